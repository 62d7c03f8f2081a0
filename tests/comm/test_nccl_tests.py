"""comm.nccl_tests: the parser against every real nccl-tests output in shared/data/nccl-tests/.

The data's source of truth lives beside the repository (``<checkout>/../shared/data/nccl-tests``,
or ``$TIDE_SHARED_DIR/data/nccl-tests``); ``tests/comm/data/nccl-tests`` is a byte-identical copy
so that a checkout anywhere runs these tests (a test keeps the two equal whenever both exist).
Missing data is a failure, never a skip.

The ``-J`` JSON fixtures are built from nccl-tests' own JSON writer (``src/util.cu``:
``jsonOutputInit``, ``writeDeviceReport``, ``writeBenchmarkLinePreamble`` /
``writeBenchmarkLineBody`` / ``writeBenchmarkLineTerminator``, ``writeResultFooter``,
``writeErrors``, ``jsonOutputFinalize``; ``JSON_FILE_VERSION 3``) because no real ``-J``
file has been published yet (see the data's README).
"""

# ruff: noqa: UP031  (the JSON fixtures keep util.cu's printf formats, %d / %6i, side by side with the C)
from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path

import pytest

from comm.nccl_tests import NcclTestsError, busbw_factor, nccl_version_string, parse_file, parse_json, parse_text

SHARED = Path(os.environ.get("TIDE_SHARED_DIR") or Path(__file__).resolve().parents[3] / "shared")
SHARED_DATA = SHARED / "data" / "nccl-tests"
VENDORED = Path(__file__).resolve().parent / "data" / "nccl-tests"  # the copy in the repository
DATA = SHARED_DATA if SHARED_DATA.is_dir() else VENDORED
FAILURE = "alltoall_16gpu_2node_v2.17.6_cuda-failure.txt"

# Figures read off the files (and the README's table).
EXPECTED = {
    "allreduce_8gpu_1node_v2.17.8.txt": dict(
        binary="all_reduce_perf", format="2.17.4+", version="2.17.8", nccl="2.29.2", rows=10, first=33554432,
        last=17179869184, avg=437.957, ranks=8, hosts=1, type="double", redop="sum", reduced=26549638485,
        row0=((182.87, 183.49, 321.10, 0), (182.88, 183.48, 321.08, 0)), root=-1, log=0),
    "allreduce_16gpu_2node_v2.13-2.16fmt.txt": dict(
        binary=None, format="2.13-2.16.2", version=None, nccl=None, rows=31, first=8, last=8589934592,
        avg=70.742, ranks=16, hosts=2, type="float", redop="sum", reduced=None,
        row0=((135.8, 0.00, 0.00, 0), (123.5, 0.00, 0.00, 0)), root=-1, log=0),
    "alltoall_16gpu_2node_v2.17.6.txt": dict(
        binary="alltoall_perf", format="2.17.4+", version="2.17.6", nccl="2.28.7", rows=10, first=33554432,
        last=17179869184, avg=23.4963, ranks=16, hosts=2, type="double", redop="none", reduced=None,
        row0=((1382.27, 24.27, 22.76, 0), (1354.09, 24.78, 23.23, None)), root=-1, log=0),
    "sendrecv_16gpu_2node_v2.17.8.txt": dict(
        binary="sendrecv_perf", format="2.17.4+", version="2.17.8", nccl="2.29.2", rows=3, first=4294967296,
        last=17179869184, avg=45.8647, ranks=16, hosts=2, type="double", redop="sum", reduced=26549638485,
        row0=((93681.5, 45.85, 45.85, 0), (93633.6, 45.87, 45.87, None)), root=-1, log=0),
    "allgather_80gpu_10node_v2.17.8.txt": dict(
        binary="all_gather_perf", format="2.17.4+", version="2.17.8", nccl="2.29.2", rows=10, first=33553920,
        last=17179868160, avg=218.677, ranks=80, hosts=10, type="double", redop="none", reduced=26549638485,
        row0=((682.20, 49.19, 48.57, 0), (672.05, 49.93, 49.30, 0)), root=-1, log=0),
    "allreduce_4gpu_1node_pre2.13.txt": dict(
        binary=None, format="pre-2.13", version=None, nccl=None, rows=7, first=33554432, last=2147483648,
        avg=2.54225, ranks=4, hosts=1, type="float", redop="sum", reduced=None,
        row0=((19902, 1.69, 2.53, 2e-07), (19898, 1.69, 2.53, 2e-07)), root=None, log=1),
    "allreduce_3gpu_3node_pre2.13_novalidation.txt": dict(
        binary=None, format="pre-2.13", version=None, nccl=None, rows=11, first=104857600, last=115343360,
        avg=0.58536, ranks=3, hosts=3, type="float", redop="sum", reduced=None,
        row0=((202872, 0.52, 0.69, None), (224616, 0.47, 0.62, None)), root=None, log=0),
}
# what the binary is, for the files that do not print it (from the data's README)
KNOWN_BINARY = {"allreduce_16gpu_2node_v2.13-2.16fmt.txt": "all_reduce_perf",
                "allreduce_4gpu_1node_pre2.13.txt": "all_reduce_perf",
                "allreduce_3gpu_3node_pre2.13_novalidation.txt": "all_reduce_perf"}


