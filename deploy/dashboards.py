"""Grafana dashboards for training and serving, defined in code.

``training_dashboard()`` and ``serving_dashboard()`` build the two dashboards with the
builders of ``grafana-foundation-sdk`` (Grafana's own code-generated SDK; the JSON is its
encoder's output, never written by hand). Every query names only series of the metric
catalogue ``cluster.ops.metrics`` (taken from ``MetricSpec.series``, never retyped), and
``queried_series`` lists the series a dashboard's queries name, by parsing each PromQL
expression with ``promql-parser`` (the Rust PromQL parser of GreptimeDB, Python bindings):
tests compare that set with the catalogue and with a live Prometheus scrape.

``write_dashboards`` writes them as JSON files (``tide dashboards``), also into the folder
from which the Grafana of Ray's own setup provisions dashboards (``ray_dashboards_dir``),
and ``push`` uploads them and a Prometheus datasource to a Grafana server with
``grafana-client`` (``tide dashboards --push URL``).

Template variables: ``datasource`` (any Prometheus datasource; the default one unless
pinned), ``run`` (training; values of the ``run`` label of ``ray_tide_train_step``) and
``model`` (serving; values of the ``model`` label of ``ray_tide_serve_running``), both
multi-valued with "All".

Aggregation: Ray labels every series with the exporting process (``WorkerId``,
``NodeAddress``, ...). Training gauges are aggregated with ``max by (run, ...)`` (one
writer per run), counters with ``sum``; serving gauges and counters are summed over the
replicas of a model.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import heatmap, stat, timeseries
from grafana_foundation_sdk.builders.common import ReduceDataOptions, VizLegendOptions, VizTooltipOptions
from grafana_foundation_sdk.builders.dashboard import Dashboard, DatasourceVariable, QueryVariable, Row
from grafana_foundation_sdk.builders.prometheus import Dataquery
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import (
    GraphDrawStyle,
    LegendDisplayMode,
    LegendPlacement,
    LineInterpolation,
    SortOrder,
    TooltipDisplayMode,
)
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    DynamicConfigValue,
    ValueMap,
    ValueMappingResult,
    VariableOption,
    VariableRefresh,
    VariableSort,
)
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

from cluster.ops.metrics import SERVING, TRAINING, MetricSpec

TRAINING_UID = "tide-training"
SERVING_UID = "tide-serving"
#: name and uid of the Prometheus datasource ``push`` creates or updates
DATASOURCE_NAME = "tide-prometheus"
DATASOURCE_UID = "tide-prometheus"

_DS = DataSourceRef(type_val="prometheus", uid="${datasource}")
_RATE = "$__rate_interval"
_TRAIN_SEL = 'run=~"$run"'
_SERVE_SEL = 'model=~"$model"'


# ------------------------------------------------------------------ series names
def series(name: str, part: str | None = None) -> str:
    """The exported series of catalogue metric ``name`` (``cluster.ops.metrics``).

    Args:
        name: a ``TRAINING`` or ``SERVING`` metric name, e.g. ``tide_serve_ttft_seconds``.
        part: for a histogram, ``bucket``, ``sum`` or ``count``; must be None otherwise.

    Raises:
        KeyError: ``name`` is not in the catalogue.
        ValueError: ``part`` does not fit the metric's kind.
    """
    spec: MetricSpec | None = TRAINING.get(name) or SERVING.get(name)
    if spec is None:
        raise KeyError(f"{name!r} is not a metric of cluster.ops.metrics (TRAINING / SERVING)")
    if spec.kind == "histogram":
        if part not in ("bucket", "sum", "count"):
            raise ValueError(f"{name} is a histogram: part must be 'bucket', 'sum' or 'count', not {part!r}")
        return next(s for s in spec.series if s.endswith("_" + part))
    if part is not None:
        raise ValueError(f"{name} is a {spec.kind}: it has no {part!r} series")
    return spec.series[0]


def _sel(name: str, selector: str, part: str | None = None) -> str:
    return f"{series(name, part)}{{{selector}}}"


def _by(labels: Iterable[str]) -> str:
    return ", ".join(labels)


def _gauge(name: str, selector: str, by: tuple[str, ...], agg: str = "max") -> str:
    return f"{agg} by ({_by(by)}) ({_sel(name, selector)})"


def _rate(name: str, selector: str, by: tuple[str, ...], fn: str = "rate", window: str = _RATE) -> str:
    return f"sum by ({_by(by)}) ({fn}({_sel(name, selector)}[{window}]))"


def _or_zero(expr: str, selector: str, by: tuple[str, ...]) -> str:
    """``expr`` or, for each series of ``by`` that ``expr`` lacks, 0 for every run that reports a step: a Ray
    counter is exported only once it first increases (``ray.util.metrics.Counter.inc`` refuses 0), so a healthy
    run's loss-spike and rollback counters do not exist and their panels would show "No data"."""
    return f"{expr} or 0 * {_gauge('tide_train_step', selector, by)}"


