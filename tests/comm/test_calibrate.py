"""Link calibration (comm.calibrate, cluster.calibrate, ``tide calibrate``).

Cheapest first: sizes, the fit on real nccl-tests tables, the nccl-tests runner with fake
binaries (shell scripts that print a real output); then, on one local Ray cluster of two
labelled racks (conftest's ``two_racks``), ``tide calibrate`` with the gloo probe and with
the fake nccl-tests binaries, including a CUDA failure.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from cluster import cli
from comm.calibrate import (
    CalibrationError,
    CalibrationTable,
    find_nccl_tests,
    fit_link_model,
    fit_table,
    nccl_tests_command,
    parse_sizes,
    run_nccl_tests,
    write_calibration,
)
from comm.link_model import LinkModel
from comm.nccl_tests import NcclTestsError, busbw_factor, parse_file

from .test_nccl_tests import FAILURE, data_file

ALLREDUCE = "allreduce_8gpu_1node_v2.17.8.txt"
ALLTOALL = "alltoall_16gpu_2node_v2.17.6.txt"
SENDRECV = "sendrecv_16gpu_2node_v2.17.8.txt"


def test_parse_sizes():
    assert parse_sizes("4K, 1M,64K,4K") == [4096, 65536, 1 << 20]
    assert parse_sizes("8,1G") == [8, 1 << 30] and parse_sizes("2KiB") == [2048]
    for bad in ("", "4X", "0", "-1K"):
        with pytest.raises(ValueError, match="--sizes"):
            parse_sizes(bad)


def test_fit_on_real_tables(tmp_path):
    """latency = smallest size's time; bandwidth = median busbw of the largest rows; classes take the worst table."""
    sr, ar, a2a = (parse_file(data_file(n)) for n in (SENDRECV, ALLREDUCE, ALLTOALL))
    assert fit_table(sr) == (93681.5, 45.87)  # 3 rows: the largest one alone
    assert fit_table(ar) == (182.87, (481.39 + 482.27) / 2)  # 10 rows: the largest two
    big = parse_file(data_file("allreduce_16gpu_2node_v2.13-2.16fmt.txt"))
    assert fit_table(big) == (135.8, 330.58)  # 31 rows: median of the largest three
    tables = [CalibrationTable("inter-rack", ("r0", "r1"), "sendrecv", "nccl-tests", sr),
              CalibrationTable("intra-rack", ("r0",), "all_reduce", "nccl-tests", ar),
              CalibrationTable("intra-rack", ("r0",), "alltoall", "nccl-tests", a2a)]
    fits = fit_link_model(tables)
    intra = fits["intra-rack"]
    assert intra.latency_us == 1382.27 and intra.latency_from == "intra-rack r0 alltoall"
    assert intra.busbw_GBps == pytest.approx(23.60) and intra.bandwidth_gbps == pytest.approx(188.8)
    out, tables_path = write_calibration(tmp_path / "lm.yaml", fits, tables, {"method": "test"})
    model = LinkModel.from_file(out)
    assert model.classes["intra-rack"].bandwidth_Bps == pytest.approx(23.60e9)  # GB/s = 1e9 B/s
    assert model.classes["inter-rack"].latency_s == pytest.approx(93681.5e-6)
    assert model.transfer_time(1 << 30, "inter-rack") == pytest.approx(93681.5e-6 + (1 << 30) / 45.87e9)
    doc = json.loads(tables_path.read_text())
    assert tables_path.name == "lm.tables.json" and [t["op"] for t in doc["tables"]] == \
        ["sendrecv", "all_reduce", "alltoall"]
    assert doc["tables"][1]["result"]["avg_busbw_GBps"] == 437.957
    assert doc["fit"]["inter-rack"]["busbw_GBps"] == 45.87


