"""Curriculum training across racks: the ``Trainer`` driving stage actors (issue 4).

``PipelineTrainer`` is ``cluster.trainer.Trainer`` (same curriculum, data,
schedule, spike detection with rollback, metrics, plots, checkpoints) where the
model lives in the ``StageWorker`` actors of the run's ``ActorGraph`` instead of
this process: every step the driver puts the batch in the object store once and
every actor runs its part of the pipeline (``comm.pipeline``); the driver only
sees global metrics. Checkpoints hold one group per (stage, expert shard)
(``cluster.pipeline_checkpoint``) and load into any layout -- or from a
single-process run's checkpoint.

Not (yet) in pipeline runs: anticipatory routing after a rollback (the rollback
itself works); it is logged and skipped.
"""

from __future__ import annotations

import json
from pathlib import Path

import ray

from actors.group import StageGroup
from comm.link_model import LinkModel
from comm.trace import plot_timeline, summarize, write_chrome_trace
from model.training import LossConfig

from . import checkpoint as ckpt
from . import pipeline_checkpoint as pckpt
from .topology import build_graph, load_topology
from .trainer import Trainer


class PipelineTrainer(Trainer):
    """``Trainer`` over a ``StageGroup`` (see module docstring); requires ``cfg.parallel`` and a Ray connection."""

    def _build(self) -> None:
        par = self.cfg.parallel
        if par is None:
            raise ValueError("PipelineTrainer needs a `parallel` section in the training config")
        self.topology = load_topology(par.topology)
        self.graph = build_graph(self.topology, self.args.num_hidden_layers, self.args.n_routed_experts)
        link = None
        if par.link_model == "default":
            link = LinkModel().to_dict()
        elif par.link_model:
            link = LinkModel.from_file(par.link_model).to_dict()
        o = self.optim_cfg
        optim = dict(lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay, muon_momentum=o.muon_momentum,
                     update_rms=o.update_rms, warmup_steps=o.warmup_steps, decay_start=o.decay_start,
                     total_steps=o.total_steps, use_muon=o.use_muon)
        self.log(f"starting {len(self.graph.actors)} stage actors: {self.topology.pipeline_stages} stages x "
                 f"{self.topology.expert_parallel} expert shards on racks "
                 f"{sorted({a.rack for a in self.graph.actors})}")
        self.group = StageGroup(self.graph, self.args.to_dict(), seed=self.cfg.seed, microbatches=par.microbatches,
                                waves=par.waves, expert_waves=par.expert_waves, schedule=par.schedule, link=link,
                                trace=False, optim=optim)
        for p, info in zip(self.group.placements, self.group.info, strict=True):
            (l0, l1), (e0, e1) = info["layers"], info["experts"]
            self.log(f"  rank {p['rank']}: stage {p['stage']} shard {p['ep_rank']} on rack {p['rack']} "
                     f"(node {p['node_id'][:8]}, pid {p['pid']}): layers {l0}..{l1 - 1}, experts {e0}..{e1 - 1}, "
                     f"{info['params'] / 1e6:.2f}M params")
        self.model = None
        self.optimizer = None
        self.trace_window: tuple[int, int] | None = None  # [start, end) steps, fixed at this run's first step
        self.tracing = False

    # ------------------------------------------------------------- the step
    def _set_mode(self, mode: str) -> None:
        self.group.call("set_attention_mode", mode)

    def _forward_backward(self, batch, loss_cfg: LossConfig, forced, clip):
        n = self.cfg.parallel.trace_steps
        if n and self.trace_window is None:  # relative to where this run (or resume) starts; skip its first step
            first = self.step + (1 if self.cfg.total_steps - self.step > 1 else 0)
            self.trace_window = (first, min(self.cfg.total_steps, first + n))
        if self.trace_window and self.step == self.trace_window[0]:
            self.group.call("set_trace", True)
            self.tracing = True
        metrics = self.group.call("forward_backward", ray.put(batch), vars(loss_cfg), clip)[0]
        grad_norm = metrics.pop("grad_norm")
        metrics.pop("kl_rows", None)
        return metrics, grad_norm

    def _apply_update(self, lr: float, bias_speed: float | None) -> dict[str, float]:
        cv = self.group.call("apply", lr, bias_speed)[0]
        self._maybe_write_trace()
        return cv

    def _maybe_write_trace(self) -> None:
        if self.tracing and self.step >= self.trace_window[1] - 1:
            self._write_trace()

    def _inject_failure(self) -> None:
        """Testing hook (``fail_at_step``): the last stage actor's process dies; the step then fails with
        ``RayActorError`` and ``cluster.train.run_pipeline`` restarts the actor graph from the last checkpoint."""
        self.log(f"injected failure at step {self.step}: killing the last stage actor")
        self.group.actors[-1].crash.remote()

    def _discard(self) -> None:
        self.group.call("discard")
        self._maybe_write_trace()

    def _rollback(self):
        good = super()._rollback()
        if self.ar_remaining:
            self.log("anticipatory routing is not implemented for pipeline runs yet: continuing without it")
            self.ar_remaining = 0
        return good

    def _write_trace(self) -> None:
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

    # ---------------------------------------------------------- checkpoints
    def _layout(self, infos: list[dict]) -> dict:
        return {"pipeline_stages": self.topology.pipeline_stages, "expert_parallel": self.topology.expert_parallel,
                "layer_slices": [list(s) for s in self.graph.layer_slices],
                "n_routed_experts": self.args.n_routed_experts,
                "shards": {pckpt.shard_group(i["stage"], i["ep_rank"]): i for i in infos}}

    def save(self, good: bool) -> Path:
        states = self.group.call("state")
        infos = self.group.call("shard_info")
        shards = {(i["stage"], i["ep_rank"]): st for i, st in zip(infos, states, strict=True)}
        meta = {"loader": self.loader.state_dict(), "rng": ckpt.rng_state(), "stage_index": self.stage_index,
                "ema": self.ema, "ema_count": self.ema_count, "spikes": self.spikes, "rollbacks": self.rollbacks,
                "model_args": self.args.to_dict()}
        path = pckpt.save_pipeline_checkpoint(self.ckpt_root, self.step, shards, self._layout(infos), meta,
                                              keep=self.cfg.checkpoint.keep)
        if good:
            ckpt.mark_good(path)
        self._plot()
        return path

    def _load_weights(self, path: Path) -> dict:
        model, optim, meta = pckpt.load_pipeline_full(path)
        if meta.get("model_args") != self.args.to_dict():
            raise ValueError(f"{path} holds a checkpoint of a different model than this config describes; "
                             f"resume with the config it was trained with, or start a new run (--name)")
        self.group.call("load_state", ray.put(model), ray.put(optim))
        layout = meta.get("layout")
        src = (f"{layout['pipeline_stages']} stage(s) x {layout['expert_parallel']} expert shard(s)" if layout
               else "one process")
        dst = f"{self.topology.pipeline_stages} stage(s) x {self.topology.expert_parallel} expert shard(s)"
        if src != dst:
            self.log(f"re-layout: {path.name} was written by {src}; loaded into {dst}"
                     + ("" if meta.get("optimizer_converted", True) else " (optimizer state not converted: fresh)"))
        return meta

    def shutdown(self) -> None:
        if getattr(self, "group", None) is not None:
            self.group.shutdown()
            self.group = None