def _quantile(q: float, name: str, selector: str, by: tuple[str, ...]) -> str:
    return (f"histogram_quantile({q}, sum by ({_by(('le', *by))}) "
            f"(rate({_sel(name, selector, 'bucket')}[{_RATE}])))")


def _bucket_increase(name: str, selector: str) -> str:
    return f"sum by (le) (increase({_sel(name, selector, 'bucket')}[{_RATE}]))"


def _hist_mean(name: str, selector: str, by: tuple[str, ...]) -> str:
    num = f"sum by ({_by(by)}) (rate({_sel(name, selector, 'sum')}[{_RATE}]))"
    den = f"sum by ({_by(by)}) (rate({_sel(name, selector, 'count')}[{_RATE}]))"
    return f"{num} / {den}"


# ------------------------------------------------------------------ panel helpers
def _query(expr: str, legend: str, ref: str) -> Dataquery:
    return Dataquery().expr(expr).legend_format(legend).ref_id(ref).datasource(_DS)


def _targets(panel, queries: list[tuple[str, str]]):
    for i, (expr, legend) in enumerate(queries):
        panel = panel.with_target(_query(expr, legend, chr(ord("A") + i)))
    return panel


def _ts(pid: int, title: str, desc: str, queries: list[tuple[str, str]], unit: str = "short",
        w: int = 12, h: int = 8, **kw) -> timeseries.Panel:
    """A time-series panel; ``kw``: ``min``, ``max``, ``step`` (step-after lines), ``bars``, ``right``
    (refIds drawn on a right-hand axis), ``mappings`` (value -> text)."""
    p = (timeseries.Panel().id(pid).title(title).description(desc).datasource(_DS).unit(unit).span(w).height(h)
         .legend(VizLegendOptions().show_legend(True).display_mode(LegendDisplayMode.LIST)
                 .placement(LegendPlacement.BOTTOM))
         .tooltip(VizTooltipOptions().mode(TooltipDisplayMode.MULTI).sort(SortOrder.DESCENDING)))
    if "min" in kw:
        p = p.min(kw["min"])
    if "max" in kw:
        p = p.max(kw["max"])
    if kw.get("step"):
        p = p.line_interpolation(LineInterpolation.STEP_AFTER)
    if kw.get("bars"):
        p = p.draw_style(GraphDrawStyle.BARS).fill_opacity(60)
    if "mappings" in kw:
        p = p.mappings([ValueMap({k: ValueMappingResult(text=v) for k, v in kw["mappings"].items()})])
    for ref in kw.get("right", ()):
        p = p.override_by_query(ref, [DynamicConfigValue("custom.axisPlacement", "right")])
    return _targets(p, queries)


def _stat(pid: int, title: str, desc: str, queries: list[tuple[str, str]], unit: str = "short",
          w: int = 6, h: int = 4) -> stat.Panel:
    p = (stat.Panel().id(pid).title(title).description(desc).datasource(_DS).unit(unit).span(w).height(h)
         .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]).values(False)))
    return _targets(p, queries)


def _heatmap(pid: int, title: str, desc: str, expr: str, unit: str = "s", w: int = 12, h: int = 8) -> heatmap.Panel:
    q = _query(expr, "{{le}}", "A").format(PromQueryFormat.HEATMAP)
    return (heatmap.Panel().id(pid).title(title).description(desc).datasource(_DS).span(w).height(h)
            .calculate(False).y_axis(heatmap.YAxisConfig().unit(unit)).with_target(q))


def _variables(d: Dashboard, label: str, source: str, datasource_uid: str | None) -> Dashboard:
    ds = DatasourceVariable("datasource").label("Prometheus").type("prometheus")
    if datasource_uid is not None:
        ds = ds.current(VariableOption(selected=True, text=datasource_uid, value=datasource_uid))
    var = (QueryVariable(label).label(label).datasource(_DS)
           .query(f"label_values({source}, {label})")
           .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.ALPHABETICAL_ASC)
           .multi(True).include_all(True).all_value(".*")
           .current(VariableOption(selected=True, text="All", value="$__all")))
    return d.with_variable(ds).with_variable(var)


