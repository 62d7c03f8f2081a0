"""Checkpoint IO: HF save_pretrained -> load_hf -> save_hf -> HF from_pretrained, sharded or not."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import load_hf, save_hf
from tests.model.hf_utils import hf_pair


@pytest.fixture(scope="module")
def pair():
    return hf_pair("c4_16_w32", seed=5)


def _ids(vocab, S=70, seed=0):
    return torch.randint(0, vocab, (2, S), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shard", [None, "20KB"])
def test_round_trip(pair, tmp_path, shard):
    from transformers import DeepseekV4ForCausalLM

    hf, _ = pair
    ids = _ids(hf.config.vocab_size)
    kw = {"max_shard_size": shard} if shard else {}
    hf.save_pretrained(tmp_path / "hf", **kw)
    if shard:
        assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    ours = load_hf(tmp_path / "hf").eval()
    with torch.no_grad():
        ref = hf(ids).logits
        assert (ours(ids) - ref).abs().max().item() <= 1e-5
    save_hf(ours, tmp_path / "ours", max_shard_bytes=30_000 if shard else None)
    back = DeepseekV4ForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(back(ids).logits, ref)
    # MTP weights are ours only (HF drops them); they survive our own round trip exactly.
    again = load_hf(tmp_path / "ours", strict_mtp=True)
    for k, v in ours.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def test_mtp_missing_is_allowed_unless_strict(pair, tmp_path):
    hf, _ = pair
    hf.save_pretrained(tmp_path)
    load_hf(tmp_path)
    with pytest.raises(ValueError, match="lacks"):
        load_hf(tmp_path, strict_mtp=True)


def test_bad_checkpoints_raise_clear_errors(pair, tmp_path):
    hf, ours = pair
    with pytest.raises(ValueError, match="no config.json"):
        load_hf(tmp_path)
    save_hf(ours, tmp_path / "ok")
    weights = load_file(tmp_path / "ok" / "model.safetensors")

    def variant(name, tensors, config=None):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(config or (tmp_path / "ok" / "config.json").read_text())
        save_file(tensors, d / "model.safetensors")
        return d

    missing = dict(weights)
    missing.pop("model.layers.1.self_attn.kv_proj.weight")
    with pytest.raises(ValueError, match="kv_proj"):
        load_hf(variant("missing", missing))
    wrong = dict(weights)
    wrong["model.norm.weight"] = torch.ones(3)
    with pytest.raises(ValueError, match="shape"):
        load_hf(variant("shape", wrong))
    extra = dict(weights)
    extra["model.layers.9.foo"] = torch.ones(1)
    with pytest.raises(ValueError, match="unexpected"):
        load_hf(variant("extra", extra))
    cfg = json.loads((tmp_path / "ok" / "config.json").read_text())
    cfg["index_topk"] = 0
    with pytest.raises(ValueError, match="index_topk"):
        load_hf(variant("badcfg", weights, json.dumps(cfg)))
    with pytest.raises(ValueError, match="invalid JSON"):
        load_hf(variant("badjson", weights, "{not json"))


def test_save_replaces_whole_directory_atomically(pair, tmp_path, monkeypatch):
    import model.hf_io as hf_io

    _, ours = pair
    ckpt = tmp_path / "ckpt"
    save_hf(ours, ckpt, max_shard_bytes=30_000)
    (ckpt / "tokenizer.json").write_text("{}")  # user files beside the weights survive re-saves
    n_shards = len(list(ckpt.glob("model-*.safetensors")))
    assert n_shards > 2
    save_hf(ours, ckpt)  # now unsharded: no stale shards or index may remain
    assert sorted(f.name for f in ckpt.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert all((f.stat().st_mode & 0o777) == 0o644 for f in ckpt.iterdir())

    # a save that dies half way leaves the previous checkpoint untouched and no debris
    before = {f.name: f.read_bytes() for f in ckpt.iterdir()}
    calls = {"n": 0}
    real_save_file = hf_io.save_file

    def dying_save_file(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real_save_file(*a, **k)

    monkeypatch.setattr(hf_io, "save_file", dying_save_file)
    other = type(ours)(ours.args)
    with pytest.raises(KeyboardInterrupt):
        save_hf(other, ckpt, max_shard_bytes=30_000)
    assert {f.name: f.read_bytes() for f in ckpt.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    load_hf(ckpt, strict_mtp=True)


def test_save_refuses_to_replace_a_non_checkpoint_directory(pair, tmp_path):
    _, ours = pair
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="refusing"):
        save_hf(ours, tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_corrupt_files_are_clear_errors(pair, tmp_path):
    _, ours = pair
    save_hf(ours, tmp_path / "c")
    f = tmp_path / "c" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_hf(tmp_path / "c")
    (tmp_path / "c" / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        load_hf(tmp_path / "c")


def test_loads_deepseek_hub_naming(pair, tmp_path):
    """The hub checkpoints use DeepSeek's names with no ``model.`` prefix (``embed.weight``, ``hc_head_fn``...)."""
    hf, _ = pair
    hf.save_pretrained(tmp_path / "hf")
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    renamed = {}
    for k, v in tensors.items():
        k = k.removeprefix("model.")
        k = {"embed_tokens.weight": "embed.weight"}.get(k, k)
        k = k.replace("hc_head.hc_", "hc_head_")
        renamed[k] = v
    assert "layers.0.ffn.experts.0.w1.weight" in renamed and "embed.weight" in renamed
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    save_file(renamed, tmp_path / "hub" / "model.safetensors")
    ours = load_hf(tmp_path / "hub").eval()
    ids = _ids(hf.config.vocab_size, S=40)
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("naming", ["deepseek", "stacked"])
def test_each_stage_reads_only_its_share(pair, tmp_path, naming):
    """``read_hf_stage_tensors``: every (stage, expert shard) of a 2 x 2 layout reads exactly its
    tensors (expert rows by range) from DeepSeek's per-expert naming (what ``save_pretrained``
    writes) and from our stacked one (``save_hf``), equal to the slices of the whole model."""
    from model.hf_io import read_hf_stage_tensors
    from model.stage import PipelineStage, is_expert_param

    hf, _ = pair
    hf.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    src = tmp_path / "hf"
    whole = load_hf(src)
    if naming == "stacked":
        save_hf(whole, tmp_path / "ours")
        src = tmp_path / "ours"
    L = whole.args.num_hidden_layers
    for s, (lo, hi) in enumerate([(0, L // 2), (L // 2, L)]):
        for e in range(2):
            want = PipelineStage.from_model(copy.deepcopy(whole), lo, hi, s == 0, s == 1, e, 2)  # it slices in place
            sd = want.state_dict()
            got = read_hf_stage_tensors(src, {n: tuple(t.shape) for n, t in sd.items()}, want.expert_lo,
                                        want.expert_hi, is_expert=is_expert_param)
            left_out = set(sd) - set(got)  # HF's save_pretrained writes no MTP block: it keeps its init
            assert set(got) <= set(sd) and (not left_out if naming == "stacked" else
                                            all(n.startswith("mtp.") for n in left_out)), (s, e, sorted(left_out))
            for n, t in got.items():
                assert torch.equal(t, sd[n]), (s, e, n)
    with pytest.raises(ValueError, match="needs"):
        read_hf_stage_tensors(src, {"norm.weight": (3,)}, 0, 1, is_expert=is_expert_param)
    with pytest.raises(ValueError, match="lacks 1 tensor"):
        read_hf_stage_tensors(src, {"layers.99.input_layernorm.weight": (3,)}, 0, 1, is_expert=is_expert_param)