def data_file(name: str) -> Path:
    assert DATA.is_dir(), f"nccl-tests test data not found at {SHARED_DATA} nor {VENDORED}"
    p = DATA / name
    assert p.is_file(), f"missing test data file {p}"
    return p


def text_of(name: str) -> str:
    return data_file(name).read_text()


def test_every_data_file_has_expectations():
    names = {p.name for p in data_file("README.md").parent.glob("*.txt")}
    assert names == set(EXPECTED) | {FAILURE}, "a data file was added or removed: give it expectations here"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_output(name):
    e = EXPECTED[name]
    r = parse_file(data_file(name))
    assert r.binary == e["binary"] and r.format == e["format"] and r.version == e["version"]
    assert r.nccl_version == e["nccl"]
    assert len(r.rows) == e["rows"]
    assert (r.rows[0].size_bytes, r.rows[-1].size_bytes) == (e["first"], e["last"])
    assert r.avg_busbw_GBps == e["avg"] and r.out_of_bounds == 0
    assert r.n_ranks == e["ranks"] and len(r.hosts) == e["hosts"] and r.hosts[0] == "host1"
    assert [k.rank for k in r.ranks] == list(range(e["ranks"]))
    assert (r.datatype, r.redop, r.reduced_max_bytes) == (e["type"], e["redop"], e["reduced"])
    assert all(row.type == e["type"] and row.redop == e["redop"] and row.root == e["root"] for row in r.rows)
    for got, want in zip((r.rows[0].out_of_place, r.rows[0].in_place), e["row0"], strict=True):
        assert (got.time_us, got.algbw_GBps, got.busbw_GBps, got.wrong) == want
    assert len(r.log_lines) == e["log"]
    # sizes strictly increase; count x element size == size (x ranks where count is per rank)
    elem = {"float": 4, "double": 8}[e["type"]]
    per_rank = e["binary"] in ("alltoall_perf", "all_gather_perf")
    assert all(a.size_bytes < b.size_bytes for a, b in zip(r.rows, r.rows[1:], strict=False))
    assert all(row.count * elem * (e["ranks"] if per_rank else 1) == row.size_bytes for row in r.rows)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_avg_bus_bandwidth_is_the_mean_of_the_printed_busbw(name):
    """nccl-tests averages busbw over every out-of-place and in-place cell; the parsed cells must agree."""
    r = parse_file(data_file(name))
    cells = [m.busbw_GBps for row in r.rows for m in (row.out_of_place, row.in_place)]
    assert abs(statistics.fmean(cells) - r.avg_busbw_GBps) <= 0.005


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_busbw_factor_matches_real_rows(name):
    r = parse_file(data_file(name))
    f = busbw_factor(r.binary or KNOWN_BINARY[name], r.n_ranks)
    for row in r.rows:
        for m in (row.out_of_place, row.in_place):
            assert abs(m.busbw_GBps - m.algbw_GBps * f) <= 0.02, (row, f)
            if m.algbw_GBps >= 1:  # algbw = size / time (GB/s = 1e9 B/s), to the printed rounding
                assert m.algbw_GBps == pytest.approx(row.size_bytes / (m.time_us * 1e3), abs=0.006, rel=1e-3)