def _base(title: str, uid: str, desc: str, tags: list[str]) -> Dashboard:
    return (Dashboard(title).uid(uid).description(desc).tags(["tide", *tags]).refresh("10s")
            .time("now-1h", "now").timezone("browser").tooltip(DashboardCursorSync.CROSSHAIR).editable())


# ------------------------------------------------------------------ dashboards
def training_dashboard(datasource_uid: str | None = None) -> Dashboard:
    """The training dashboard (uid ``tide-training``), as a ``grafana-foundation-sdk`` builder.

    Args:
        datasource_uid: pin the ``datasource`` variable to this Prometheus datasource (``push`` does);
            None = Grafana's default datasource (what Ray's provisioning sets up).
    """
    s, by = _TRAIN_SEL, ("run",)
    d = _base("tide: training", TRAINING_UID, "Curriculum training of tide runs (cluster.ops.metrics.TRAINING, "
              "exported by ray.util.metrics).", ["training"])
    d = _variables(d, "run", series("tide_train_step"), datasource_uid)
    pid = iter(range(1, 1000))
    d = d.with_row(Row("Progress").id(next(pid)))
    d = d.with_panel(_ts(next(pid), "Loss by term", "Loss of the last step by term (loss = the optimised total; "
                         "ce, mtp, balance, indexer_kl), nats per token.",
                         [(_gauge("tide_train_loss", s, ("run", "term")), "{{run}} {{term}}")]))
    d = d.with_panel(_ts(next(pid), "Tokens / s", "Throughput of the last step (gauge) and the rate of the "
                         "token counter.",
                         [(_gauge("tide_train_tokens_per_second", s, by), "{{run}} last step"),
                          (_rate("tide_train_tokens", s, by), "{{run}} counter rate")], unit="short"))
    d = d.with_panel(_ts(next(pid), "Step time", "Wall time of one optimizer step: quantiles of the "
                         "histogram's buckets and the mean (sum / count).",
                         [(_quantile(0.5, "tide_train_step_seconds", s, by), "{{run}} p50"),
                          (_quantile(0.9, "tide_train_step_seconds", s, by), "{{run}} p90"),
                          (_quantile(0.99, "tide_train_step_seconds", s, by), "{{run}} p99"),
                          (_hist_mean("tide_train_step_seconds", s, by), "{{run}} mean")], unit="s"))
    d = d.with_panel(_heatmap(next(pid), "Step time distribution", "Optimizer steps per step-time bucket.",
                              _bucket_increase("tide_train_step_seconds", s)))
    d = d.with_panel(_ts(next(pid), "Gradient norm", "Global gradient norm before clipping.",
                         [(_gauge("tide_train_grad_norm", s, by), "{{run}}")]))
    d = d.with_panel(_ts(next(pid), "Learning rate", "Learning rate of the last step.",
                         [(_gauge("tide_train_learning_rate", s, by), "{{run}}")], step=True))
    d = d.with_panel(_ts(next(pid), "Curriculum stage & sequence length", "Index of the curriculum stage "
                         "(left) and its sequence length in tokens (right).",
                         [(_gauge("tide_train_curriculum_stage", s, by), "{{run}} stage"),
                          (_gauge("tide_train_seq_len", s, by), "{{run}} seq len")], step=True, right=("B",)))
    d = d.with_panel(_stat(next(pid), "Steps completed", "Optimizer steps completed.",
                           [(_gauge("tide_train_step", s, by), "{{run}}")], w=12))
    d = d.with_row(Row("Pipeline and experts").id(next(pid)))
    d = d.with_panel(_ts(next(pid), "Exposed communication & bubble", "Fraction of communication time not "
                         "hidden behind compute, and the pipeline bubble (idle fraction of the stage actors), "
                         "over the last traced steps (pipeline runs).",
                         [(_gauge("tide_train_exposed_comm_fraction", s, by), "{{run}} exposed comm"),
                          (_gauge("tide_train_bubble_fraction", s, by), "{{run}} bubble")],
                         unit="percentunit", min=0, max=1))
    cv = "tide_train_expert_load_cv"
    d = d.with_panel(_ts(next(pid), "Expert load CV (max / mean over layers)", "Coefficient of variation of "
                         "the tokens per routed expert in the last step (0 = perfectly balanced): the worst "
                         "MoE layer and the mean over layers.",
                         [(f"max by (run) ({_sel(cv, s)})", "{{run}} max"),
                          (f"avg by (run) ({_sel(cv, s)})", "{{run}} mean")], min=0))
    d = d.with_panel(_ts(next(pid), "Expert load CV per layer", "Coefficient of variation of the tokens per "
                         "routed expert in the last step, per MoE layer.",
                         [(_gauge(cv, s, ("run", "layer")), "{{run}} layer {{layer}}")], min=0, w=24))
    d = d.with_row(Row("Stability and checkpoints").id(next(pid)))
    d = d.with_panel(_ts(next(pid), "Loss spikes, rollbacks & checkpoints", "Events per interval "
                         "(increase of the counters): loss spikes (update skipped), rollbacks to an earlier "
                         "checkpoint, checkpoints committed.",
                         [(_or_zero(_rate("tide_train_loss_spikes", s, by, fn="increase"), s, by), "{{run}} spikes"),
                          (_or_zero(_rate("tide_train_rollbacks", s, by, fn="increase"), s, by), "{{run}} rollbacks"),
                          (_or_zero(_rate("tide_train_checkpoints", s, by, fn="increase"), s, by),
                           "{{run}} checkpoints")],
                         bars=True, min=0))
    d = d.with_panel(_ts(next(pid), "Anticipatory routing", "1 while steps route with the anticipatory "
                         "(early-parameter) router after a rollback, else 0.",
                         [(_gauge("tide_train_anticipatory_routing", s, by), "{{run}}")],
                         step=True, min=0, max=1, mappings={"0": "off", "1": "anticipatory"}))
    totals = "Counter totals of the running process (increase() misses a counter's first increment, so " \
             "the totals are shown as they are; 0 until the first event, when the counter is not exported yet)."
    for metric, title in (("tide_train_loss_spikes", "Loss spikes"), ("tide_train_rollbacks", "Rollbacks"),
                          ("tide_train_checkpoints", "Checkpoints")):
        d = d.with_panel(_stat(next(pid), title, totals,
                               [(_or_zero(f"sum by (run) ({_sel(metric, s)})", s, ("run",)), "{{run}}")], w=8))
    return d


