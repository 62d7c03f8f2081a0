"""Parse NVIDIA nccl-tests output: the printed table (every version) and the ``-J`` JSON file.

One run of a benchmark binary (``all_reduce_perf``, ``sendrecv_perf``, ``alltoall_perf``,
``all_gather_perf`` ...) becomes one :class:`NcclTestsResult`: header metadata, one
:class:`Row` per message size (out-of-place and in-place :class:`Measurement`), the
out-of-bounds count and the average bus bandwidth.

Units are the ones nccl-tests prints: sizes in bytes, times in microseconds, algbw and
busbw in GB/s with G = 1e9 (``algbw = size / time``; ``busbw = algbw * factor`` with the
collective's factor, see :func:`busbw_factor`).

Failed runs are never turned into numbers: :func:`parse_text` and :func:`parse_json`
raise :class:`NcclTestsError` naming the error (``Test CUDA failure ...`` / ``Test NCCL
failure ...`` lines, a table that does not end with the ``Out of bounds`` / ``Avg bus
bandwidth`` footer, rows with ``#wrong`` > 0, a non-zero out-of-bounds count).

Text formats handled (see the test data's README for how each was dated):

- before 2.13: ``#   Rank  0 Pid ...`` (no Group), no ``root`` column, an ``error``
  column holding the maximum absolute error (a float such as ``2e-07``, not a count);
- 2.13.4 - 2.16.2: ``Group`` in the rank lines, ``root`` and ``#wrong`` columns;
- 2.16.3 and later: ``# Collective test starting: <binary>`` / ``concluded`` lines;
  2.17.4 and later: ``# nccl-tests version X nccl-headers=N nccl-library=N``;
  2.18 and later: ``unalign:`` in the ``# nThread`` line, optional extra columns
  (``#bitdiff``, per-iteration ``i_min`` ...) and a timestamp column.

Cells printed as ``N/A`` (no validation, or in-place ``#wrong`` of alltoall/sendrecv)
become None. Lines that are neither table nor ``#`` comments (``NCCL INFO`` log lines,
``NCCL version ...``) are kept in :attr:`NcclTestsResult.log_lines` and otherwise ignored.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["NcclTestsError", "Measurement", "Row", "RankInfo", "NcclTestsResult", "parse_text", "parse_json",
           "parse_file", "busbw_factor", "collective_of", "nccl_version_string"]


class NcclTestsError(ValueError):
    """A failed nccl-tests run (CUDA/NCCL failure, wrong results, unfinished table) or unreadable output.

    ``str(e)`` names the error, e.g. ``alltoall_perf failed: host1: Test CUDA failure
    common.cu:389 'an illegal memory access was encountered'``.
    """


@dataclass(frozen=True)
class Measurement:
    """One half of a row (out-of-place or in-place).

    Attributes:
        time_us: mean time per iteration, microseconds.
        algbw_GBps: algorithm bandwidth, size / time, GB/s (1e9 bytes/s).
        busbw_GBps: bus bandwidth, algbw times the collective's factor, GB/s.
        wrong: the ``#wrong`` count of wrong elements (2.13 and later) or, for older
            outputs, the ``error`` column's maximum absolute error; None when printed ``N/A``.
    """

    time_us: float
    algbw_GBps: float
    busbw_GBps: float
    wrong: float | None = None


@dataclass(frozen=True)
class Row:
    """One message size of the table.

    Attributes:
        size_bytes: message size in bytes (the ``size`` column).
        count: elements (the ``count`` column).
        type: data type name (``float``, ``double`` ...).
        redop: reduction (``sum``; ``none`` for data movement collectives).
        root: root rank (-1 when the collective has none); None when the output has no
            ``root`` column (before 2.13).
        out_of_place / in_place: the two measurements; None when not run or not printed.
    """

    size_bytes: int
    count: int
    type: str
    redop: str
    root: int | None
    out_of_place: Measurement | None
    in_place: Measurement | None = None


@dataclass(frozen=True)
class RankInfo:
    """One ``#  Rank N Group G Pid P on HOST device D [BUS] NAME`` line (``group`` None before 2.13)."""

    rank: int
    group: int | None
    pid: int
    host: str
    device: int
    bus_id: str
    device_name: str


