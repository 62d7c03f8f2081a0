"""Timelines of distributed pipeline / expert-parallel runs.

Each actor owns a ``Tracer`` and records spans: compute on the ``"compute"``
thread, pipeline p2p on ``"p2p-send"`` / ``"p2p-recv"`` (cat ``"send"`` /
``"recv"``), expert all-to-all on ``"a2a"`` (cat ``"dispatch"`` / ``"combine"``),
collectives on ``"collective"`` (cat ``"allreduce"``). Span args may carry ``mb``
(microbatch), ``wave`` and ``bytes``. The driver concatenates every actor's
``Tracer.events()`` and

- ``write_chrome_trace`` writes Chrome trace JSON (open in https://ui.perfetto.dev
  or chrome://tracing),
- ``summarize`` reports compute, comm, overlap and idle time per actor plus the
  pipeline bubble and the fraction of comm hidden under compute,
- ``plot_timeline`` draws a PNG with one lane per (actor, thread).

Times are wall-clock seconds from ``time.time()`` so spans of several processes
(on one host, or NTP-synchronised hosts) line up; Chrome trace events carry
microseconds. Spans that partly overlap on one thread (e.g. two isends in
flight) are moved to extra lanes ``"p2p-send#2"`` ... because trace viewers
require the spans of one thread to nest.

CLI::

    python -m comm.trace summarize TRACE.json      # summary as JSON on stdout
    python -m comm.trace plot TRACE.json OUT.png   # timeline PNG

Never imports torch or ray; matplotlib only inside ``plot_timeline``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import tempfile
import threading
import time
from collections.abc import Iterable

# Known threads first, in this order, in the trace viewer and the PNG.
THREAD_ORDER = ("compute", "p2p-recv", "p2p-send", "a2a", "grad-reduce", "collective")

# cat -> colour; unknown cats take FALLBACK_COLORS in order of first appearance.
PALETTE = {
    "compute": "#4C72B0",
    "send": "#DD8452",
    "recv": "#55A868",
    "dispatch": "#8172B3",
    "combine": "#DA8BC3",
    "allreduce": "#C44E52",
}
FALLBACK_COLORS = ("#937860", "#8C8C8C", "#CCB974", "#64B5CD", "#2F4F4F", "#B8860B")

REQUIRED_X_KEYS = ("name", "cat", "ph", "ts", "dur", "pid", "tid", "args")


class _Span:
    """Context manager of one enabled span; yields its args dict (callers may add e.g. ``bytes``)."""

    __slots__ = ("_tracer", "_name", "_cat", "_tid", "_args", "_start")

    def __init__(self, tracer: Tracer, name: str, cat: str, tid: str, args: dict):
        self._tracer, self._name, self._cat, self._tid, self._args = tracer, name, cat, tid, args

    def __enter__(self) -> dict:
        self._start = time.time()
        return self._args

    def __exit__(self, exc_type, exc, tb) -> bool:
        end = time.time()
        if exc_type is not None:
            self._args["error"] = exc_type.__name__
        self._tracer.add(self._name, self._cat, self._tid, self._start, end, **self._args)
        return False


class _NullSpan:
    """Context manager of a disabled tracer: records nothing, yields a throwaway dict."""

    __slots__ = ()

    def __enter__(self) -> dict:
        return {}

    def __exit__(self, exc_type, exc, tb) -> bool:
        return False


_NULL_SPAN = _NullSpan()


class Tracer:
    """Records spans of one actor. Times are wall-clock seconds from time.time() so spans of several processes line up.

    ``pid`` identifies the actor in the merged trace (e.g. its global rank; a
    non-negative int below 2**31 so Perfetto accepts it); ``process_name`` labels
    it (default ``"pid <pid>"``). When ``enabled`` is false, ``span`` and ``add``
    record nothing and cost one attribute test. ``add`` is thread-safe.
    """

    def __init__(self, pid: int, process_name: str = "", enabled: bool = True):
        if not isinstance(pid, int) or isinstance(pid, bool) or not 0 <= pid < 2**31:
            raise ValueError(f"pid must be an int in [0, 2**31), got {pid!r}")
        self.pid = pid
        self.process_name = process_name or f"pid {pid}"
        self.enabled = bool(enabled)
        self._lock = threading.Lock()
        self._spans: list[tuple[str, str, str, float, float, dict]] = []

    def span(self, name: str, cat: str = "compute", tid: str = "compute", **args):
        """Context manager timing its body as one span (wall-clock s); yields the span's args dict.

        ``with tracer.span("F", mb=3) as a: ...; a["bytes"] = n`` records a span
        ``F`` on thread ``tid`` with args ``{"mb": 3, "bytes": n}``. Spans on one
        thread may nest. A body that raises is still recorded, with
        ``args["error"]`` = the exception's type name. Disabled: a shared no-op
        context manager, nearly free.
        """
        if not self.enabled:
            return _NULL_SPAN
        return _Span(self, name, cat, tid, args)

    def add(self, name: str, cat: str, tid: str, start_s: float, end_s: float, **args) -> None:
        """Record one finished span from ``start_s`` to ``end_s`` (time.time() seconds); thread-safe."""
        if not self.enabled:
            return
        if end_s < start_s:
            raise ValueError(f"span {name!r}: end_s {end_s} is before start_s {start_s}")
        rec = (str(name), str(cat), str(tid), float(start_s), float(end_s), args)
        with self._lock:
            self._spans.append(rec)

    def events(self) -> list[dict]:
        """Chrome trace events of this actor: ``"X"`` spans (``ts``/``dur`` in microseconds, absolute
        epoch time) plus ``"M"`` metadata naming the process and its threads.

        Threads get small int tids (viewers need ints to show thread names), known
        threads first (``THREAD_ORDER``), then others in order of first use; partly
        overlapping spans of one thread go to extra lanes ``"<tid>#2"``, ...
        """
        with self._lock:
            spans = list(self._spans)
        first_use: dict[str, int] = {}
        for _, _, tid, _, _, _ in spans:
            first_use.setdefault(tid, len(first_use))

        # Lane packing: sort by (start asc, end desc) so parents come before children;
        # a span joins lane k if it is disjoint from or nested in that lane's open spans.
        order = sorted(range(len(spans)), key=lambda i: (spans[i][3], -spans[i][4], i))
        stacks: dict[str, list[list[float]]] = {}  # tid -> per lane, stack of open span ends
        lane_of: list[int] = [0] * len(spans)
        for i in order:
            _, _, tid, start, end, _ = spans[i]
            lanes = stacks.setdefault(tid, [])
            for k, stack in enumerate(lanes):
                while stack and stack[-1] <= start:
                    stack.pop()
                if not stack or end <= stack[-1]:
                    stack.append(end)
                    lane_of[i] = k
                    break
            else:
                lanes.append([end])
                lane_of[i] = len(lanes) - 1

        def rank(tid: str) -> tuple:
            known = THREAD_ORDER.index(tid) if tid in THREAD_ORDER else len(THREAD_ORDER)
            return (known, first_use[tid])

        lane_names: list[tuple[str, int]] = [
            (tid, k) for tid in sorted(stacks, key=rank) for k in range(len(stacks[tid]))
        ]
        tid_int = {lk: n for n, lk in enumerate(lane_names)}

        out: list[dict] = [
            {"name": "process_name", "ph": "M", "pid": self.pid, "tid": 0, "args": {"name": self.process_name}},
            {"name": "process_sort_index", "ph": "M", "pid": self.pid, "tid": 0, "args": {"sort_index": self.pid}},
        ]
        for (tid, k), n in tid_int.items():
            label = tid if k == 0 else f"{tid}#{k + 1}"
            out.append({"name": "thread_name", "ph": "M", "pid": self.pid, "tid": n, "args": {"name": label}})
            out.append({"name": "thread_sort_index", "ph": "M", "pid": self.pid, "tid": n, "args": {"sort_index": n}})
        for i in order:
            name, cat, tid, start, end, args = spans[i]
            out.append({
                "name": name, "cat": cat, "ph": "X",
                "ts": start * 1e6, "dur": (end - start) * 1e6,
                "pid": self.pid, "tid": tid_int[(tid, lane_of[i])], "args": dict(args),
            })
        return out

    def clear(self) -> None:
        """Drop all recorded spans."""
        with self._lock:
            self._spans.clear()

    def __len__(self) -> int:
        return len(self._spans)

    def __getstate__(self) -> dict:  # picklable (Ray): the lock is recreated
        state = self.__dict__.copy()
        del state["_lock"]
        with self._lock:
            state["_spans"] = list(self._spans)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


def _spans(events: Iterable[dict]) -> list[dict]:
    return [e for e in events if e.get("ph") == "X"]


def _names(events: Iterable[dict]) -> tuple[dict[int, str], dict[tuple[int, int], str]]:
    procs: dict[int, str] = {}
    threads: dict[tuple[int, int], str] = {}
    for e in events:
        if e.get("ph") != "M":
            continue
        if e.get("name") == "process_name":
            procs[e["pid"]] = str(e.get("args", {}).get("name", e["pid"]))
        elif e.get("name") == "thread_name":
            threads[(e["pid"], e["tid"])] = str(e.get("args", {}).get("name", e["tid"]))
    return procs, threads


def _atomic_write(path: pathlib.Path, write) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_chrome_trace(events: list[dict], path) -> pathlib.Path:
    """Write ``{"traceEvents": [...], "displayTimeUnit": "ms"}`` to ``path`` atomically (tmp + os.replace).

    ``events``: Chrome trace events, e.g. several ``Tracer.events()``
    concatenated. ``ts`` (microseconds) is rebased so the earliest span starts at
    0 and rounded to nanoseconds; the input list is not modified. Returns the path.
    """
    xs = _spans(events)
    t0 = min((e["ts"] for e in xs), default=0.0)
    out = [dict(e) for e in events if e.get("ph") != "X"]
    for e in sorted(xs, key=lambda e: (e["ts"], -e.get("dur", 0.0))):
        e = dict(e)
        e["ts"] = round(e["ts"] - t0, 3)
        e["dur"] = round(e.get("dur", 0.0), 3)
        out.append(e)
    data = json.dumps({"traceEvents": out, "displayTimeUnit": "ms"}).encode()
    return _atomic_write(pathlib.Path(path), lambda f: f.write(data))


def load_trace(path) -> list[dict]:
    """Events of a Chrome trace file: ``{"traceEvents": [...]}`` or a bare JSON list."""
    with open(path) as f:
        data = json.load(f)
    events = data.get("traceEvents") if isinstance(data, dict) else data
    if not isinstance(events, list):
        raise ValueError(f"{path}: expected a JSON list of events or an object with 'traceEvents'")
    return events


def _union(iv: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Disjoint sorted union of intervals."""
    out: list[list[float]] = []
    for a, b in sorted(iv):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _length(u: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in u)


