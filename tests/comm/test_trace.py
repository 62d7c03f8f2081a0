"""Timeline traces: Tracer spans, Chrome trace JSON, summary figures, PNG and CLI."""

import json
import subprocess
import sys
import threading
import time

import pytest

from comm.trace import REQUIRED_X_KEYS, Tracer, load_trace, plot_timeline, summarize, write_chrome_trace


def X(pid, tid, cat, start_ms, end_ms, name="s", **args):
    """A hand-built "X" event; times in ms."""
    return {"name": name, "cat": cat, "ph": "X", "ts": start_ms * 1e3, "dur": (end_ms - start_ms) * 1e3,
            "pid": pid, "tid": tid, "args": args}


def xs(events):
    return [e for e in events if e["ph"] == "X"]


def thread_names(events):
    return {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}


def test_span_nesting_and_timing():
    tr = Tracer(3, "stage 3")
    t_before = time.time()
    with tr.span("step", mb=1) as a:
        time.sleep(0.004)
        with tr.span("F", mb=1, wave=0):
            time.sleep(0.006)
        a["bytes"] = 128
    t_after = time.time()
    ev = tr.events()
    spans = {e["name"]: e for e in xs(ev)}
    outer, inner = spans["step"], spans["F"]
    assert outer["args"] == {"mb": 1, "bytes": 128} and inner["args"] == {"mb": 1, "wave": 0}
    assert outer["cat"] == inner["cat"] == "compute" and outer["pid"] == 3
    # nested spans stay on one lane: the inner lies inside the outer
    assert outer["tid"] == inner["tid"]
    assert outer["ts"] <= inner["ts"] and inner["ts"] + inner["dur"] <= outer["ts"] + outer["dur"]
    assert inner["dur"] >= 6e3 and outer["dur"] >= 10e3  # microseconds
    assert t_before * 1e6 <= outer["ts"] and outer["ts"] + outer["dur"] <= t_after * 1e6
    assert outer["dur"] < (t_after - t_before) * 1e6 + 1
    meta = {(e["name"], e["tid"]): e["args"] for e in ev if e["ph"] == "M"}
    assert meta[("process_name", 0)] == {"name": "stage 3"}
    assert thread_names(ev) == {(3, outer["tid"]): "compute"}


def test_span_records_on_exception():
    tr = Tracer(0)
    with pytest.raises(RuntimeError):
        with tr.span("F", mb=2):
            raise RuntimeError("boom")
    (e,) = xs(tr.events())
    assert e["args"] == {"mb": 2, "error": "RuntimeError"}


def test_partly_overlapping_spans_of_one_thread_get_extra_lanes():
    tr = Tracer(1, "stage 1")
    tr.add("send", "send", "p2p-send", 0.0, 0.010, mb=0)
    tr.add("send", "send", "p2p-send", 0.005, 0.015, mb=1)  # overlaps mb 0 without nesting
    tr.add("send", "send", "p2p-send", 0.012, 0.020, mb=2)  # fits after mb 0 on the first lane
    tr.add("F", "compute", "compute", 0.0, 0.020)
    ev = tr.events()
    names = thread_names(ev)
    lane = {e["args"]["mb"]: names[(1, e["tid"])] for e in xs(ev) if e["name"] == "send"}
    assert lane == {0: "p2p-send", 1: "p2p-send#2", 2: "p2p-send"}
    compute_tid = next(e["tid"] for e in xs(ev) if e["cat"] == "compute")
    assert compute_tid == 0  # known threads first, compute on top


def test_two_tracers_merged_and_rebased(tmp_path):
    a, b = Tracer(0, "stage 0"), Tracer(1, "stage 1")
    t = time.time()
    a.add("F", "compute", "compute", t + 0.001, t + 0.003, mb=0)
    b.add("recv", "recv", "p2p-recv", t + 0.002, t + 0.004, mb=0, bytes=4096)
    b.add("F", "compute", "compute", t + 0.004, t + 0.006, mb=0)
    path = write_chrome_trace(a.events() + b.events(), tmp_path / "sub" / "trace.json")
    assert path == tmp_path / "sub" / "trace.json" and not list(path.parent.glob("*.tmp"))
    data = json.loads(path.read_text())
    assert data["displayTimeUnit"] == "ms"
    ev = data["traceEvents"]
    spans = xs(ev)
    assert len(spans) == 3
    for e in spans:
        assert all(k in e for k in REQUIRED_X_KEYS), e
        assert e["ph"] == "X" and e["dur"] >= 0
    for e in ev:
        assert {"name", "ph", "pid", "tid"} <= e.keys()
    assert min(e["ts"] for e in spans) == 0
    by = {(e["pid"], e["name"]): e for e in spans}
    # 1 ms after stage 0's F; time.time() floats resolve ~0.25 us near 1.7e9 s
    assert by[(1, "recv")]["ts"] == pytest.approx(1000, abs=0.5)
    assert by[(1, "F")]["ts"] == pytest.approx(3000, abs=0.5)
    assert by[(1, "recv")]["args"] == {"mb": 0, "bytes": 4096}
    procs = {e["pid"]: e["args"]["name"] for e in ev if e["ph"] == "M" and e["name"] == "process_name"}
    assert procs == {0: "stage 0", 1: "stage 1"}
    assert load_trace(path) == ev
    s = summarize(ev)
    assert s["makespan_s"] == pytest.approx(0.005, abs=1e-6)
    assert s["per_pid"][1]["overlap_s"] == pytest.approx(0.0, abs=1e-6)


