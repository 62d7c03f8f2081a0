"""The training loop: one program for every run, whatever its layout.

Every run is an actor graph (``cluster.launch.topology``): P pipeline stages x E expert
shards of ``StageWorker`` actors placed on racks, or -- for a config without a
``parallel`` section -- the 1 x 1 graph, one worker holding the whole model (a Ray
actor, or with ``in_process`` this process itself). The same stage code
(``model.stage``), schedule runner (``comm.pipeline``), objective (``model.losses``),
optimizer step and checkpoint format serve all of them; this module is the driver:

- the curriculum (``TrainConfig.stage_at``): at a stage change the loader's sequence
  length / batch size and the attention mode change;
- Muon + AdamW with warmup -> constant -> cosine (decay over the last
  ``1 - decay_start_frac`` of all steps; the MTP weight drops to 0.1 when it starts);
- auxiliary-loss-free bias updates + the sequence-wise balance loss (MTP's MoE included);
- loss-spike control: a spike is a non-finite loss or gradient norm, or a loss above
  ``factor x EMA``. The update is skipped, model + optimizer roll back to the last GOOD
  checkpoint (the data stream moves on past the bad batch; the step counter keeps
  counting) and anticipatory routing is switched on (``cluster.training.routing``):
  the stage actors route batches ``delta`` steps ahead and the forced steps use that
  routing. Checkpoints are deferred while it is on (batches are fetched early);
- crash-safe checkpoints every ``every_steps`` and at the end, one tensor group per
  (stage, expert shard) (``cluster.checkpoint.sharded``; checkpoints of any layout, and
  one-process checkpoints of earlier versions, resume into any other); exact resume
  (weights, optimizer, loader position, RNG, spike state);
- ``metrics.jsonl``, ``loss.png`` (stage boundaries and spikes marked), ``actor_memory.json``
  (each actor's parameters, gradients, optimizer state and peak memory at the end), ``run_info.json``
  (resolved config, git SHA, package versions, device, the actors' placement) and, with
  ``parallel.trace_steps``, ``trace.json`` + ``timeline.png``;
- the retry policy (:func:`train`): a stage actor that dies (node loss, OOM) restarts the
  whole graph from the last committed checkpoint, up to ``ray.max_failures`` times.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cluster.checkpoint import sharded as pckpt
from cluster.checkpoint import store as ckpt
from cluster.data import TokenLoader, prepare_data, save_tokenizer_files, sequences_per_batch
from cluster.launch.topology import ActorGraph, build_graph, load_topology, single_actor
from cluster.ops.metrics import TrainingMetrics
from model.losses import LossConfig
from model.optim import OptimConfig, lr_at

from .config import TrainConfig, model_args_for
from .plots import plot_losses
from .routing import RoutingSchedule

ReportFn = Callable[[dict, "Path | None"], None]


def run_info(cfg: TrainConfig) -> dict[str, Any]:
    """Resolved config, git SHA, package versions and device of this process."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        sha = None
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("ray", "tokenizers", "safetensors"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return {"config": cfg.to_dict(), "git_sha": sha, "versions": versions,
            "device": "cuda" if torch.cuda.is_available() else "cpu", "threads": torch.get_num_threads(),
            "host": platform.node()}


def graph_of(cfg: TrainConfig, num_layers: int, n_routed_experts: int) -> ActorGraph:
    """The run's actor graph: its ``parallel.topology``, or the 1 x 1 graph without one."""
    topo = load_topology(cfg.parallel.topology) if cfg.parallel is not None else single_actor()
    return build_graph(topo, num_layers, n_routed_experts)


def optim_config(cfg: TrainConfig) -> OptimConfig:
    o, total = cfg.optim, cfg.total_steps
    return OptimConfig(lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay, muon_momentum=o.muon_momentum,
                       update_rms=o.update_rms, warmup_steps=o.warmup_steps,
                       decay_start=int(o.decay_start_frac * total), total_steps=total, use_muon=o.muon)


class Trainer:
    """The curriculum trainer over an actor graph; see the module docstring.

    Args:
        cfg: a validated ``TrainConfig``.
        report: called after every step with the metrics row and, when a checkpoint was
            committed at that step, its directory.
        progress: ``"bar"`` (tqdm, interactive), ``"lines"`` (one line every ``log_every``
            steps: what Ray forwards from a job) or ``"none"``.
        in_process: run the 1 x 1 graph's worker in this process (no Ray).
        attempt: 0 for the first start, n for the n-th restart (names the actors apart).
    """

    def __init__(self, cfg: TrainConfig, *, report: ReportFn | None = None, progress: str = "bar",
                 log_every: int = 10, log: Callable[[str], None] | None = None, in_process: bool = False,
                 attempt: int = 0):
        if progress not in ("bar", "lines", "none"):
            raise ValueError(f"progress must be 'bar', 'lines' or 'none', got {progress!r}")
        self.cfg, self.report, self.progress, self.log_every = cfg, report, progress, log_every
        self.in_process, self.attempt = in_process, attempt
        self.run_dir = cfg.run_dir()
        self.ckpt_root = self.run_dir / "checkpoints"
        self.log = log or (lambda msg: print(msg, flush=True))
        self.step = 0
        self.stage_index = -1
        self.ema: float | None = None
        self.ema_count = 0
        self.spikes: list[int] = []
        self.rollbacks = 0
        self.history: list[dict] = []
        self.routing = RoutingSchedule(cfg.spike.delta, cfg.spike.anticipatory_steps)
        self.queue: deque[tuple[int, dict]] = deque()  # batches fetched early (anticipatory routing)
        self.routed: set[int] = set()  # steps whose routing the actors hold
        self.group = None
        self.trace_window: tuple[int, int] | None = None
        self.tracing = False
        self.metrics = TrainingMetrics(cfg.name)  # ray.util.metrics (no-op without Ray)

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        info = run_info(cfg)
        self.tokenizer, self.stream = prepare_data(
            cfg.data.source, vocab_size=cfg.data.vocab_size, cache_dir=self.run_dir / "data",
            tokenizer_path=cfg.data.tokenizer, max_bytes=cfg.data.max_bytes, text_field=cfg.data.text_field)
        save_tokenizer_files(self.tokenizer, self.run_dir)  # served / exported with the checkpoints
        self.args = model_args_for(cfg, cfg.data.vocab_size)
        self.optim_cfg = optim_config(cfg)
        self.graph = graph_of(cfg, self.args.num_hidden_layers, self.args.n_routed_experts)
        self._start_group()
        self._check_storage()
        info["actors"] = [{**p, **i} for p, i in zip(self.group.placements, self.group.info, strict=True)]
        (self.run_dir / "run_info.json").write_text(json.dumps(info, indent=2, default=str))
        _, st0, _ = cfg.stage_at(0)
        self.loader = TokenLoader(self.stream, st0.seq_len, sequences_per_batch(st0.batch_tokens, st0.seq_len),
                                  seed=cfg.seed)
        if self.ckpt_root.exists():
            ckpt.cleanup_debris(self.ckpt_root)  # .tmp-* left by a crash mid-save
        src = self._intact_checkpoint()
        if src is not None:
            self.restore(src, verified=True)  # _intact_checkpoint hashed it
            self.log(f"resumed from {src} at step {self.step}")
        else:
            self._truncate_metrics(0)
            self.save(good=True)  # step 0: the rollback target of last resort

    def _check_storage(self) -> None:
        """Every actor writes its checkpoint shards into the run directory the driver commits, so
        every actor must see that directory. A probe file written here must be visible to each
        actor; on a graph that spans machines, a relative ``storage_path`` is refused as well
        (simulated racks on one machine share its disk).

        Raises:
            ValueError: naming the actors (and hosts) that do not see the run directory.
        """
        import uuid

        hosts = sorted({p.get("host") for p in self.group.placements})
        if len(hosts) > 1 and not Path(self.cfg.storage_path).expanduser().is_absolute():
            raise ValueError(f"storage_path {self.cfg.storage_path!r} is relative, but the actor graph spans "
                             f"{len(hosts)} machines ({', '.join(map(str, hosts))}): give an absolute path on "
                             f"storage every node mounts at the same place (NFS, Lustre, a FUSE-mounted bucket)")
        probe = self.run_dir / f".storage-probe-{uuid.uuid4().hex}"
        probe.write_text("tide")
        try:
            seen = self.group.call("sees", str(probe))
        finally:
            probe.unlink(missing_ok=True)
        blind = [f"rank {p['rank']} on {p.get('host')}" for p, ok in zip(self.group.placements, seen, strict=True)
                 if not ok]
        if blind:
            raise ValueError(f"the run directory {self.run_dir} is not visible to {', '.join(blind)}: the actors "
                             f"write their checkpoint shards there, so storage_path must be storage every node "
                             f"mounts at the same path (NFS, Lustre, a FUSE-mounted bucket), not a node-local disk")

    def _intact_checkpoint(self) -> Path | None:
        """The newest checkpoint whose every file matches its manifest (sizes and sha256).

        Damaged newer ones (a flipped byte, a truncated file) are named and moved aside
        (``store.set_aside``: ``checkpoints/damaged/``), and the run resumes from the newest
        intact one. None: the run has no checkpoint yet.

        Raises:
            ValueError: the run has checkpoints but none is intact (nothing is moved: a run never
                starts over on top of its own checkpoints).
        """
        if not self.ckpt_root.is_dir():
            return None
        damaged: list[tuple[Path, str]] = []
        for path in reversed(ckpt.list_checkpoints(self.ckpt_root)):
            problems = ckpt.verify_checkpoint(path, hash_files=True)
            if not problems:
                for bad, why in damaged:
                    dest = ckpt.set_aside(bad)
                    self.log(f"checkpoint {bad.name} is damaged: {why}; moved aside to {dest}")
                if damaged:
                    self.log(f"resuming from {path.name}, the newest intact checkpoint")
                return path
            damaged.append((path, problems[0]))
        if damaged:
            raise ValueError(f"{self.ckpt_root}: no intact checkpoint to resume from; the newest: {damaged[0][1]}; "
                             f"move the damaged ones aside to start over")
        return None

    def _start_group(self) -> None:
        from actors.group import LocalGroup, StageGroup
        from cluster.launch.link_model import load_link_model
        from comm.link_model import LinkModel

        cfg, par, o = self.cfg, self.cfg.parallel, self.optim_cfg
        link = None
        if par is not None and par.link_model == "default":
            link = LinkModel().to_dict()
        elif par is not None and par.link_model:
            link = load_link_model(par.link_model).to_dict()
        kwargs = dict(seed=cfg.seed, link=link, trace=False, optim=dataclasses.asdict(o),
                      activation_checkpointing=cfg.activation_checkpointing, deterministic=cfg.deterministic,
                      init=cfg.init,
                      microbatches=par.microbatches if par else 1, waves=par.waves if par else 1,
                      expert_waves=par.expert_waves if par else None, schedule=par.schedule if par else "1f1b",
                      bucket_mb=par.bucket_mb if par else 25.0)
        topo = load_topology(par.topology) if par is not None else None
        racks = sorted({a.rack for a in self.graph.actors if a.rack is not None})
        shape = "1 stage x 1 shard (the whole model)"
        if topo:
            shape = self.graph.shape() + (f" on racks {racks}" if racks else " on any node")
        name = f"tide/{cfg.name}" + (f"/restart{self.attempt}" if self.attempt else "")
        where = "in this process" if self.in_process else "as Ray actors"
        self.log(f"starting {len(self.graph.actors)} stage actor(s) {where}: {shape}")
        group_cls = LocalGroup if self.in_process else StageGroup
        self.group = group_cls(self.graph, self.args.to_dict(), name=name, **kwargs)
        for p, i in zip(self.group.placements, self.group.info, strict=True):
            (l0, l1), (e0, e1) = i["layers"], i["experts"]
            rep = f"replica {i['dp_rank']} " if self.graph.data_parallel > 1 else ""
            self.log(f"  rank {p['rank']}: {rep}stage {p['stage']} shard {p['ep_rank']}"
                     + (f" on rack {p['rack']}" if p.get("rack") else "")
                     + f" (pid {p['pid']}, {i['threads']} threads): layers {l0}..{l1 - 1}, experts {e0}..{e1 - 1}, "
                     f"{i['params'] / 1e6:.2f}M params")

    # ------------------------------------------------------------- checkpoint
    def _layout(self, infos: list[dict]) -> dict:
        layout = pckpt.make_layout(self.graph.layer_slices, self.graph.expert_parallel,
                                   self.args.n_routed_experts, self.graph.data_parallel)
        layout["shards"] = {pckpt.shard_group(i["stage"], i["ep_rank"], i.get("dp_rank", 0)): i for i in infos}
        return layout

    def save(self, good: bool) -> Path:
        """A checkpoint of this step: every actor writes its own shard file into the uncommitted
        directory and reports its sha256; the driver writes the meta and the manifest last and
        commits with the atomic rename (``cluster.checkpoint.sharded.commit_pipeline_checkpoint``).
        No tensor passes through the driver."""
        cfg = self.cfg
        crash_rank = None
        marker = self.run_dir / ".injected_checkpoint_failure_done"
        if cfg.fail_at_checkpoint == self.step and not marker.exists():
            marker.write_text("1")
            crash_rank = len(self.graph.actors) - 1
            self.log(f"injected failure: the last stage actor dies while writing checkpoint {self.step}")
        tmp = ckpt.begin_checkpoint(self.ckpt_root, self.step)
        try:
            written = self.group.call("write_shard", str(tmp), pckpt.SHARD_GROUP_FORMAT, crash_rank,
                                      pckpt.REPLICA_GROUP_FORMAT)
        except BaseException:
            ckpt.abort_checkpoint(tmp)
            raise
        infos = [{k: w[k] for k in ("stage", "ep_rank", "expert_lo", "expert_hi", "layers")}
                 | ({"dp_rank": w["dp_rank"]} if w.get("dp_rank") else {}) for w in written]
        meta = {"loader": self.loader.state_dict(), "rng": ckpt.rng_state(), "stage_index": self.stage_index,
                "ema": self.ema, "ema_count": self.ema_count, "spikes": self.spikes, "rollbacks": self.rollbacks,
                "model_args": self.args.to_dict()}
        path = pckpt.commit_pipeline_checkpoint(tmp, self.step, written, self._layout(infos), meta,
                                                keep=self.cfg.checkpoint.keep)
        if good:
            ckpt.mark_good(path)
        self._plot()
        return path

    def _load_weights(self, path: Path, *, verified: bool = False) -> dict:
        """Load checkpoint ``path`` into the actors. A sharded checkpoint (any layout) is read by
        each actor for its own tensors (``StageWorker.load_shards``) after the driver verified
        every file's sha256; nothing passes through the driver. A one-process checkpoint of an
        earlier version is converted on the driver (``sharded.load_pipeline_full``)."""
        meta = pckpt.read_meta(path)
        if meta.get("model_args") != self.args.to_dict():
            raise ValueError(f"{path} holds a checkpoint of a different model than this config describes; "
                             f"resume with the config it was trained with, or start a new run (--name)")
        if meta.get("layout") is not None:
            sources = pckpt.shard_sources(path, meta, verify=not verified)  # sizes + sha256 of every file
            self.group.call("load_shards", sources)
        else:
            model, optim, meta = pckpt.load_pipeline_full(path)
            self.group.call("load_state", self.group.put(model), self.group.put(optim))
        layout = meta.get("layout")
        def words(D, P, E):
            return (f"{D} data-parallel replicas x " if D > 1 else "") + f"{P} stage(s) x {E} expert shard(s)"
        src = (words(layout.get("data_parallel", 1), layout["pipeline_stages"], layout["expert_parallel"]) if layout
               else "one process (an earlier version's format)")
        dst = self.graph.shape()
        if src != dst:
            self.log(f"re-layout: {path.name} was written by {src}; loaded into {dst}"
                     + ("" if meta.get("optimizer_converted", True) else " (optimizer state not converted: fresh)"))
        return meta

    def restore(self, path: Path, *, verified: bool = False) -> None:
        """Exact resume: weights, optimizer, loader position, RNG, spike state, step (``verified``:
        ``path`` was just checked against its manifest, do not hash it again)."""
        meta = self._load_weights(path, verified=verified)
        self.loader.load_state_dict(meta["loader"])
        ckpt.set_rng_state(meta["rng"], strict=False)
        self.step = int(meta["step"])
        self.stage_index = -1  # re-applied (mode, shape) by the loop; loader shape is already restored
        self.ema, self.ema_count = meta["ema"], meta["ema_count"]
        self.spikes, self.rollbacks = list(meta["spikes"]), meta["rollbacks"]
        self._truncate_metrics(self.step)

    # ---------------------------------------------------------------- metrics
    def _truncate_metrics(self, step: int) -> None:
        """Keep metrics rows of steps < ``step`` (a resumed run rewrites the rest)."""
        f = self.run_dir / "metrics.jsonl"
        rows = [r for r in read_metrics(self.run_dir) if r["step"] < step] if step > 0 else []
        f.write_text("".join(json.dumps(r) + "\n" for r in rows))
        self.history = rows

    def _write_metrics(self, row: dict) -> None:
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        self.history.append(row)

    def _plot(self) -> None:
        if self.history:
            plot_losses(self.history, self.cfg, self.spikes, self.run_dir / "loss.png")

    # ------------------------------------------------------------ the steps
    def _apply_stage(self):
        idx, stage, start = self.cfg.stage_at(self.step)
        if idx != self.stage_index:
            self.stage_index = idx
            self.group.call("set_attention_mode", stage.attention)
            bs = sequences_per_batch(stage.batch_tokens, stage.seq_len)
            if (self.loader.seq_len, self.loader.batch_size) != (stage.seq_len, bs):
                self.loader.set_shape(stage.seq_len, bs)
            if self.step == start:  # a new stage has a new loss level: restart the spike EMA
                self.ema, self.ema_count = None, 0
            self.log(f"stage {idx} '{stage.name}': seq_len {stage.seq_len}, {bs} seq/step, "
                     f"attention {stage.attention}, steps {start}..{start + stage.num_steps() - 1}")
        return stage

    def loss_config(self, step: int) -> LossConfig:
        """The objective's weights at ``step`` (its stage's mode and MTP weight, 0.1 once the decay starts)."""
        cfg = self.cfg
        _, stage, _ = cfg.stage_at(step)
        decaying = step >= (self.optim_cfg.decay_start or 1 << 62)
        mtp_w = min(stage.mtp_weight, cfg.optim.mtp_weight_after_decay) if decaying else stage.mtp_weight
        return LossConfig(mode=stage.attention, mtp_weight=mtp_w, balance_weight=cfg.balance.sequence_weight,
                          mtp_balance=cfg.balance.mtp)

    def _next_batch(self) -> tuple[dict, int | None, bool]:
        """The batch of this step, the key of its cached routing (None: select) and whether this step
        routed a later batch ahead (anticipatory routing, see ``cluster.training.routing``)."""
        t, delta = self.step, self.routing.delta
        if self.queue:
            step_of, batch = self.queue.popleft()
            assert step_of == t, (step_of, t)
        else:
            batch = self.loader.next_batch()
        routed_ahead = False
        target = t + delta
        if self.routing.routes_ahead(t) and self.cfg.stage_at(target)[0] == self.cfg.stage_at(t)[0]:
            while len(self.queue) < delta:  # batches t+1 .. t+delta, in order
                self.queue.append((t + 1 + len(self.queue), self.loader.next_batch()))
            step_of, ahead = self.queue[-1]
            assert step_of == target, (step_of, target)
            self.group.call("route_ahead", self.group.put(ahead), dataclasses.asdict(self.loss_config(target)),
                            target)
            self.routed.add(target)
            routed_ahead = True
        key = t if t in self.routed else None
        self.routed.discard(t)
        return batch, key, routed_ahead

    def _is_spike(self, ce: float, grad_norm: float) -> bool:
        sp = self.cfg.spike
        if not sp.enabled:
            return False
        if not (math.isfinite(ce) and math.isfinite(grad_norm)):
            return True
        return self.ema is not None and self.ema_count >= sp.min_steps and ce > sp.factor * self.ema

    def _rollback(self) -> Path | None:
        good = ckpt.latest_checkpoint(self.ckpt_root, good_only=True)
        if good is not None:
            self._load_weights(good)
        self.rollbacks += 1
        self.metrics.inc("tide_train_rollbacks")
        if self.cfg.spike.anticipatory_steps > 0:
            self.routing.rollback(self.step)
            self.routed.clear()
            self.group.call("drop_routing")  # computed with the parameters just replaced
        return good

    def _maybe_trace(self) -> None:
        n = self.cfg.parallel.trace_steps if self.cfg.parallel else 0
        if n and self.trace_window is None:  # relative to where this run (or resume) starts; skip its first step
            first = self.step + (1 if self.cfg.total_steps - self.step > 1 else 0)
            self.trace_window = (first, min(self.cfg.total_steps, first + n))
        if self.trace_window and self.step == self.trace_window[0]:
            self.group.call("set_trace", True)
            self.tracing = True

    def _maybe_write_trace(self) -> None:
        if not (self.tracing and self.step >= self.trace_window[1] - 1):
            return
        from comm.trace import plot_timeline, summarize, write_chrome_trace

        self.tracing = False
        events = [e for ev in self.group.call("trace_events") for e in ev]
        self.group.call("set_trace", False)
        path = write_chrome_trace(events, self.run_dir / "trace.json")
        png = plot_timeline(events, self.run_dir / "timeline.png",
                            title=f"{self.cfg.name}: steps {self.trace_window[0]}..{self.step}")
        s = summarize(events)
        (self.run_dir / "trace_summary.json").write_text(json.dumps(s, indent=2, default=str))
        self.metrics.communication(s)
        self.log(f"timeline of steps {self.trace_window[0]}..{self.step}: {path} "
                 f"(open in https://ui.perfetto.dev or chrome://tracing), {png}; bubble {s['bubble']:.2f}, "
                 f"comm overlapped {s['overlap_fraction']:.0%}")

    def train_step(self, batch: dict, stage, routing_key: int | None) -> dict:
        """One optimisation step on ``batch``; returns its metrics row (see ``metrics.jsonl``)."""
        cfg = self.cfg
        lr = lr_at(self.step, self.optim_cfg, stage.lr_mult)
        loss_cfg = self.loss_config(self.step)
        self._maybe_trace()
        metrics = self.group.call("forward_backward", self.group.put(batch), dataclasses.asdict(loss_cfg),
                                  cfg.optim.grad_clip, routing_key)[0]
        grad_norm = metrics.pop("grad_norm")
        metrics.pop("kl_rows", None)
        watched = metrics.get("indexer_kl", 0.0) if stage.attention == "indexer_warmup" else metrics["ce"]
        spike = self._is_spike(watched, grad_norm) if stage.attention != "indexer_warmup" else \
            not math.isfinite(watched)
        row = {"step": self.step, "stage": self.stage_index, "seq_len": stage.seq_len,
               "attention": stage.attention, "lr": lr, "grad_norm": grad_norm, **metrics,
               "tokens": int(batch["input_ids"].numel()), "anticipatory_routing": routing_key is not None}
        if routing_key is not None:
            row["routing_lag"] = self.routing.delta
        if spike:
            self.group.call("discard")
            self._maybe_write_trace()
            self.spikes.append(self.step)
            self.metrics.inc("tide_train_loss_spikes")
            good = self._rollback()
            row.update(spike=True, rolled_back_to=str(good) if good else None)
            self.log(f"loss spike at step {self.step} (ce {metrics['ce']:.3f}, EMA {self.ema}); update skipped, "
                     f"rolled back to {good.name if good else 'nothing'}"
                     + (f"; anticipatory routing from step {self.routing.first_forced} to {self.routing.last_forced}"
                        if self.routing.forced(self.routing.first_forced) else ""))
        else:
            bias = cfg.balance.bias_update_speed if stage.attention != "indexer_warmup" else None
            cv = self.group.call("apply", lr, bias)[0]
            self._maybe_write_trace()
            if stage.attention != "indexer_warmup":
                if cv:
                    row["load_cv_mean"] = sum(cv.values()) / len(cv)
                    row["load_cv_max"] = max(cv.values())
                    row.update(cv)
                b = cfg.spike.ema_beta
                self.ema = watched if self.ema is None else b * self.ema + (1 - b) * watched
                self.ema_count += 1
        return row

    def _inject_failure(self) -> None:
        """Testing hook (``fail_at_step``): the last stage actor dies; the step then fails and
        :func:`train` restarts the graph from the last checkpoint."""
        self.log(f"injected failure at step {self.step}: killing the last stage actor")
        self.group.crash_last()

    # ------------------------------------------------------------------- run
    def run(self) -> dict:
        """Train to the end of the curriculum; returns :func:`run_summary`."""
        self.setup()
        cfg = self.cfg
        total = cfg.total_steps
        bar = None
        if self.progress == "bar":
            from tqdm import tqdm

            bar = tqdm(total=total, initial=self.step, desc="train", unit="step", file=sys.stdout,
                       mininterval=1.0, dynamic_ncols=True)
        fail_marker = self.run_dir / ".injected_failure_done"
        log = self.log
        if bar is not None:  # messages above the bar, not glued to it
            self.log = bar.write
        try:
            while self.step < total:
                stage = self._apply_stage()
                if cfg.fail_at_step is not None and self.step == cfg.fail_at_step and not fail_marker.exists():
                    fail_marker.write_text("1")
                    self._inject_failure()
                t0 = time.perf_counter()
                batch, key, routed_ahead = self._next_batch()  # includes the routing pass when it is on
                if cfg.inject_spike_at_step == self.step:
                    g = torch.Generator().manual_seed(self.step)
                    rnd = torch.randint(3, cfg.data.vocab_size, batch["input_ids"].shape, generator=g)
                    # garbage in, one constant (rare) token out: what a corrupt shard looks like to the loss
                    batch = {**batch, "input_ids": rnd, "labels": torch.full_like(rnd, cfg.data.vocab_size - 1)}
                row = self.train_step(batch, stage, key)
                row["routing_pass"] = routed_ahead
                row["step_time"] = time.perf_counter() - t0
                row["tokens_per_s"] = row["tokens"] / row["step_time"]
                self._write_metrics(row)
                self.metrics.step(row)
                self.step += 1
                committed = None
                due = self.step % cfg.checkpoint.every_steps == 0 or self.step == total
                if due and not self.routing.active(self.step) and not self.queue and not self.routed:
                    recent_spike = bool(self.spikes) and self.spikes[-1] >= self.step - cfg.checkpoint.every_steps
                    committed = self.save(good=not recent_spike)
                    self.metrics.inc("tide_train_checkpoints")
                if bar is not None:
                    bar.set_postfix(stage=cfg.curriculum[self.stage_index].name, loss=f"{row['ce']:.3f}",
                                    tok_s=f"{row['tokens_per_s']:.0f}", refresh=False)
                    bar.update(1)
                elif self.progress == "lines" and (self.step % self.log_every == 0 or self.step == total):
                    self.log(f"step {self.step}/{total} [{cfg.curriculum[self.stage_index].name}] "
                             f"loss {row['ce']:.3f} lr {row['lr']:.2e} {row['tokens_per_s']:.0f} tok/s"
                             + (" (anticipatory routing)" if row["anticipatory_routing"] else "")
                             + (f" checkpoint {committed.name}" if committed else ""))
                if self.report is not None:
                    self.report(row, committed)
        finally:
            self.log = log
            if bar is not None:
                bar.close()
        self._record_memory()
        self._plot()
        return run_summary(self.cfg)

    def _record_memory(self) -> None:
        """``actor_memory.json``: what every stage actor holds at the end of the run (parameters,
        gradients, optimizer state, peak resident memory; ``StageWorker.memory``), to compare with
        ``tide plan``'s memory plan."""
        mem = self.group.call("memory")
        where = {p["rank"]: p for p in self.group.placements}
        rows = [{**m, **{k: where[m["rank"]].get(k) for k in ("dp_rank", "stage", "ep_rank", "rack", "host")}}
                for m in mem]
        (self.run_dir / "actor_memory.json").write_text(json.dumps(rows, indent=2))
        peaks = [r["peak_rss"] for r in rows if r.get("peak_rss")]
        if peaks:
            self.log(f"actor memory: peak {max(peaks) / 2**30:.2f} GiB (largest of {len(rows)} actor(s)); "
                     f"per actor in {self.run_dir / 'actor_memory.json'}")

    def shutdown(self) -> None:
        """Stop the stage actors (or close the in-process worker)."""
        if self.group is not None:
            self.group.shutdown()
            self.group = None


# ----------------------------------------------------------------- summaries
def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of ``<run_dir>/metrics.jsonl`` (empty when there is none)."""
    f = Path(run_dir) / "metrics.jsonl"
    if not f.is_file():
        return []
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]


def run_summary(cfg: TrainConfig) -> dict:
    """What a run has done, read from its directory (the same after training, on an already finished
    run, and for ``tide train`` to print): steps, first and final loss (mean of the last 5 steps' CE),
    spikes, rollbacks, the anticipatory-routing overhead (median step time of the steps that route
    ahead over the median of ordinary steps of the same stages, the first 3 steps excluded), the
    newest committed checkpoint and the files."""
    run_dir = cfg.run_dir()
    h = read_metrics(run_dir)
    latest = ckpt.latest_checkpoint(run_dir / "checkpoints") if (run_dir / "checkpoints").is_dir() else None
    ar = sorted(r["step_time"] for r in h if r.get("routing_pass"))
    ar_stages = {r["stage"] for r in h if r.get("routing_pass")}
    normal = sorted(r["step_time"] for r in h[3:] if not r.get("routing_pass") and not r.get("anticipatory_routing")
                    and not r.get("spike") and r["stage"] in ar_stages)
    last = h[-5:]
    return {"run_dir": str(run_dir), "steps": ckpt.checkpoint_step(latest) if latest else len(h),
            "first_loss": h[0]["ce"] if h else None,
            "final_loss": sum(r["ce"] for r in last) / len(last) if last else None,
            "ln_vocab": math.log(cfg.data.vocab_size), "spikes": [r["step"] for r in h if r.get("spike")],
            "rollbacks": sum(1 for r in h if r.get("spike")),
            "anticipatory_overhead": ar[len(ar) // 2] / normal[len(normal) // 2] - 1 if ar and normal else None,
            "checkpoint": str(latest) if latest else None, "loss_png": str(run_dir / "loss.png"),
            "metrics_jsonl": str(run_dir / "metrics.jsonl")}


# ---------------------------------------------------------------- the program
@contextlib.contextmanager
def run_lock(cfg: TrainConfig):
    """Hold ``<run_dir>/.lock`` (an exclusive ``flock``) while a run trains: a second ``tide train``
    (or ``ray job submit``) of the same run directory is refused instead of interleaving its steps and
    checkpoints with the first's. The lock is the kernel's: a killed process never leaves it held.

    Raises:
        ValueError: the run is being trained by another process (named, when it wrote its name).
    """
    import fcntl

    run_dir = cfg.run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / ".lock"
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = path.read_text().strip() or "another process"
            raise ValueError(f"run '{cfg.name}' ({run_dir}) is being trained by {holder}; wait for it to finish "
                             f"(then the same command resumes it) or give another --name") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {platform.node()}\n")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            fcntl.flock(f, fcntl.LOCK_UN)


def train(cfg: TrainConfig, *, address: str | None = None, progress: str = "bar", in_process: bool = False,
          extra_cpus: dict[str, float] | None = None, after: Callable[[dict, TrainConfig], Any] | None = None,
          report: ReportFn | None = None) -> dict:
    """Run ``cfg`` to the end: connect to Ray (or simulate its racks), train with restarts, summarise.

    Args:
        address: a Ray cluster to join (default ``RAY_ADDRESS``, a live local head, else embedded;
            ``cluster.launch.connect``).
        in_process: the 1 x 1 graph's worker in this process, no Ray (a ``parallel`` section
            with more than one actor is refused).
        extra_cpus: CPUs per rack to reserve on top of the actors' (e.g. a Serve replica to start
            in ``after``).
        after: ``after(summary, cfg)`` once training is done, while the cluster is still up (e.g.
            ``deploy.serve.serve_and_ask``); its result is stored as ``summary["after"]``.

    Raises:
        ValueError: a config the graph cannot run (before anything starts), nothing to join, the run
            already being trained by another process (``run_lock``).
        RuntimeError: the run failed ``ray.max_failures + 1`` times.
    """
    with run_lock(cfg):
        return _train(cfg, address=address, progress=progress, in_process=in_process, extra_cpus=extra_cpus,
                      after=after, report=report)


def _train(cfg, *, address, progress, in_process, extra_cpus, after, report) -> dict:
    from ray.exceptions import RayActorError

    from actors.group import ActorDied
    from cluster.launch.connect import connect_ray

    latest = ckpt.latest_checkpoint(cfg.run_dir() / "checkpoints") if (cfg.run_dir() / "checkpoints").is_dir() \
        else None
    # finished only if that last checkpoint is intact to the byte (else the Trainer sets it aside and trains on)
    finished = (latest is not None and ckpt.checkpoint_step(latest) >= cfg.total_steps
                and not ckpt.verify_checkpoint(latest, hash_files=True))
    if finished:
        print(f"tide: run '{cfg.name}' already finished ({latest.name}); nothing to train", flush=True)
        if after is None:
            return run_summary(cfg)
    args = model_args_for(cfg, cfg.data.vocab_size)
    graph = graph_of(cfg, args.num_hidden_layers, args.n_routed_experts)
    if in_process and len(graph.actors) != 1:
        raise ValueError(f"--in-process runs the 1 x 1 graph; this config's topology has {len(graph.actors)} actors")
    conn = None
    if not in_process or after is not None:
        conn = connect_ray(graph.cpus_per_rack(extra_cpus), address=address,
                           simulate=cfg.parallel.local_racks if cfg.parallel else True)
        print(f"tide: {conn.mode}; run '{cfg.name}' in {cfg.run_dir()} "
              f"({len(cfg.curriculum)} curriculum stages, {cfg.total_steps} steps)", flush=True)
    try:
        for attempt in range(0 if finished else cfg.ray.max_failures + 1):
            trainer = Trainer(cfg, progress=progress, in_process=in_process, attempt=attempt, report=report)
            try:
                trainer.run()
                break
            except (RayActorError, ActorDied) as e:
                if attempt == cfg.ray.max_failures:
                    raise RuntimeError(f"run '{cfg.name}' failed after {attempt + 1} attempts: {e}") from e
                print(f"tide: a stage actor died ({type(e).__name__}); restarting the actor graph from the last "
                      f"checkpoint (attempt {attempt + 2} of {cfg.ray.max_failures + 1})", flush=True)
            finally:
                trainer.shutdown()
        summary = run_summary(cfg)
        if after is not None:  # while the (simulated) racks are still up
            summary["after"] = after(summary, cfg)
    finally:
        if conn is not None:
            conn.shutdown()
    return summary


__all__ = ["Trainer", "train", "run_summary", "read_metrics", "run_info", "graph_of", "optim_config"]
