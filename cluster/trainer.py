"""The curriculum training loop (single stage: one process holds the whole model).

``Trainer(cfg).run()`` trains a DeepSeek-V4 model on real text with the V4 recipe:

- curriculum stages looked up by global step (``TrainConfig.stage_at``); at a stage
  change the loader's sequence length / batch size and the attention mode change;
- Muon + AdamW with warmup -> constant -> cosine (decay over the last
  ``1 - decay_start_frac`` of all steps; the MTP weight drops to 0.1 when it starts);
- auxiliary-loss-free bias update + sequence-wise balance loss, load CV logged;
- loss-spike control: a spike is a non-finite loss or gradient, or a loss above
  ``factor x EMA``. The update is skipped, model + optimizer roll back to the last
  GOOD checkpoint (the data stream moves on past the bad batch; the step counter
  keeps counting), and anticipatory routing is switched on for
  ``anticipatory_steps`` steps: the batch of step t is fetched at step t - delta and
  its routing indices computed with the then-current parameters, cached, and used
  at step t. Checkpoints are deferred while it is on.
- crash-safe checkpoints (``cluster.checkpoint``) every ``every_steps`` and at the
  end; exact resume (model, optimizer, loader position, RNG, spike state);
- ``metrics.jsonl``, ``loss.png`` (stage boundaries marked) and ``run_info.json``
  (resolved config, git SHA, package versions, device) in the run directory.

The step function (``compute_losses`` + optimizer) does not know about stages of a
pipeline, so the pipeline-parallel issue can reuse it per stage.
"""

from __future__ import annotations

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

from cluster import checkpoint as ckpt
from cluster.data import TokenLoader, prepare_data, save_tokenizer_files, sequences_per_batch
from cluster.metrics import TrainingMetrics
from cluster.train_config import TrainConfig, model_args_for
from model import Transformer
from model.moe import MoE
from model.optim import CombinedOptimizer, OptimConfig, lr_at
from model.training import LossConfig, compute_losses, set_attention_mode, update_router_biases

ReportFn = Callable[[dict, "Path | None"], None]


def run_info(cfg: TrainConfig) -> dict[str, Any]:
    """Resolved config, git SHA, package versions and device (DESIGN convention 9)."""
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