def serving_dashboard(datasource_uid: str | None = None) -> Dashboard:
    """The serving dashboard (uid ``tide-serving``), as a ``grafana-foundation-sdk`` builder.

    Args:
        datasource_uid: as for ``training_dashboard``.
    """
    s = _SERVE_SEL
    d = _base("tide: serving", SERVING_UID, "OpenAI-compatible serving of tide models on Ray Serve "
              "(cluster.ops.metrics.SERVING, exported by ray.util.metrics).", ["serving"])
    d = _variables(d, "model", series("tide_serve_running"), datasource_uid)
    pid = iter(range(1, 1000))
    d = d.with_row(Row("Traffic").id(next(pid)))
    d = d.with_panel(_ts(next(pid), "Requests / s by finish reason", "Generation requests finished per second, "
                         "by finish_reason (stop, length, timeout, cancelled, error).",
                         [(_rate("tide_serve_requests", s, ("model", "finish_reason")),
                           "{{model}} {{finish_reason}}")], unit="reqps"))
    d = d.with_panel(_ts(next(pid), "Rejections / s by reason", "Requests refused before generation per "
                         "second, by reason (overloaded, unauthorized, invalid_request, unknown_model, too_large, "
                         "engine_failed).",
                         [(_rate("tide_serve_rejections", s, ("model", "reason")), "{{model}} {{reason}}")],
                         unit="reqps"))
    d = d.with_panel(_ts(next(pid), "Running & queued", "Requests decoding (prompt prefilled) and requests "
                         "admitted and waiting for (or in) prefill, over all replicas.",
                         [(_gauge("tide_serve_running", s, ("model",), agg="sum"), "{{model}} running"),
                          (_gauge("tide_serve_queued", s, ("model",), agg="sum"), "{{model}} queued")], min=0))
    d = d.with_panel(_ts(next(pid), "Tokens / s", "Output tokens generated and prompt tokens prefilled per "
                         "second.",
                         [(_rate("tide_serve_generated_tokens", s, ("model",)), "{{model}} output"),
                          (_rate("tide_serve_prompt_tokens", s, ("model",)), "{{model}} prompt")], min=0))
    d = d.with_row(Row("Latency").id(next(pid)))
    ttft, itl = "tide_serve_ttft_seconds", "tide_serve_inter_token_seconds"
    d = d.with_panel(_ts(next(pid), "Time to first token", "Request admitted to its first token sampled: "
                         "p50 / p90 / p99 of the histogram's buckets, and the mean.",
                         [*((_quantile(q, ttft, s, ("model",)), f"{{{{model}}}} p{round(q * 100)}")
                            for q in (0.5, 0.9, 0.99)),
                          (_hist_mean(ttft, s, ("model",)), "{{model}} mean")], unit="s"))
    d = d.with_panel(_ts(next(pid), "Inter-token latency", "Between two consecutive tokens of one request: "
                         "p50 / p99 of the histogram's buckets, and the mean.",
                         [(_quantile(0.5, itl, s, ("model",)), "{{model}} p50"),
                          (_quantile(0.99, itl, s, ("model",)), "{{model}} p99"),
                          (_hist_mean(itl, s, ("model",)), "{{model}} mean")], unit="s"))
    d = d.with_panel(_heatmap(next(pid), "Time to first token distribution", "Requests per TTFT bucket.",
                              _bucket_increase(ttft, s)))
    d = d.with_panel(_heatmap(next(pid), "Inter-token latency distribution", "Tokens per inter-token latency "
                              "bucket.", _bucket_increase(itl, s)))
    d = d.with_row(Row("Memory").id(next(pid)))
    d = d.with_panel(_ts(next(pid), "Decode state (KV cache) bytes", "Decode-state bytes held for live "
                         "sequences, over all stage actors and replicas.",
                         [(_gauge("tide_serve_kv_state_bytes", s, ("model",), agg="sum"), "{{model}}")],
                         unit="bytes", min=0, w=24))
    return d