def test_header_details():
    r = parse_file(data_file("allreduce_8gpu_1node_v2.17.8.txt"))
    assert r.params == {"nThread": 1, "nGpus": 1, "minBytes": 33554432, "maxBytes": 68719476736, "step": 2,
                        "step_kind": "factor", "warmup_iters": 5, "iters": 20, "agg_iters": 1, "validation": 1,
                        "graph": 0}
    assert (r.nccl_headers, r.nccl_library, r.collective, r.wrong_kind) == (22902, 22902, "all_reduce", "count")
    k = r.ranks[7]
    assert (k.rank, k.group, k.pid, k.host, k.device, k.bus_id, k.device_name) == \
        (7, 0, 4180135, "host1", 7, "0000:df:00", "NVIDIA H100 80GB HBM3")
    old = parse_file(data_file("allreduce_4gpu_1node_pre2.13.txt"))
    assert old.wrong_kind == "max_error" and old.ranks[2].group is None and old.ranks[2].pid == 198
    assert old.log_lines == ["host1:195:195 [0] NCCL INFO Launch mode Parallel"]
    nv = parse_file(data_file("allreduce_3gpu_3node_pre2.13_novalidation.txt"))
    assert (nv.params["step"], nv.params["step_kind"], nv.params["iters"], nv.params["validation"]) == \
        (1048576, "bytes", 1, 0)
    assert nv.hosts == ["host1", "host2", "host3"]
    big = parse_file(data_file("allgather_80gpu_10node_v2.17.8.txt"))
    assert big.hosts == [f"host{i}" for i in range(1, 11)] and big.ranks[79].device == 7
    assert nccl_version_string(22807) == "2.28.7" and nccl_version_string(2708) == "2.7.8"


def test_binary_hint_for_outputs_that_do_not_name_it():
    r = parse_text(text_of("allreduce_16gpu_2node_v2.13-2.16fmt.txt"), binary="all_reduce_perf")
    assert r.collective == "all_reduce"


def test_cuda_failure_is_an_error_never_numbers():
    with pytest.raises(NcclTestsError) as ei:
        parse_file(data_file(FAILURE))
    msg = str(ei.value)
    assert msg.startswith("alltoall_perf failed: host1: Test CUDA failure common.cu:389 "
                          "'an illegal memory access was encountered'")
    assert "6 more failure line(s)" in msg and "common.cu:1368" in msg


def _mutate(name: str, old: str, new: str, count: int = 1) -> str:
    text = text_of(name)
    assert old in text, f"{old!r} not in {name}"
    return text.replace(old, new, count)


@pytest.mark.parametrize("text, match", [
    (lambda: _mutate("allreduce_8gpu_1node_v2.17.8.txt", "# Out of bounds values : 0 OK\n# Avg bus bandwidth    : "
                     "437.957 \n#\n# Collective test concluded: all_reduce_perf\n", ""),
     r"table does not end .*last size printed: 17179869184"),
    (lambda: _mutate("allreduce_16gpu_2node_v2.13-2.16fmt.txt", "# Avg bus bandwidth    : 70.742 \n", ""),
     "table does not end"),
    (lambda: _mutate("allreduce_8gpu_1node_v2.17.8.txt", "# Collective test concluded: all_reduce_perf\n", ""),
     "did not finish"),
    (lambda: _mutate("allreduce_8gpu_1node_v2.17.8.txt", "4000.82  268.38  469.67       0",
                     "4000.82  268.38  469.67       3"),
     r"3 wrong elements at size 1073741824 B \(out-of-place\)"),
    (lambda: _mutate("alltoall_16gpu_2node_v2.17.6.txt", "# Out of bounds values : 0 OK",
                     "# Out of bounds values : 12 FAILED"), "12 out-of-bounds"),
    (lambda: _mutate("allreduce_8gpu_1node_v2.17.8.txt", "# Avg bus bandwidth    : 437.957 ",
                     "# Avg bus bandwidth    : 437.957 FAILED"), "below the NCCL_TESTS_MIN_BW"),
    (lambda: _mutate("sendrecv_16gpu_2node_v2.17.8.txt", "  187260   45.87   45.87       0", "  187260   45.87"),
     "malformed row"),
    (lambda: text_of("sendrecv_16gpu_2node_v2.17.8.txt") + text_of("alltoall_16gpu_2node_v2.17.6.txt"),
     "holds 2 runs"),
    (lambda: "", "no result table"),
    (lambda: "nccl-tests: command not found\n", "no result table"),
])
def test_failed_or_broken_outputs_raise(text, match):
    with pytest.raises(NcclTestsError, match=match):
        parse_text(text())