@dataclass
class NcclTestsResult:
    """One finished, successful nccl-tests run (or a probe that measured the same table).

    Attributes:
        binary: the benchmark binary (``all_reduce_perf``) when the output names it
            (2.16.3 and later, the JSON ``args``, or given by the caller), else None.
        version: nccl-tests version when printed (2.17.4 and later), e.g. ``"2.17.8"``.
        nccl_headers / nccl_library: NCCL version codes (``22902`` = 2.29.2) when printed;
            the JSON form gives the library's code only.
        params: the ``# nThread`` line as numbers (``nThread``, ``nGpus``, ``minBytes``,
            ``maxBytes``, ``step``, ``step_kind`` (``factor``/``bytes``), ``warmup_iters``,
            ``iters``, ``agg_iters``, ``validation``, ``graph``, ``unalign`` when printed).
        ranks: the rank/device lines in order.
        reduced_max_bytes: the ``Reducing maxBytes to N`` value (bytes) when printed.
        wrong_kind: ``"count"`` (``#wrong`` column) or ``"max_error"`` (``error`` column, before 2.13).
        rows: the table, in printed order.
        out_of_bounds: the ``Out of bounds values`` count (0 for a successful run).
        avg_busbw_GBps: the ``Avg bus bandwidth`` line, GB/s (nccl-tests' mean busbw over rows).
        format: which output format this was (``"pre-2.13"``, ``"2.13-2.16.2"``,
            ``"2.16.3-2.17.3"``, ``"2.17.4+"``, ``"2.18+"``, ``"json"`` or ``"probe"``).
        source: what produced the table (``"nccl-tests"`` or e.g. ``"gloo probe"``).
        log_lines: interleaved non-table lines (NCCL log lines), verbatim.
        nccl_last_error: the ``# error: ...`` line / JSON ``errors`` (NCCL's last error
            string; informational, printed by successful runs too), else None.
    """

    rows: list[Row]
    avg_busbw_GBps: float
    out_of_bounds: int = 0
    binary: str | None = None
    version: str | None = None
    nccl_headers: int | None = None
    nccl_library: int | None = None
    params: dict[str, Any] = field(default_factory=dict)
    ranks: list[RankInfo] = field(default_factory=list)
    reduced_max_bytes: int | None = None
    wrong_kind: str = "count"
    format: str = "probe"
    source: str = "nccl-tests"
    log_lines: list[str] = field(default_factory=list)
    nccl_last_error: str | None = None

    @property
    def collective(self) -> str | None:
        """``binary`` without ``_perf`` (``all_reduce``, ``sendrecv`` ...), None when unknown."""
        return collective_of(self.binary) if self.binary else None

    @property
    def n_ranks(self) -> int:
        """Number of ranks listed (0 when the output lists none)."""
        return len(self.ranks)

    @property
    def hosts(self) -> list[str]:
        """Distinct host names of the ranks, in order of first appearance."""
        return list(dict.fromkeys(r.host for r in self.ranks))

    @property
    def datatype(self) -> str | None:
        """The rows' data type (``float`` ...), None without rows."""
        return self.rows[0].type if self.rows else None

    @property
    def redop(self) -> str | None:
        """The rows' reduction (``sum``, ``none`` ...), None without rows."""
        return self.rows[0].redop if self.rows else None

    @property
    def nccl_version(self) -> str | None:
        """NCCL library version as ``major.minor.patch`` (from ``nccl_library``, else the headers)."""
        code = self.nccl_library or self.nccl_headers
        return nccl_version_string(code) if code else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (dataclass fields plus ``collective`` and ``nccl_version``)."""
        from dataclasses import asdict

        d = asdict(self)
        d["collective"], d["nccl_version"] = self.collective, self.nccl_version
        return d


# ------------------------------------------------------------------- helpers
def nccl_version_string(code: int) -> str:
    """NCCL's version code as text: ``22902`` -> ``"2.29.2"`` (codes >= 2.9 use X*10000+Y*100+Z)."""
    if code >= 10000:
        return f"{code // 10000}.{code // 100 % 100}.{code % 100}"
    return f"{code // 1000}.{code // 100 % 10}.{code % 100}"