DASHBOARDS = {TRAINING_UID: training_dashboard, SERVING_UID: serving_dashboard}


def to_json(dashboard: Dashboard) -> dict[str, Any]:
    """The dashboard model Grafana stores (the SDK encoder's JSON, as a dict)."""
    return json.loads(JSONEncoder(sort_keys=True).encode(dashboard.build()))


def dashboards(datasource_uid: str | None = None) -> dict[str, dict[str, Any]]:
    """Both dashboards as JSON models, by uid (``tide-training``, ``tide-serving``)."""
    return {uid: to_json(build(datasource_uid)) for uid, build in DASHBOARDS.items()}


# ------------------------------------------------------------------ query analysis
# Grafana's interval macros (the only variables our queries use outside label values); a stand-in
# duration makes the expression valid PromQL for the parser.
_INTERVAL_MACRO = re.compile(r"\$(?:__rate_interval|__interval|__range)\b|\$\{(?:__rate_interval|__interval|__range)\}")


def promql_of(expr: str) -> str:
    """``expr`` with Grafana's interval macros (``$__rate_interval``, ``$__interval``, ``$__range``) outside
    string literals replaced by ``5m``, i.e. valid PromQL. Variables inside label-value strings
    (``run=~"$run"``) stay as they are: to the parser they are plain strings.

    Raises:
        ValueError: any other ``$`` variable outside a string literal (its value, hence the query, would be
            unknown here).
    """
    out: list[str] = []
    i, quote = 0, None
    while i < len(expr):
        c = expr[i]
        if quote is not None:
            out.append(c)
            if c == "\\" and quote != "`" and i + 1 < len(expr):
                out.append(expr[i + 1])
                i += 2
                continue
            if c == quote:
                quote = None
            i += 1
        elif c in "\"'`":
            quote = c
            out.append(c)
            i += 1
        elif c == "$":
            m = _INTERVAL_MACRO.match(expr, i)
            if m is None:
                raise ValueError(f"unsupported Grafana variable outside a string at offset {i} of {expr!r}; "
                                 "allowed there: $__rate_interval, $__interval, $__range")
            out.append("5m")
            i = m.end()
        else:
            out.append(c)
            i += 1
    return "".join(out)