def test_newer_header_variants():
    """2.18+ prints ``unalign:`` and may add columns (util.cu: ``#bitdiff`` with -B, a timestamp column)."""
    text = _mutate("sendrecv_16gpu_2node_v2.17.8.txt", "validation: 1 graph: 0", "validation: 1 graph: 0 unalign: 0")
    assert parse_text(text).format == "2.18+" and parse_text(text).params["unalign"] == 0
    hdr = ("#       size         count      type   redop    root     time   algbw   busbw  #wrong  #bitdiff     time   "
           "algbw   busbw  #wrong  #bitdiff  timestamp")
    row = ("  4294967296     536870912    double     sum      -1  93681.5   45.85   45.85       0         0  93633.6   "
           "45.87   45.87    N/A         0  2026-01-28 01:07:02")
    out = []
    for ln in text.splitlines():
        if ln.lstrip("#").split()[:2] == ["size", "count"]:
            out.append(hdr)
        elif ln.startswith("#") or not ln.strip():
            out.append(ln)
            if ln.lstrip("#").split()[:1] == ["(B)"]:
                out.append(row)
    r = parse_text("\n".join(out) + "\n")
    assert len(r.rows) == 1 and r.rows[0].in_place.time_us == 93633.6 and r.rows[0].in_place.wrong is None
    assert r.rows[0].out_of_place.wrong == 0


# ---------------------------------------------------------------------- JSON
def _jdouble(v: float | None) -> str:
    """util.cu jsonDouble: printf("%lf") (6 decimals), NaN as the string "nan"."""
    if v is None:
        return "null"
    return '"nan"' if math.isnan(v) else f"{v:f}"


def json_like_util_cu(name: str, *, cut_after: int | None = None, nwrong: float | None = None,
                      oob: int = 0) -> str:
    """The ``-J`` file nccl-tests would write for the run in data file ``name``, key for key as
    util.cu writes it (compact, booleans as "true"/"false" strings, ``root`` as "%6i", "devices"
    inside "config"). ``cut_after``: stop as a crash would after that many full rows (the
    writer's finalize closes the open objects; the next row stops after its preamble)."""
    r = parse_file(data_file(name))
    p = r.params
    head = ('{"version":3,"start_time":"2026-01-28 14:50:17","args":["./build/%s","-b","%d","-e","%d","-f","2",'
            '"-g","1","-J","out.json"],"env":["NCCL_DEBUG=WARN"],"nccl_version":%d,' %
            (r.binary, p["minBytes"], p["maxBytes"], r.nccl_library))
    cfg = ('"config":{"nthreads":%d,"ngpus":%d,"minimum_bytes":%d,"maximum_bytes":%d,"step_factor":%d,'
           '"warmup_iters":%d,"iterations":%d,"aggregated_iterations":%d,"validation":%d,"graph":%d,'
           '"blocking_collectives":"false","per_iter_timing":"false","per_iter_skip":0,"parallel_init":"false",'
           '"devices":[%s]},' %
           (p["nThread"], p["nGpus"], p["minBytes"], p["maxBytes"], p["step"], p["warmup_iters"], p["iters"],
            p["agg_iters"], p["validation"], p["graph"],
            ",".join('{"rank":%d,"group":%d,"pid":%d,"hostname":"%s","device":%d,"device_hex":"%s",'
                     '"device_info":"%s"}' % (k.rank, k.group, k.pid, k.host, k.device, k.bus_id, k.device_name)
                     for k in r.ranks)))

    def body(key, m, wrong):
        return ('"%s":{"time":%s,"alg_bw":%s,"bus_bw":%s,"nwrong":%s}' %
                (key, _jdouble(m.time_us), _jdouble(m.algbw_GBps), _jdouble(m.busbw_GBps), _jdouble(wrong)))

    rows = []
    for i, row in enumerate(r.rows):
        pre = ('{"size":%d,"count":%d,"type":"%s","redop":"%s","root":"%6i"' %
               (row.size_bytes, row.count, row.type, row.redop, row.root))
        if cut_after is not None and i == cut_after:
            rows.append(pre + "}")
            return head + cfg + '"results":[' + ",".join(rows) + "]}"
        w = nwrong if (nwrong is not None and i == 1) else row.out_of_place.wrong
        rows.append(pre + "," + body("out_of_place", row.out_of_place, w) + "," +
                    body("in_place", row.in_place, row.in_place.wrong) +
                    ',"actual_iterations":%d,"experiment_name":""}' % p["iters"])
    tail = ('"out_of_bounds":{"count":%d,"okay":"%s"},"average_bus_bandwidth":{"bandwidth":%s,"okay":"unchecked"},'
            '"errors":[],"end_time":"2026-01-28 14:51:02"}' % (oob, "false" if oob else "true",
                                                               _jdouble(r.avg_busbw_GBps)))
    return head + cfg + '"results":[' + ",".join(rows) + "]," + tail