def _intersect_length(u: list[tuple[float, float]], v: list[tuple[float, float]]) -> float:
    """Total length of the intersection of two disjoint sorted unions."""
    i = j = 0
    total = 0.0
    while i < len(u) and j < len(v):
        lo, hi = max(u[i][0], v[j][0]), min(u[i][1], v[j][1])
        if hi > lo:
            total += hi - lo
        if u[i][1] < v[j][1]:
            i += 1
        else:
            j += 1
    return total


def _subtract(a: list, b: list) -> list:
    """Interval union ``a`` minus interval union ``b`` (both sorted, disjoint)."""
    out, j = [], 0
    for lo, hi in a:
        cur = lo
        while j < len(b) and b[j][1] <= cur:
            j += 1
        k = j
        while k < len(b) and b[k][0] < hi:
            if b[k][0] > cur:
                out.append((cur, b[k][0]))
            cur = max(cur, b[k][1])
            k += 1
        if cur < hi:
            out.append((cur, hi))
    return out


COMM_CATS = ("send", "dispatch", "combine", "allreduce")


def summarize(events: list[dict]) -> dict:
    """Per-actor and overall figures of a trace (all times in seconds).

    Span categories: ``compute`` (the compute thread's work), ``wait`` (the compute
    thread blocked on communication: exposed communication), transfers
    ``send`` / ``dispatch`` / ``combine`` / ``allreduce`` (comm threads; the sender
    holds the link-model time), and ``recv`` (a posted receive waiting for its
    data: shown on the timeline, not counted as transfer time).

    ``per_pid[pid]``: ``name``; ``compute_s`` = union of compute spans minus the
    waits inside them; ``wait_s`` = union of waits; ``comm_s`` = union of
    transfer spans; ``overlap_s`` = transfer time during compute; ``span_s`` =
    first span start to last span end; ``idle_s`` = time in ``span_s`` with neither
    compute nor transfer.

    Overall: ``makespan_s``, ``n_pids``, totals, ``bubble = 1 - sum(compute_s) /
    (n_pids * makespan_s)`` (idle share of the actors' time), and
    ``overlap_fraction`` = the share of transfer time hidden behind compute:
    ``1 - sum(exposed_comm_s) / sum(comm_s)`` when waits are recorded, where a
    wait counts as exposed communication only while a transfer it depends on is
    in flight -- this actor's own transfers, or, for a wait whose args name a
    ``peer`` (pid) and ``kind`` / ``mb`` / ``wave``, the peer's matching ``send``
    span (waiting for an upstream stage that is still computing is bubble, not
    communication); else
    ``sum(overlap_s) / sum(comm_s)`` (0 when there is no transfer). Only ``"X"`` events count.
    """
    procs, _ = _names(events)
    by_pid: dict[int, dict[str, list]] = {}
    sends: dict[tuple, list] = {}  # (pid, kind, mb, wave) -> send spans: matched by the receiver's waits
    waits: dict[int, list[dict]] = {}
    for e in _spans(events):
        a = e.get("args") or {}
        if e.get("cat") == "send" and "kind" in a:
            t = e["ts"] * 1e-6
            sends.setdefault((e["pid"], a["kind"], a.get("mb"), a.get("wave")), []).append(
                (t, t + e.get("dur", 0.0) * 1e-6))
        if e.get("cat") == "wait":
            waits.setdefault(e["pid"], []).append(e)
    for e in _spans(events):
        a = e["ts"] * 1e-6
        iv = (a, a + e.get("dur", 0.0) * 1e-6)
        cat = e.get("cat", "comm")
        kind = "compute" if cat == "compute" else "wait" if cat == "wait" else "recv" if cat == "recv" else "comm"
        by_pid.setdefault(e["pid"], {"compute": [], "wait": [], "recv": [], "comm": []})[kind].append(iv)

    per_pid: dict[int, dict] = {}
    t_lo, t_hi = float("inf"), float("-inf")
    for pid in sorted(by_pid):
        u = {k: _union(v) for k, v in by_pid[pid].items()}
        wait = u["wait"]
        comp = _subtract(u["compute"], wait)
        comm = u["comm"]
        every = _union(u["compute"] + wait + u["recv"] + comm)
        busy = _union(comp + comm)
        lo, hi = every[0][0], every[-1][1]
        t_lo, t_hi = min(t_lo, lo), max(t_hi, hi)
        # exposed communication: waits while a transfer this wait depends on is in flight (this actor's
        # own transfers, e.g. all-to-alls, or the peer's send of the awaited activation / gradient)
        exposed = 0.0
        for w in waits.get(pid, []):
            t = w["ts"] * 1e-6
            wi = [(t, t + w.get("dur", 0.0) * 1e-6)]
            a = w.get("args") or {}
            mine = list(comm)
            if "peer" in a:
                mine += sends.get((a["peer"], a.get("kind"), a.get("mb"), a.get("wave")), [])
            exposed += _intersect_length(wi, _union(mine))
        per_pid[pid] = {
            "name": procs.get(pid, f"pid {pid}"),
            "compute_s": _length(comp),
            "wait_s": _length(wait),
            "exposed_comm_s": exposed,
            "comm_s": _length(comm),
            "overlap_s": _intersect_length(comp, comm),
            "idle_s": (hi - lo) - _length(busy),
            "span_s": hi - lo,
        }
    makespan = (t_hi - t_lo) if per_pid else 0.0
    compute = sum(p["compute_s"] for p in per_pid.values())
    comm = sum(p["comm_s"] for p in per_pid.values())
    wait = sum(p["wait_s"] for p in per_pid.values())
    exposed = sum(p["exposed_comm_s"] for p in per_pid.values())
    overlap = sum(p["overlap_s"] for p in per_pid.values())
    n = len(per_pid)
    if comm <= 0:
        frac = 0.0
    elif wait > 0:
        frac = min(1.0, max(0.0, 1.0 - exposed / comm))
    else:
        frac = overlap / comm
    return {
        "per_pid": per_pid,
        "n_pids": n,
        "makespan_s": makespan,
        "compute_s": compute,
        "wait_s": wait,
        "exposed_comm_s": exposed,
        "comm_s": comm,
        "overlap_s": overlap,
        "bubble": 1.0 - compute / (n * makespan) if n and makespan > 0 else 0.0,
        "overlap_fraction": frac,
    }