def collective_of(binary: str) -> str:
    """``"/opt/nccl-tests/build/all_reduce_perf"`` -> ``"all_reduce"``."""
    name = Path(binary).name
    return name[: -len("_perf")] if name.endswith("_perf") else name


# nccl-tests' busbw factors (src/<collective>.cu, GetBw): busbw = algbw * factor(nranks).
_FACTORS = {
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "alltoall": lambda n: (n - 1) / n,
    "gather": lambda n: (n - 1) / n,
    "scatter": lambda n: (n - 1) / n,
    "broadcast": lambda n: 1.0,
    "reduce": lambda n: 1.0,
    "sendrecv": lambda n: 1.0,
}


def busbw_factor(collective: str, n_ranks: int) -> float:
    """nccl-tests' bus-bandwidth factor: all_reduce 2(n-1)/n; all_gather, reduce_scatter,
    alltoall, gather, scatter (n-1)/n; broadcast, reduce, sendrecv 1.

    Raises:
        ValueError: unknown collective or ``n_ranks < 1``.
    """
    if n_ranks < 1:
        raise ValueError(f"n_ranks must be >= 1, got {n_ranks}")
    key = collective_of(collective)
    if key not in _FACTORS:
        raise ValueError(f"no busbw factor for collective {collective!r}; known: {sorted(_FACTORS)}")
    return float(_FACTORS[key](n_ranks))


# --------------------------------------------------------------------- text
_FAILURE_RE = re.compile(r"Test (?:\w+ )?failure\b")  # "Test CUDA failure", "Test NCCL failure", "Test failure"
_CAUSE_RE = re.compile(r"(?:(?P<host>\S+): )?Test (?P<what>\w+) failure (?P<where>\S+)(?: '(?P<msg>.*)')?")
_VERSION_RE = re.compile(r"^# nccl-tests version (\S+)(?: nccl-headers=(\d+))?(?: nccl-library=(\d+))?")
_RANK_RE = re.compile(r"^#\s+Rank\s+(\d+)\s+(?:Group\s+(\d+)\s+)?Pid\s+(\d+)\s+on\s+(\S+)\s+device\s+(\d+)\s+"
                      r"\[([^\]]*)\]\s*(.*?)\s*$")
_PARAM_RES = {
    "nThread": r"nThread (\d+)", "nGpus": r"nGpus (\d+)", "minBytes": r"minBytes (\d+)", "maxBytes": r"maxBytes (\d+)",
    "warmup_iters": r"warmup iters: (\d+)", "agg_iters": r"agg iters: (\d+)",
    "iters": r"(?<!warmup )(?<!agg )iters: (\d+)",
    "validation": r"validation: (\d+)", "graph": r"graph: (\d+)", "unalign": r"unalign: (\d+)",
}
_NA = "N/A"


def _num(cell: str) -> float | None:
    return None if cell == _NA else float(cell)


def _failure_message(lines: list[str], binary: str | None) -> str:
    """The first ``Test X failure`` line (the cause), plus how many more failure lines follow."""
    hits = [ln.strip() for ln in lines if _FAILURE_RE.search(ln)]
    first = hits[0]
    # the cause may sit at the end of a half-printed row ("  2097152 ... -1 host1: Test CUDA failure ...")
    m = _CAUSE_RE.search(first)
    cause = first[m.start():] if m else first
    more = f" (+{len(hits) - 1} more failure line(s): {hits[-1]})" if len(hits) > 1 else ""
    return f"{binary or 'nccl-tests'} failed: {cause}{more}"


