"""Checkpoints of an actor graph (P stages x E expert shards) in the crash-safe store.

A pipeline checkpoint is an ordinary ``cluster.checkpoint.store`` checkpoint with one
tensor group per (stage, expert shard)::

    step-00000100/
      stage0-ep0.safetensors    shard (0, 0): model + optimizer tensors
      stage0-ep1.safetensors
      stage1-ep0.safetensors
      ...
      stage0-ep0-dp1.safetensors  with D > 1 data-parallel replicas: replica 1's part of
                                  shard (0, 0)'s optimizer state (ZeRO-1), no model tensors
      meta.json                 caller meta + "layout" + "checkpoint_format"
      MANIFEST.json

Key scheme inside a shard group (names are the full model's, see ``model.stage``):

- model tensors (parameters and persistent buffers) under their names, e.g.
  ``layers.5.mlp.experts.gate_up_proj`` (routed experts sliced on dim 0 to the
  shard's ``[expert_lo, expert_hi)``);
- optimizer state under ``"optim/" + "<param name>::<state key>"``, e.g.
  ``optim/layers.5.mlp.experts.gate_up_proj::momentum_buffer`` or
  ``optim/norm.weight::step`` (``model.optim.optimizer_state_by_name``); expert
  state is sliced like its parameter, 0-d state (AdamW ``step``) is not.

``meta["layout"]`` (written by :func:`save_pipeline_checkpoint`, see :func:`make_layout`)::

    {"pipeline_stages": P, "expert_parallel": E, "layer_slices": [[lo, hi], ...],
     "n_routed_experts": N, "data_parallel": D,
     "shards": {"stage{s}-ep{e}": {"stage": s, "ep_rank": e, "expert_lo": lo, "expert_hi": hi},
                "stage{s}-ep{e}-dp{d}": {..., "dp_rank": d}  (d >= 1)}}

With data parallelism every optimizer-state tensor is in exactly one of the D files of its
(stage, shard): the one of the replica that owned it (``comm.data_parallel.assign_owners``);
model tensors only in replica 0's. Readers treat the D files of a (stage, shard) as one shard,
so a checkpoint of any D loads into any other D (and any P x E). ``data_parallel`` absent: 1.

Tensors held by several shards (attention, routers, shared experts, norms over a
stage's expert shards; the tied embedding copy of the last stage) are written by
each of them; :func:`load_pipeline_full` checks that the copies are bitwise equal.

Re-sharding goes through the full model: ``load_pipeline_full`` merges the shards
(``model.stage.merge_state_dicts``) into full-model tensors and full optimizer
state by name; a stage of any layout then takes its part with
``PipelineStage.shard_state_dict(full_model)`` and :func:`shard_optimizer_state`
(or both at once with :func:`stage_shard`) and loads them with
``stage.load_state_dict`` / ``model.optim.load_optimizer_state_by_name``.
``load_pipeline_full`` also reads the one-process checkpoints earlier versions of tide
wrote (groups ``model`` + ``optimizer``, the optimizer as a ``flatten_state`` skeleton in
``meta.json``): they resume into any layout. Every run writes the sharded layout now (a
one-process run is the 1 x 1 layout, group ``stage0-ep0``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from cluster.checkpoint.store import (
    abort_checkpoint,
    commit_checkpoint,
    load_checkpoint,
    save_checkpoint,
    unflatten_state,
)
from model.optim import CombinedOptimizer, is_muon_param, optimizer_state_by_name
from model.stage import PipelineStage, is_expert_param, merge_state_dicts, shard_range

OPTIM_PREFIX = "optim/"
PIPELINE_FORMAT = "tide-pipeline/1"
DEFAULT_KEEP = 3  # save_checkpoint's default retention

__all__ = [
    "OPTIM_PREFIX",
    "shard_group",
    "make_layout",
    "check_layout",
    "shard_tensors",
    "split_shard_tensors",
    "save_pipeline_checkpoint",
    "commit_pipeline_checkpoint",
    "SHARD_GROUP_FORMAT",
    "REPLICA_GROUP_FORMAT",
    "load_pipeline_full",
    "read_meta",
    "shard_sources",
    "shard_optimizer_state",
    "stage_shard",
]


# ---------------------------------------------------------------------- layout
SHARD_GROUP_FORMAT = "stage{stage}-ep{ep_rank}"
REPLICA_GROUP_FORMAT = "stage{stage}-ep{ep_rank}-dp{dp_rank}"


def shard_group(stage: int, ep_rank: int, dp_rank: int = 0) -> str:
    """Tensor group name of shard ``(stage, ep_rank)`` in replica ``dp_rank``:
    ``"stage{stage}-ep{ep_rank}"`` for replica 0, ``"stage{stage}-ep{ep_rank}-dp{dp_rank}"`` else."""
    if dp_rank:
        return REPLICA_GROUP_FORMAT.format(stage=stage, ep_rank=ep_rank, dp_rank=dp_rank)
    return SHARD_GROUP_FORMAT.format(stage=stage, ep_rank=ep_rank)


def make_layout(layer_slices: Iterable[tuple[int, int]], expert_parallel: int, n_routed_experts: int,
                data_parallel: int = 1) -> dict:
    """The ``layout`` dict of a pipeline: stages with ``layer_slices`` (``[[lo, hi), ...]``,
    e.g. ``cluster.launch.topology.split_layers``), each with ``expert_parallel`` shards of
    ``model.stage.shard_range`` experts, in ``data_parallel`` replicas.

    Raises ValueError for an indivisible expert count or an invalid slicing.
    """
    slices = [[int(lo), int(hi)] for lo, hi in layer_slices]
    shards = {}
    for d in range(data_parallel):
        for s in range(len(slices)):
            for e in range(expert_parallel):
                lo, hi = shard_range(n_routed_experts, e, expert_parallel)
                shards[shard_group(s, e, d)] = {"stage": s, "ep_rank": e, "expert_lo": lo, "expert_hi": hi,
                                                **({"dp_rank": d} if d else {})}
    layout = {"pipeline_stages": len(slices), "expert_parallel": expert_parallel, "layer_slices": slices,
              "n_routed_experts": n_routed_experts, "data_parallel": data_parallel, "shards": shards}
    check_layout(layout)
    return layout


def _dp(ent: dict) -> int:
    return ent.get("dp_rank", 0)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_layout(layout: Any, model_args: dict | None = None) -> None:
    """Validate a layout dict (see the module docstring).

    Checks: P, E, N (and D, default 1) positive ints; ``layer_slices`` are P contiguous
    non-empty slices from layer 0; ``shards`` has exactly the D*P*E entries ``stage{s}-ep{e}``
    (and ``stage{s}-ep{e}-dp{d}``) with matching ``stage``/``ep_rank``/``dp_rank`` and expert
    ranges tiling ``[0, N)`` per stage, equal across replicas. With ``model_args`` (a
    ``ModelArgs.to_dict()``), also that the slices end at ``num_hidden_layers`` and N equals
    ``n_routed_experts``.

    Raises:
        ValueError: naming the first problem found.
    """
    if not isinstance(layout, dict):
        raise ValueError(f"pipeline layout must be a dict, got {type(layout).__name__}")
    for k in ("pipeline_stages", "expert_parallel", "n_routed_experts"):
        if not _is_int(layout.get(k)) or layout[k] < 1:
            raise ValueError(f"pipeline layout: {k} must be a positive int, got {layout.get(k)!r}")
    P, E, N = layout["pipeline_stages"], layout["expert_parallel"], layout["n_routed_experts"]
    D = layout.get("data_parallel", 1)
    if not _is_int(D) or D < 1:
        raise ValueError(f"pipeline layout: data_parallel must be a positive int, got {D!r}")
    slices = layout.get("layer_slices")
    if not isinstance(slices, (list, tuple)) or len(slices) != P:
        raise ValueError(f"pipeline layout: layer_slices must list {P} [lo, hi] slices, got {slices!r}")
    at = 0
    for s, sl in enumerate(slices):
        if not (isinstance(sl, (list, tuple)) and len(sl) == 2 and all(map(_is_int, sl))
                and sl[0] == at and sl[1] > sl[0]):
            raise ValueError(f"pipeline layout: layer slice {s} is {sl!r}; slices must be contiguous, "
                             f"non-empty and start at layer {at}")
        at = sl[1]
    shards = layout.get("shards")
    if not isinstance(shards, dict):
        raise ValueError("pipeline layout: 'shards' must be a dict {stage{s}-ep{e}: {...}}")
    expected = {shard_group(s, e, d): (s, e, d) for d in range(D) for s in range(P) for e in range(E)}
    if set(shards) != set(expected):
        missing = sorted(set(expected) - set(shards))
        extra = sorted(set(shards) - set(expected))
        raise ValueError(f"pipeline layout of {D} replica(s) x {P} stages x {E} expert shards: shards missing "
                         f"{missing}, unexpected {extra}")
    for name, (s, e, d) in expected.items():
        ent, base = shards[name], shards[shard_group(s, e)]
        if not isinstance(ent, dict) or _dp(ent) != d:
            raise ValueError(f"pipeline layout: shard {name} entry {ent!r} must have dp_rank={d}")
        if d and (ent.get("stage"), ent.get("ep_rank"), ent.get("expert_lo"), ent.get("expert_hi")) != (
                base.get("stage"), base.get("ep_rank"), base.get("expert_lo"), base.get("expert_hi")):
            raise ValueError(f"pipeline layout: replica shard {name} {ent!r} must cover what "
                             f"{shard_group(s, e)} does")
    for s in range(P):
        ranges = []
        for e in range(E):
            name = shard_group(s, e)
            ent = shards[name]
            if not isinstance(ent, dict) or (ent.get("stage"), ent.get("ep_rank")) != (s, e):
                raise ValueError(f"pipeline layout: shard {name} entry {ent!r} must have stage={s}, ep_rank={e}")
            lo, hi = ent.get("expert_lo"), ent.get("expert_hi")
            if not (_is_int(lo) and _is_int(hi) and 0 <= lo < hi <= N):
                raise ValueError(f"pipeline layout: shard {name} has expert range [{lo}, {hi}), not inside [0, {N})")
            ranges.append((lo, hi, name))
        at = 0
        for lo, hi, name in sorted(ranges):
            if lo != at:
                raise ValueError(f"pipeline layout: the expert shards of stage {s} do not tile [0, {N}) "
                                 f"(gap or overlap at {at}, shard {name} starts at {lo})")
            at = hi
        if at != N:
            raise ValueError(f"pipeline layout: the expert shards of stage {s} cover [0, {at}) of [0, {N})")
    if model_args is not None:
        L, n = model_args.get("num_hidden_layers"), model_args.get("n_routed_experts")
        if slices[-1][1] != L or N != n:
            raise ValueError(f"pipeline layout ({slices[-1][1]} layers, {N} routed experts) does not match "
                             f"model_args ({L} layers, {n} routed experts)")


# ---------------------------------------------------------------- shard dicts
def shard_tensors(stage: PipelineStage, opt: CombinedOptimizer | None = None) -> dict[str, torch.Tensor]:
    """What one shard saves: ``stage.state_dict()`` plus ``opt``'s state under ``"optim/<param>::<key>"``."""
    out = dict(stage.state_dict())
    if opt is not None:
        out.update({OPTIM_PREFIX + k: v for k, v in optimizer_state_by_name(opt).items()})
    return out


