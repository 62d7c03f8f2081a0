"""Link calibration (comm.calibrate, cluster.ops.calibrate, ``tide calibrate``).

Cheapest first: sizes, the fit on real nccl-tests tables, the nccl-tests runner with fake
binaries (shell scripts that print a real output); then, on one local Ray cluster of two
labelled racks (conftest's ``two_racks``), ``tide calibrate`` with the gloo probe and with
the fake nccl-tests binaries, including a CUDA failure.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

from cli.main import main
from cluster.launch.link_model import load_link_model
from cluster.ops import calibrate as cluster_calibrate
from comm import calibrate as comm_calibrate
from comm.calibrate import (
    MAX_GLOO_SIZE,
    MAX_NCCL_SIZE,
    CalibrationError,
    CalibrationTable,
    check_out_path,
    check_sweep,
    find_nccl_tests,
    fit_link_model,
    fit_table,
    gloo_max_bytes,
    nccl_tests_command,
    parse_sizes,
    run_nccl_tests,
    write_calibration,
)
from comm.nccl_tests import NcclTestsError, busbw_factor, parse_file

from .test_nccl_tests import FAILURE, data_file

ALLREDUCE = "allreduce_8gpu_1node_v2.17.8.txt"
ALLTOALL = "alltoall_16gpu_2node_v2.17.6.txt"
SENDRECV = "sendrecv_16gpu_2node_v2.17.8.txt"
ALLREDUCE_8B = "allreduce_16gpu_2node_v2.13-2.16fmt.txt"  # 8 B .. 8 GiB, no 'Reducing maxBytes' line
ROOT = Path(__file__).resolve().parents[2]


def test_parse_sizes():
    assert parse_sizes("4K, 1M,64K,4K") == [4096, 65536, 1 << 20]
    assert parse_sizes("8,1G") == [8, 1 << 30] and parse_sizes("2KiB") == [2048]
    assert parse_sizes("16G") == [MAX_NCCL_SIZE]  # the bound itself is allowed
    for bad in ("", " ", "4X", "0", "-1K"):
        with pytest.raises(ValueError, match="--sizes"):
            parse_sizes(bad)
    with pytest.raises(ValueError, match="--sizes: empty; give at least one size"):
        parse_sizes("")
    # far too large: a clear error naming the size and what is allowed, never an allocator crash later
    for bad, n in (("1024G", 1 << 40), ("4K,99999999999999999999999", 99999999999999999999999), ("17G", 17 << 30)):
        with pytest.raises(ValueError, match=rf"--sizes: \S+ \({n} B\) is too large; allowed: 1 \.\. 16G "
                                             rf"\({MAX_NCCL_SIZE} B\)"):
            parse_sizes(bad)
    with pytest.raises(ValueError, match=r"allowed: 1 \.\. 1M \(1048576 B\) for the probe"):
        parse_sizes("4K,2M", max_bytes=1 << 20, limit="for the probe")


def test_gloo_max_bytes():
    assert gloo_max_bytes(64 << 30) == MAX_GLOO_SIZE == 1 << 30  # 1 GiB at most
    assert gloo_max_bytes(1 << 30) == 128 << 20  # 1/8 of the available memory
    assert gloo_max_bytes(0) == 4096  # never below the smallest useful size
    assert 4096 <= gloo_max_bytes() <= MAX_GLOO_SIZE


def test_check_sweep():
    """The table must reach the sweep's last step (min x 2^k <= max), or nccl-tests' own reduced maxBytes."""
    full = parse_file(data_file(ALLREDUCE_8B))
    check_sweep(full, [8, 8 << 30])
    check_sweep(full, [8, (8 << 30) + 5])  # -e 8G+5: nccl-tests' last step is 8G
    short = parse_file(data_file(ALLREDUCE_8B))
    short.rows = short.rows[:2]  # 8, 16 B
    with pytest.raises(NcclTestsError, match=r"the table ends at 16 B but the sweep asked for sizes up to "
                                             r"1073741824 B \(last step 1073741824 B; nccl-tests printed no "
                                             r"'Reducing maxBytes' line\)"):
        check_sweep(short, [8, 1 << 30])
    with pytest.raises(NcclTestsError, match=r"ends at 8589934592 B .* up to 17179869184 B"):
        check_sweep(full, [8, 16 << 30])  # one step short is short too
    a2a = parse_file(data_file(ALLTOALL))  # 32M .. 16G, no Reducing line
    with pytest.raises(NcclTestsError, match=r"ends at 17179869184 B .* up to 68719476736 B"):
        check_sweep(a2a, [32 << 20, 64 << 30])
    # "# Reducing maxBytes to 26549638485 due to memory limitation": then the sweep ends at 16G
    ar = parse_file(data_file(ALLREDUCE))
    assert ar.reduced_max_bytes == 26549638485
    check_sweep(ar, [32 << 20, 64 << 30])
    ar.rows = ar.rows[:-1]
    with pytest.raises(NcclTestsError, match=r"ends at 8589934592 B .* nccl-tests reduced maxBytes to 26549638485"):
        check_sweep(ar, [32 << 20, 64 << 30])
    # sizes rounded down to whole elements per rank (80 ranks x 8 B): 17179868160 is the 16G step
    check_sweep(parse_file(data_file("allgather_80gpu_10node_v2.17.8.txt")), [32 << 20, 64 << 30])


def test_check_out_path(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    (tmp_path / "lm.tables.json").mkdir()
    for bad, match in ((tmp_path / "dir", "is a directory"), (tmp_path / "lm.yaml", "lm.tables.json is a directory"),
                       (tmp_path / "file" / "lm.yaml", "file is not a directory"),
                       (tmp_path / "file" / "a" / "lm.yaml", "file is not a directory"),
                       (Path("/proc/lm.yaml"), "cannot create files in /proc"), ("", "empty path")):
        with pytest.raises(CalibrationError, match=f"--out.*{match}"):
            check_out_path(bad)
    before = sorted(tmp_path.rglob("*"))
    assert check_out_path(tmp_path / "new" / "deeper" / "lm.yaml") == tmp_path / "new" / "deeper" / "lm.yaml"
    assert sorted(tmp_path.rglob("*")) == before  # checks, creates nothing (the probe file is gone)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_check_out_path_read_only(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(CalibrationError, match="cannot create files in .*ro: Permission denied"):
            check_out_path(ro / "sub" / "lm.yaml")
    finally:
        ro.chmod(0o755)


def test_write_failure_leaves_no_temp_file(tmp_path, monkeypatch):
    sr = parse_file(data_file(SENDRECV))
    tables = [CalibrationTable("inter-rack", ("r0", "r1"), "sendrecv", "nccl-tests", sr)]

    def fail(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(comm_calibrate.os, "replace", fail)
    with pytest.raises(CalibrationError, match=r"cannot write .*lm.yaml: No space left on device"):
        write_calibration(tmp_path / "lm.yaml", fit_link_model(tables), tables)
    assert list(tmp_path.iterdir()) == []


def test_default_out_is_uploaded_with_the_working_dir():
    """`ray job submit --working-dir .` skips what .gitignore / .rayignore list: the default must not be there."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    for path in (cluster_calibrate.DEFAULT_OUT, str(comm_calibrate.tables_path_of(cluster_calibrate.DEFAULT_OUT))):
        r = subprocess.run(["git", "-c", "core.excludesFile=.rayignore", "check-ignore", "--no-index", "-v", path],
                           cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 1, f"{path} is ignored (not uploaded with a job): {r.stdout}"
    assert not Path(cluster_calibrate.DEFAULT_OUT).is_absolute()


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
    model = load_link_model(out)
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


@pytest.mark.parametrize("args,match", [
    (["--out", "{tmp}"], "is a directory"),
    (["--out", "{tmp}/file/lm.yaml"], "file is not a directory"),
    (["--out", "/proc/lm.yaml"], "cannot create files in /proc"),
    (["--sizes", ""], "--sizes: empty"),
    (["--sizes", "1024G"], r"1024G \(1099511627776 B\) is too large; allowed: 1 \.\. 16G"),
    (["--sizes", "4K,99999999999999999999999"], "is too large; allowed: 1 .. 16G"),
    (["--method", "gloo", "--sizes", "2G"], r"too large; allowed: 1 \.\. \S+ \(\d+ B\) for the gloo probe"),
    (["--launcher", "mpirun -np {{nprocs}} -H {{hostz}}"], r"--launcher uses \{hostz\}; allowed: \{nprocs\}"),
    (["--launcher", "mpirun -x 'A"], "--launcher is not a valid command line: No closing quotation"),
])
def test_bad_options_fail_before_measuring(tmp_path, monkeypatch, capsys, args, match):
    """A bad --out, --sizes or --launcher is a usage error at once: no cluster joined, nothing measured, no file
    left."""
    (tmp_path / "file").write_text("x")
    d = fake_nccl_tests(tmp_path / "bin", {"sendrecv_perf": SENDRECV, "all_reduce_perf": ALLREDUCE,
                                           "alltoall_perf": ALLTOALL})
    monkeypatch.setenv("NCCL_TESTS_DIR", str(d))
    monkeypatch.setattr(cluster_calibrate, "connect", lambda *a: pytest.fail("connected before checking options"))
    before = sorted(tmp_path.rglob("*"))
    argv = ["calibrate", *(a.format(tmp=tmp_path) for a in args)]
    if "--out" not in args:
        argv += ["--out", str(tmp_path / "lm.yaml")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("tide: error: ") and "Traceback" not in err
    assert re.search(match, err), err
    assert sorted(tmp_path.rglob("*")) == before


def test_tables_are_not_cut_when_stdout_is_not_a_terminal(capsys):
    """CI logs and `ray job logs` are no terminal: rich's 80 columns would print sizes as `10485…`."""
    console = cluster_calibrate._console()
    assert not console.is_terminal and console.width == cluster_calibrate.LOG_WIDTH
    table = CalibrationTable("intra-rack", ("r0",), "all_reduce", "nccl-tests", parse_file(data_file(ALLREDUCE_8B)))
    console.print(comm_calibrate.render_table(table))
    out = capsys.readouterr().out
    assert "…" not in out and "8589934592" in out and "2147483648" in out
    assert max(len(line) for line in out.splitlines()) < 200  # natural width, not padded to LOG_WIDTH


def test_forced_nccl_tests_without_binaries_is_a_usage_error(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("NCCL_TESTS_DIR", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert main(["calibrate", "--method", "nccl-tests", "--out", str(tmp_path / "lm.yaml")]) == 2
    assert "no nccl-tests binaries" in capsys.readouterr().err


# ------------------------------------------------------------ on a Ray cluster
def test_calibrate_gloo_on_two_racks(two_racks, tmp_path, capsys):
    out = tmp_path / "cal" / "link_model.yaml"
    rc = main(["calibrate", "--method", "gloo", "--sizes", "4K,64K", "--iters", "3", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    model = load_link_model(out)
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


def fake_launcher(d: Path) -> str:
    """A test double of mpirun: logs its arguments to calls.log and runs the command after ``-np N -H HOSTS``."""
    _script(d / "launch", f'echo "launch $*" >> "{d}/calls.log"\nshift 4\nexec "$@"\n')
    return f"{d}/launch -np {{nprocs}} -H {{hosts}}"


def test_calibrate_nccl_tests_path_with_fake_binaries(two_racks, tmp_path, capsys):
    d = fake_nccl_tests(tmp_path / "bin", {"sendrecv_perf": SENDRECV, "all_reduce_perf": ALLREDUCE,
                                           "alltoall_perf": ALLTOALL})
    # the launcher spans the two racks' nodes for sendrecv; this one logs its arguments and runs the rest
    out = tmp_path / "lm.json"
    rc = main(["calibrate", "--method", "nccl-tests", "--nccl-tests-dir", str(d), "--sizes", "32M,16G",
                   "--iters", "5", "--launcher", fake_launcher(d), "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "method nccl-tests" in printed
    assert "17179869184" in printed and "…" not in printed  # full-width tables: stdout is no terminal here
    model = load_link_model(out)
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
    rc = main(["calibrate", "--method", "nccl-tests", "--nccl-tests-dir", str(d), "--sizes", "32M,16G",
                   "--launcher", fake_launcher(d), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1
    assert ("tide: error: intra-rack r0: alltoall_perf failed: host1: Test CUDA failure common.cu:389 "
            "'an illegal memory access was encountered'") in err
    assert not out.exists() and not (tmp_path / "lm.tables.json").exists()
    assert not list(tmp_path.glob("*.tmp"))


def test_calibrate_refuses_an_empty_launcher_between_racks(two_racks, tmp_path, capsys):
    """`--launcher ''` would run one sendrecv_perf process on one node and call it the inter-rack link."""
    d = fake_nccl_tests(tmp_path / "bin", {"sendrecv_perf": SENDRECV, "all_reduce_perf": ALLREDUCE,
                                           "alltoall_perf": ALLTOALL})
    out = tmp_path / "lm.yaml"
    rc = main(["calibrate", "--method", "nccl-tests", "--nccl-tests-dir", str(d), "--sizes", "32M,16G",
                   "--launcher", "", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "tide: error: --launcher '' cannot measure sendrecv between racks r0 and r1" in err
    assert not (d / "calls.log").exists() and not out.exists()  # refused before running anything


def _edit_output(name: str, keep) -> str:
    """A real output with only the lines ``keep(line)`` accepts."""
    return "".join(ln for ln in data_file(name).read_text().splitlines(keepends=True) if keep(ln))


@pytest.mark.parametrize("case", ["short table", "one rank"])
def test_calibrate_refuses_a_fake_inter_rack_table(two_racks, tmp_path, capsys, case):
    """A table that stops before the largest size asked for, or one rank only, measured no inter-rack link."""
    if case == "short table":  # 8 and 16 B only, footer kept: "finished", but far short of -e 1G
        text = _edit_output(ALLREDUCE_8B, lambda ln: ln.startswith("#") or ln.split()[0] in ("8", "16"))
        sizes, match = "8,1G", (r"tide: error: inter-rack r0<->r1: sendrecv_perf: the table ends at 16 B but the "
                                r"sweep asked for sizes up to 1073741824 B")
    else:  # what `sendrecv_perf -g 1` run directly prints: one rank on one host
        text = _edit_output(SENDRECV, lambda ln: "Rank " not in ln or " Rank  0 " in ln)
        sizes, match = "32M,16G", (r"tide: error: inter-rack r0<->r1: sendrecv_perf: 1 rank \(on host1\): "
                                   r"the launcher did not start one process on each rack")
    d = fake_nccl_tests(tmp_path / "bin", {"all_reduce_perf": ALLREDUCE, "alltoall_perf": ALLTOALL})
    (tmp_path / "sendrecv.txt").write_text(text)
    _script(d / "sendrecv_perf", f'cat "{tmp_path / "sendrecv.txt"}"\n')
    out = tmp_path / "lm.yaml"
    rc = main(["calibrate", "--method", "nccl-tests", "--nccl-tests-dir", str(d), "--sizes", sizes,
                   "--launcher", fake_launcher(d), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and re.search(match, err), err
    assert not out.exists()


def test_calibrate_auto_uses_gloo_when_the_racks_have_no_gpu(two_racks, tmp_path, capsys):
    """nccl-tests installed but no rack reports a GPU (these racks are CPU-only): auto falls back to gloo."""
    d = fake_nccl_tests(tmp_path / "bin", {"sendrecv_perf": SENDRECV, "all_reduce_perf": ALLREDUCE,
                                           "alltoall_perf": ALLTOALL})
    out = tmp_path / "lm.yaml"
    rc = main(["calibrate", "--nccl-tests-dir", str(d), "--sizes", "4K", "--iters", "1",
                   "--launcher", fake_launcher(d), "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "rack(s) r0, r1 report no GPU: --method auto uses the gloo probe" in printed and "method gloo" in printed
    assert not (d / "calls.log").exists()  # no nccl-tests binary ran
    assert json.loads((tmp_path / "lm.tables.json").read_text())["meta"]["method"] == "gloo"


def test_a_relative_out_inside_a_ray_job_is_refused(tmp_path, monkeypatch, capsys):
    """Run as a `ray job submit --working-dir .` job, a relative --out lands in Ray's temporary copy of the
    working dir (deleted with it): refused before measuring, like tide train's relative storage_path."""
    job_dir = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_1"
    job_dir.mkdir(parents=True)
    monkeypatch.chdir(job_dir)
    monkeypatch.setattr(cluster_calibrate, "connect", lambda *a: pytest.fail("connected before checking options"))
    assert main(["calibrate", "--method", "gloo", "--out", "calibration/lm.yaml"]) == 2
    err = capsys.readouterr().err
    assert "is relative and this job runs in Ray's temporary copy" in err and not (job_dir / "calibration").exists()