def _columns(header: str) -> tuple[list[str], list[str], list[str], bool]:
    """Split the ``#  size count type ...`` header into the leading columns and the two measurement groups."""
    names = header.lstrip("#").split()
    times = [i for i, n in enumerate(names) if n in ("time", "cputime")]
    if len(times) != 2:
        raise NcclTestsError(f"unexpected table header (want two time columns): {header.strip()!r}")
    timestamp = names[-1] == "timestamp"
    if timestamp:
        names = names[:-1]
    return names[: times[0]], names[times[0]: times[1]], names[times[1]:], timestamp


def _measurement(names: list[str], cells: list[str]) -> Measurement:
    d = dict(zip(names, cells, strict=True))
    wrong = d.get("#wrong", d.get("error", _NA))
    t = d.get("time", d.get("cputime"))
    return Measurement(time_us=float(t), algbw_GBps=float(d["algbw"]), busbw_GBps=float(d["busbw"]),
                       wrong=_num(wrong))


def _split_runs(lines: list[str]) -> int:
    """How many result tables the output holds (one per run)."""
    return sum(1 for ln in lines if ln.startswith("#") and "size" in ln.split() and "count" in ln.split())


def parse_text(text: str, *, binary: str | None = None) -> NcclTestsResult:
    """Parse the printed output of one nccl-tests run.

    Args:
        text: stdout (and optionally stderr) of one run, any version's format.
        binary: the benchmark's name when the output does not print it (before 2.16.3).

    Returns:
        The run's :class:`NcclTestsResult`.

    Raises:
        NcclTestsError: the run failed (``Test ... failure`` lines, ``#wrong`` > 0,
            out-of-bounds values), did not finish (no ``Avg bus bandwidth`` footer, or a
            ``Collective test starting`` without ``concluded``), holds no result table,
            holds several runs, or has a malformed row.
    """
    lines = text.splitlines()
    starting = concluded = None
    for ln in lines:
        if ln.startswith("# Collective test starting:"):
            starting = ln.split(":", 1)[1].strip()
        elif ln.startswith("# Collective test concluded:"):
            concluded = ln.split(":", 1)[1].strip()
    binary = starting or concluded or binary
    if any(_FAILURE_RE.search(ln) for ln in lines):
        raise NcclTestsError(_failure_message(lines, binary))
    n_tables = _split_runs(lines)
    if n_tables == 0:
        raise NcclTestsError(f"{binary or 'nccl-tests'}: no result table in the output (the run failed before "
                             f"its first size, or this is not nccl-tests output)")
    if n_tables > 1:
        raise NcclTestsError(f"{binary or 'nccl-tests'}: the output holds {n_tables} runs; parse one run at a time")

    res = NcclTestsResult(rows=[], avg_busbw_GBps=math.nan, binary=binary)
    lead = grp_a = grp_b = None
    has_timestamp = False
    avg_line = oob_line = None
    for ln in lines:
        s = ln.strip()
        if not s:
            continue
        if s.startswith("#"):
            if m := _VERSION_RE.match(s):
                res.version = m.group(1)
                res.nccl_headers = int(m.group(2)) if m.group(2) else None
                res.nccl_library = int(m.group(3)) if m.group(3) else None
            elif s.startswith("# nThread"):
                for key, rx in _PARAM_RES.items():
                    if m := re.search(rx, s):
                        res.params[key] = int(m.group(1))
                if m := re.search(r"step: (\d+)\((\w+)\)", s):
                    res.params["step"], res.params["step_kind"] = int(m.group(1)), m.group(2)
            elif m := _RANK_RE.match(s):
                res.ranks.append(RankInfo(rank=int(m.group(1)), group=int(m.group(2)) if m.group(2) else None,
                                          pid=int(m.group(3)), host=m.group(4), device=int(m.group(5)),
                                          bus_id=m.group(6), device_name=m.group(7)))
            elif m := re.match(r"# Reducing maxBytes to (\d+)", s):
                res.reduced_max_bytes = int(m.group(1))
            elif "size" in s.split() and "count" in s.split():
                lead, grp_a, grp_b, has_timestamp = _columns(s)
            elif s.startswith("# Out of bounds values"):
                oob_line = s
            elif s.startswith("# Avg bus bandwidth"):
                avg_line = s
            elif s.startswith("# error:"):
                res.nccl_last_error = s.split(":", 1)[1].strip() or None
            continue
        cells = s.split()
        if lead is None or avg_line is not None or not cells[0].isdigit():
            res.log_lines.append(ln)  # NCCL INFO lines, "NCCL version ...", anything outside the table
            continue
        want = len(lead) + len(grp_a) + len(grp_b) + (2 if has_timestamp else 0)
        if len(cells) != want:
            raise NcclTestsError(f"{binary or 'nccl-tests'}: malformed row (want {want} cells, got {len(cells)}): "
                                 f"{s!r}")
        if has_timestamp:
            cells = cells[:-2]
        try:
            head = dict(zip(lead, cells[: len(lead)], strict=True))
            a = cells[len(lead): len(lead) + len(grp_a)]
            b = cells[len(lead) + len(grp_a):]
            row = Row(size_bytes=int(head["size"]), count=int(head["count"]), type=head["type"], redop=head["redop"],
                      root=int(head["root"]) if "root" in head else None,
                      out_of_place=_measurement(grp_a, a), in_place=_measurement(grp_b, b))
        except (KeyError, ValueError) as e:
            raise NcclTestsError(f"{binary or 'nccl-tests'}: malformed row ({e}): {s!r}") from None
        res.rows.append(row)

    name = binary or "nccl-tests"
    res.wrong_kind = "max_error" if grp_a is not None and "error" in grp_a else "count"
    if avg_line is None or oob_line is None:
        last = res.rows[-1].size_bytes if res.rows else None
        raise NcclTestsError(f"{name}: the table does not end (no 'Out of bounds values' / 'Avg bus bandwidth' "
                             f"footer; last size printed: {last}): the run crashed or its output was cut")
    if starting is not None and concluded is None:
        raise NcclTestsError(f"{name}: 'Collective test starting' without 'Collective test concluded': the run "
                             f"did not finish")
    m = re.match(r"# Out of bounds values\s*:\s*(\d+)\s*(\w*)", oob_line)
    if not m:
        raise NcclTestsError(f"{name}: unreadable line {oob_line!r}")
    res.out_of_bounds = int(m.group(1))
    if res.out_of_bounds or m.group(2) == "FAILED":
        raise NcclTestsError(f"{name} failed: {res.out_of_bounds} out-of-bounds (wrong) values")
    m = re.match(r"# Avg bus bandwidth\s*:\s*(\S+)\s*(\w*)", avg_line)
    if not m:
        raise NcclTestsError(f"{name}: unreadable line {avg_line!r}")
    res.avg_busbw_GBps = float(m.group(1))
    if m.group(2) == "FAILED":
        raise NcclTestsError(f"{name} failed: average bus bandwidth {res.avg_busbw_GBps} GB/s is below the "
                             f"NCCL_TESTS_MIN_BW check")
    if not res.rows:
        raise NcclTestsError(f"{name}: the table has no rows")
    if res.wrong_kind == "count":
        for r in res.rows:
            for where, meas in (("out-of-place", r.out_of_place), ("in-place", r.in_place)):
                if meas is not None and meas.wrong:
                    raise NcclTestsError(f"{name} failed: {meas.wrong:g} wrong elements at size {r.size_bytes} B "
                                         f"({where})")
    res.format = _format_of(res, starting is not None)
    return res