def series_of(expr: str) -> set[str]:
    """The metric names the PromQL expression ``expr`` (Grafana macros allowed, see ``promql_of``) selects.

    Parsed with ``promql-parser``: function names, label names and values, strings and keywords are not
    mistaken for series, and ``{__name__="x"}`` counts as ``x``.

    Raises:
        ValueError: not valid PromQL, or a selector whose metric name is not fixed (no name, or
            ``__name__`` matched by a regex / inequality): such a query cannot be checked against the
            catalogue.
    """
    import promql_parser

    try:
        tree = promql_parser.parse(promql_of(expr))
    except ValueError as e:
        raise ValueError(f"invalid PromQL {expr!r}: {e}") from None
    names: set[str] = set()
    unnamed: list[str] = []

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                names.add(node.name)
            else:
                fixed = [m.value for m in node.matchers.matchers
                         if m.name == "__name__" and m.op == promql_parser.MatchOp.Equal]
                if fixed:
                    names.update(fixed)
                else:
                    unnamed.append(str(node))

    promql_parser.walk(tree, pre_visit=visit)
    if unnamed:
        raise ValueError(f"selector(s) {unnamed} in {expr!r} do not name a fixed metric")
    return names


_LABEL_VALUES = re.compile(r"^\s*label_values\((?P<selector>.+),\s*(?P<label>[A-Za-z_]\w*)\s*\)\s*$", re.S)
_QUERY_RESULT = re.compile(r"^\s*query_result\((?P<expr>.+)\)\s*$", re.S)


def variable_series(query: str) -> set[str]:
    """The series a Prometheus query variable's query names: ``label_values(SELECTOR, LABEL)`` or
    ``query_result(EXPR)`` (Grafana's variable query syntax).

    Raises:
        ValueError: another form (``label_values(LABEL)``, ``metrics(...)``, ``label_names()``): it names no
            fixed series to check.
    """
    m = _LABEL_VALUES.match(query)
    if m:
        return series_of(m["selector"])
    m = _QUERY_RESULT.match(query)
    if m:
        return series_of(m["expr"])
    raise ValueError(f"variable query {query!r} names no fixed series (use label_values(SELECTOR, LABEL))")