def split_shard_tensors(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(model tensors, optimizer tensors by "<param>::<key>")`` of one shard group (prefix removed)."""
    model, optim = {}, {}
    for k, t in tensors.items():
        if k.startswith(OPTIM_PREFIX):
            optim[k[len(OPTIM_PREFIX):]] = t
        else:
            model[k] = t
    return model, optim


def _norm_json(x: Any) -> Any:
    if hasattr(x, "to_dict"):
        x = x.to_dict()
    return json.loads(json.dumps(x, sort_keys=True))


# ------------------------------------------------------------------------ save
def save_pipeline_checkpoint(root: str | Path, step: int, shards: dict[tuple[int, int], dict[str, torch.Tensor]],
                             layout: dict, meta: dict, keep: int | None = None, *,
                             overwrite: bool = False) -> Path:
    """Write the shards of a pipeline as one checkpoint ``root/step-NNNNNNNN`` (crash-safe, atomic).

    Args:
        root, step, overwrite: as ``cluster.checkpoint.save_checkpoint``.
        shards: ``(stage, ep_rank) -> tensors`` of every shard of ``layout``:
            model tensors under their names and optimizer state under
            ``"optim/<param>::<key>"`` (:func:`shard_tensors` builds it); written as
            group ``stage{s}-ep{e}``.
        layout: see :func:`make_layout`; stored as ``meta["layout"]``.
        meta: JSON-serializable caller meta (e.g. ``model_args``, loader, rng).
        keep: retention (newest checkpoints kept); None: the store's default (3).

    Returns:
        The committed checkpoint directory.

    Raises:
        ValueError: invalid layout (or one disagreeing with ``meta["model_args"]``
            or a different ``meta["layout"]``), a shard of the layout without
            tensors or a shard not in the layout, an optimizer key without ``::``,
            a routed-expert tensor whose dim 0 is not the shard's expert count;
            plus everything ``save_checkpoint`` raises.
    """
    check_layout(layout, meta.get("model_args"))
    layout = _norm_json(layout)
    if "layout" in meta and _norm_json(meta["layout"]) != layout:
        raise ValueError("meta['layout'] differs from the layout argument")
    groups: dict[str, dict[str, torch.Tensor]] = {}
    keys = set()
    for key in shards:
        if not (isinstance(key, tuple) and len(key) == 2):
            raise ValueError(f"shards keys must be (stage, ep_rank) tuples, got {key!r}")
        keys.add(shard_group(*key))
    missing, extra = sorted(set(layout["shards"]) - keys), sorted(keys - set(layout["shards"]))
    if missing or extra:
        raise ValueError(f"shards do not match the layout: no tensors for {missing}, not in the layout {extra}")
    for (s, e), tensors in shards.items():
        name = shard_group(s, e)
        ent = layout["shards"][name]
        n = ent["expert_hi"] - ent["expert_lo"]
        for k, t in tensors.items():
            if k.startswith(OPTIM_PREFIX) and "::" not in k:
                raise ValueError(f"shard {name}: optimizer key {k!r} is not 'optim/<param>::<key>'")
            if is_expert_param(k) and t.dim() > 0 and t.shape[0] != n:
                raise ValueError(f"shard {name}: expert tensor {k} has {t.shape[0]} experts on dim 0, "
                                 f"the shard holds {n} ([{ent['expert_lo']}, {ent['expert_hi']}))")
        groups[name] = tensors
    meta = {**meta, "layout": layout, "checkpoint_format": PIPELINE_FORMAT}
    return save_checkpoint(root, step, groups, meta, keep=DEFAULT_KEEP if keep is None else keep,
                           overwrite=overwrite)


def commit_pipeline_checkpoint(directory: str | Path, step: int, written: list[dict], layout: dict, meta: dict,
                               keep: int | None = None) -> Path:
    """Commit a checkpoint whose shard files the actors wrote themselves.

    ``directory`` is ``cluster.checkpoint.store.begin_checkpoint``'s; every actor wrote its
    group there (``actors.stage_worker.StageWorker.write_shard``) and reported ``{"group",
    "file", "size", "sha256", "stage", "ep_rank", ...}`` (``written``). The driver writes
    ``meta.json`` (with ``layout`` and the format) and the manifest last, then renames: a
    checkpoint is committed only when every shard reported, and never holds a partial file.

    Raises:
        ValueError: the reported shards do not match ``layout`` (missing or extra groups), an
            invalid layout, or what ``store.commit_checkpoint`` raises. On any error the
            uncommitted directory is removed.
    """
    try:
        check_layout(layout, meta.get("model_args"))
        layout = _norm_json(layout)
        groups = {w["group"]: w for w in written}
        missing, extra = sorted(set(layout["shards"]) - set(groups)), sorted(set(groups) - set(layout["shards"]))
        if missing or extra or len(groups) != len(written):
            raise ValueError(f"shards written do not match the layout: none for {missing}, not in the layout {extra}"
                             f"{'' if len(groups) == len(written) else ', a group written twice'}")
    except BaseException:
        abort_checkpoint(directory)
        raise
    meta = {**meta, "layout": layout, "checkpoint_format": PIPELINE_FORMAT}
    return commit_checkpoint(directory, step, groups, meta, keep=DEFAULT_KEEP if keep is None else keep)


# ------------------------------------------------------------------------ load
def _reference_model(model_args: dict):
    """The full ``Transformer`` of ``model_args`` on the meta device (names and shapes only)."""
    from model import ModelArgs, Transformer
    from model.transformer import meta_device

    with torch.random.fork_rng(devices=[]), meta_device():
        return Transformer(ModelArgs.from_dict(model_args, source="checkpoint meta model_args"))


def _bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def _check_full(path: Path, model_t: dict, optim_t: dict, ref) -> None:
    """Full tensors against the reference model: same model keys and shapes; optimizer
    keys of its parameters with their shapes (``step``: one element)."""
    want = ref.state_dict()
    missing, extra = sorted(set(want) - set(model_t)), sorted(set(model_t) - set(want))
    if missing or extra:
        raise ValueError(f"{path}: model tensors do not match model_args: missing {missing[:5]} "
                         f"({len(missing)}), unexpected {extra[:5]} ({len(extra)})")
    for k, t in want.items():
        if tuple(model_t[k].shape) != tuple(t.shape):
            raise ValueError(f"{path}: model tensor {k} has shape {tuple(model_t[k].shape)}, "
                             f"model_args give {tuple(t.shape)}")
    params = dict(ref.named_parameters())
    for k, t in optim_t.items():
        name, _, key = k.rpartition("::")
        if name not in params:
            raise ValueError(f"{path}: optimizer state {k!r} is for no parameter of the model")
        ok = t.numel() == 1 if key == "step" else tuple(t.shape) == tuple(params[name].shape)
        if not ok:
            raise ValueError(f"{path}: optimizer state {k!r} has shape {tuple(t.shape)}, "
                             f"parameter {name} has {tuple(params[name].shape)}")


def _convert_single(path: Path, groups: dict, meta: dict, ref) -> dict[str, torch.Tensor]:
    """A trainer's ``CombinedOptimizer.state_dict()`` (flattened) -> state by name.

    torch numbers an optimizer's parameters 0.. in param-group order; the
    CombinedOptimizer gives Muon the ``is_muon_param`` parameters of
    ``model.named_parameters()`` (in that order) when ``use_muon`` (recorded as a
    non-None ``"muon"`` entry) and AdamW the rest.
    """
    sd = unflatten_state(groups["optimizer"], meta["optimizer_skeleton"])
    if not isinstance(sd, dict) or set(sd) != {"muon", "adam"}:
        raise ValueError(f"{path}: optimizer state is not a CombinedOptimizer state_dict (keys 'muon', 'adam')")
    named = list(ref.named_parameters())
    use_muon = sd["muon"] is not None
    muon = [n for n, p in named if use_muon and is_muon_param(n, p)]
    muon_set = set(muon)
    adam = [n for n, _ in named if n not in muon_set]
    out: dict[str, torch.Tensor] = {}
    for part, names in (("muon", muon), ("adam", adam)):
        inner = sd[part]
        if inner is None:
            if names:
                raise ValueError(f"{path}: optimizer has no {part} state but the model has {len(names)} "
                                 f"{part} parameter(s)")
            continue
        order = [i for g in inner["param_groups"] for i in g["params"]]
        if len(order) != len(names):
            raise ValueError(f"{path}: the {part} optimizer steps {len(order)} parameters, model_args give "
                             f"{len(names)}; the checkpoint does not match its model_args")
        by_index = dict(zip(order, names, strict=True))
        for idx, st in inner["state"].items():
            if idx not in by_index:
                raise ValueError(f"{path}: {part} optimizer state for unknown parameter index {idx}")
            for key, v in st.items():
                out[f"{by_index[idx]}::{key}"] = v if isinstance(v, torch.Tensor) else torch.tensor(v)
    return out


def load_pipeline_full(path: str | Path, *, model_args: Any = None
                       ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """Full-model tensors, full optimizer state by name and meta of a checkpoint.

    Pipeline checkpoints (``meta["layout"]``): every shard group of the layout is
    read; routed-expert tensors (and their optimizer state) are concatenated in
    global expert order, replicated tensors taken once after checking that all
    copies are bitwise equal. Optimizer keys are ``"<param>::<key>"`` (no
    ``optim/`` prefix), as ``model.optim.load_optimizer_state_by_name`` takes them.

    Single-process trainer checkpoints (groups ``model`` + ``optimizer``,
    ``meta["optimizer_skeleton"]``, ``meta["model_args"]``): model tensors as
    stored; the optimizer state is converted to by-name form (see
    ``_convert_single``) and ``meta["optimizer_converted"]`` is True. Without an
    optimizer group or skeleton the optimizer dict is empty and
    ``meta["optimizer_converted"]`` False.

    When the checkpoint's meta has ``model_args``, the result is checked against
    that model's tensor names and shapes.

    Args:
        path: a checkpoint directory.
        model_args: optional expected ``ModelArgs`` (or its ``to_dict()``); the
            checkpoint's ``meta["model_args"]`` must equal it.

    Raises:
        ValueError: the store's integrity errors (corrupt or missing file, named);
            no ``layout`` and no ``model`` group; an invalid layout; a layout
            shard without its group, or a group not in the layout; replicated
            copies that differ (names the tensor and both shards); expert
            shards that do not tile; ``model_args`` mismatch (argument vs meta,
            layout vs meta, tensors vs meta); an optimizer state that cannot be
            mapped to parameters.
        FileNotFoundError: ``path`` is not a directory.
    """
    path = Path(path)
    groups, meta = load_checkpoint(path)
    margs = meta.get("model_args")
    if model_args is not None:
        if margs is None:
            raise ValueError(f"{path}: meta has no model_args to compare with the expected ones")
        if _norm_json(model_args) != _norm_json(margs):
            a, b = _norm_json(model_args), _norm_json(margs)
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            raise ValueError(f"{path}: checkpoint model_args differ from the expected ones in {diff}")
    ref = _reference_model(margs) if margs is not None else None

    layout = meta.get("layout")
    if layout is None:
        if "model" not in groups:
            raise ValueError(f"{path}: meta has no pipeline 'layout' and there is no 'model' group "
                             f"(groups {sorted(groups)}); not a tide training checkpoint")
        model_t = groups["model"]
        if "optimizer" in groups and "optimizer_skeleton" in meta and ref is not None:
            optim_t = _convert_single(path, groups, meta, ref)
            meta["optimizer_converted"] = True
        else:
            optim_t = {}
            meta["optimizer_converted"] = False
        if ref is not None:
            _check_full(path, model_t, optim_t, ref)
        return model_t, optim_t, meta

    check_layout(layout, margs)
    missing = sorted(g for g in layout["shards"] if g not in groups)
    if missing:
        raise ValueError(f"{path}: the layout's shard group(s) {missing} are not in the checkpoint "
                         f"(groups {sorted(groups)})")
    extra = sorted(set(groups) - set(layout["shards"]))
    if extra:
        raise ValueError(f"{path}: tensor group(s) {extra} are not shards of the layout")
    model_parts, optim_parts = [], []
    first: dict[str, tuple[str, torch.Tensor]] = {}  # replicated name -> (group, tensor)
    D = layout.get("data_parallel", 1)
    for g, ent in sorted(layout["shards"].items(), key=lambda kv: (kv[1]["stage"], kv[1]["ep_rank"], _dp(kv[1]))):
        if _dp(ent):
            continue  # read with replica 0's group below
        lo, hi = ent["expert_lo"], ent["expert_hi"]
        model_t, optim_t = split_shard_tensors(groups[g])
        for d in range(1, D):  # ZeRO-1: the other replicas' parts of this shard's optimizer state
            g_d = shard_group(ent["stage"], ent["ep_rank"], d)
            more_model, more = split_shard_tensors(groups[g_d])
            clash = sorted(set(more) & set(optim_t))
            if more_model or clash:
                raise ValueError(f"{path}: replica group {g_d} must hold only optimizer state not in the other "
                                 f"replicas' groups; it has model tensors {sorted(more_model)[:3]} / repeats "
                                 f"{clash[:3]}")
            optim_t = {**optim_t, **more}
        for prefix, part in (("", model_t), (OPTIM_PREFIX, optim_t)):
            for k, t in part.items():
                if is_expert_param(k) and t.dim() > 0:
                    if t.shape[0] != hi - lo:
                        raise ValueError(f"{path}: shard {g} tensor {prefix}{k} has {t.shape[0]} experts, "
                                         f"the layout gives [{lo}, {hi})")
                    continue
                seen = first.setdefault(prefix + k, (g, t))
                if seen[0] != g and not _bit_equal(seen[1], t):
                    raise ValueError(f"{path}: replicated tensor {prefix}{k} differs between shards {seen[0]} "
                                     f"and {g} (copies must be identical)")
        model_parts.append((model_t, lo))
        optim_parts.append((optim_t, lo))
    N = layout["n_routed_experts"]
    try:
        full_model = merge_state_dicts(model_parts, N)
        full_optim = merge_state_dicts(optim_parts, N)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    if ref is not None:
        _check_full(path, full_model, full_optim, ref)
    return full_model, full_optim, meta


def read_meta(path: str | Path) -> dict:
    """A checkpoint's ``meta.json`` (with ``step``), without reading any tensor.

    Raises:
        ValueError: no readable meta (named). FileNotFoundError: ``path`` is not a directory.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist or is not a directory")
    try:
        meta = json.loads((path / "meta.json").read_bytes())
    except (OSError, ValueError) as e:
        raise ValueError(f"checkpoint {path}: meta.json is unreadable: {e}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"checkpoint {path}: meta.json is not a JSON object")
    return meta


def shard_sources(path: str | Path, meta: dict, *, verify: bool = True) -> list[tuple[str, int, int]]:
    """``(file, expert_lo, expert_hi)`` of every shard file of a sharded checkpoint, for the
    actors to read their own tensors from (``StageWorker.load_shards``), after checking the
    layout and every file against the manifest (sizes and sha256: a streaming read, nothing held;
    ``verify=False`` for a checkpoint the caller has just verified).

    Raises:
        ValueError: a damaged checkpoint (names the file), an invalid layout, or a layout shard
            without its file.
    """
    from cluster.checkpoint.store import verify_checkpoint

    path = Path(path)
    problems = verify_checkpoint(path, hash_files=True) if verify else []
    if problems:
        raise ValueError(problems[0])
    layout = meta["layout"]
    check_layout(layout, meta.get("model_args"))
    out = []
    for g, ent in sorted(layout["shards"].items(), key=lambda kv: (kv[1]["stage"], kv[1]["ep_rank"], _dp(kv[1]))):
        f = path / f"{g}.safetensors"
        if not f.is_file():
            raise ValueError(f"{path}: the layout's shard group {g} has no file")
        out.append((str(f.resolve()), ent["expert_lo"], ent["expert_hi"]))
    return out


# ---------------------------------------------------------------- re-sharding
def shard_optimizer_state(full_optim: dict[str, torch.Tensor], param_names: Iterable[str],
                          expert_lo: int, expert_hi: int) -> dict[str, torch.Tensor]:
    """One shard's part of full optimizer state by name.

    Keeps the ``"<param>::<key>"`` entries whose ``<param>`` is in ``param_names``
    (e.g. ``{n for n, _ in stage.named_parameters()}``); routed-expert state with
    an expert dim (``[N, ...]``) is sliced to ``[expert_lo, expert_hi)`` (views),
    0-d state (AdamW ``step``) is kept whole. Parameters without entries stay fresh.

    Raises:
        ValueError: an expert tensor has fewer than ``expert_hi`` experts.
    """
    names = set(param_names)
    out = {}
    for k, t in full_optim.items():
        if k.rpartition("::")[0] not in names:
            continue
        if is_expert_param(k) and t.dim() > 0:
            if t.shape[0] < expert_hi:
                raise ValueError(f"optimizer state {k} has {t.shape[0]} experts, shard needs [{expert_lo}, "
                                 f"{expert_hi})")
            t = t[expert_lo:expert_hi]
        out[k] = t
    return out


def stage_shard(stage: PipelineStage, full_model: dict[str, torch.Tensor], full_optim: dict[str, torch.Tensor]
                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(model tensors, optimizer state by name)`` of ``stage`` from full tensors
    (``stage.shard_state_dict`` + :func:`shard_optimizer_state`); load them with
    ``stage.load_state_dict`` and ``load_optimizer_state_by_name``."""
    names = {n for n, _ in stage.named_parameters()}
    return (stage.shard_state_dict(full_model),
            shard_optimizer_state(full_optim, names, stage.expert_lo, stage.expert_hi))