def plot_timeline(events: list[dict], path, title: str = "") -> pathlib.Path:
    """Draw the trace as a PNG at ``path`` (written atomically) and return the path.

    One horizontal lane per (pid, tid), labelled ``"<process> / <thread>"``, spans
    coloured by ``cat`` (``PALETTE``, then ``FALLBACK_COLORS``), x axis in ms
    from the earliest span, a legend, and a text box with the bubble, the
    overlap fraction and the makespan from ``summarize``. Uses the Agg canvas
    directly (no pyplot, no global backend change).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    xs = _spans(events)
    procs, threads = _names(events)
    t0 = min((e["ts"] for e in xs), default=0.0)
    lanes = sorted({(e["pid"], e["tid"]) for e in xs}, key=lambda pt: (pt[0], str(type(pt[1])), pt[1]))
    lane_idx = {pt: i for i, pt in enumerate(lanes)}

    colors: dict[str, str] = {}
    for e in xs:
        cat = str(e.get("cat", ""))
        if cat not in colors:
            n_fallback = sum(1 for c in colors if c not in PALETTE)
            colors[cat] = PALETTE.get(cat, FALLBACK_COLORS[n_fallback % len(FALLBACK_COLORS)])

    bars: dict[tuple[int, str], list[tuple[float, float]]] = {}
    for e in xs:
        bars.setdefault((lane_idx[(e["pid"], e["tid"])], str(e.get("cat", ""))), []).append(
            ((e["ts"] - t0) / 1e3, e.get("dur", 0.0) / 1e3))
    makespan_ms = max(((e["ts"] - t0 + e.get("dur", 0.0)) / 1e3 for e in xs), default=1.0) or 1.0

    n = max(1, len(lanes))
    fig = Figure(figsize=(12, 1.2 + 0.45 * n), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for (lane, cat), segs in bars.items():
        ax.broken_barh(segs, (lane - 0.4, 0.8), facecolors=colors[cat], edgecolor="black", linewidth=0.3)
    if len(xs) <= 400:  # label spans wide enough to hold text
        for e in xs:
            dur_ms = e.get("dur", 0.0) / 1e3
            if dur_ms < 0.04 * makespan_ms:
                continue
            mb = e.get("args", {}).get("mb")
            label = str(e.get("name", "")) + ("" if mb is None else str(mb))
            ax.text((e["ts"] - t0) / 1e3 + dur_ms / 2, lane_idx[(e["pid"], e["tid"])], label,
                    ha="center", va="center", fontsize=7, clip_on=True)
    for i in range(1, len(lanes)):  # separate actors
        if lanes[i][0] != lanes[i - 1][0]:
            ax.axhline(i - 0.5, color="black", linewidth=0.6)
    ax.set_yticks(range(len(lanes)))
    ax.set_yticklabels([f"{procs.get(p, f'pid {p}')} / {threads.get((p, t), str(t))}" for p, t in lanes],
                       fontsize=8)
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_xlim(0, makespan_ms * 1.01)
    ax.set_xlabel("time (ms)")
    ax.grid(axis="x", alpha=0.3)
    if title:
        ax.set_title(title)
    if colors:
        ax.legend(handles=[Patch(facecolor=c, label=k or "(none)") for k, c in colors.items()],
                  loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, title="cat")
    s = summarize(events)
    ax.text(1.01, 0.0, f"makespan {s['makespan_s'] * 1e3:.2f} ms\nbubble {s['bubble']:.3f}\n"
                       f"overlap fraction {s['overlap_fraction']:.3f}",
            transform=ax.transAxes, fontsize=8, va="bottom", ha="left",
            bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.9})
    fig.tight_layout()
    return _atomic_write(pathlib.Path(path), lambda f: fig.savefig(f, format="png"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m comm.trace",
        description="Inspect Chrome trace JSON written by comm.trace.write_chrome_trace "
                    "(one span per compute / send / recv / dispatch / combine / allreduce step; "
                    "open the file itself in https://ui.perfetto.dev).",
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("summarize", help="print per-actor compute / comm / overlap / idle seconds, the "
                                         "makespan, the pipeline bubble and the overlap fraction as JSON",
                       description="Print the summary of a trace as JSON. Times in seconds; bubble = "
                                   "1 - sum(compute) / (n_actors * makespan); overlap_fraction = share "
                                   "of comm time hidden under compute.")
    p.add_argument("trace", help="trace JSON ({'traceEvents': [...]} or a list of events)")
    p = sub.add_parser("plot", help="draw the timeline as a PNG (one lane per actor and thread)",
                       description="Draw the timeline: one lane per (actor, thread), spans coloured by "
                                   "category, x axis in ms, with the summary figures in a box.")
    p.add_argument("trace", help="trace JSON ({'traceEvents': [...]} or a list of events)")
    p.add_argument("out", help="output PNG path")
    p.add_argument("--title", default="", help="figure title (default: none)")
    args = parser.parse_args(argv)

    events = load_trace(args.trace)
    if args.cmd == "summarize":
        print(json.dumps(summarize(events), indent=2))
    else:
        print(plot_timeline(events, args.out, title=args.title))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
