"""Pipeline checkpoints (P stages x E expert shards): by-name optimizer state, save/merge,
re-layout round trips, exact continuation, integrity errors, single-process conversion."""

import copy

import pytest
import torch

from cluster.checkpoint.sharded import (
    OPTIM_PREFIX,
    load_pipeline_full,
    make_layout,
    save_pipeline_checkpoint,
    shard_group,
    shard_optimizer_state,
    shard_tensors,
    stage_shard,
)
from cluster.checkpoint.store import flatten_state, load_checkpoint, save_checkpoint
from cluster.launch.topology import split_layers
from model import ModelArgs, Transformer
from model.optim import CombinedOptimizer, OptimConfig, load_optimizer_state_by_name, optimizer_state_by_name
from model.stage import PipelineStage, is_expert_param
from model.training import LossConfig, compute_losses, set_attention_mode

ARGS = ModelArgs.flavor("debug")
CFG = OptimConfig(warmup_steps=0)
N_EXPERTS = ARGS.n_routed_experts
N_LAYERS = ARGS.num_hidden_layers


def _batch(seed, B=2, S=64):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, ARGS.vocab_size, (B, S + 1), generator=g)
    labels = ids[:, 1:].clone()
    labels[:, 7] = -100
    return {"input_ids": ids[:, :-1], "labels": labels}


def _train(use_muon=True, steps=2):
    """A model after ``steps`` optimizer steps, its optimizer, and the grads of one more step."""
    torch.manual_seed(0)
    model = Transformer(ARGS)
    set_attention_mode(model, "sparse")
    opt = CombinedOptimizer(model, OptimConfig(warmup_steps=0, use_muon=use_muon))
    for i in range(steps + 1):
        opt.zero_grad()
        loss, _, _ = compute_losses(model, _batch(i), LossConfig(mode="sparse"))
        loss.backward()
        if i < steps:
            opt.step()
    return model, opt


def _clone(d):
    return {k: v.detach().clone() for k, v in d.items()}


def assert_tensors_equal(got, want):
    assert sorted(got) == sorted(want), (sorted(set(want) - set(got))[:5], sorted(set(got) - set(want))[:5])
    for k, w in want.items():
        g = got[k]
        assert g.dtype == w.dtype and g.shape == w.shape, (k, g.dtype, w.dtype, g.shape, w.shape)
        assert torch.equal(g, w), k


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """The single-process reference: tensors before and after one more step, its grads,
    and the same state written in the single-process trainer's checkpoint format."""
    model, opt = _train()
    model_sd, optim_sd = _clone(model.state_dict()), optimizer_state_by_name(opt)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    root = tmp_path_factory.mktemp("single")
    opt_t, skel = flatten_state(opt.state_dict())  # exactly as Trainer._state
    single = save_checkpoint(root, 2, {"model": model.state_dict(), "optimizer": opt_t},
                             {"optimizer_skeleton": skel, "model_args": ARGS.to_dict(), "loader": {}})
    opt.step()
    return dict(model=model_sd, optim=optim_sd, grads=grads, after=_clone(model.state_dict()),
                after_optim=optimizer_state_by_name(opt), single=single)


def _build(P, E, full_model, full_optim, seed=100):
    """P x E stages built from fresh (differently initialised) models, loaded from full tensors."""
    slices = split_layers(N_LAYERS, P)
    stages = {}
    for s, (lo, hi) in enumerate(slices):
        for e in range(E):
            torch.manual_seed(seed + s * E + e)
            st = PipelineStage.from_model(Transformer(ARGS), lo, hi, s == 0, s == P - 1, e, E)
            m, o = stage_shard(st, full_model, full_optim)
            st.load_state_dict(m)
            opt = CombinedOptimizer(st, CFG)
            load_optimizer_state_by_name(opt, o)
            stages[(s, e)] = (st, opt)
    return stages, make_layout(slices, E, N_EXPERTS)


def _save(root, stages, layout, step=2):
    shards = {k: shard_tensors(st, opt) for k, (st, opt) in stages.items()}
    return save_pipeline_checkpoint(root, step, shards, layout, {"model_args": ARGS.to_dict()})


def _step_and_compare(stages, ref):
    """One step of every stage optimizer with the reference grads == the reference step."""
    for st, opt in stages.values():
        for n, p in st.named_parameters():
            g = ref["grads"].get(n)
            p.grad = None if g is None else (g[st.expert_lo:st.expert_hi] if is_expert_param(n) else g).clone()
        opt.step()
        for n, t in st.state_dict().items():
            want = ref["after"][n]
            if is_expert_param(n):
                want = want[st.expert_lo:st.expert_hi]
            assert torch.equal(t, want), n
        want_optim = shard_optimizer_state(ref["after_optim"], {n for n, _ in st.named_parameters()},
                                           st.expert_lo, st.expert_hi)
        assert_tensors_equal(optimizer_state_by_name(opt), want_optim)