def panels(model: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every panel of a dashboard model, rows included, panels inside collapsed rows too."""
    out: list[dict[str, Any]] = []
    for p in model.get("panels", []):
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def queries(model: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(where, query) of every query of a dashboard model: each panel target's ``expr`` (where = the panel's
    title and the target's refId) and each query variable's query (where = ``$name``)."""
    out = [(f"{p.get('title', '?')} [{t.get('refId', '?')}]", t["expr"])
           for p in panels(model) for t in p.get("targets", []) if "expr" in t]
    for v in model.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            q = v.get("query")
            out.append((f"${v['name']}", q["query"] if isinstance(q, dict) else q))
    return out


def queried_series(model: Mapping[str, Any] | Dashboard) -> set[str]:
    """The Prometheus series every query of ``model`` (a dashboard model or builder) names, panels and
    template variables together.

    Raises:
        ValueError: a query that cannot be parsed or names no fixed series (see ``series_of``).
    """
    if isinstance(model, Dashboard):
        model = to_json(model)
    names: set[str] = set()
    for where, q in queries(model):
        try:
            names |= variable_series(q) if where.startswith("$") else series_of(q)
        except ValueError as e:
            raise ValueError(f"{model.get('uid')}: {where}: {e}") from None
    return names


def catalogue_series() -> set[str]:
    """Every series the metric catalogue (``cluster.ops.metrics``) exports."""
    return {name for spec in (*TRAINING.values(), *SERVING.values()) for name in spec.series}


# ------------------------------------------------------------------ files
def ray_temp_dir() -> Path:
    """Ray's default temporary root, as Ray 2.60 computes it (``ray._common.utils.get_default_ray_temp_dir``):
    ``$RAY_TMPDIR`` or (Linux) ``$TMPDIR`` or ``/tmp``, plus ``ray``."""
    root = os.environ.get("RAY_TMPDIR")
    if root is None and sys.platform.startswith("linux"):
        root = os.environ.get("TMPDIR")
    return Path(root or "/tmp") / "ray"


def ray_dashboards_dir(temp_dir: str | Path | None = None) -> Path | None:
    """The folder from which the Grafana of Ray's own setup provisions dashboards, for the latest Ray session
    under ``temp_dir`` (default ``ray_temp_dir()``); None when there is none.

    Ray's dashboard process (``ray/dashboard/modules/metrics/metrics_head.py``) writes, per session,
    ``<session>/metrics/grafana/grafana.ini`` (provisioning = ``session_latest/metrics/grafana/provisioning``)
    and ``provisioning/dashboards/default.yml``, whose file provider reads the JSON dashboards of
    ``<session>/metrics/grafana/dashboards`` (or ``$RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR`` as it was at
    ``ray start``). This reads that ``default.yml``, so it finds the folder either way.
    """

    root = Path(temp_dir) if temp_dir is not None else ray_temp_dir()
    provider = root / "session_latest" / "metrics" / "grafana" / "provisioning" / "dashboards" / "default.yml"
    if not provider.is_file():
        return None
    from model.safe_io import read_yaml

    cfg = read_yaml(provider, "Grafana provisioning file") or {}
    for p in cfg.get("providers") or []:
        path = (p.get("options") or {}).get("path")
        if path:
            return Path(path)
    return None


def write_dashboards(out: str | Path, datasource_uid: str | None = None) -> list[Path]:
    """Write ``<uid>.json`` for both dashboards into ``out`` (created); returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for uid, model in dashboards(datasource_uid).items():
        path = out / f"{uid}.json"
        tmp = path.with_suffix(".json.tmp")  # Grafana's file provider polls the folder: never a half file
        tmp.write_text(json.dumps(model, indent=2, sort_keys=True) + "\n")
        tmp.replace(path)
        paths.append(path)
    return paths


# ------------------------------------------------------------------ upload
class PushError(RuntimeError):
    """An upload to Grafana failed; the message says why (never containing the token)."""


def _safe_url(url: str) -> str:
    """``url`` without user info (``user:password@``), query or fragment: safe to print."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    netloc = parts.hostname or ""
    try:
        if parts.port is not None:
            netloc += f":{parts.port}"
    except ValueError:  # a port that is not a number: left out
        pass
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def check_url(url: str, what: str = "Grafana URL") -> None:
    """Refuse ``url`` unless it is an http(s) URL with a host and without user info; the message shows the
    URL without user info, query or fragment (``_safe_url``), never a credential.

    Raises:
        ValueError: another scheme, no host, or ``user:password@`` in the URL.
    """
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        # not echoed: what is not a URL may be anything, a credential included
        raise ValueError(f"{what} must be an http(s) URL with a host, e.g. http://127.0.0.1:3000 (the value given "
                         "is not one; not shown)")
    try:
        parts.port  # noqa: B018 - urllib validates the port on access (ValueError: not a number, out of range)
    except ValueError:
        raise ValueError(f"{what} {parts.scheme}://{parts.hostname}: its port is not a number in 0..65535") from None
    if "@" in parts.netloc:
        raise ValueError(f"{what} {_safe_url(url)} carries user info (user:password@): not allowed, credentials "
                         "go in the token's environment variable (GRAFANA_TOKEN, --token-env), never in a URL")


def check_token(token: str) -> None:
    """Refuse a Grafana token that cannot be one: empty, or with a character outside printable ASCII
    (whitespace such as a trailing newline of ``$(cat file)``, a tab, a control character). The message
    never contains the token.

    Raises:
        ValueError: as above.
    """
    if not token:
        raise ValueError("an empty Grafana token")
    bad = [i for i, c in enumerate(token) if not 33 <= ord(c) <= 126]
    if bad:
        raise ValueError(f"the Grafana token ({len(token)} characters) contains whitespace, control or non-ASCII "
                         f"characters (at position(s) {', '.join(map(str, bad[:5]))}): a service-account token is "
                         "one word of printable ASCII characters")


def redact(text: str, secret: str, min_len: int = 8) -> str:
    """``text`` with ``secret`` replaced by ``***`` in every form a message may carry it: as it is, its
    ``repr`` / ``ascii`` escapes (``glsa_x\\n``), its bytes' escapes (``b'Bearer glsa_x\\n'``) and
    percent-encoded, and any part of one of these at least ``min_len`` characters long (a fragment of a
    truncated or split message). A secret shorter than ``min_len`` is matched whole only.
    """
    if not secret:
        return text
    from urllib.parse import quote

    forms = {secret, repr(secret)[1:-1], ascii(secret)[1:-1], quote(secret, safe="")}
    try:
        forms.add(repr(secret.encode())[2:-1])
    except UnicodeEncodeError:  # a lone surrogate: no bytes form
        pass
    masked = [False] * len(text)
    for form in forms:
        k = min(min_len, len(form))
        grams = {form[i:i + k] for i in range(len(form) - k + 1)}
        for i in range(len(text) - k + 1):
            if text[i:i + k] in grams:
                masked[i:i + k] = [True] * k
    out, i = [], 0
    while i < len(text):
        if masked[i]:
            while i < len(text) and masked[i]:
                i += 1
            out.append("***")
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def datasource_payload(prometheus_url: str, name: str = DATASOURCE_NAME, uid: str = DATASOURCE_UID) -> dict:
    """The Prometheus datasource ``push`` creates or updates (Grafana's ``/api/datasources`` model);
    ``timeInterval`` = Ray's metrics export interval (10 s), the smallest useful query step."""
    return {"name": name, "uid": uid, "type": "prometheus", "access": "proxy", "url": prometheus_url,
            "isDefault": False, "jsonData": {"httpMethod": "POST", "timeInterval": "10s"}}


def push(url: str, token: str, prometheus_url: str, *, datasource_name: str = DATASOURCE_NAME,
         datasource_uid: str = DATASOURCE_UID, timeout: float = 10.0) -> dict[str, Any]:
    """Upload the Prometheus datasource and both dashboards to the Grafana server at ``url``.

    With ``grafana-client``'s ``GrafanaApi`` and ``token`` (a service-account token, sent as
    ``Authorization: Bearer``): the datasource is looked up by uid, then by name, and updated
    (``PUT /api/datasources/uid/<uid>``) or created (``POST /api/datasources``); each dashboard is saved
    with ``overwrite`` (``POST /api/dashboards/db``), its ``datasource`` variable pinned to that datasource.

    Returns:
        ``{"datasource": {"name", "uid", "action": "created" | "updated"}, "dashboards": [{"uid", "url",
        "version"}]}``.

    Raises:
        ValueError: ``url`` or ``prometheus_url`` is not an http(s) URL or carries user info (``check_url``),
            or ``token`` is not a token (``check_token``).
        PushError: Grafana is unreachable, refuses the token (401), denies the operation (403) or fails.
        Every message has the token masked (``redact``).
    """
    from urllib.parse import urlsplit

    import requests
    from grafana_client import GrafanaApi
    from grafana_client.client import GrafanaClientError, GrafanaException

    def clean(msg: str) -> str:
        return redact(msg, token)

    try:
        check_url(url, "Grafana URL")
        check_url(prometheus_url, "Prometheus URL")
        check_token(token)
    except ValueError as e:
        raise ValueError(clean(str(e))) from None
    safe = _safe_url(url)
    base = safe if urlsplit(safe).path.endswith("/") or not urlsplit(safe).path else safe + "/"
    api = GrafanaApi.from_url(base, credential=token, timeout=timeout)

    def lookup(fn, key):
        try:
            return fn(key)
        except GrafanaClientError as e:
            if e.status_code == 404:
                return None
            raise

    try:
        existing = lookup(api.datasource.get_datasource_by_uid, datasource_uid) or \
            lookup(api.datasource.get_datasource_by_name, datasource_name)
        if existing:
            uid = existing.get("uid") or datasource_uid
            api.datasource.update_datasource_by_uid(uid, datasource_payload(prometheus_url, datasource_name, uid))
            ds = {"name": datasource_name, "uid": uid, "action": "updated"}
        else:
            created = api.datasource.create_datasource(
                datasource_payload(prometheus_url, datasource_name, datasource_uid))
            uid = (created.get("datasource") or {}).get("uid") or datasource_uid
            ds = {"name": datasource_name, "uid": uid, "action": "created"}
        saved = []
        for model in dashboards(uid).values():
            r = api.dashboard.update_dashboard({"dashboard": model, "overwrite": True,
                                                "message": "tide dashboards --push"})
            saved.append({"uid": r.get("uid", model["uid"]), "url": r.get("url"), "version": r.get("version")})
    except requests.exceptions.RequestException as e:
        raise PushError(clean(f"cannot reach Grafana at {safe}: {type(e).__name__}")) from None
    except GrafanaException as e:
        if e.status_code == 401:
            msg = f"Grafana at {safe} refused the token (401 Unauthorized): check the token's value and expiry"
        elif e.status_code == 403:
            msg = (f"Grafana at {safe} denied the request (403 Forbidden): the token's service account needs "
                   "the Editor or Admin role (datasources need Admin)")
        else:
            # the status only: a misbehaving server's body may echo the request (its Authorization header) in
            # forms no masking can enumerate
            msg = f"Grafana at {safe} failed: HTTP {e.status_code} (response body not shown)"
        raise PushError(clean(msg)) from None
    except Exception as e:  # anything else may quote the request (its headers): its message masked, no traceback
        raise PushError(clean(f"uploading to Grafana at {safe} failed: {type(e).__name__}")) from None
    return {"datasource": ds, "dashboards": saved}
