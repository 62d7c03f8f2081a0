"""Metrics that training and serving export through ``ray.util.metrics``.

One catalogue (``TRAINING``, ``SERVING``) names every series: the recorders below
write only names from it, the Grafana dashboards (``deploy/dashboards.py``) query
only names from it, and the tests compare both against a live scrape of Ray's
metrics export port. Ray exports a custom metric ``name`` as the Prometheus series
``ray_<name>`` (counters ``ray_<name>_total``, histograms ``ray_<name>_bucket`` /
``_sum`` / ``_count``), labelled with the tags given here plus Ray's own
(``SessionName``, ``NodeAddress``, ``WorkerId``, ...); ``MetricSpec.series`` gives
the exported names.

Ray 2.60 drops a gauge that has not been set for two export intervals (about 20 s):
a recorder therefore re-sets its gauges' last values every ``GAUGE_REFRESH_S`` on a
daemon thread, so a gauge that holds still (a finished step's loss, an idle server's
queue of 0) stays visible for as long as the process lives.

Recorders are no-ops in a process without Ray (unit tests, ``LocalEngine`` in a
script): the metric objects are made on first use once ``ray.is_initialized()``.
They also keep the last value written per series (``Recorder.last``) so callers and
tests can read what was exported without scraping.

Units: seconds, bytes, tokens; ratios in [0, 1].
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

Kind = Literal["counter", "gauge", "histogram"]

RAY_PREFIX = "ray_"
GAUGE_REFRESH_S = 5.0  # < Ray's gauge time-to-live of 2 export intervals (2 x 10 s by default)


@dataclass(frozen=True)
class MetricSpec:
    """One exported metric.

    Attributes:
        name: the ``ray.util.metrics`` name (Prometheus-valid, without Ray's ``ray_`` prefix).
        kind: ``counter`` (monotonic total), ``gauge`` (last value) or ``histogram``.
        description: what it measures, with its unit; shown in Prometheus' ``# HELP``.
        tag_keys: label names besides the recorder's default tags (which are part of this tuple).
        boundaries: histogram bucket upper bounds (seconds for latencies).
    """

    name: str
    kind: Kind
    description: str
    tag_keys: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()

    @property
    def series(self) -> tuple[str, ...]:
        """The Prometheus series names Ray exports for this metric."""
        base = RAY_PREFIX + self.name
        if self.kind == "counter":
            return (base + "_total",)
        if self.kind == "histogram":
            return (base + "_bucket", base + "_sum", base + "_count")
        return (base,)


_STEP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_ITL_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


def _catalogue(*specs: MetricSpec) -> dict[str, MetricSpec]:
    return {s.name: s for s in specs}


#: Training metrics; default tag ``run`` (the run name).
TRAINING: dict[str, MetricSpec] = _catalogue(
    MetricSpec("tide_train_loss", "gauge", "loss of the last step by term (loss = the optimised total; ce, mtp, "
               "balance, indexer_kl), nats per token", ("run", "term")),
    MetricSpec("tide_train_step", "gauge", "optimizer steps completed", ("run",)),
    MetricSpec("tide_train_tokens", "counter", "training tokens processed", ("run",)),
    MetricSpec("tide_train_tokens_per_second", "gauge", "training throughput of the last step, tokens/s", ("run",)),
    MetricSpec("tide_train_step_seconds", "histogram", "wall time of one optimizer step, s", ("run",),
               _STEP_BUCKETS),
    MetricSpec("tide_train_grad_norm", "gauge", "global gradient norm before clipping", ("run",)),
    MetricSpec("tide_train_learning_rate", "gauge", "learning rate of the last step", ("run",)),
    MetricSpec("tide_train_curriculum_stage", "gauge", "index of the curriculum stage (0 = first)", ("run",)),
    MetricSpec("tide_train_seq_len", "gauge", "sequence length of the current curriculum stage, tokens", ("run",)),
    MetricSpec("tide_train_exposed_comm_fraction", "gauge", "fraction of communication time not hidden behind "
               "compute, over the last traced steps (pipeline runs)", ("run",)),
    MetricSpec("tide_train_bubble_fraction", "gauge", "pipeline bubble: idle fraction of the stage actors over the "
               "last traced steps (pipeline runs)", ("run",)),
    MetricSpec("tide_train_expert_load_cv", "gauge", "coefficient of variation of the tokens per routed expert "
               "in the last step, per MoE layer (0 = perfectly balanced)", ("run", "layer")),
    MetricSpec("tide_train_loss_spikes", "counter", "loss spikes detected (update skipped)", ("run",)),
    MetricSpec("tide_train_rollbacks", "counter", "rollbacks to an earlier checkpoint after repeated spikes",
               ("run",)),
    MetricSpec("tide_train_anticipatory_routing", "gauge", "1 while the step routes with the anticipatory "
               "(early-parameter) router after a rollback, else 0", ("run",)),
    MetricSpec("tide_train_checkpoints", "counter", "checkpoints committed", ("run",)),
)

#: Serving metrics; default tag ``model`` (the served model id).
SERVING: dict[str, MetricSpec] = _catalogue(
    MetricSpec("tide_serve_requests", "counter", "generation requests finished, by finish_reason (stop, length, "
               "timeout, cancelled, error)", ("model", "finish_reason")),
    MetricSpec("tide_serve_rejections", "counter", "requests refused before generation, by reason (overloaded, "
               "unauthorized, invalid_request, unknown_model, too_large, engine_failed)", ("model", "reason")),
    MetricSpec("tide_serve_running", "gauge", "requests decoding (prompt prefilled)", ("model",)),
    MetricSpec("tide_serve_queued", "gauge", "requests admitted and waiting for (or in) prefill", ("model",)),
    MetricSpec("tide_serve_ttft_seconds", "histogram", "time to first token: request admitted to its first token "
               "sampled, s", ("model",), _TTFT_BUCKETS),
    MetricSpec("tide_serve_inter_token_seconds", "histogram", "inter-token latency: between two consecutive "
               "tokens of one request, s", ("model",), _ITL_BUCKETS),
    MetricSpec("tide_serve_generated_tokens", "counter", "tokens generated (rate = output tokens/s)", ("model",)),
    MetricSpec("tide_serve_prompt_tokens", "counter", "prompt tokens prefilled", ("model",)),
    MetricSpec("tide_serve_kv_state_bytes", "gauge", "decode-state (KV cache) bytes held for live sequences, "
               "over all stage actors", ("model",)),
)

#: Rejection reasons ``tide_serve_rejections`` uses (HTTP status in the comment).
REJECTION_REASONS = ("overloaded",        # 503: max_queue reached
                     "unauthorized",      # 401: missing / wrong API key
                     "invalid_request",   # 400: body, field or prompt length
                     "unknown_model",     # 404: model id not served
                     "too_large",         # 413: body over the limit
                     "engine_failed")     # 503: the backend failed


class Recorder:
    """Writes metrics of one catalogue through ``ray.util.metrics``.

    Args:
        specs: the catalogue (``TRAINING`` or ``SERVING``).
        default_tags: tag values set on every series (e.g. ``{"run": "pipeline"}``); their keys
            must be in every spec's ``tag_keys``.

    Raises:
        KeyError: a metric name not in the catalogue (a typo must not export silently nothing).
        ValueError: a default tag that some metric does not declare, or a call of the wrong kind
            (``inc`` on a gauge, ...).

    Thread-safe (the serving engine records from its scheduler thread and the HTTP event loop).
    """

    def __init__(self, specs: dict[str, MetricSpec], default_tags: dict[str, str]):
        for s in specs.values():
            missing = set(default_tags) - set(s.tag_keys)
            if missing:
                raise ValueError(f"metric {s.name} does not declare the default tags {sorted(missing)}")
        self.specs = specs
        self.default_tags = {k: str(v) for k, v in default_tags.items()}
        self._objs: dict[str, object] | None = None
        self._lock = threading.Lock()
        self._closed = threading.Event()
        #: last value written per (name, sorted extra tags): gauges' values, counters' totals
        self.last: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

    def _metric(self, name: str, kind: Kind):
        spec = self.specs[name]
        if spec.kind != kind:
            raise ValueError(f"metric {name} is a {spec.kind}, not a {kind}")
        if self._objs is None:
            import ray

            if not ray.is_initialized():
                return None
            from ray.util import metrics as rm

            objs: dict[str, object] = {}
            for s in self.specs.values():
                if s.kind == "counter":
                    m = rm.Counter(s.name, description=s.description, tag_keys=s.tag_keys)
                elif s.kind == "gauge":
                    m = rm.Gauge(s.name, description=s.description, tag_keys=s.tag_keys)
                else:
                    m = rm.Histogram(s.name, description=s.description, boundaries=list(s.boundaries),
                                     tag_keys=s.tag_keys)
                m.set_default_tags(self.default_tags)
                objs[s.name] = m
            self._objs = objs
            threading.Thread(target=_refresh_gauges, args=(weakref.ref(self), self._closed), daemon=True,
                             name="tide-metrics-gauges").start()
        return self._objs[name]

    def refresh(self) -> None:
        """Re-set every gauge to its last value (keeps Ray from expiring gauges that hold still)."""
        with self._lock:
            if self._objs is None:
                return
            for (name, tags), value in self.last.items():
                if self.specs[name].kind == "gauge":
                    self._objs[name].set(value, tags=dict(tags) or None)

    def close(self) -> None:
        """Stop refreshing the gauges (they expire from Ray's export about 20 s later)."""
        self._closed.set()

    @staticmethod
    def _key(name: str, tags: dict[str, str]) -> tuple[str, tuple[tuple[str, str], ...]]:
        return name, tuple(sorted(tags.items()))

    def set(self, name: str, value: float, **tags: str) -> None:
        """Set gauge ``name`` to ``value`` (with extra ``tags``)."""
        tags = {k: str(v) for k, v in tags.items()}
        with self._lock:
            m = self._metric(name, "gauge")
            self.last[self._key(name, tags)] = float(value)
            if m is not None:
                m.set(float(value), tags=tags or None)

    def inc(self, name: str, value: float = 1.0, **tags: str) -> None:
        """Add ``value`` (>= 0) to counter ``name``."""
        tags = {k: str(v) for k, v in tags.items()}
        with self._lock:
            m = self._metric(name, "counter")
            key = self._key(name, tags)
            self.last[key] = self.last.get(key, 0.0) + float(value)
            if m is not None and value > 0:
                m.inc(float(value), tags=tags or None)

    def observe(self, name: str, value: float, **tags: str) -> None:
        """Record one observation of histogram ``name``."""
        tags = {k: str(v) for k, v in tags.items()}
        with self._lock:
            m = self._metric(name, "histogram")
            self.last[self._key(name, tags)] = float(value)
            if m is not None:
                m.observe(float(value), tags=tags or None)

    def value(self, name: str, **tags: str) -> float | None:
        """The last value written to ``name`` with exactly these extra ``tags`` (None if never)."""
        return self.last.get(self._key(name, {k: str(v) for k, v in tags.items()}))


def _refresh_gauges(ref: weakref.ref, closed: threading.Event) -> None:
    """The gauge keep-alive loop of one recorder; ends with ``close()`` or when the recorder is collected."""
    while not closed.wait(GAUGE_REFRESH_S):
        rec = ref()
        if rec is None:
            return
        rec.refresh()
        del rec


LOSS_TERMS = ("loss", "ce", "mtp", "balance", "indexer_kl")


class TrainingMetrics(Recorder):
    """``TRAINING`` metrics of one run (default tag ``run``); fed by the trainers."""

    def __init__(self, run: str):
        super().__init__(TRAINING, {"run": run})

    def step(self, row: dict) -> None:
        """Export one ``metrics.jsonl`` row (``cluster.training.trainer.Trainer.train_step`` + timings)."""
        for term in LOSS_TERMS:
            if term in row:
                self.set("tide_train_loss", row[term], term=term)
        self.set("tide_train_step", row["step"] + 1)
        self.inc("tide_train_tokens", row.get("tokens", 0))
        if "step_time" in row:
            self.observe("tide_train_step_seconds", row["step_time"])
            self.set("tide_train_tokens_per_second", row["tokens_per_s"])
        self.set("tide_train_grad_norm", row["grad_norm"])
        self.set("tide_train_learning_rate", row["lr"])
        self.set("tide_train_curriculum_stage", row["stage"])
        self.set("tide_train_seq_len", row["seq_len"])
        self.set("tide_train_anticipatory_routing", float(bool(row.get("anticipatory_routing"))))
        for key, v in row.items():
            if key.startswith("load_cv/"):
                self.set("tide_train_expert_load_cv", v, layer=key.split("/", 1)[1])

    def communication(self, summary: dict) -> None:
        """Export a trace summary (``comm.trace.summarize``): exposed communication = 1 - the
        fraction of communication time hidden behind compute; the pipeline bubble."""
        if summary.get("comm_s", 0) > 0:
            self.set("tide_train_exposed_comm_fraction", 1.0 - summary["overlap_fraction"])
        if "bubble" in summary:
            self.set("tide_train_bubble_fraction", summary["bubble"])


class ServingMetrics(Recorder):
    """``SERVING`` metrics of one served model (default tag ``model``); fed by ``deploy.engine.Engine``
    and the HTTP app. Gauge updates are rate-limited to every ``gauge_interval`` seconds (the
    engine calls ``gauges`` every scheduler iteration) except when the engine goes idle."""

    def __init__(self, model: str, gauge_interval: float = 0.5):
        super().__init__(SERVING, {"model": model})
        self.gauge_interval = gauge_interval
        self._gauge_t = float("-inf")

    def gauges(self, running: int, queued: int, kv_bytes: Callable[[], int], force: bool = False) -> None:
        """Running / queued requests and decode-state bytes (``kv_bytes()`` is called only when the
        gauges are due, not on every scheduler iteration)."""
        now = time.monotonic()
        if not force and now - self._gauge_t < self.gauge_interval:
            return
        self._gauge_t = now
        self.set("tide_serve_running", running)
        self.set("tide_serve_queued", queued)
        self.set("tide_serve_kv_state_bytes", kv_bytes())

    def rejected(self, reason: str) -> None:
        """A request refused before generation; ``reason`` one of ``REJECTION_REASONS``.

        Raises:
            ValueError: an unknown reason.
        """
        if reason not in REJECTION_REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}; allowed: {REJECTION_REASONS}")
        self.inc("tide_serve_rejections", reason=reason)