def test_summarize_overlap_idle_and_union():
    ev = [
        {"name": "process_name", "ph": "M", "pid": 0, "tid": 0, "args": {"name": "stage 0"}},
        X(0, 0, "compute", 0, 10),
        X(0, 0, "compute", 2, 4),  # nested compute, counted once
        X(0, 1, "send", 5, 15),
        X(0, 2, "recv", 8, 12),  # inside the send: comm union stays [5, 15]
        X(0, 0, "compute", 20, 25),
        X(1, 0, "compute", 5, 10),
        X(1, 3, "dispatch", 12, 14),
        X(1, 3, "combine", 13, 16),  # comm union [12, 16]
        X(1, 0, "compute", 15, 30),
    ]
    s = summarize(ev)
    p0, p1 = s["per_pid"][0], s["per_pid"][1]
    assert p0["name"] == "stage 0" and p1["name"] == "pid 1"
    assert p0["compute_s"] == pytest.approx(0.015)
    assert p0["comm_s"] == pytest.approx(0.010)
    assert p0["overlap_s"] == pytest.approx(0.005)
    assert p0["span_s"] == pytest.approx(0.025)
    assert p0["idle_s"] == pytest.approx(0.005)  # gap [15, 20]
    assert p1["compute_s"] == pytest.approx(0.020)
    assert p1["comm_s"] == pytest.approx(0.004)
    assert p1["overlap_s"] == pytest.approx(0.001)  # [15, 16]
    assert p1["span_s"] == pytest.approx(0.025)
    assert p1["idle_s"] == pytest.approx(0.002)  # [10, 12]
    assert s["n_pids"] == 2
    assert s["makespan_s"] == pytest.approx(0.030)
    assert s["bubble"] == pytest.approx(1 - 0.035 / (2 * 0.030))
    assert s["overlap_fraction"] == pytest.approx(0.006 / 0.014)


def test_summarize_empty_and_no_comm():
    s = summarize([])
    assert s["per_pid"] == {} and s["makespan_s"] == 0 and s["bubble"] == 0 and s["overlap_fraction"] == 0
    s = summarize([X(0, 0, "compute", 0, 10), X(1, 0, "compute", 0, 10)])
    assert s["bubble"] == pytest.approx(0.0) and s["overlap_fraction"] == 0.0


def test_disabled_tracer_records_nothing():
    tr = Tracer(0, enabled=False)
    with tr.span("F", mb=0) as a:
        a["bytes"] = 1
    tr.add("send", "send", "p2p-send", 0.0, 1.0)
    assert xs(tr.events()) == [] and len(tr) == 0
    tr.enabled = True
    with tr.span("F"):
        pass
    assert len(xs(tr.events())) == 1
    tr.clear()
    assert xs(tr.events()) == []


def test_add_rejects_bad_input():
    with pytest.raises(ValueError, match="end_s"):
        Tracer(0).add("x", "send", "p2p-send", 2.0, 1.0)
    with pytest.raises(ValueError, match="pid"):
        Tracer(-1)


def test_thread_safety():
    tr = Tracer(0)
    n_threads, per_thread = 8, 500
    barrier = threading.Barrier(n_threads)

    def work(k):
        barrier.wait()
        for i in range(per_thread):
            t = time.time()
            tr.add("send", "send", f"t{k}", t, t + 1e-6, i=i)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    spans = xs(tr.events())
    assert len(spans) == n_threads * per_thread
    names = thread_names(tr.events())
    per_lane = {}  # spans of one thread within the clock resolution may overlap -> lanes "t3#2", ...
    for e in spans:
        per_lane.setdefault(names[(0, e["tid"])].split("#")[0], []).append(e["args"]["i"])
    assert {k: sorted(v) for k, v in per_lane.items()} == {f"t{k}": list(range(per_thread)) for k in range(n_threads)}