# ---------------------------------------------------------------- by-name optimizer state
def test_state_by_name_round_trip_steps_bit_identically(ref):
    optim = ref["optim"]
    assert any(k.endswith("::momentum_buffer") for k in optim)
    steps = [k for k in optim if k.endswith("::step")]
    assert steps and all(optim[k].dim() == 0 for k in steps)
    torch.manual_seed(7)
    model = Transformer(ARGS)
    model.load_state_dict(ref["model"])
    opt = CombinedOptimizer(model, CFG)
    load_optimizer_state_by_name(opt, optim)
    st = opt.adam.state[dict(model.named_parameters())["norm.weight"]]
    assert st["step"].dtype == torch.float32 and st["step"].dim() == 0 and float(st["step"]) == 2.0
    assert st["exp_avg"].data_ptr() != optim["norm.weight::exp_avg"].data_ptr()  # copied, not aliased
    assert_tensors_equal(optimizer_state_by_name(opt), optim)
    # parameters without entries get no state (fresh), replacing what they had
    opt2 = CombinedOptimizer(model, CFG)
    load_optimizer_state_by_name(opt2, optim)
    load_optimizer_state_by_name(opt2, {k: v for k, v in optim.items() if not k.startswith("norm.weight::")})
    assert dict(model.named_parameters())["norm.weight"] not in opt2.adam.state
    assert len(optimizer_state_by_name(opt2)) == len(optim) - 3
    for n, p in model.named_parameters():
        p.grad = ref["grads"][n].clone() if n in ref["grads"] else None
    opt.step()
    assert_tensors_equal(_clone(model.state_dict()), ref["after"])
    assert_tensors_equal(optimizer_state_by_name(opt), ref["after_optim"])


def test_load_state_by_name_errors_change_nothing(ref):
    model = Transformer(ARGS)
    opt = CombinedOptimizer(model, CFG)
    load_optimizer_state_by_name(opt, ref["optim"])
    before = optimizer_state_by_name(opt)
    bad = {**ref["optim"], "layers.9.nope::exp_avg": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"layers\.9\.nope::exp_avg"):
        load_optimizer_state_by_name(opt, bad)
    bad = {**ref["optim"], "norm.weight::exp_avg": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"norm\.weight::exp_avg.*shape"):
        load_optimizer_state_by_name(opt, bad)
    bad = {**ref["optim"], "norm.weight::momentum_buffer": torch.zeros(ARGS.hidden_size)}
    with pytest.raises(ValueError, match="AdamW"):
        load_optimizer_state_by_name(opt, bad)
    bad = {k: v for k, v in ref["optim"].items() if k != "norm.weight::step"}
    with pytest.raises(ValueError, match=r"norm\.weight.*incomplete"):
        load_optimizer_state_by_name(opt, bad)
    assert_tensors_equal(optimizer_state_by_name(opt), before)
    load_optimizer_state_by_name(opt, {})
    assert optimizer_state_by_name(opt) == {}


def test_expert_optimizer_keys_shard_and_merge():
    assert is_expert_param("layers.1.mlp.experts.gate_up_proj::exp_avg")
    assert is_expert_param("mtp.0.block.mlp.experts.down_proj::step")
    assert not is_expert_param("layers.1.mlp.gate.weight::exp_avg")
    full = {"layers.1.mlp.experts.down_proj::exp_avg": torch.arange(8.0).reshape(8, 1),
            "layers.1.mlp.experts.down_proj::step": torch.tensor(3.0)}
    part = shard_optimizer_state(full, {"layers.1.mlp.experts.down_proj"}, 4, 8)
    assert part["layers.1.mlp.experts.down_proj::exp_avg"].flatten().tolist() == [4, 5, 6, 7]
    assert part["layers.1.mlp.experts.down_proj::step"].dim() == 0
    assert shard_optimizer_state(full, {"other"}, 0, 4) == {}