def test_fit_rejects_zero_bandwidth():
    small = parse_file(data_file("allreduce_16gpu_2node_v2.13-2.16fmt.txt"))
    small.rows = small.rows[:4]  # 8..64 B: busbw prints as 0.00
    with pytest.raises(CalibrationError, match="use larger --sizes"):
        fit_table(small)


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def fake_nccl_tests(d: Path, outputs: dict[str, str], status: int = 0) -> Path:
    """nccl-tests binaries that log their argv and print a real output file."""
    d.mkdir(parents=True, exist_ok=True)
    for binary, name in outputs.items():
        _script(d / binary, f'echo "$0 $*" >> "{d}/calls.log"\ncat "{data_file(name)}"\nexit {status}\n')
    return d


def test_run_nccl_tests_with_fake_binaries(tmp_path):
    d = fake_nccl_tests(tmp_path / "bin", {"sendrecv_perf": SENDRECV, "alltoall_perf": FAILURE})
    argv = nccl_tests_command(d, "sendrecv", [8, 1 << 30], iters=7, gpus_per_process=1)
    assert argv == [str(d / "sendrecv_perf"), "-b", "8", "-e", str(1 << 30), "-f", "2", "-n", "7", "-w", "5",
                    "-g", "1"]
    result, output = run_nccl_tests(argv)
    assert result.binary == "sendrecv_perf" and len(result.rows) == 3 and output == data_file(SENDRECV).read_text()
    with pytest.raises(NcclTestsError, match="Test CUDA failure common.cu:389 'an illegal memory access"):
        run_nccl_tests(nccl_tests_command(d, "alltoall", [8], iters=1))
    bad = fake_nccl_tests(tmp_path / "bad", {"sendrecv_perf": SENDRECV}, status=3)
    with pytest.raises(NcclTestsError, match="exited with status 3"):
        run_nccl_tests(nccl_tests_command(bad, "sendrecv", [8], iters=1))
    with pytest.raises(NcclTestsError, match="cannot start"):
        run_nccl_tests([str(tmp_path / "nope" / "sendrecv_perf")])


