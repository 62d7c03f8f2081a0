"""Checkpoint IO in the Hugging Face ``save_pretrained`` format.

A checkpoint directory holds ``config.json`` (a ``DeepseekV4Config``) and either
``model.safetensors`` or shards listed in ``model.safetensors.index.json``.
``load_hf`` reads both tensor-name dialects: DeepSeek's original names (the hub
checkpoints, and what ``transformers`` ``save_pretrained`` writes: ``layers.N.attn.wq_a``,
per-expert ``ffn.experts.E.w1/w2/w3``, ...) and HF's in-memory names, which are
ours (``model.layers.N.self_attn.q_a_proj``, stacked ``mlp.experts.gate_up_proj``).
``save_hf`` writes the in-memory names, ``lm_head.weight``, and ``mtp.<i>.*`` for
the MTP module (which ``transformers`` ignores on load).
Checkpoints are never unpickled: only JSON and safetensors are read. A directory with
only ``pytorch_model.bin`` / ``*.pt`` weights, an index naming a non-safetensors shard, or
a pickle saved under a ``.safetensors`` name is refused (``model.safe_io``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import ModelArgs
from .safe_io import NEVER_UNPICKLED, SAFETENSORS_ALLOWED, open_safetensors
from .transformer import Transformer

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def to_hf_name(name: str) -> str:
    """Our parameter name -> the key ``save_hf`` writes (HF's in-memory naming)."""
    if name.startswith(("lm_head.", "mtp.")):
        return name
    return "model." + name


# DeepSeek's original tensor names (the hub checkpoints, and what ``transformers``
# ``save_pretrained`` writes back out) -> HF's in-memory names, which are ours.
# Applied in order to the key without its ``model.`` prefix.
_DEEPSEEK_RENAMES: list[tuple[str, str]] = [
    (r"\.attn\.", ".self_attn."),
    (r"\.ffn\.", ".mlp."),
    (r"\.indexer\.compressor\.", ".compressor.indexer."),
    (r"^embed\.weight$", "embed_tokens.weight"),
    (r"^head\.weight$", "lm_head.weight"),
    (r"^hc_head_(fn|base|scale)$", r"hc_head.hc_\1"),
    (r"\.attn_norm\.", ".input_layernorm."),
    (r"\.ffn_norm\.", ".post_attention_layernorm."),
    (r"\.hc_attn_(fn|base|scale)$", r".attn_hc.\1"),
    (r"\.hc_ffn_(fn|base|scale)$", r".ffn_hc.\1"),
    (r"\.attn_sink$", ".sinks"),
    (r"\.indexer\.weights_proj\.", ".compressor.indexer.scorer.weights_proj."),
    (r"\.indexer\.wq_b\.", ".compressor.indexer.q_b_proj."),
    (r"\.norm\.", ".kv_norm."),
    (r"\.ape$", ".position_bias"),
    (r"\.wq_a\.", ".q_a_proj."),
    (r"\.wq_b\.", ".q_b_proj."),
    (r"\.wkv\.", ".kv_proj."),
    (r"\.wgate\.", ".gate_proj."),
    (r"\.wo_a\.", ".o_a_proj."),
    (r"\.wo_b\.", ".o_b_proj."),
    (r"\.q_norm\.", ".q_a_norm."),
    (r"\.gate\.bias$", ".gate.e_score_correction_bias"),
    (r"\.shared_experts\.w1\.", ".shared_experts.gate_proj."),
    (r"\.shared_experts\.w2\.", ".shared_experts.down_proj."),
    (r"\.shared_experts\.w3\.", ".shared_experts.up_proj."),
]
_EXPERT_KEY = re.compile(r"^(.*\.experts)\.(\d+)\.(w1|w2|w3)\.weight$")


def from_hf_name(key: str) -> str:
    """A checkpoint key (HF in-memory naming or DeepSeek's original naming) -> our name.

    Per-expert DeepSeek keys (``...experts.<e>.w1.weight``) are returned unchanged;
    ``load_hf`` stacks them into ``gate_up_proj`` / ``down_proj``.
    """
    if key.startswith("mtp."):
        return key
    name = key[len("model."):] if key.startswith("model.") else key
    if _EXPERT_KEY.match(name) or name in _OUR_TOP_LEVEL:
        return name
    for pat, rep in _DEEPSEEK_RENAMES:
        name = re.sub(pat, rep, name)
    return name


_OUR_TOP_LEVEL = {"norm.weight", "lm_head.weight", "embed_tokens.weight"}


def _merge_experts(loaded: dict[str, torch.Tensor], n_experts: int, source: str) -> None:
    """Stack DeepSeek per-expert ``w1``/``w3`` (gate/up) and ``w2`` (down) matrices in place."""
    groups: dict[str, dict[tuple[int, str], torch.Tensor]] = {}
    for name in [k for k in loaded if _EXPERT_KEY.match(k)]:
        prefix, e, w = _EXPERT_KEY.match(name).groups()
        groups.setdefault(from_hf_name(prefix + ".x").rsplit(".", 1)[0], {})[(int(e), w)] = loaded.pop(name)
    for prefix, mats in groups.items():
        got = {e for e, _ in mats}
        if got != set(range(n_experts)) or len(mats) != 3 * n_experts:
            raise ValueError(f"{source}: {prefix} has per-expert weights for experts {sorted(got)[:8]}..., "
                             f"expected w1/w2/w3 for all {n_experts} experts")
        loaded[prefix + ".gate_up_proj"] = torch.stack(
            [torch.cat([mats[(e, "w1")], mats[(e, "w3")]], dim=0) for e in range(n_experts)])
        loaded[prefix + ".down_proj"] = torch.stack([mats[(e, "w2")] for e in range(n_experts)])


def _checkpoint_files(path: Path) -> list[Path]:
    if (path / INDEX_NAME).is_file():
        try:
            index = json.loads((path / INDEX_NAME).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path / INDEX_NAME}: invalid JSON: {e}") from None
        if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
            raise ValueError(f"{path / INDEX_NAME}: missing 'weight_map'")
        shards = sorted(set(index["weight_map"].values()))
        for f in shards:
            if not isinstance(f, str) or Path(f).name != f or f in (".", ".."):
                raise ValueError(f"{path / INDEX_NAME}: shard {f!r} is not a plain file name in {path}")
            if not f.endswith(".safetensors"):
                raise ValueError(f"{path / INDEX_NAME}: refused shard {f!r}: {NEVER_UNPICKLED}; "
                                 f"{SAFETENSORS_ALLOWED}")
        return [path / f for f in shards]
    if (path / SINGLE_NAME).is_file():
        return [path / SINGLE_NAME]
    pickled = sorted(f.name for f in path.iterdir()
                     if f.is_file() and (f.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")
                                         or f.name.endswith(".bin.index.json")))
    if pickled:
        raise ValueError(f"{path}: refused: the weights are pickle-based PyTorch files {pickled[:4]} and there is "
                         f"no {SINGLE_NAME} or {INDEX_NAME}; {NEVER_UNPICKLED}; {SAFETENSORS_ALLOWED}")
    raise ValueError(f"{path}: no {SINGLE_NAME} or {INDEX_NAME} found (expected a directory written by "
                     "save_pretrained / model.save_hf)")


def load_hf(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
            strict_mtp: bool = False) -> Transformer:
    """Load a ``Transformer`` from an HF-format directory.

    Args:
        path: directory with ``config.json`` + safetensors (sharded or not).
        dtype: parameter dtype (float32 on CPU); float32-kept HF tensors (norms,
            mHC, sinks, biases) are also loaded in ``dtype``.
        strict_mtp: if True a checkpoint without ``mtp.*`` weights is an error;
            otherwise the MTP module keeps its fresh initialisation.
    Raises:
        ValueError: missing directory/config, unknown config fields, missing or
            unexpected tensors, or shape mismatches (each named); pickle-based
            weights (``pytorch_model.bin``, ``*.pt``, a pickle under a safetensors
            name), which are never loaded.
    """
    p = Path(path)
    if not (p / "config.json").is_file():
        raise ValueError(f"{p}: not a checkpoint directory (no config.json)")
    try:
        cfg = json.loads((p / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{p / 'config.json'}: invalid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{p / 'config.json'}: expected a JSON object, got {type(cfg).__name__}")
    if cfg.get("model_type", "deepseek_v4") != "deepseek_v4":
        raise ValueError(f"{p}: model_type is {cfg.get('model_type')!r}, expected 'deepseek_v4'")
    args = ModelArgs.from_hf_config(cfg)
    with torch.device(device):
        model = Transformer(args)
    model.to(dtype)
    expected = model.state_dict()
    raw: dict[str, torch.Tensor] = {}
    for f in _checkpoint_files(p):
        if not f.is_file():
            raise ValueError(f"{p}: shard {f.name} listed in the index is missing")
        with open_safetensors(f, device=device) as sf:  # a pickle under any name is refused here
            for key in sf.keys():
                raw[from_hf_name(key)] = sf.get_tensor(key)
    _merge_experts(raw, args.n_routed_experts, str(p))
    loaded: dict[str, torch.Tensor] = {}
    ignored_mtp = []
    for name, t in raw.items():
        if name not in expected:
            if name.startswith("mtp.") and not strict_mtp:
                ignored_mtp.append(name)
                continue
            raise ValueError(f"{p}: unexpected tensor {to_hf_name(name)!r} (not part of this architecture)")
        if tuple(t.shape) != tuple(expected[name].shape):
            raise ValueError(f"{p}: tensor {to_hf_name(name)!r} has shape {tuple(t.shape)}, the config implies "
                             f"{tuple(expected[name].shape)}")
        loaded[name] = t.to(expected[name].dtype)
    if ignored_mtp:
        warnings.warn(f"{p}: {len(ignored_mtp)} MTP tensor(s) in a layout this model does not know were ignored "
                      f"(e.g. {ignored_mtp[0]!r}); the MTP module keeps its initialisation", stacklevel=2)
    missing = sorted(set(expected) - set(loaded))
    missing_non_mtp = [k for k in missing if not k.startswith("mtp.")]
    if missing_non_mtp or (strict_mtp and missing):
        shown = (missing_non_mtp or missing)[:10]
        raise ValueError(f"{p}: checkpoint lacks {len(missing_non_mtp or missing)} tensor(s), e.g. "
                         f"{[to_hf_name(k) for k in shown]}")
    model.load_state_dict(loaded, strict=False)
    return model


def read_hf_stage_tensors(path: str | os.PathLike, shapes: dict[str, tuple], expert_lo: int, expert_hi: int, *,
                          is_expert, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """One pipeline stage's tensors straight from an HF-format directory, reading only what it owns.

    For every name of ``shapes`` (our names, e.g. a ``model.stage.PipelineStage.state_dict()``'s)
    the checkpoint key that holds it is found (HF in-memory names, or DeepSeek's original ones,
    :func:`from_hf_name`); routed-expert tensors (``is_expert(name)``) are read as rows
    ``[expert_lo, expert_hi)`` only: stacked HF tensors through ``safe_open(...).get_slice``,
    DeepSeek's per-expert ``experts.<e>.w1/w2/w3`` matrices only for the experts in range
    (``w1``/``w3`` concatenated into ``gate_up_proj``). Files are memory-mapped: a stage of a
    large model reads its share of the bytes, not the checkpoint. MTP tensors the checkpoint
    lacks are left out (the caller keeps their initialisation, as :func:`load_hf` does).

    Returns ``name -> tensor`` in ``dtype``. Raises ValueError: a missing non-MTP tensor or a
    shape that differs from ``shapes`` (named), or what :func:`load_hf` refuses (pickles, a bad
    index).
    """
    from contextlib import ExitStack

    p = Path(path)
    out: dict[str, torch.Tensor] = {}
    with ExitStack() as stack:
        where: dict[str, tuple] = {}  # our name -> (safe_open handle, checkpoint key)
        per_expert: dict[str, dict[tuple[int, str], tuple]] = {}  # stacked name prefix -> (e, w) -> (sf, key)
        for f in _checkpoint_files(p):
            if not f.is_file():
                raise ValueError(f"{p}: shard {f.name} listed in the index is missing")
            sf = stack.enter_context(open_safetensors(f))
            for key in sf.keys():
                name = from_hf_name(key)
                m = _EXPERT_KEY.match(name)
                if m:
                    prefix, e, w = m.groups()
                    per_expert.setdefault(from_hf_name(prefix + ".x").rsplit(".", 1)[0], {})[(int(e), w)] = (sf, key)
                else:
                    where[name] = (sf, key)
        missing = []
        for name, shape in shapes.items():
            expert = is_expert(name)
            if name in where:
                sf, key = where[name]
                t = sf.get_slice(key)[expert_lo:expert_hi] if expert else sf.get_tensor(key)
            elif expert and name.rsplit(".", 1)[0] in per_expert:
                mats, kind = per_expert[name.rsplit(".", 1)[0]], name.rsplit(".", 1)[1]
                parts = ("w1", "w3") if kind == "gate_up_proj" else ("w2",)
                try:
                    rows = [torch.cat([mats[(e, w)][0].get_tensor(mats[(e, w)][1]) for w in parts], dim=0)
                            for e in range(expert_lo, expert_hi)]
                except KeyError as err:
                    raise ValueError(f"{p}: {name.rsplit('.', 1)[0]} lacks the per-expert weight {err.args[0]} "
                                     f"of an expert in [{expert_lo}, {expert_hi})") from None
                t = torch.stack(rows)
            else:
                missing.append(name)
                continue
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"{p}: tensor {to_hf_name(name)!r} gives shape {tuple(t.shape)} here, this stage "
                                 f"needs {tuple(shape)}")
            out[name] = t.to(dtype)
    missing = [n for n in missing if not n.startswith("mtp.")]
    if missing:
        raise ValueError(f"{p}: checkpoint lacks {len(missing)} tensor(s) of this stage, e.g. "
                         f"{[to_hf_name(k) for k in missing[:5]]}")
    return out


_OWN_FILES = re.compile(r"^(config\.json|model\.safetensors|model\.safetensors\.index\.json|"
                        r"model-\d{5}-of-\d{5}\.safetensors)$")


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a directory (a directory after renames in it), so the change is durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_hf(model: Transformer, path: str | os.PathLike, *, max_shard_bytes: int | None = None,
            dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` as an HF-format directory that ``DeepseekV4ForCausalLM.from_pretrained`` loads.

    The whole directory is written next to ``path`` under a temporary name, synced,
    then swapped in by rename: an interrupted save leaves the previous checkpoint
    intact and never a mix of old and new shards. Files other than the weights,
    index and config already in ``path`` (tokenizer, chat template...) are carried
    over. ``max_shard_bytes`` splits the weights into
    ``model-0000i-of-0000n.safetensors`` shards plus ``model.safetensors.index.json``.

    Raises:
        ValueError: ``path`` exists but is a file, or a non-empty directory that is
            not a checkpoint (no ``config.json``) -- it is never replaced.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise ValueError(f"{out} is a non-empty directory without config.json; refusing to replace it "
                         "with a checkpoint (choose an empty or new directory)")
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg = model.args.to_hf_config()
    cfg.architectures = ["DeepseekV4ForCausalLM"]
    dt = dtype or next(model.parameters()).dtype
    cfg.dtype = str(dt).replace("torch.", "")
    tensors = {to_hf_name(k): v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    tensors = {k: (v.to(dt) if v.is_floating_point() else v) for k, v in tensors.items()}

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in tensors.items():
        nb = v.numel() * v.element_size()
        if max_shard_bytes and shards[-1] and size + nb > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nb

    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        meta = {"format": "pt"}
        if len(shards) == 1:
            save_file(shards[0], tmp / SINGLE_NAME, metadata=meta)
        else:
            n = len(shards)
            weight_map = {}
            for i, sh in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                save_file(sh, tmp / name, metadata=meta)
                weight_map.update({k: name for k in sh})
            total = sum(v.numel() * v.element_size() for v in tensors.values())
            (tmp / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total},
                                                      "weight_map": weight_map}, indent=2))
        (tmp / "config.json").write_text(cfg.to_json_string())
        if out.is_dir():
            for f in out.iterdir():
                if f.is_file() and not _OWN_FILES.match(f.name):
                    shutil.copy2(f, tmp / f.name)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
            fsync_path(f)
        os.chmod(tmp, 0o755)
        fsync_path(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            os.replace(out, old / "ckpt")
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
        fsync_path(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