# ---------------------------------------------------------------- pipeline checkpoints
def test_relayout_round_trips_and_continues_exactly(ref, tmp_path):
    stages, layout = _build(2, 2, ref["model"], ref["optim"])
    path = _save(tmp_path / "a", stages, layout)
    groups, meta = load_checkpoint(path)
    assert sorted(groups) == ["stage0-ep0", "stage0-ep1", "stage1-ep0", "stage1-ep1"]
    assert meta["layout"]["shards"]["stage1-ep1"] == {"stage": 1, "ep_rank": 1, "expert_lo": 4, "expert_hi": 8}
    assert "embed_tokens.weight" in groups["stage1-ep0"]  # the tied copy of the last stage
    assert groups["stage0-ep1"][OPTIM_PREFIX + "layers.1.mlp.experts.gate_up_proj::momentum_buffer"].shape[0] == 4
    full_m, full_o, meta = load_pipeline_full(path, model_args=ARGS)
    assert meta["step"] == 2
    assert_tensors_equal(full_m, ref["model"])
    assert_tensors_equal(full_o, ref["optim"])

    one, layout1 = _build(1, 1, full_m, full_o, seed=200)
    m1, o1, _ = load_pipeline_full(_save(tmp_path / "b", one, layout1))
    assert_tensors_equal(m1, ref["model"])
    assert_tensors_equal(o1, ref["optim"])

    four, layout4 = _build(4, 2, m1, o1, seed=300)
    m4, o4, _ = load_pipeline_full(_save(tmp_path / "c", four, layout4))
    assert_tensors_equal(m4, ref["model"])
    assert_tensors_equal(o4, ref["optim"])

    _step_and_compare(four, ref)
    _step_and_compare(stages, ref)


@pytest.fixture()
def saved(ref, tmp_path):
    stages, layout = _build(2, 2, ref["model"], ref["optim"])
    shards = {k: shard_tensors(st, opt) for k, (st, opt) in stages.items()}
    return tmp_path, shards, layout


def test_corrupt_or_missing_shard_group(saved):
    root, shards, layout = saved
    path = save_pipeline_checkpoint(root / "a", 2, shards, layout, {"model_args": ARGS.to_dict()})
    f = path / "stage1-ep0.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.chmod(0o644)
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"stage1-ep0\.safetensors is corrupt"):
        load_pipeline_full(path)
    # a layout entry whose group was never written
    partial = {shard_group(*k): v for k, v in shards.items() if k != (1, 1)}
    p2 = save_checkpoint(root / "b", 2, partial, {"layout": layout, "model_args": ARGS.to_dict()})
    with pytest.raises(ValueError, match=r"stage1-ep1.*not in the checkpoint"):
        load_pipeline_full(p2)
    # shard groups without a layout
    p3 = save_checkpoint(root / "c", 2, {shard_group(*k): v for k, v in shards.items()}, {})
    with pytest.raises(ValueError, match="no pipeline 'layout'"):
        load_pipeline_full(p3)
    # save refuses shards that do not match the layout
    with pytest.raises(ValueError, match=r"no tensors for \['stage1-ep1'\]"):
        save_pipeline_checkpoint(root / "d", 2, {k: v for k, v in shards.items() if k != (1, 1)}, layout, {})
    bad_layout = copy.deepcopy(layout)
    bad_layout["shards"]["stage0-ep1"]["expert_lo"] = 3
    with pytest.raises(ValueError, match="stage 0 do not tile"):
        save_pipeline_checkpoint(root / "d", 2, shards, bad_layout, {})


def test_replicated_copies_must_agree(saved):
    root, shards, layout = saved
    for i, (key, name) in enumerate([((0, 1), "layers.0.input_layernorm.weight"),
                                     ((1, 0), "embed_tokens.weight"),
                                     ((1, 1), OPTIM_PREFIX + "norm.weight::exp_avg")]):
        bad = {k: dict(v) for k, v in shards.items()}
        bad[key][name] = bad[key][name].clone()
        bad[key][name].view(-1)[0] += 1e-6
        path = save_pipeline_checkpoint(root / str(i), 2, bad, layout, {})
        with pytest.raises(ValueError, match=rf"replicated tensor {name.replace('.', '[.]')} differs"):
            load_pipeline_full(path)


def test_model_args_mismatch(saved):
    root, shards, layout = saved
    path = save_pipeline_checkpoint(root / "a", 2, shards, layout, {"model_args": ARGS.to_dict()})
    with pytest.raises(ValueError, match="vocab_size"):
        load_pipeline_full(path, model_args=ModelArgs.flavor("debug", vocab_size=256))
    other = ModelArgs.flavor("debug", n_routed_experts=16).to_dict()
    with pytest.raises(ValueError, match="does not match model_args"):
        save_pipeline_checkpoint(root / "b", 2, shards, layout, {"model_args": other})
    p = save_checkpoint(root / "c", 2, {shard_group(*k): v for k, v in shards.items()},
                        {"layout": layout, "model_args": ModelArgs.flavor("debug", hidden_size=64).to_dict()})
    with pytest.raises(ValueError, match="shape"):
        load_pipeline_full(p)


# ---------------------------------------------------------------- single-process checkpoints
def test_single_process_checkpoint_converts(ref):
    m, o, meta = load_pipeline_full(ref["single"])
    assert meta["optimizer_converted"] is True
    assert_tensors_equal(m, ref["model"])
    assert_tensors_equal(o, ref["optim"])
    stages, _ = _build(2, 2, m, o)  # and it re-shards into a pipeline that continues exactly
    _step_and_compare(stages, ref)


