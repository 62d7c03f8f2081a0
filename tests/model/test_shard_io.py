"""``model.shard_io``: a stage of any layout reads its own tensors out of another layout's shard files."""

from __future__ import annotations

import pytest
import torch

from model import ModelArgs, Transformer
from model.safe_io import write_safetensors
from model.shard_io import read_stage_tensors
from model.stage import PipelineStage, is_expert_param, merge_state_dicts


def _split(L: int, P: int) -> list[tuple[int, int]]:
    cuts = [round(i * L / P) for i in range(P + 1)]
    return list(zip(cuts[:-1], cuts[1:], strict=True))


def _fake_optim(stage: PipelineStage, seed: int) -> dict[str, torch.Tensor]:
    """Optimizer-like state: a tensor per parameter (a function of its name and experts) and a 0-d step."""
    out = {}
    for n, p in stage.named_parameters():
        rows = torch.arange(stage.expert_lo, stage.expert_hi) if is_expert_param(n) else None
        base = float(len(n) + seed)
        t = torch.full_like(p, base)
        if rows is not None:
            t += rows.view(-1, *[1] * (p.dim() - 1)).float()
        out[f"optim/{n}::momentum"] = t
        out[f"optim/{n}::step"] = torch.tensor(7.0)
    return out


def _write_layout(tmp, args, P, E):
    sources, full_optim = [], []
    for s, (lo, hi) in enumerate(_split(args.num_hidden_layers, P)):
        for e in range(E):
            st = PipelineStage.build(args, lo, hi, e, E, seed=1)
            optim = _fake_optim(st, 0)
            path = tmp / f"stage{s}-ep{e}.safetensors"
            write_safetensors(path, {**st.state_dict(), **optim})
            sources.append((str(path), st.expert_lo, st.expert_hi))
            full_optim.append(({k[len("optim/"):]: v for k, v in optim.items()}, st.expert_lo))
    return sources, merge_state_dicts(full_optim, args.n_routed_experts)


@pytest.mark.parametrize("src,dst", [((2, 2), (4, 2)), ((2, 2), (1, 1)), ((4, 2), (2, 8)), ((1, 1), (2, 2))])
def test_any_layout_reads_into_any_other(tmp_path, src, dst):
    args = ModelArgs.flavor("debug")
    sources, full_optim = _write_layout(tmp_path, args, *src)
    want = Transformer.build(args, seed=1).state_dict()
    P, E = dst
    for lo, hi in _split(args.num_hidden_layers, P):
        for e in range(E):
            st = PipelineStage.build(args, lo, hi, e, E, seed=99)  # other values: the load must replace them
            shapes = {n: tuple(t.shape) for n, t in st.state_dict().items()}
            names = {n for n, _ in st.named_parameters()}
            model_t, optim_t = read_stage_tensors(sources, shapes, names, st.expert_lo, st.expert_hi,
                                                  is_expert=is_expert_param)
            assert set(model_t) == set(shapes)
            for k, t in model_t.items():
                ref = want[k][st.expert_lo:st.expert_hi] if is_expert_param(k) else want[k]
                assert torch.equal(t, ref), k
            assert {k.split("::")[0] for k in optim_t} == names
            for k, t in optim_t.items():
                ref = full_optim[k]
                if is_expert_param(k) and ref.dim():
                    ref = ref[st.expert_lo:st.expert_hi]
                assert torch.equal(t, ref), k
            st.load_state_dict(model_t)  # what StageWorker.load_shards does


def test_missing_tensors_and_uncovered_experts_are_named(tmp_path):
    args = ModelArgs.flavor("debug")
    sources, _ = _write_layout(tmp_path, args, 2, 2)
    st = PipelineStage.build(args, 0, 2, 0, 1, seed=0)
    shapes = {n: tuple(t.shape) for n, t in st.state_dict().items()}
    with pytest.raises(ValueError, match=r"cover experts up to 4, this stage needs \[0, 8\)"):
        read_stage_tensors(sources[:1] + sources[2:], shapes, set(), 0, 8, is_expert=is_expert_param)
    with pytest.raises(ValueError, match="lacks 1 tensor"):
        read_stage_tensors(sources, {**shapes, "layers.0.extra": (3,)}, set(), 0, 8, is_expert=is_expert_param)
    with pytest.raises(ValueError, match="norm.weight has shape"):
        bad = PipelineStage.build(args, 2, 4, 0, 1, seed=0)
        shapes = {n: (1,) if n == "norm.weight" else tuple(t.shape) for n, t in bad.state_dict().items()}
        read_stage_tensors(sources, shapes, set(), 0, 8, is_expert=is_expert_param)
