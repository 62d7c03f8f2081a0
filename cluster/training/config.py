"""Training-run configuration: one YAML file, validated into dataclasses.

Top-level keys (all optional except ``curriculum``)::

    name: debug-run              # run name: <storage_path>/<name> holds the run; actors tide/<name>/stage<s>-shard<e>
    storage_path: runs           # where runs live
    seed: 0
    deterministic: true          # torch deterministic algorithms (bit-exact resume on CPU)
    activation_checkpointing: false  # recompute every decoder block in backward (less activation memory)
    init: per_parameter          # initial weights from (seed, parameter name): the same for every layout
                                 # (sequential: the global RNG in build order, as tide before; whole model per actor)
    model: {flavor: debug, ...}  # ModelArgs fields; vocab_size comes from the tokenizer
    data: {source: stdlib, vocab_size: 2048, max_bytes: 4000000, tokenizer: null, ...}
    optim: {lr: 3.0e-3, min_lr: 3.0e-4, warmup_steps: 20, muon: true, ...}
    balance: {bias_update_speed: 0.001, sequence_weight: 1.0e-4, mtp: true}
    spike: {enabled: true, factor: 1.8, ema_beta: 0.95, min_steps: 20, anticipatory_steps: 10, delta: 1}
    checkpoint: {every_steps: 25, keep: 3}
    ray: {max_failures: 1}       # restarts of the actor graph after an actor dies
    parallel: {topology: {racks: [r0, r1], pipeline_stages: 2, expert_parallel: 2}, ...}  # default: 1 x 1
    curriculum:                  # the paper's 4K -> 16K -> 64K -> 1M, scaled down
      - {name: s256, seq_len: 256, steps: 60, batch_tokens: 4096, lr_mult: 1.0, attention: dense, mtp_weight: 0.3}
      - ...

A stage's budget is ``steps`` or ``tokens`` (exactly one). Unknown keys, wrong
types and out-of-range values are ``ValueError``s naming the key path.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.config import _hint_name, _matches
from model.init import INIT_SCHEMES
from model.training import ATTENTION_MODES


@dataclass
class Stage:
    """One curriculum stage (docs/training.md §3)."""

    name: str
    seq_len: int
    batch_tokens: int
    steps: int | None = None
    tokens: int | None = None
    lr_mult: float = 1.0
    attention: str = "dense"
    mtp_weight: float = 0.3

    def num_steps(self) -> int:
        """Steps in this stage (a token budget is rounded up to whole steps)."""
        if self.steps is not None:
            return self.steps
        per_step = max(1, self.batch_tokens // self.seq_len) * self.seq_len
        return -(-self.tokens // per_step)


@dataclass
class DataConfig:
    source: str = "stdlib"  # "stdlib", a text file, a directory, a .jsonl or a .parquet file
    vocab_size: int = 2048
    max_bytes: int | None = 4_000_000
    tokenizer: str | None = None  # a tokenizer.json to use instead of training one
    text_field: str = "text"


@dataclass
class OptimSection:
    lr: float = 3.0e-3
    min_lr: float = 3.0e-4
    warmup_steps: int = 20
    weight_decay: float = 0.1
    muon: bool = True
    muon_momentum: float = 0.95
    update_rms: float = 0.18
    grad_clip: float | None = 1.0
    decay_start_frac: float = 0.8  # cosine decay over the last 20% of all steps
    mtp_weight_after_decay: float = 0.1


@dataclass
class BalanceSection:
    bias_update_speed: float = 1e-3
    sequence_weight: float = 1e-4
    mtp: bool = True  # the MTP block's MoE gets the bias update and the balance loss too


@dataclass
class SpikeSection:
    enabled: bool = True
    factor: float = 1.8  # spike: loss > factor x EMA(loss), or a non-finite loss / gradient
    ema_beta: float = 0.95
    min_steps: int = 20  # no detection before this many steps of EMA history
    anticipatory_steps: int = 10  # steps with anticipatory routing after a rollback
    delta: int = 1  # routing indices for step t come from the parameters of step t - delta


@dataclass
class CheckpointSection:
    every_steps: int = 25
    keep: int = 3


@dataclass
class RaySection:
    max_failures: int = 1  # restarts of the whole actor graph from the last checkpoint


@dataclass
class ParallelSection:
    """Pipeline stages x expert shards over racks. Without this section a run is the 1 x 1 graph:
    one actor (2 CPUs, on any node) holding the whole model.

    ``topology``: a topology mapping or YAML path (``cluster.launch.topology``: racks,
    data_parallel, pipeline_stages, expert_parallel, placement, cpus_per_actor). Each step's
    batch is split over the data-parallel replicas and their expert shards, then into
    ``microbatches`` (1F1B), each
    streamed between stages in ``waves``; ``expert_waves`` (default ``waves``)
    pipelines each MoE's dispatch / compute / combine. ``link_model``: None (off),
    ``"default"`` (built-in intra/inter-rack classes) or a calibration file.
    ``trace_steps``: write a Chrome trace + timeline PNG of that many steps (from
    the second step). ``local_racks``: with no cluster to join, start one labelled
    raylet per rack. ``bucket_mb``: size of the gradient all-reduce buckets that go out during
    backward (MiB; ``comm.data_parallel``).
    """

    topology: dict[str, Any] | str
    microbatches: int = 1
    waves: int = 1
    expert_waves: int | None = None
    schedule: str = "1f1b"
    link_model: str | None = None
    trace_steps: int = 0
    local_racks: bool = True
    bucket_mb: float = 25.0


@dataclass
class TrainConfig:
    curriculum: list[Stage]
    name: str = "tide-run"
    storage_path: str = "runs"
    seed: int = 0
    deterministic: bool = True
    model: dict[str, Any] = field(default_factory=lambda: {"flavor": "debug"})
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimSection = field(default_factory=OptimSection)
    balance: BalanceSection = field(default_factory=BalanceSection)
    spike: SpikeSection = field(default_factory=SpikeSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    ray: RaySection = field(default_factory=RaySection)
    parallel: ParallelSection | None = None
    activation_checkpointing: bool = False
    init: str = "per_parameter"
    # testing hooks: raise inside the worker at this global step (first attempt only);
    # replace the batch of this step by uniformly random tokens (a corrupted batch -> loss spike)
    fail_at_step: int | None = None
    fail_at_checkpoint: int | None = None  # the last actor dies while writing the checkpoint of this step
    inject_spike_at_step: int | None = None

    @property
    def total_steps(self) -> int:
        return sum(s.num_steps() for s in self.curriculum)

    def run_dir(self) -> Path:
        return Path(self.storage_path).expanduser().resolve() / self.name

    def stage_at(self, step: int) -> tuple[int, Stage, int]:
        """``(stage index, stage, first step of that stage)`` for a global step (curriculum as data)."""
        start = 0
        for i, st in enumerate(self.curriculum):
            if step < start + st.num_steps():
                return i, st, start
            start += st.num_steps()
        return len(self.curriculum) - 1, self.curriculum[-1], start - self.curriculum[-1].num_steps()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _build(cls, data: Any, where: str):
    if not isinstance(data, dict):
        raise ValueError(f"{where or 'top level'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        hint = ""
        if where == "ray" and set(unknown) <= {"num_workers", "cpus_per_worker"}:
            hint = ("; runs no longer go through Ray Train workers: every run is an actor graph, and a run "
                    "without a `parallel` section is one actor of 2 CPUs (set parallel.topology.cpus_per_actor "
                    "with pipeline_stages: 1, expert_parallel: 1 to change it)")
        raise ValueError(f"{where or 'top level'}: unknown key(s) {unknown}; allowed: {sorted(names)}{hint}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ValueError(f"{where or 'top level'}: missing required key {f.name!r}")
            continue
        value, hint = data[f.name], hints[f.name]
        key = f"{where}.{f.name}" if where else f.name
        opt = [a for a in typing.get_args(hint) if a is not type(None)]
        if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(opt) == 1 \
                and dataclasses.is_dataclass(opt[0]):
            value = None if value is None else _build(opt[0], value, key)
        elif dataclasses.is_dataclass(hint):
            value = _build(hint, value, key)
        elif typing.get_origin(hint) is list and dataclasses.is_dataclass(typing.get_args(hint)[0]):
            if not isinstance(value, list):
                raise ValueError(f"{key}: expected a list, got {type(value).__name__}")
            value = [_build(typing.get_args(hint)[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
        elif not _matches(value, hint):
            raise ValueError(f"{key}: expected {_hint_name(hint)}, got {type(value).__name__} ({value!r})")
        elif hint is float or hint == (float | None):
            value = float(value) if value is not None else None
        kwargs[f.name] = value
    return cls(**kwargs)


def _validate(cfg: TrainConfig) -> None:
    if not cfg.curriculum:
        raise ValueError("curriculum: at least one stage is required")
    for i, st in enumerate(cfg.curriculum):
        w = f"curriculum[{i}] ({st.name})"
        if st.seq_len < 2:
            raise ValueError(f"{w}: seq_len must be >= 2, got {st.seq_len}")
        if st.batch_tokens < st.seq_len:
            raise ValueError(f"{w}: batch_tokens ({st.batch_tokens}) must be >= seq_len ({st.seq_len})")
        if (st.steps is None) == (st.tokens is None):
            raise ValueError(f"{w}: give exactly one of steps or tokens (how long the stage trains)")
        if (st.steps is not None and st.steps < 1) or (st.tokens is not None and st.tokens < 1):
            raise ValueError(f"{w}: steps / tokens must be >= 1")
        if st.attention not in ATTENTION_MODES:
            raise ValueError(f"{w}: attention must be one of {ATTENTION_MODES}, got {st.attention!r}")
        if st.lr_mult <= 0 or st.mtp_weight < 0:
            raise ValueError(f"{w}: lr_mult must be > 0 and mtp_weight >= 0")
    if cfg.init not in INIT_SCHEMES:
        raise ValueError(f"init must be one of {list(INIT_SCHEMES)} (per_parameter: the same initial weights for "
                         f"every layout; sequential: tide's earlier rule), got {cfg.init!r}")
    if cfg.data.vocab_size < 259:
        raise ValueError(f"data.vocab_size must be >= 259 (256 bytes + 3 special tokens), got {cfg.data.vocab_size}")
    if cfg.optim.lr <= 0 or cfg.optim.min_lr < 0 or cfg.optim.warmup_steps < 0:
        raise ValueError("optim: lr must be > 0, min_lr >= 0, warmup_steps >= 0")
    if not 0 < cfg.optim.decay_start_frac <= 1:
        raise ValueError(f"optim.decay_start_frac must be in (0, 1], got {cfg.optim.decay_start_frac}")
    if cfg.checkpoint.every_steps < 1 or cfg.checkpoint.keep < 1:
        raise ValueError("checkpoint.every_steps and checkpoint.keep must be >= 1")
    if cfg.spike.factor <= 1 or not 0 < cfg.spike.ema_beta < 1 or cfg.spike.delta < 1:
        raise ValueError("spike: factor must be > 1, ema_beta in (0, 1), delta >= 1")
    if cfg.ray.max_failures < 0:
        raise ValueError(f"ray.max_failures must be >= 0, got {cfg.ray.max_failures}")
    if not cfg.name or "/" in cfg.name:
        raise ValueError(f"name must be a non-empty run name without '/', got {cfg.name!r}")
    from model import ModelArgs

    model = dict(cfg.model)
    model.setdefault("flavor", "debug")
    model["vocab_size"] = cfg.data.vocab_size
    args = ModelArgs.from_dict(model, source="model")  # raises ValueError naming the bad key
    if cfg.parallel is not None:
        _validate_parallel(cfg, args)


def _validate_parallel(cfg: TrainConfig, args) -> None:
    from cluster.data import sequences_per_batch
    from cluster.launch.topology import build_graph, load_topology
    from comm.pipeline import SCHEDULES

    par = cfg.parallel
    try:
        topo = load_topology(par.topology)
    except ValueError as e:
        msg = str(e)
        raise ValueError(f"parallel.{msg}" if msg.startswith("topology") else f"parallel.topology ({msg})") from None
    try:
        build_graph(topo, args.num_hidden_layers, args.n_routed_experts)
    except ValueError as e:
        raise ValueError(f"parallel.topology: {e}") from None
    E = topo.expert_parallel
    per_shard = args.n_routed_experts // E
    if par.expert_waves is not None and par.expert_waves > per_shard:
        raise ValueError(f"parallel.expert_waves ({par.expert_waves}) must be <= the routed experts per shard "
                         f"({args.n_routed_experts} / {E} = {per_shard})")
    if par.microbatches < 1 or par.waves < 1 or (par.expert_waves is not None and par.expert_waves < 1):
        raise ValueError("parallel: microbatches, waves and expert_waves must be >= 1")
    if par.schedule not in SCHEDULES:
        raise ValueError(f"parallel.schedule must be one of {sorted(SCHEDULES)}, got {par.schedule!r}")
    if par.trace_steps < 0:
        raise ValueError("parallel.trace_steps must be >= 0")
    if isinstance(par.bucket_mb, bool) or not isinstance(par.bucket_mb, (int, float)) or not par.bucket_mb > 0:
        raise ValueError(f"parallel.bucket_mb must be a number of MiB > 0, got {par.bucket_mb!r}")
    if par.link_model not in (None, "default"):
        if not Path(par.link_model).is_file():
            raise ValueError(f"parallel.link_model must be null, 'default' or a calibration file; "
                             f"{Path(par.link_model).resolve()} does not exist")
        from cluster.launch.link_model import load_link_model

        try:  # what the trainer will load: its contents fail here (the message names the file), not at run time
            load_link_model(par.link_model)
        except ValueError as e:
            raise ValueError(f"parallel.link_model: {e}") from None
    D = topo.data_parallel
    for i, st in enumerate(cfg.curriculum):
        B = sequences_per_batch(st.batch_tokens, st.seq_len)
        per = D * E * par.microbatches
        if B % per or B // per < par.waves:
            dp = f"data_parallel ({D}) x " if D > 1 else ""
            raise ValueError(f"curriculum[{i}] ({st.name}): {B} sequences per step (batch_tokens / seq_len) must "
                             f"split into {dp}expert_parallel ({E}) x parallel.microbatches ({par.microbatches}) "
                             f"microbatches of >= parallel.waves ({par.waves}) sequences each: change batch_tokens, "
                             f"microbatches or waves")


def load_train_config(path_or_dict: str | Path | dict, **overrides: Any) -> TrainConfig:
    """Load and validate a training YAML (or dict). ``overrides``: top-level keys to replace.

    Raises:
        ValueError: unreadable file, unknown keys, wrong types or inconsistent values.
    """
    from model.safe_io import read_yaml_mapping

    data, where = read_yaml_mapping(path_or_dict, "training config")
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        cfg = _build(TrainConfig, data, "")
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    try:
        _validate(cfg)
    except ValueError as e:
        if isinstance(path_or_dict, dict):  # no file to name
            raise
        raise ValueError(f"{where}: {e}") from None
    return cfg


def model_args_for(cfg: TrainConfig, vocab_size: int):
    """The run's ``ModelArgs`` with the tokenizer's vocabulary size."""
    from model import ModelArgs

    model = dict(cfg.model)
    model.setdefault("flavor", "debug")
    model["vocab_size"] = vocab_size
    return ModelArgs.from_dict(model, source="model")