@pytest.mark.parametrize("name", ["allreduce_8gpu_1node_v2.17.8.txt", "alltoall_16gpu_2node_v2.17.6.txt",
                                  "sendrecv_16gpu_2node_v2.17.8.txt"])
def test_json_output_matches_the_text_output(name, tmp_path):
    text = parse_file(data_file(name))
    doc = json_like_util_cu(name)
    json.loads(doc)  # the emulation writes valid JSON
    (tmp_path / "out.json").write_text(doc)
    js = parse_file(tmp_path / "out.json")
    assert js.format == "json" and js.binary == text.binary and js.nccl_version == text.nccl_version
    assert js.rows == text.rows and js.ranks == text.ranks
    assert js.avg_busbw_GBps == text.avg_busbw_GBps and js.out_of_bounds == 0
    assert {k: js.params[k] for k in text.params} == text.params


def test_json_failures_raise():
    name = "allreduce_8gpu_1node_v2.17.8.txt"
    with pytest.raises(NcclTestsError, match=r"result 3 \(size 268435456 B\) was cut short"):
        parse_json(json_like_util_cu(name, cut_after=3))
    with pytest.raises(NcclTestsError, match="2 wrong elements at size 67108864 B"):
        parse_json(json_like_util_cu(name, nwrong=2.0))
    with pytest.raises(NcclTestsError, match="5 out-of-bounds"):
        parse_json(json_like_util_cu(name, oob=5))
    doc = json.loads(json_like_util_cu(name))
    del doc["average_bus_bandwidth"]
    with pytest.raises(NcclTestsError, match="no 'average_bus_bandwidth': the run did not finish"):
        parse_json(doc)
    with pytest.raises(NcclTestsError, match="no 'results'"):
        parse_json({"version": 3, "nccl_version": 22902, "errors": ["unhandled cuda error"]})
    with pytest.raises(NcclTestsError, match="not valid JSON"):
        parse_json('{"version":3,"results":[')


def test_busbw_factor():
    assert busbw_factor("all_reduce_perf", 8) == 2 * 7 / 8
    assert busbw_factor("alltoall", 16) == 15 / 16 and busbw_factor("sendrecv", 16) == 1.0
    assert busbw_factor("all_gather", 80) == 79 / 80
    with pytest.raises(ValueError, match="no busbw factor"):
        busbw_factor("hypercube_perf", 4)


def test_the_vendored_copy_equals_the_shared_data():
    """tests/comm/data/nccl-tests is the shared data, file for file, byte for byte (when shared/ is there)."""
    names = sorted(p.name for p in VENDORED.iterdir())
    assert len(names) >= 9 and "README.md" in names
    if not SHARED_DATA.is_dir():
        return  # a checkout without shared/: the copy is all there is
    assert names == sorted(p.name for p in SHARED_DATA.iterdir())
    for name in names:
        assert (VENDORED / name).read_bytes() == (SHARED_DATA / name).read_bytes(), name
