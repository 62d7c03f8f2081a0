"""Link calibration: measure links with nccl-tests or a gloo probe, fit the link model, write it.

The pieces that need no Ray (``cluster/ops/calibrate.py`` places them on racks and is what
``tide calibrate`` runs):

- :func:`gloo_probe`: inside a process of an initialised ``torch.distributed`` gloo
  group, time ``sendrecv`` / ``all_reduce`` / ``alltoall`` over a size sweep and return
  the same :class:`~comm.nccl_tests.NcclTestsResult` table nccl-tests prints (time in us,
  algbw = size / time, busbw = algbw x nccl-tests' factor, ``#wrong`` from a check).
- :func:`find_nccl_tests`, :func:`nccl_tests_command`, :func:`run_nccl_tests`: locate the
  nccl-tests binaries, build their command line, run one and parse its output
  (a failed run raises :class:`~comm.nccl_tests.NcclTestsError` naming the error).
- :func:`fit_table` / :func:`fit_link_model`: the link model's figures (see there).
- :func:`write_calibration`: the link-model YAML that ``parallel.link_model`` and
  ``LinkModel.from_dict`` takes (``cluster.launch.link_model`` reads it), plus the raw tables as JSON
  beside it.

Units: sizes in bytes, times in microseconds, algbw/busbw in GB/s (1e9 bytes/s) as
nccl-tests prints them; the link model's ``bandwidth_gbps`` is in Gbit/s (= busbw x 8).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .link_model import LINK_CLASSES, LinkModel
from .nccl_tests import (
    Measurement,
    NcclTestsError,
    NcclTestsResult,
    RankInfo,
    Row,
    busbw_factor,
    parse_text,
)

# nccl-tests binary per probe op, and the ops measured per link class
BINARIES = {"sendrecv": "sendrecv_perf", "all_reduce": "all_reduce_perf", "alltoall": "alltoall_perf"}
INTER_RACK_OPS = ("sendrecv",)
INTRA_RACK_OPS = ("all_reduce", "alltoall")
DEFAULT_GLOO_SIZES = "4K,16K,64K,256K,1M,4M"
DEFAULT_NCCL_SIZES = "8,1G"  # nccl-tests sweeps -b 8 -e 1G -f 2
# the link model's bandwidth: median busbw of the largest rows, this many at most
LARGE_ROWS = 3
# the largest message size (bytes) accepted by --sizes: nccl-tests' buffers are per GPU; the gloo
# probe's two float32 tensors per process live in host memory (see gloo_max_bytes)
MAX_NCCL_SIZE = 16 << 30
MAX_GLOO_SIZE = 1 << 30
GLOO_MEMORY_FRACTION = 8  # gloo sizes up to available host memory / this (2 processes x 2 buffers, and slack)

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMG]?)(?:i?B)?\s*$", re.IGNORECASE)


class CalibrationError(ValueError):
    """Calibration cannot proceed or produced unusable figures (message says what and why)."""


def _fmt_size(n: int) -> str:
    """``17179869184`` -> ``"16G"`` (the largest K/M/G unit that divides it), else bytes."""
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def parse_sizes(spec: str, *, max_bytes: int = MAX_NCCL_SIZE, limit: str = "") -> list[int]:
    """``"4K,64K,1M"`` -> bytes ``[4096, 65536, 1048576]`` (K/M/G are powers of 1024, as nccl-tests' -b/-e).

    Args:
        spec: comma-separated sizes.
        max_bytes: the largest size allowed, bytes (default ``MAX_NCCL_SIZE``, 16 GiB).
        limit: why ``max_bytes`` is the limit, for the error message.

    Raises:
        ValueError: empty list, unreadable item, a size < 1 or > ``max_bytes`` (the message
            names the size and the allowed range).
    """
    if not spec.strip():
        raise ValueError(f"--sizes: empty; give at least one size, e.g. 4K,64K,1M (bytes, K/M/G = 1024^n, "
                         f"1 .. {_fmt_size(max_bytes)}), or leave the option out for the defaults")
    out = []
    for item in spec.split(","):
        m = _SIZE_RE.match(item)
        if not m:
            raise ValueError(f"--sizes: cannot read {item.strip()!r}; use e.g. 4K,64K,1M (bytes, K/M/G = 1024^n)")
        n = int(m.group(1)) * 1024 ** " KMG".index((m.group(2) or " ").upper())
        if n < 1:
            raise ValueError(f"--sizes: sizes must be >= 1 byte, got {item.strip()!r}")
        if n > max_bytes:
            raise ValueError(f"--sizes: {item.strip()} ({n} B) is too large; allowed: 1 .. {_fmt_size(max_bytes)} "
                             f"({max_bytes} B){' ' + limit if limit else ''}")
        out.append(n)
    return sorted(set(out))


def available_memory() -> int | None:
    """Bytes of memory this host can still give (/proc/meminfo ``MemAvailable``, else free pages); None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def gloo_max_bytes(available: int | None = None) -> int:
    """The largest ``--sizes`` entry for the gloo probe, bytes: ``MAX_GLOO_SIZE`` (1 GiB), and at
    most ``available / GLOO_MEMORY_FRACTION`` of this host's available memory (``available``:
    bytes, default :func:`available_memory`; unknown -> the 1 GiB cap alone), at least 4 KiB.
    """
    available = available_memory() if available is None else available
    if available is None:
        return MAX_GLOO_SIZE
    return max(4096, min(MAX_GLOO_SIZE, available // GLOO_MEMORY_FRACTION))


# --------------------------------------------------------------- gloo probe
def _round_size(nbytes: int, op: str, world: int) -> int:
    """float32 elements, a multiple of ``world`` for alltoall (nccl-tests rounds sizes the same way)."""
    unit = 4 * (world if op == "alltoall" else 1)
    return max(unit, nbytes // unit * unit)


def gloo_probe(op: str, sizes: list[int], *, iters: int = 20, warmup: int = 2, group=None,
               host: str = "") -> NcclTestsResult:
    """Time one collective over ``sizes`` in the current (gloo) process group; call on every rank.

    Each rank runs the op ``warmup`` times, then ``iters`` times between barriers; the
    row's ``time_us`` is the slowest rank's mean time per iteration (microseconds).
    ``algbw = size / time`` and ``busbw = algbw * busbw_factor(op, world)`` in GB/s.
    Before timing, one checked run per size counts wrong elements (the ``#wrong`` cell).

    - ``sendrecv``: every rank sends ``size`` bytes to rank+1 and receives from rank-1
      at the same time (nccl-tests' sendrecv pattern; with 2 ranks both directions).
    - ``all_reduce``: sum of a ``size``-byte float32 tensor.
    - ``alltoall``: ``all_to_all_single`` of a ``size``-byte tensor (size/world per peer).

    Args:
        op: ``sendrecv``, ``all_reduce`` or ``alltoall``.
        sizes: message sizes in bytes (rounded down to float32 elements; multiples of
            world elements for alltoall).
        iters, warmup: timed and untimed iterations per size.
        group: process group (default: the default group).
        host: this rank's host name for the rank list.

    Returns:
        The table as :class:`NcclTestsResult` (``source="gloo probe"``, ``binary`` the
        matching nccl-tests binary name); identical on every rank.

    Raises:
        ValueError: unknown op, ``iters < 1``, no sizes.
        NcclTestsError: a size produced wrong elements.
    """
    import torch
    import torch.distributed as dist

    if op not in BINARIES:
        raise ValueError(f"unknown probe op {op!r}; allowed: {sorted(BINARIES)}")
    if iters < 1 or warmup < 0 or not sizes:
        raise ValueError(f"need iters >= 1, warmup >= 0 and sizes; got {iters}, {warmup}, {sizes}")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    if group is not None:
        nxt, prv = dist.get_global_rank(group, nxt), dist.get_global_rank(group, prv)
    factor = busbw_factor(op, world)
    rows: list[Row] = []
    for size in sizes:
        nbytes = _round_size(size, op, world)
        n = nbytes // 4
        x = torch.full((n,), float(rank + 1))
        y = torch.empty(n)

        if op == "sendrecv":
            def step(x=x, y=y):
                for req in dist.batch_isend_irecv([dist.P2POp(dist.isend, x, nxt, group),
                                                   dist.P2POp(dist.irecv, y, prv, group)]):
                    req.wait()
            step()
            wrong = int((y != float((rank - 1) % world + 1)).sum())
        elif op == "all_reduce":
            def step(x=x):
                dist.all_reduce(x, group=group)
            step()
            wrong = int((x != float(world * (world + 1) // 2)).sum())
            x.zero_()  # timed iterations sum zeros: no overflow however many iterations
        else:
            def step(x=x, y=y):
                dist.all_to_all_single(y, x, group=group)
            step()
            expect = torch.arange(1, world + 1, dtype=torch.float32).repeat_interleave(n // world)
            wrong = int((y != expect).sum())
        for _ in range(warmup):
            step()
        dist.barrier(group=group)
        t0 = time.perf_counter()
        for _ in range(iters):
            step()
        elapsed = time.perf_counter() - t0
        stats = torch.tensor([elapsed / iters, float(wrong)], dtype=torch.float64)
        dist.all_reduce(stats, op=dist.ReduceOp.MAX, group=group)
        time_us, wrong_max = float(stats[0]) * 1e6, float(stats[1])
        algbw = nbytes / (time_us * 1e3)  # bytes/us -> GB/s: / 1e3
        rows.append(Row(size_bytes=nbytes, count=n, type="float", redop="sum" if op == "all_reduce" else "none",
                        root=-1, out_of_place=Measurement(time_us, algbw, algbw * factor, wrong_max)))
        if wrong_max:
            raise NcclTestsError(f"gloo probe {op} failed: {wrong_max:g} wrong elements at size {nbytes} B")
    hosts: list[Any] = [None] * world
    dist.all_gather_object(hosts, (host, os.getpid()), group=group)
    ranks = [RankInfo(rank=r, group=0, pid=pid, host=h, device=-1, bus_id="", device_name="cpu (gloo)")
             for r, (h, pid) in enumerate(hosts)]
    return NcclTestsResult(rows=rows, avg_busbw_GBps=statistics.fmean(r.out_of_place.busbw_GBps for r in rows),
                           binary=BINARIES[op], ranks=ranks, format="probe", source="gloo probe",
                           params={"nThread": 1, "nGpus": 1, "minBytes": rows[0].size_bytes,
                                   "maxBytes": rows[-1].size_bytes, "warmup_iters": warmup, "iters": iters,
                                   "validation": 1})


# ---------------------------------------------------------------- nccl-tests
def find_nccl_tests(directory: str | Path | None = None, ops=tuple(BINARIES)) -> Path | None:
    """The directory holding the nccl-tests binaries for ``ops``, or None when they are not installed.

    Looks in ``directory`` if given, else ``$NCCL_TESTS_DIR``, else the directory of
    ``sendrecv_perf`` on ``PATH``.

    Raises:
        CalibrationError: ``directory`` (or ``$NCCL_TESTS_DIR``) was given but lacks an
            executable binary (it names which).
    """
    given = directory or os.environ.get("NCCL_TESTS_DIR")
    if given:
        d = Path(given).expanduser().resolve()
        missing = [BINARIES[o] for o in ops if not os.access(d / BINARIES[o], os.X_OK)]
        if missing:
            src = "--nccl-tests-dir" if directory else "NCCL_TESTS_DIR"
            raise CalibrationError(f"{src} {d} lacks executable nccl-tests binaries {missing} (build them with "
                                   f"`make MPI=1` in nccl-tests; they land in build/)")
        return d
    found = shutil.which(BINARIES[ops[0]])
    if found is None:
        return None
    d = Path(found).resolve().parent
    return d if all(os.access(d / BINARIES[o], os.X_OK) for o in ops) else None


def nccl_tests_command(directory: str | Path, op: str, sizes: list[int], *, iters: int, warmup: int = 5,
                       gpus_per_process: int = 1, launcher: list[str] | None = None) -> list[str]:
    """argv for one nccl-tests run: ``[*launcher, DIR/<op>_perf, -b MIN -e MAX -f 2 -n ITERS -w WARMUP -g G]``.

    nccl-tests sweeps powers of two from ``min(sizes)`` to ``max(sizes)`` (``-f 2``).
    ``launcher`` (e.g. ``mpirun -np 2 -H a:1,b:1``) spans nodes; None runs one process.
    """
    return [*(launcher or []), str(Path(directory) / BINARIES[op]), "-b", str(min(sizes)), "-e", str(max(sizes)),
            "-f", "2", "-n", str(iters), "-w", str(warmup), "-g", str(gpus_per_process)]


def run_nccl_tests(argv: list[str], *, timeout_s: float = 1800.0) -> tuple[NcclTestsResult, str]:
    """Run one nccl-tests command and parse what it prints (stdout, then stderr).

    Returns:
        ``(result, output)``: the parsed table and the raw text.

    Raises:
        NcclTestsError: the run failed (named by its error line), printed no finished
            table, exited non-zero, timed out, or the binary could not start.
    """
    binary = Path(next(a for a in argv if a.endswith("_perf"))).name if any(a.endswith("_perf") for a in argv) \
        else Path(argv[0]).name
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    except FileNotFoundError as e:
        raise NcclTestsError(f"{binary}: cannot start {argv[0]!r}: {e.strerror}") from None
    except subprocess.TimeoutExpired:
        raise NcclTestsError(f"{binary}: no result within {timeout_s:g} s (hung?): {' '.join(argv)}") from None
    output = proc.stdout + (("\n" + proc.stderr) if proc.stderr.strip() else "")
    try:
        result = parse_text(output, binary=binary)
    except NcclTestsError as e:
        status = f" (exit status {proc.returncode})" if proc.returncode else ""
        raise NcclTestsError(f"{e}{status}") from None
    if proc.returncode:
        raise NcclTestsError(f"{binary} exited with status {proc.returncode} after printing its table: "
                             f"{proc.stderr.strip()[-500:] or 'no stderr'}")
    return result, output


def check_sweep(result: NcclTestsResult, sizes: list[int]) -> None:
    """Refuse a table that stops before the end of the requested sweep.

    nccl-tests run with ``-b min(sizes) -e max(sizes) -f 2`` print sizes ``min * 2^k``
    up to the requested maximum, or up to ``N`` when they print ``Reducing maxBytes to N``
    (not enough device memory). The last row must be that sweep's last step (more than
    half of it: nccl-tests rounds sizes down to whole elements per rank).

    Raises:
        NcclTestsError: the largest size printed is below the sweep's last step (both
            sizes named), e.g. a table ending at 16 B when 1 GiB was asked for.
    """
    lo, hi = min(sizes), max(sizes)
    cap = hi if result.reduced_max_bytes is None else min(hi, result.reduced_max_bytes)
    end = lo
    while end * 2 <= cap:
        end *= 2
    end = min(end, cap)
    last = max(r.size_bytes for r in result.rows)
    if last * 2 <= end:
        why = (f"nccl-tests reduced maxBytes to {result.reduced_max_bytes}" if result.reduced_max_bytes is not None
               else "nccl-tests printed no 'Reducing maxBytes' line")
        raise NcclTestsError(f"{result.binary or 'nccl-tests'}: the table ends at {last} B but the sweep asked for "
                             f"sizes up to {hi} B (last step {end} B; {why}): the run stopped early or is not the "
                             f"command that was asked for")


# -------------------------------------------------------------------- fitting
@dataclass
class CalibrationTable:
    """One measured table: which link class and racks it calibrates, and how it was measured.

    Attributes:
        link_class: ``intra-rack`` or ``inter-rack``.
        racks: the rack(s) measured (one for intra-rack, a pair for inter-rack).
        op: ``sendrecv``, ``all_reduce`` or ``alltoall``.
        method: ``nccl-tests`` or ``gloo``.
        result: the parsed table.
        raw_output: what nccl-tests printed (None for the gloo probe).
    """

    link_class: str
    racks: tuple[str, ...]
    op: str
    method: str
    result: NcclTestsResult
    raw_output: str | None = None

    @property
    def name(self) -> str:
        return f"{self.link_class} {'<->'.join(self.racks)} {self.op}"


@dataclass
class LinkFit:
    """The fitted figures of one link class.

    Attributes:
        latency_us: one-way latency, microseconds.
        busbw_GBps: sustained bus bandwidth, GB/s (1e9 bytes/s).
        tables: names of the tables it was fitted from.
        latency_from / bandwidth_from: the table that gave each figure.
    """

    latency_us: float
    busbw_GBps: float
    tables: list[str] = field(default_factory=list)
    latency_from: str = ""
    bandwidth_from: str = ""

    @property
    def bandwidth_gbps(self) -> float:
        """The link model's unit: Gbit/s = busbw (GB/s) x 8."""
        return self.busbw_GBps * 8


def _measurement(row: Row) -> Measurement:
    m = row.out_of_place or row.in_place
    assert m is not None, "a row has at least one measurement"
    return m


def fit_table(result: NcclTestsResult) -> tuple[float, float]:
    """``(latency_us, busbw_GBps)`` of one table.

    latency = the time of the smallest size (out-of-place, else in-place), in us: at
    small sizes the time is latency-bound. bandwidth = the median busbw of the largest
    rows (the top quarter, at least 1 and at most ``LARGE_ROWS``), in GB/s: at large
    sizes busbw approaches the link's sustained bandwidth. busbw (not algbw) because it
    is comparable across collectives and rank counts.

    Raises:
        CalibrationError: no rows, or the large-size busbw is 0 (prints as 0.00: the
            sizes are too small for the link; pass larger ``--sizes``).
    """
    rows = sorted(result.rows, key=lambda r: r.size_bytes)
    if not rows:
        raise CalibrationError(f"{result.binary}: no rows to fit")
    k = min(LARGE_ROWS, max(1, len(rows) // 4))
    busbw = statistics.median(_measurement(r).busbw_GBps for r in rows[-k:])
    if busbw <= 0:
        raise CalibrationError(f"{result.binary}: busbw at the largest size ({rows[-1].size_bytes} B) is {busbw} "
                               f"GB/s; use larger --sizes")
    return _measurement(rows[0]).time_us, busbw


def fit_link_model(tables: list[CalibrationTable]) -> dict[str, LinkFit]:
    """Fit each link class from its tables, conservatively: the largest latency and the
    smallest bandwidth over the class's tables (every rack / rack pair and op), so the
    modelled link is never faster than the slowest one measured.

    Classes without tables are left out (the link model keeps its default for them).

    Raises:
        CalibrationError: see :func:`fit_table`.
    """
    fits: dict[str, LinkFit] = {}
    for cls in LINK_CLASSES:
        mine = [t for t in tables if t.link_class == cls]
        if not mine:
            continue
        figures = [fit_table(t.result) for t in mine]
        lat = max(range(len(mine)), key=lambda i: figures[i][0])
        bw = min(range(len(mine)), key=lambda i: figures[i][1])
        fits[cls] = LinkFit(latency_us=figures[lat][0], busbw_GBps=figures[bw][1], tables=[t.name for t in mine],
                            latency_from=mine[lat].name, bandwidth_from=mine[bw].name)
    return fits


def tables_path_of(out: str | Path) -> Path:
    """Where :func:`write_calibration` puts the tables of link-model file ``out``: ``<stem>.tables.json`` beside it."""
    out = Path(out)
    return out.with_name(out.stem + ".tables.json")


def check_out_path(out: str | Path) -> Path:
    """Check, before measuring, that :func:`write_calibration` can write ``out`` and its tables file.

    The nearest existing directory above ``out`` must be a directory this process can
    create files in (tried with a probe file, removed again): a read-only directory, a
    path under a file or /proc fail now, not after the measurement. Creates nothing.

    Returns:
        ``out`` as a Path.

    Raises:
        CalibrationError: empty path, ``out`` or its tables file is a directory, a parent
            is a file, or the parent is not writable (the message names the path and why).
    """
    import tempfile

    if not str(out).strip():
        raise CalibrationError("--out: empty path; give the link-model file to write, e.g. "
                               "calibration/link_model.yaml")
    out = Path(out)
    for target in (out, tables_path_of(out)):
        if target.is_dir():
            raise CalibrationError(f"--out {out}: {target} is a directory; give a file path (.yaml, or .json)")
    base = out.absolute().parent
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise CalibrationError(f"--out {out}: {base} is not a directory, so nothing can be created under it")
    try:
        with tempfile.NamedTemporaryFile(dir=base, prefix=".tide-calibrate.", suffix=".probe"):
            pass
    except OSError as e:
        raise CalibrationError(f"--out {out}: cannot create files in {base}: {e.strerror or e} (the directory of "
                               f"--out must be writable, or creatable in a writable one)") from None
    return out


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through ``<path>.tmp`` + rename; the temp file never stays behind.

    Raises:
        CalibrationError: the write or the rename failed (the message names the path).
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        raise CalibrationError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if tmp.is_file():  # gone after a successful rename; after a failure it must not stay
            tmp.unlink()


def write_calibration(out: str | Path, fits: dict[str, LinkFit], tables: list[CalibrationTable],
                      meta: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """Write the link-model file and the raw tables beside it.

    ``out`` (YAML, or JSON if it ends in ``.json``) holds only what ``LinkModel.from_dict``
    takes: ``{class: {latency_us, bandwidth_gbps}}``. ``<out stem>.tables.json`` holds
    ``meta``, the fit per class and every table (rows, parsed metadata, raw nccl-tests output).
    The written mapping is checked with ``LinkModel.from_dict`` before returning (the caller
    reads the file back with the project's YAML reader).

    Returns:
        ``(link_model_path, tables_path)``.

    Raises:
        CalibrationError: no class could be fitted, or a file cannot be written (see
            :func:`check_out_path` to find out before measuring).
    """
    import yaml

    if not fits:
        raise CalibrationError("nothing measured: no link class to write")
    out = check_out_path(out)
    model = {cls: {"latency_us": round(f.latency_us, 3), "bandwidth_gbps": round(f.bandwidth_gbps, 6)}
             for cls, f in fits.items()}
    _write_atomic(out, json.dumps(model, indent=2) + "\n" if out.suffix == ".json"
                  else yaml.safe_dump(model, sort_keys=False))
    LinkModel.from_dict(model, source=str(out))  # what the trainer will do: fail here, not there
    tables_path = tables_path_of(out)
    doc = {
        "meta": meta or {},
        "link_model": model,
        "fit": {cls: {"latency_us": f.latency_us, "busbw_GBps": f.busbw_GBps, "bandwidth_gbps": f.bandwidth_gbps,
                      "tables": f.tables, "latency_from": f.latency_from, "bandwidth_from": f.bandwidth_from,
                      "rule": "latency = max over tables of the smallest size's time; bandwidth = min over tables "
                              "of the median busbw of the largest rows, x 8 for Gbit/s"}
                for cls, f in fits.items()},
        "tables": [{"name": t.name, "link_class": t.link_class, "racks": list(t.racks), "op": t.op,
                    "method": t.method,
                    "fit": dict(zip(("latency_us", "busbw_GBps"), fit_table(t.result), strict=True)),
                    "result": t.result.to_dict(), "raw_output": t.raw_output} for t in tables],
    }
    _write_atomic(tables_path, json.dumps(doc, indent=2) + "\n")
    return out, tables_path


def render_table(table: CalibrationTable):
    """A rich ``Table`` of one measured table in nccl-tests' columns (out-of-place half)."""
    from rich.table import Table

    r = table.result
    t = Table(title=f"{table.name} ({table.method}, {r.n_ranks or '?'} ranks; avg busbw "
                    f"{r.avg_busbw_GBps:.3f} GB/s)", title_justify="left")
    for col in ("size (B)", "count", "type", "redop", "root", "time (us)", "algbw (GB/s)", "busbw (GB/s)",
                "#wrong" if r.wrong_kind == "count" else "error"):
        t.add_column(col, justify="left" if col in ("type", "redop") else "right", no_wrap=True)
    for row in r.rows:
        m = _measurement(row)
        t.add_row(str(row.size_bytes), str(row.count), row.type, row.redop,
                  "" if row.root is None else str(row.root), f"{m.time_us:.2f}", f"{m.algbw_GBps:.4f}",
                  f"{m.busbw_GBps:.4f}", "N/A" if m.wrong is None else f"{m.wrong:g}")
    return t


def render_fits(fits: dict[str, LinkFit]):
    """A rich ``Table`` of the fitted link model."""
    from rich.table import Table

    t = Table(title="link model", title_justify="left")
    for col in ("class", "latency_us", "busbw (GB/s)", "bandwidth_gbps (Gbit/s)", "latency from", "busbw from"):
        t.add_column(col, justify="left" if col in ("class", "latency from", "busbw from") else "right")
    for cls, f in fits.items():
        t.add_row(cls, f"{f.latency_us:.2f}", f"{f.busbw_GBps:.4f}", f"{f.bandwidth_gbps:.4f}",
                  f.latency_from.removeprefix(cls + " "), f.bandwidth_from.removeprefix(cls + " "))
    return t