def test_find_nccl_tests(tmp_path, monkeypatch):
    monkeypatch.delenv("NCCL_TESTS_DIR", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert find_nccl_tests() is None
    part = fake_nccl_tests(tmp_path / "part", {"sendrecv_perf": SENDRECV})
    with pytest.raises(CalibrationError, match=r"lacks executable nccl-tests binaries \['all_reduce_perf', "
                                               r"'alltoall_perf'\]"):
        find_nccl_tests(part)
    full = fake_nccl_tests(tmp_path / "full", {"sendrecv_perf": SENDRECV, "all_reduce_perf": ALLREDUCE,
                                               "alltoall_perf": ALLTOALL})
    monkeypatch.setenv("PATH", f"{tmp_path / 'empty'}{os.pathsep}{full}")
    assert find_nccl_tests() == full.resolve()
    monkeypatch.setenv("NCCL_TESTS_DIR", str(part))
    with pytest.raises(CalibrationError, match="NCCL_TESTS_DIR"):
        find_nccl_tests()


def test_forced_nccl_tests_without_binaries_is_a_usage_error(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("NCCL_TESTS_DIR", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert cli.main(["calibrate", "--method", "nccl-tests", "--out", str(tmp_path / "lm.yaml")]) == 2
    assert "no nccl-tests binaries" in capsys.readouterr().err


# ------------------------------------------------------------ on a Ray cluster
def test_calibrate_gloo_on_two_racks(two_racks, tmp_path, capsys):
    out = tmp_path / "cal" / "link_model.yaml"
    rc = cli.main(["calibrate", "--method", "gloo", "--sizes", "4K,64K", "--iters", "3", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    model = LinkModel.from_file(out)
    for cls in ("intra-rack", "inter-rack"):
        assert model.classes[cls].latency_s > 0 and model.classes[cls].bandwidth_Bps > 0
    doc = json.loads((tmp_path / "cal" / "link_model.tables.json").read_text())
    assert [(t["link_class"], t["racks"], t["op"]) for t in doc["tables"]] == [
        ("inter-rack", ["r0", "r1"], "sendrecv"), ("intra-rack", ["r0"], "all_reduce"),
        ("intra-rack", ["r0"], "alltoall"), ("intra-rack", ["r1"], "all_reduce"), ("intra-rack", ["r1"], "alltoall")]
    for t in doc["tables"]:
        res = t["result"]
        assert res["source"] == "gloo probe" and [r["size_bytes"] for r in res["rows"]] == [4096, 65536]
        hosts = [k["host"] for k in res["ranks"]]
        assert [h.rsplit("(", 1)[1] for h in hosts] == [f"{t['racks'][0]})", f"{t['racks'][-1]})"]
        f = busbw_factor(t["op"], 2)
        for r in res["rows"]:
            m = r["out_of_place"]
            assert m["wrong"] == 0 and m["time_us"] > 0
            assert m["algbw_GBps"] == pytest.approx(r["size_bytes"] / (m["time_us"] * 1e3))
            assert m["busbw_GBps"] == pytest.approx(m["algbw_GBps"] * f)
    assert "inter-rack r0<->r1 sendrecv" in printed and "busbw" in printed and "link model" in printed


def test_calibrate_nccl_tests_path_with_fake_binaries(two_racks, tmp_path, capsys):
    d = fake_nccl_tests(tmp_path / "bin", {"sendrecv_perf": SENDRECV, "all_reduce_perf": ALLREDUCE,
                                           "alltoall_perf": ALLTOALL})
    # the launcher spans the two racks' nodes for sendrecv; this one logs its arguments and runs the rest
    _script(d / "launch", f'echo "launch $*" >> "{d}/calls.log"\nshift 4\nexec "$@"\n')
    out = tmp_path / "lm.json"
    rc = cli.main(["calibrate", "--nccl-tests-dir", str(d), "--sizes", "32M,16G", "--iters", "5",
                   "--launcher", f"{d}/launch -np {{nprocs}} -H {{hosts}}", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "method nccl-tests" in printed
    model = LinkModel.from_file(out)
    assert model.classes["inter-rack"].latency_s == pytest.approx(93681.5e-6)
    assert model.classes["inter-rack"].bandwidth_Bps == pytest.approx(45.87e9)
    assert model.classes["intra-rack"].latency_s == pytest.approx(1382.27e-6)  # alltoall's, the worse one
    assert model.classes["intra-rack"].bandwidth_Bps == pytest.approx(23.60e9)
    calls = (d / "calls.log").read_text().splitlines()
    launch = [c for c in calls if c.startswith("launch")]
    assert len(launch) == 1 and launch[0].split()[1:4] == ["-np", "2", "-H"] and launch[0].count(":1") == 2
    runs = [c.split() for c in calls if not c.startswith("launch")]
    assert [Path(c[0]).name for c in runs] == ["sendrecv_perf", "all_reduce_perf", "alltoall_perf",
                                               "all_reduce_perf", "alltoall_perf"]
    assert all(c[1:] == ["-b", str(32 << 20), "-e", str(16 << 30), "-f", "2", "-n", "5", "-w", "5", "-g", "1"]
               for c in runs)
    doc = json.loads((tmp_path / "lm.tables.json").read_text())
    assert doc["tables"][0]["raw_output"].startswith("# nccl-tests version 2.17.8")
    assert doc["meta"]["method"] == "nccl-tests"


def test_calibrate_reports_a_failed_nccl_tests_run(two_racks, tmp_path, capsys):
    d = fake_nccl_tests(tmp_path / "bin", {"sendrecv_perf": SENDRECV, "all_reduce_perf": ALLREDUCE,
                                           "alltoall_perf": FAILURE})
    out = tmp_path / "lm.yaml"
    rc = cli.main(["calibrate", "--method", "nccl-tests", "--nccl-tests-dir", str(d), "--launcher", "",
                   "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1
    assert ("tide: error: intra-rack r0: alltoall_perf failed: host1: Test CUDA failure common.cu:389 "
            "'an illegal memory access was encountered'") in err
    assert not out.exists() and not (tmp_path / "lm.tables.json").exists()