def test_single_process_adamw_only_converts(tmp_path):
    model, opt = _train(use_muon=False, steps=1)
    opt_t, skel = flatten_state(opt.state_dict())
    path = save_checkpoint(tmp_path, 1, {"model": model.state_dict(), "optimizer": opt_t},
                           {"optimizer_skeleton": skel, "model_args": ARGS.to_dict()})
    m, o, meta = load_pipeline_full(path)
    assert meta["optimizer_converted"] is True
    assert_tensors_equal(o, optimizer_state_by_name(opt))
    assert "layers.1.mlp.experts.gate_up_proj::step" in o
    p2 = save_checkpoint(tmp_path / "w", 1, {"model": model.state_dict()}, {"model_args": ARGS.to_dict()})
    m, o, meta = load_pipeline_full(p2)
    assert o == {} and meta["optimizer_converted"] is False


# ---------------------------------------------------------------- data-parallel (ZeRO-1) layouts
def _zero1_groups(shards: dict, D: int) -> dict:
    """``shards`` of a D = 1 layout split as D replicas write them: replica 0 the model and the
    optimizer state it owns, replica d > 0 only the state it owns (``assign_owners``)."""
    from comm.data_parallel import assign_owners

    groups = {}
    for (s, e), tensors in shards.items():
        optim = {k: v for k, v in tensors.items() if k.startswith(OPTIM_PREFIX)}
        names = {k[len(OPTIM_PREFIX):].rpartition("::")[0] for k in optim}
        owners = assign_owners({n: sum(v.numel() for k, v in optim.items() if k.startswith(OPTIM_PREFIX + n + "::"))
                                for n in names}, D)
        for d in range(D):
            part = {k: v for k, v in optim.items() if owners[k[len(OPTIM_PREFIX):].rpartition("::")[0]] == d}
            if d == 0:
                part.update({k: v for k, v in tensors.items() if not k.startswith(OPTIM_PREFIX)})
            groups[shard_group(s, e, d)] = part
    return groups


def test_data_parallel_checkpoint_merges_the_replicas_optimizer_parts(saved, ref):
    from cluster.checkpoint.sharded import read_meta, shard_sources
    from model.shard_io import read_stage_tensors

    root, shards, _ = saved
    layout = make_layout(split_layers(N_LAYERS, 2), 2, N_EXPERTS, data_parallel=2)
    assert sorted(layout["shards"]) == ["stage0-ep0", "stage0-ep0-dp1", "stage0-ep1", "stage0-ep1-dp1",
                                        "stage1-ep0", "stage1-ep0-dp1", "stage1-ep1", "stage1-ep1-dp1"]
    groups = _zero1_groups(shards, 2)
    assert all(groups[shard_group(s, e, 1)] for s in range(2) for e in range(2))  # each replica owns some
    path = save_checkpoint(root / "dp", 2, groups, {"layout": layout, "model_args": ARGS.to_dict()})
    full_m, full_o, _ = load_pipeline_full(path, model_args=ARGS)
    assert_tensors_equal(full_m, ref["model"])
    assert_tensors_equal(full_o, ref["optim"])
    # an actor of a 1 x 1 layout reads the whole optimizer state straight from the 8 files
    sources = shard_sources(path, read_meta(path))
    assert len(sources) == 8
    torch.manual_seed(7)
    one = PipelineStage.from_model(Transformer(ARGS), 0, N_LAYERS, True, True, 0, 1)
    m, o = read_stage_tensors(sources, {n: tuple(t.shape) for n, t in one.state_dict().items()},
                              {n for n, _ in one.named_parameters()}, 0, N_EXPERTS, is_expert=is_expert_param)
    assert_tensors_equal(m, ref["model"])
    assert_tensors_equal(o, ref["optim"])

    # a replica group that holds model tensors, or repeats another replica's state, is refused
    bad = {k: dict(v) for k, v in groups.items()}
    bad["stage1-ep1-dp1"]["norm.weight"] = groups["stage1-ep1"]["norm.weight"]
    p2 = save_checkpoint(root / "bad", 2, bad, {"layout": layout, "model_args": ARGS.to_dict()})
    with pytest.raises(ValueError, match=r"replica group stage1-ep1-dp1 must hold only optimizer state"):
        load_pipeline_full(p2)
    # a layout whose replica entry covers other experts than replica 0's
    wrong = copy.deepcopy(layout)
    wrong["shards"]["stage0-ep1-dp1"]["expert_lo"] = 0
    p3 = save_checkpoint(root / "w", 2, groups, {"layout": wrong, "model_args": ARGS.to_dict()})
    with pytest.raises(ValueError, match=r"replica shard stage0-ep1-dp1 .* must cover what stage0-ep1 does"):
        load_pipeline_full(p3)