class Trainer:
    """Curriculum trainer; see the module docstring.

    Args:
        cfg: a validated ``TrainConfig``.
        report: called after every step with the metrics dict and, when a checkpoint
            was committed at that step, its directory (Ray Train's ``report``).
        resume_from: a checkpoint directory to resume from; default: the newest
            committed one in ``<run_dir>/checkpoints`` (a fresh run if none).
        progress: ``"bar"`` (tqdm, interactive), ``"lines"`` (one line every
            ``log_every`` steps: what Ray forwards to the driver) or ``"none"``.
    """

    def __init__(self, cfg: TrainConfig, *, report: ReportFn | None = None, resume_from: Path | None = None,
                 progress: str = "bar", log_every: int = 10, log: Callable[[str], None] | None = None):
        if progress not in ("bar", "lines", "none"):
            raise ValueError(f"progress must be 'bar', 'lines' or 'none', got {progress!r}")
        self.log_every = log_every
        self.cfg = cfg
        self.run_dir = cfg.run_dir()
        self.ckpt_root = self.run_dir / "checkpoints"
        self.report = report
        self.progress = progress
        self.log = log or (lambda msg: print(msg, flush=True))
        self.resume_from = resume_from
        self.step = 0
        self.ema: float | None = None
        self.ema_count = 0
        self.ar_remaining = 0
        self.ar_queue: deque = deque()
        self.spikes: list[int] = []
        self.rollbacks = 0
        self.history: list[dict] = []
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
        (self.run_dir / "run_info.json").write_text(json.dumps(run_info(cfg), indent=2, default=str))
        self.tokenizer, self.stream = prepare_data(
            cfg.data.source, vocab_size=cfg.data.vocab_size, cache_dir=self.run_dir / "data",
            tokenizer_path=cfg.data.tokenizer, max_bytes=cfg.data.max_bytes, text_field=cfg.data.text_field)
        save_tokenizer_files(self.tokenizer, self.run_dir)  # served / exported with the checkpoints
        self.args = model_args_for(cfg, cfg.data.vocab_size)
        total = cfg.total_steps
        o = cfg.optim
        self.optim_cfg = OptimConfig(lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
                                     muon_momentum=o.muon_momentum, update_rms=o.update_rms,
                                     warmup_steps=o.warmup_steps, decay_start=int(o.decay_start_frac * total),
                                     total_steps=total, use_muon=o.muon)
        self._build()
        _, st0, _ = cfg.stage_at(0)
        self.loader = TokenLoader(self.stream, st0.seq_len, sequences_per_batch(st0.batch_tokens, st0.seq_len),
                                  seed=cfg.seed)
        self.stage_index = -1
        if self.ckpt_root.exists():
            ckpt.cleanup_debris(self.ckpt_root)  # .tmp-* left by a crash mid-save
        src = self.resume_from or ckpt.latest_checkpoint(self.ckpt_root)
        if src is not None:
            self.restore(Path(src))
            self.log(f"resumed from {src} at step {self.step}")
        else:
            self._truncate_metrics(0)
            self.save(good=True)  # step 0: the rollback target of last resort

    def _build(self) -> None:
        """Create the model and optimizer (one process; ``PipelineTrainer`` starts stage actors instead)."""
        torch.manual_seed(self.cfg.seed)
        self.model = Transformer(self.args)
        self.model.train()
        self.optimizer = CombinedOptimizer(self.model, self.optim_cfg)

    # ------------------------------------------------------------- checkpoint
    def _state(self) -> tuple[dict, dict]:
        opt_t, skel = ckpt.flatten_state(self.optimizer.state_dict())
        meta = {"loader": self.loader.state_dict(), "rng": ckpt.rng_state(), "optimizer_skeleton": skel,
                "stage_index": self.stage_index, "ema": self.ema, "ema_count": self.ema_count,
                "spikes": self.spikes, "rollbacks": self.rollbacks, "model_args": self.args.to_dict()}
        return {"model": self.model.state_dict(), "optimizer": opt_t}, meta

    def save(self, good: bool) -> Path:
        tensors, meta = self._state()
        path = ckpt.save_checkpoint(self.ckpt_root, self.step, tensors, meta, keep=self.cfg.checkpoint.keep,
                                    overwrite=True)
        if good:
            ckpt.mark_good(path)
        self._plot()
        return path

    def _load_weights(self, path: Path) -> dict:
        tensors, meta = ckpt.load_checkpoint(path)
        if meta.get("model_args") != self.args.to_dict():
            raise ValueError(f"{path} holds a checkpoint of a different model than this config describes; "
                             f"resume with the config it was trained with, or start a new run (--name)")
        self.model.load_state_dict(tensors["model"])
        self.optimizer.load_state_dict(ckpt.unflatten_state(tensors["optimizer"], meta["optimizer_skeleton"]))
        return meta

    def restore(self, path: Path) -> None:
        """Exact resume: weights, optimizer, loader position, RNG, spike state, step."""
        meta = self._load_weights(path)
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
        rows = []
        if f.exists() and step > 0:
            rows = [r for r in (json.loads(line) for line in f.read_text().splitlines() if line.strip())
                    if r["step"] < step]
        f.write_text("".join(json.dumps(r) + "\n" for r in rows))
        self.history = rows

    def _write_metrics(self, row: dict) -> None:
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        self.history.append(row)

    def _plot(self) -> None:
        """Loss curve PNG with the curriculum stage boundaries and spikes marked."""
        if not self.history:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [r["step"] for r in self.history]
        fig, ax = plt.subplots(figsize=(9, 4.5))
        ax.plot(steps, [r["ce"] for r in self.history], lw=1.2, label="next-token CE")
        if any("mtp" in r for r in self.history):  # gaps where MTP is off (indexer warm-up)
            ax.plot(steps, [r.get("mtp", float("nan")) for r in self.history], lw=0.8, alpha=0.6, label="MTP CE")
        start = 0
        top = ax.get_ylim()[1]
        for i, st in enumerate(self.cfg.curriculum):
            ax.axvline(start, color="grey", ls="--", lw=0.8)
            y = top - (i % 2) * 0.05 * (top - ax.get_ylim()[0])  # alternate rows so labels never overlap
            ax.text(start, y, f" {st.name}: {st.seq_len} tok, {st.attention}", va="top", fontsize=7,
                    bbox={"fc": "white", "ec": "none", "alpha": 0.7, "pad": 1})
            start += st.num_steps()
        for s in self.spikes:
            ax.axvline(s, color="red", lw=0.8, alpha=0.6)
        ax.axhline(math.log(self.cfg.data.vocab_size), color="black", lw=0.6, ls=":", label="ln(vocab)")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(f"{self.cfg.name}: loss over the curriculum")
        ax.legend(loc="lower left", fontsize=8)
        fig.tight_layout()
        tmp = self.run_dir / ".loss.png.tmp"
        fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
        os.replace(tmp, self.run_dir / "loss.png")

    # ------------------------------------------------------------ the steps
    def _apply_stage(self) -> tuple[Any, int]:
        idx, stage, start = self.cfg.stage_at(self.step)
        if idx != self.stage_index:
            self.stage_index = idx
            self._set_mode(stage.attention)
            bs = sequences_per_batch(stage.batch_tokens, stage.seq_len)
            if (self.loader.seq_len, self.loader.batch_size) != (stage.seq_len, bs):
                self.loader.set_shape(stage.seq_len, bs)
            if self.step == start:  # a new stage has a new loss level: restart the spike EMA
                self.ema, self.ema_count = None, 0
            self.log(f"stage {idx} '{stage.name}': seq_len {stage.seq_len}, {bs} seq/step, "
                     f"attention {stage.attention}, steps {start}..{start + stage.num_steps() - 1}")
        return stage, start

    def _set_mode(self, mode: str) -> None:
        set_attention_mode(self.model, mode)

    def _routed_moes(self) -> list[MoE]:
        return [blk.mlp for blk in self.model.layers if not blk.mlp.gate.hashed]

    @torch.no_grad()
    def _routing_for(self, batch: dict) -> list[torch.Tensor]:
        """Routing indices of every learned-routing MoE layer for ``batch`` with the current parameters."""
        was = self.model.training
        self.model.eval()
        self.model.forward_hidden(batch["input_ids"], doc_ids=batch.get("doc_ids"))
        self.model.train(was)
        return [m.last_indices.clone() for m in self._routed_moes()]

    def _next_batch(self) -> tuple[dict, list[torch.Tensor] | None]:
        if self.ar_remaining > 0:
            while len(self.ar_queue) < self.cfg.spike.delta + 1:  # batch t .. t+delta, routed early
                b = self.loader.next_batch()
                self.ar_queue.append((b, self._routing_for(b)))
            return self.ar_queue.popleft()
        if self.ar_queue:  # drain batches prefetched while anticipatory routing was on
            b, _ = self.ar_queue.popleft()
            return b, None
        return self.loader.next_batch(), None

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
        self.ar_remaining = self.cfg.spike.anticipatory_steps
        return good

    def train_step(self, batch: dict, stage, forced: list[torch.Tensor] | None) -> dict:
        """One optimisation step on ``batch``; returns its metrics (see ``metrics.jsonl``)."""
        cfg = self.cfg
        lr = lr_at(self.step, self.optim_cfg, stage.lr_mult)
        decaying = self.step >= (self.optim_cfg.decay_start or 1 << 62)
        mtp_w = min(stage.mtp_weight, cfg.optim.mtp_weight_after_decay) if decaying else stage.mtp_weight
        loss_cfg = LossConfig(mode=stage.attention, mtp_weight=mtp_w, balance_weight=cfg.balance.sequence_weight)
        metrics, grad_norm = self._forward_backward(batch, loss_cfg, forced, cfg.optim.grad_clip)
        watched = metrics.get("indexer_kl", 0.0) if stage.attention == "indexer_warmup" else metrics["ce"]
        spike = self._is_spike(watched, grad_norm) if stage.attention != "indexer_warmup" else \
            not math.isfinite(watched)
        row = {"step": self.step, "stage": self.stage_index, "seq_len": stage.seq_len,
               "attention": stage.attention, "lr": lr, "grad_norm": grad_norm, **metrics,
               "tokens": int(batch["input_ids"].numel()), "anticipatory_routing": forced is not None}
        if spike:
            self._discard()
            self.spikes.append(self.step)
            self.metrics.inc("tide_train_loss_spikes")
            good = self._rollback()
            row.update(spike=True, rolled_back_to=str(good) if good else None)
            self.log(f"loss spike at step {self.step} (ce {metrics['ce']:.3f}, EMA {self.ema}); update skipped, "
                     f"rolled back to {good.name if good else 'nothing'}; anticipatory routing on for "
                     f"{self.ar_remaining} steps")
        else:
            cv = self._apply_update(lr, cfg.balance.bias_update_speed if stage.attention != "indexer_warmup"
                                    else None)
            if stage.attention != "indexer_warmup":
                if cv:
                    row["load_cv_mean"] = sum(cv.values()) / len(cv)
                    row["load_cv_max"] = max(cv.values())
                    row.update(cv)
                b = cfg.spike.ema_beta
                self.ema = watched if self.ema is None else b * self.ema + (1 - b) * watched
                self.ema_count += 1
            if forced is not None:
                self.ar_remaining -= 1
        return row

    # ------------------------------------------------ step pieces (overridable)
    def _forward_backward(self, batch: dict, loss_cfg: LossConfig, forced: list[torch.Tensor] | None,
                          clip: float | None) -> tuple[dict, float]:
        """Losses and clipped gradients of ``batch``; returns ``(metrics, grad_norm before clipping)``."""
        if forced is not None:
            for m, idx in zip(self._routed_moes(), forced, strict=True):
                m.forced_indices = idx
        loss, metrics = compute_losses(self.model, batch, loss_cfg)
        self.optimizer.zero_grad()
        loss.backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip or float("inf"))) if params else 0.0
        return metrics, grad_norm

    def _apply_update(self, lr: float, bias_speed: float | None) -> dict[str, float]:
        """Optimizer step at ``lr``, then the aux-loss-free bias update unless ``bias_speed`` is None."""
        self.optimizer.set_lr(lr)
        self.optimizer.step()
        self.optimizer.zero_grad()
        return update_router_biases(self.model, bias_speed) if bias_speed is not None else {}

    def _discard(self) -> None:
        self.optimizer.zero_grad()

    # ------------------------------------------------------------------- run
    def run(self) -> dict:
        """Train to the end of the curriculum; returns a summary dict."""
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
                stage, _ = self._apply_stage()
                if cfg.fail_at_step is not None and self.step == cfg.fail_at_step and not fail_marker.exists():
                    fail_marker.write_text("1")
                    self._inject_failure()
                t0 = time.perf_counter()
                batch, forced = self._next_batch()  # includes the early routing pass when it is on
                if cfg.inject_spike_at_step == self.step:
                    g = torch.Generator().manual_seed(self.step)
                    rnd = torch.randint(3, cfg.data.vocab_size, batch["input_ids"].shape, generator=g)
                    # garbage in, one constant (rare) token out: what a corrupt shard looks like to the loss
                    batch = {**batch, "input_ids": rnd, "labels": torch.full_like(rnd, cfg.data.vocab_size - 1)}
                row = self.train_step(batch, stage, forced)
                row["step_time"] = time.perf_counter() - t0
                row["tokens_per_s"] = row["tokens"] / row["step_time"]
                self._write_metrics(row)
                self.metrics.step(row)
                self.step += 1
                committed = None
                due = self.step % cfg.checkpoint.every_steps == 0 or self.step == total
                if due and self.ar_remaining == 0 and not self.ar_queue:
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
        self._plot()
        return self.summary()

    def _inject_failure(self) -> None:
        """Testing hook (``fail_at_step``, first attempt only): the worker process fails."""
        raise RuntimeError(f"injected failure at step {self.step} (fail_at_step)")

    def shutdown(self) -> None:
        """Release what the trainer started (nothing for one process; ``PipelineTrainer`` stops its actors)."""

    def summary(self) -> dict:
        h = self.history
        ar = sorted(r["step_time"] for r in h if r.get("anticipatory_routing"))
        # same-stage steps without it (the first steps of a run are slow warm-ups)
        ar_stages = {r["stage"] for r in h if r.get("anticipatory_routing")}
        normal = sorted(r["step_time"] for r in h[3:] if not r.get("anticipatory_routing")
                        and not r.get("spike") and r["stage"] in ar_stages)
        first = h[0]["ce"] if h else None
        last = sum(r["ce"] for r in h[-5:]) / len(h[-5:]) if h else None
        return {"run_dir": str(self.run_dir), "steps": self.step, "first_loss": first, "final_loss": last,
                "ln_vocab": math.log(self.cfg.data.vocab_size), "spikes": self.spikes, "rollbacks": self.rollbacks,
                "anticipatory_overhead": ar[len(ar) // 2] / normal[len(normal) // 2] - 1  # medians
                if ar and normal else None,
                "latest_checkpoint": str(ckpt.latest_checkpoint(self.ckpt_root))}


def resolve_checkpoint(path: str | Path, skipped: list[tuple[Path, str]] | None = None) -> Path:
    """A checkpoint directory, or a run directory's latest committed one.

    Args:
        path: a checkpoint directory or a run directory.
        skipped: when given, the run's damaged newer checkpoints passed over are appended to it as
            ``(path, problem)`` instead of being warned about (see ``ckpt.latest_checkpoint``).

    Raises:
        ValueError: a run directory without a committed checkpoint, or not a directory
            (a pickle-based file, e.g. a ``.pt``, is refused by name).
    """
    from model.safe_io import refuse_pickle

    path = Path(path).expanduser()
    if path.is_file():
        refuse_pickle(path, "allowed: a run directory or a tide checkpoint directory (safetensors + JSON)")
    if (path / "checkpoints").is_dir():
        latest = ckpt.latest_checkpoint(path / "checkpoints", skipped=skipped)
        if latest is None:
            damaged = ckpt.list_checkpoints(path / "checkpoints")
            problems = ckpt.verify_checkpoint(damaged[-1], hash_files=False) if damaged else []
            if problems:  # say why the newest one is unusable (e.g. a pickle in place of a tensor file)
                raise ValueError(f"{path}: run directory has no intact checkpoint; the newest: {problems[0]}")
            raise ValueError(f"{path}: run directory has no committed checkpoint")
        path = latest
    if not path.is_dir():
        raise ValueError(f"{path}: not a checkpoint directory")
    return path


def load_trained_model(path: str | Path) -> tuple[Transformer, Path]:
    """The ``Transformer`` of a training checkpoint of any layout (or a run's latest) and the checkpoint's path.

    The checkpoint is verified against its manifest. Raises ValueError (named) for a
    missing, damaged or non-tide checkpoint.
    """
    from cluster.pipeline_checkpoint import load_pipeline_full
    from model import ModelArgs

    path = resolve_checkpoint(path)
    full, _, meta = load_pipeline_full(path)  # either layout: one process, or stage x expert-shard groups
    if "model_args" not in meta:
        raise ValueError(f"{path}: not a tide training checkpoint (no model_args)")
    model = Transformer(ModelArgs.from_dict(meta["model_args"], source=f"{path}/meta.json"))
    model.load_state_dict(full)
    return model, path


def export_hf(checkpoint: Path, out: Path) -> Path:
    """Export a training checkpoint (or a run directory's latest) with ``model.save_hf``.

    The checkpoint is verified against its manifest first; the run's
    ``tokenizer.json`` is copied beside the weights when present.

    Raises:
        ValueError: no checkpoint found, or a damaged one (named).
    """
    import shutil

    from model import save_hf

    model, path = load_trained_model(checkpoint)
    save_hf(model, out)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the tokenizer and its chat template
        if (path.parent.parent / name).is_file():
            shutil.copy2(path.parent.parent / name, Path(out) / name)
    return Path(out)