def test_pickle_roundtrip():
    import pickle

    tr = Tracer(2, "stage 2")
    tr.add("F", "compute", "compute", 1.0, 2.0)
    tr2 = pickle.loads(pickle.dumps(tr))
    assert tr2.events() == tr.events()
    tr2.add("B", "compute", "compute", 2.0, 3.0)
    assert len(tr2) == 2 and len(tr) == 1


def _pipeline_events():
    ev = []
    for s in range(2):
        tr = Tracer(s, f"stage {s}")
        for mb in range(3):
            f0 = 1000.0 + 0.004 * (mb + s)
            if s:
                tr.add("recv", "recv", "p2p-recv", f0 - 0.001, f0, mb=mb, bytes=1 << 20)
            tr.add("F", "compute", "compute", f0, f0 + 0.003, mb=mb)
            tr.add("dispatch", "dispatch", "a2a", f0 + 0.001, f0 + 0.002, mb=mb, wave=0)
            tr.add("combine", "combine", "a2a", f0 + 0.002, f0 + 0.0035, mb=mb, wave=0)
            if not s:
                tr.add("send", "send", "p2p-send", f0 + 0.003, f0 + 0.004, mb=mb, bytes=1 << 20)
        tr.add("allreduce", "allreduce", "collective", 1000.02, 1000.025)
        tr.add("ckpt", "checkpoint", "io", 1000.025, 1000.026)  # unknown cat -> fallback colour
        ev += tr.events()
    return ev


def test_plot_timeline_writes_png(tmp_path):
    out = plot_timeline(_pipeline_events(), tmp_path / "timeline.png", title="2 stages x 3 microbatches")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert not list(tmp_path.glob("*.tmp"))


def test_cli_summarize_and_plot(tmp_path, repo_root):
    ev = _pipeline_events()
    path = write_chrome_trace(ev, tmp_path / "trace.json")
    r = subprocess.run([sys.executable, "-m", "comm.trace", "summarize", str(path)], cwd=repo_root,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    want = summarize(ev)
    assert got["n_pids"] == 2 and set(got["per_pid"]) == {"0", "1"}
    for k in ("makespan_s", "bubble", "overlap_fraction"):
        assert got[k] == pytest.approx(want[k], abs=1e-6)
    png = tmp_path / "t.png"
    r = subprocess.run([sys.executable, "-m", "comm.trace", "plot", str(path), str(png), "--title", "x"],
                       cwd=repo_root, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:4] == b"\x89PNG"
    r = subprocess.run([sys.executable, "-m", "comm.trace", "--help"], cwd=repo_root,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "summarize" in r.stdout and "plot" in r.stdout


def test_summarize_counts_only_waits_during_transfers_as_exposed():
    ev = [
        # actor 0: computes 0-10 ms, sends the activation 10-14 ms
        X(0, 0, "compute", 0, 10, name="F0"),
        X(0, 2, "send", 10, 14, name="send ->1", kind="act", mb=0, wave=0),
        # actor 1: waits 0-14 ms for that activation (10 ms bubble, 4 ms exposed transfer), computes 14-20
        X(1, 0, "wait", 0, 14, name="wait act", kind="act", mb=0, wave=0, peer=0),
        X(1, 1, "recv", 0, 14, name="recv <-0"),
        X(1, 0, "compute", 14, 20, name="F0"),
        # an all-to-all 15-19 on actor 1 while it computes, with a 1 ms wait inside the compute span
        X(1, 3, "dispatch", 15, 19, name="dispatch w0"),
        X(1, 0, "wait", 18, 19, name="wait dispatch"),
    ]
    s = summarize(ev)
    a1 = s["per_pid"][1]
    assert a1["compute_s"] == pytest.approx(0.005, abs=1e-6)  # 6 ms of compute span minus the 1 ms wait
    assert a1["exposed_comm_s"] == pytest.approx(0.005, abs=1e-6)  # 4 ms of the send + 1 ms of the dispatch
    assert s["comm_s"] == pytest.approx(0.008, abs=1e-6)  # recv spans are not transfer time
    assert s["overlap_fraction"] == pytest.approx(1 - 5 / 8, abs=1e-3)
    assert s["bubble"] == pytest.approx(1 - (0.010 + 0.005) / (2 * 0.020), abs=1e-3)