def _format_of(res: NcclTestsResult, has_starting: bool) -> str:
    if "unalign" in res.params:
        return "2.18+"
    if res.version is not None:
        return "2.17.4+"
    if has_starting:
        return "2.16.3-2.17.3"
    if res.wrong_kind == "max_error" or (res.ranks and res.ranks[0].group is None):
        return "pre-2.13"
    return "2.13-2.16.2"


# --------------------------------------------------------------------- JSON
def _json_bool(v: Any) -> bool | None:
    """nccl-tests writes booleans as the strings "true"/"false" (jsonBool -> jsonStr)."""
    if isinstance(v, bool):
        return v
    return {"true": True, "false": False}.get(v) if isinstance(v, str) else None


def _json_float(v: Any) -> float:
    return math.nan if v == "nan" else float(v)


def _json_measurement(d: dict | None) -> Measurement | None:
    if d is None:
        return None
    t = d["time"] if "time" in d else d["cpu_time"]
    wrong = d.get("nwrong")
    return Measurement(time_us=_json_float(t), algbw_GBps=_json_float(d["alg_bw"]),
                       busbw_GBps=_json_float(d["bus_bw"]), wrong=None if wrong is None else _json_float(wrong))


def parse_json(data: str | bytes | dict, *, binary: str | None = None) -> NcclTestsResult:
    """Parse the file written by nccl-tests' ``-J/--output_file`` option (2.18 and later).

    Keys (nccl-tests ``src/util.cu``): top level ``version`` (the JSON format's version,
    1 or 3), ``start_time``, ``args`` (argv; ``args[0]`` names the binary), ``env``,
    ``nccl_version`` (library code), ``config`` {``nthreads``, ``ngpus``, ``minimum_bytes``,
    ``maximum_bytes``, ``step_factor`` | ``step_bytes``, ``warmup_iters``, ``iterations``,
    ``aggregated_iterations``, ``validation``, ``graph``, ..., ``devices`` [{``rank``,
    ``group``, ``pid``, ``hostname``, ``device``, ``device_hex``, ``device_info``}]},
    ``results`` [{``size``, ``count``, ``type``, ``redop``, ``root`` (a string, ``"    -1"``),
    ``out_of_place`` / ``in_place`` {``time`` | ``cpu_time``, ``alg_bw``, ``bus_bw``,
    ``nwrong`` (number or null)} or null, ``actual_iterations``, ``experiment_name``}],
    ``out_of_bounds`` {``count``, ``okay``}, ``average_bus_bandwidth`` {``bandwidth``,
    ``okay``}, ``errors`` [NCCL's last error string], ``end_time``. Booleans are written
    as the strings ``"true"``/``"false"``; NaN as the string ``"nan"``.

    Raises:
        NcclTestsError: invalid JSON, missing ``results`` / ``out_of_bounds`` /
            ``average_bus_bandwidth`` (the run did not finish), a result row cut short,
            ``nwrong`` > 0, out-of-bounds values, or ``average_bus_bandwidth.okay`` false.
    """
    if isinstance(data, (str, bytes)):
        try:
            doc = json.loads(data)
        except json.JSONDecodeError as e:
            raise NcclTestsError(f"nccl-tests JSON output is not valid JSON: {e}") from None
    else:
        doc = data
    if not isinstance(doc, dict):
        raise NcclTestsError("nccl-tests JSON output: expected an object at the top level")
    args = doc.get("args") or []
    binary = Path(args[0]).name if args and isinstance(args[0], str) else binary
    name = binary or "nccl-tests"
    errors = [e for e in doc.get("errors") or [] if isinstance(e, str) and e]
    if not isinstance(doc.get("results"), list):
        raise NcclTestsError(f"{name}: JSON output has no 'results' (the run failed before its first size)"
                             + (f": {errors[0]}" if errors else ""))
    cfg = doc.get("config") or {}
    res = NcclTestsResult(rows=[], avg_busbw_GBps=math.nan, binary=binary, nccl_library=doc.get("nccl_version"),
                          format="json", nccl_last_error=errors[0] if errors else None)
    keymap = {"nthreads": "nThread", "ngpus": "nGpus", "minimum_bytes": "minBytes", "maximum_bytes": "maxBytes",
              "warmup_iters": "warmup_iters", "iterations": "iters", "aggregated_iterations": "agg_iters",
              "validation": "validation", "graph": "graph"}
    res.params = {ours: cfg[theirs] for theirs, ours in keymap.items() if theirs in cfg}
    if "step_factor" in cfg:
        res.params["step"], res.params["step_kind"] = cfg["step_factor"], "factor"
    elif "step_bytes" in cfg:
        res.params["step"], res.params["step_kind"] = cfg["step_bytes"], "bytes"
    for d in cfg.get("devices") or []:  # util.cu writes "devices" inside the "config" object
        res.ranks.append(RankInfo(rank=d["rank"], group=d.get("group"), pid=d["pid"], host=d["hostname"],
                                  device=d["device"], bus_id=d.get("device_hex", ""),
                                  device_name=d.get("device_info", "")))
    for i, r in enumerate(doc["results"]):
        if "in_place" not in r and "out_of_place" not in r:  # a crash mid-row; the writer closed the object
            raise NcclTestsError(f"{name} failed: result {i} (size {r.get('size')} B) was cut short: the run "
                                 f"failed there" + (f": {errors[0]}" if errors else ""))
        try:
            root = str(r["root"]).strip()
            row = Row(size_bytes=int(r["size"]), count=int(r["count"]), type=r["type"], redop=r["redop"],
                      root=int(root) if root else None, out_of_place=_json_measurement(r.get("out_of_place")),
                      in_place=_json_measurement(r.get("in_place")))
        except (KeyError, TypeError, ValueError) as e:
            raise NcclTestsError(f"{name}: malformed result {i}: {e!r}") from None
        for where, meas in (("out-of-place", row.out_of_place), ("in-place", row.in_place)):
            if meas is not None and meas.wrong:
                raise NcclTestsError(f"{name} failed: {meas.wrong:g} wrong elements at size {row.size_bytes} B "
                                     f"({where})")
        res.rows.append(row)
    for key in ("out_of_bounds", "average_bus_bandwidth"):
        if not isinstance(doc.get(key), dict):
            last = res.rows[-1].size_bytes if res.rows else None
            raise NcclTestsError(f"{name}: JSON output has no '{key}': the run did not finish (last size: {last})"
                                 + (f": {errors[0]}" if errors else ""))
    res.avg_busbw_GBps = _json_float(doc["average_bus_bandwidth"]["bandwidth"])
    oob = doc["out_of_bounds"]
    res.out_of_bounds = int(oob.get("count", 0))
    if res.out_of_bounds or _json_bool(oob.get("okay")) is False:
        raise NcclTestsError(f"{name} failed: {res.out_of_bounds} out-of-bounds (wrong) values")
    if _json_bool(doc["average_bus_bandwidth"].get("okay")) is False:
        raise NcclTestsError(f"{name} failed: average bus bandwidth {res.avg_busbw_GBps} GB/s is below the "
                             f"NCCL_TESTS_MIN_BW check")
    if not res.rows:
        raise NcclTestsError(f"{name}: the JSON output has no result rows")
    return res


def parse_file(path: str | Path, *, binary: str | None = None) -> NcclTestsResult:
    """Parse a saved output: ``.json`` files with :func:`parse_json`, anything else with :func:`parse_text`.

    Raises:
        NcclTestsError: see the two parsers; also an unreadable file.
    """
    p = Path(path)
    try:
        text = p.read_text(errors="replace")
    except OSError as e:
        raise NcclTestsError(f"cannot read {p}: {e}") from None
    return parse_json(text, binary=binary) if p.suffix == ".json" else parse_text(text, binary=binary)
