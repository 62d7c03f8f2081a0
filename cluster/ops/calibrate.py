"""``tide calibrate``: measure the links between and within racks and write the link-model file.

Joins the Ray cluster (``--address`` / ``RAY_ADDRESS`` / a live local head) or, with none
to join, simulates ``--local-racks`` labelled racks on this machine
(``cluster.launch.local_racks``), then discovers the racks from the nodes' ``rack`` labels and
measures, as Ray tasks/actors pinned with ``label_selector={"rack": ...}``:

- between every pair of racks: ``sendrecv`` (the pipeline's point-to-point traffic);
- within every rack: ``all_reduce`` and ``alltoall`` (gradient sync, expert all-to-all).

With the nccl-tests binaries (``--nccl-tests-dir``, ``$NCCL_TESTS_DIR`` or ``PATH``) the
measurements are ``sendrecv_perf`` (through ``--launcher``, ``mpirun`` by default, one
process on the first node of each rack; an empty launcher is refused, as one process on
one node measures no inter-rack link) and ``all_reduce_perf`` / ``alltoall_perf``
(one process driving every GPU of the rack's first node, ``-g <GPUs>``; racks of several
nodes go through the launcher). A table that stops before the requested largest size
is a failure (unless nccl-tests reduced its maxBytes). Without the binaries, or with
``--method auto`` when a rack reports no GPU, a torch.distributed gloo probe measures the
same three collectives between two processes (``comm.calibrate.gloo_probe``) and prints
the same table. ``--out`` and ``--sizes`` are checked before anything is measured. The
fit and the files written are described in ``comm.calibrate`` (``fit_link_model``,
``write_calibration``).

The nccl-tests binaries must sit at the same path on every node (a shared install).
"""

from __future__ import annotations

import argparse
import itertools
import os
import shlex
import time
from pathlib import Path
from typing import Any

from comm.calibrate import (
    BINARIES,
    DEFAULT_GLOO_SIZES,
    DEFAULT_NCCL_SIZES,
    GLOO_MEMORY_FRACTION,
    INTER_RACK_OPS,
    INTRA_RACK_OPS,
    MAX_GLOO_SIZE,
    MAX_NCCL_SIZE,
    CalibrationError,
    CalibrationTable,
    check_out_path,
    check_sweep,
    find_nccl_tests,
    fit_link_model,
    gloo_max_bytes,
    nccl_tests_command,
    parse_sizes,
    render_fits,
    render_table,
    write_calibration,
)

# in the repository root, not under runs/: `ray job submit --working-dir .` skips runs/ (.gitignore,
# .rayignore), so a training config pointing here still finds the file as a job
DEFAULT_OUT = "calibration/link_model.yaml"
DEFAULT_LAUNCHER = "mpirun -np {nprocs} -H {hosts}"
PROBE_CPUS = 1  # logical CPUs per gloo probe process (a local simulated rack has 2)
LOG_WIDTH = 10_000  # console width when stdout is not a terminal: tables are never cut (rich's default is 80)

DESCRIPTION = (
    "Measure the links between racks (sendrecv) and within racks (all_reduce, alltoall) with NVIDIA nccl-tests "
    "when installed, else with a torch.distributed gloo probe, as Ray tasks pinned to racks by the nodes' `rack` "
    "label; print the tables (size, time, algbw, busbw as nccl-tests prints them) and write the link-model file "
    "that `parallel.link_model` loads (latency from the smallest size's time, bandwidth from the large sizes' "
    "busbw) plus the raw tables as JSON beside it. Joins the cluster given by --address or RAY_ADDRESS or a "
    "running local head; with none, simulates --local-racks racks on this machine.")


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``tide calibrate``."""
    p.add_argument("--out", default=DEFAULT_OUT, metavar="PATH",
                   help="link-model file to write (YAML; .json for JSON); the tables go to <stem>.tables.json "
                        "beside it. For `ray job submit --working-dir .` keep it inside the uploaded directory "
                        "(not under runs/) or on shared storage (default: %(default)s)")
    p.add_argument("--method", choices=("auto", "nccl-tests", "gloo"), default="auto",
                   help="nccl-tests binaries, or the gloo probe; auto: nccl-tests when found and every rack has a "
                        "GPU, else gloo (default: %(default)s)")
    p.add_argument("--sizes", metavar="LIST",
                   help=f"message sizes in bytes, comma-separated, K/M/G = 1024^n (default: {DEFAULT_GLOO_SIZES} for "
                        f"gloo; {DEFAULT_NCCL_SIZES} for nccl-tests, which sweeps powers of two from the smallest "
                        f"to the largest); at most 16G for nccl-tests, 1G and 1/{GLOO_MEMORY_FRACTION} of the "
                        f"available memory for gloo")
    p.add_argument("--iters", type=int, default=20, help="timed iterations per size (default: %(default)s)")
    p.add_argument("--nccl-tests-dir", metavar="DIR",
                   help="directory of sendrecv_perf, all_reduce_perf, alltoall_perf (default: $NCCL_TESTS_DIR, "
                        "else found on PATH)")
    p.add_argument("--launcher", default=DEFAULT_LAUNCHER, metavar="CMD",
                   help="prefix that starts a multi-node nccl-tests run (inter-rack sendrecv: one process on each "
                        "rack), with {nprocs} and {hosts} (host:slots,...) filled in; '' is refused when a run spans "
                        "nodes, i.e. with two or more racks (default: %(default)r)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, a local head, or simulated racks)")
    p.add_argument("--local-racks", type=int, default=2, metavar="N",
                   help="racks to simulate when there is no cluster to join (default: %(default)s)")
    return p


# ------------------------------------------------------------------- cluster
def connect(address: str | None, local_racks: int, log):
    """Join a cluster with rack-labelled nodes, or simulate ``local_racks`` racks of 2 CPUs
    (``cluster.launch.connect.connect_ray``, as ``tide train`` does). Returns the ``Connection``.

    Raises:
        ValueError: an explicit address that does not answer, or ``local_racks < 1``.
    """
    from cluster.launch.connect import connect_ray

    if local_racks < 1:
        raise ValueError(f"--local-racks must be >= 1, got {local_racks}")
    return connect_ray(None, address=address, simulated={f"r{i}": 2 for i in range(local_racks)}, log=log)


def racks_of_cluster() -> dict[str, list[dict]]:
    """``{rack: [node, ...]}`` of the alive nodes labelled ``rack=...``, racks and nodes sorted.

    Each node: ``{"node_id", "ip", "gpus", "cpus"}``.
    """
    import ray

    racks: dict[str, list[dict]] = {}
    for n in ray.nodes():
        rack = (n.get("Labels") or {}).get("rack")
        if n.get("Alive") and rack:
            res = n.get("Resources") or {}
            racks.setdefault(rack, []).append({"node_id": n["NodeID"], "ip": n["NodeManagerAddress"],
                                               "gpus": int(res.get("GPU", 0)), "cpus": res.get("CPU", 0)})
    return {r: sorted(racks[r], key=lambda d: (d["ip"], d["node_id"])) for r in sorted(racks)}


# ---------------------------------------------------------------- gloo probe
class _Probe:
    """One gloo probe process (a Ray actor pinned to a rack)."""

    def where(self) -> dict:
        import socket

        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        ctx = ray.get_runtime_context()
        return {"ip": ray.util.get_node_ip_address(), "port": port,
                "rack": (ctx.get_node_labels() or {}).get("rack"), "host": socket.gethostname()}

    def run(self, rank: int, world: int, master: str, port: int, ops: list[str], sizes: list[int], iters: int,
            host: str, timeout_s: float):
        import datetime

        import torch
        import torch.distributed as dist

        from comm.calibrate import gloo_probe

        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://{master}:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        try:
            return [gloo_probe(op, sizes, iters=iters, host=host) for op in ops]
        finally:
            dist.destroy_process_group()


def _gloo_tables(link_class: str, racks: tuple[str, ...], ops: tuple[str, ...], sizes: list[int], iters: int,
                 timeout_s: float = 600.0) -> list[CalibrationTable]:
    """Two probe processes (on the two racks, or both on one rack) measure ``ops``."""
    import ray

    Probe = ray.remote(_Probe)
    placed = [racks[0], racks[-1]]
    actors = [Probe.options(num_cpus=PROBE_CPUS, label_selector={"rack": r}).remote() for r in placed]
    try:
        where = ray.get([a.where.remote() for a in actors], timeout=timeout_s)
        wrong = [(w["rack"], r) for w, r in zip(where, placed, strict=True) if w["rack"] != r]
        if wrong:
            raise CalibrationError(f"probe placed on the wrong rack (got, wanted): {wrong}")
        results = ray.get([a.run.remote(i, 2, where[0]["ip"], where[0]["port"], list(ops), sizes, iters,
                                        f"{w['host']} ({w['rack']})", timeout_s)
                           for i, (a, w) in enumerate(zip(actors, where, strict=True))], timeout=timeout_s)
    finally:
        for a in actors:
            ray.kill(a)
    return [CalibrationTable(link_class, racks, op, "gloo", res) for op, res in zip(ops, results[0], strict=True)]


# ---------------------------------------------------------------- nccl-tests
def _run_command(argv: list[str], timeout_s: float):
    """Ray task body: run one nccl-tests command on this node."""
    from comm.calibrate import run_nccl_tests

    return run_nccl_tests(argv, timeout_s=timeout_s)


def _nccl_tables(link_class: str, racks: tuple[str, ...], ops: tuple[str, ...], nodes: dict[str, list[dict]],
                 directory: Path, sizes: list[int], iters: int, launcher: str,
                 timeout_s: float = 1800.0) -> list[CalibrationTable]:
    """Run ``ops`` with nccl-tests from a task pinned to ``racks[0]``.

    inter-rack: one process (one GPU) on the first node of each of the two racks, through
    the launcher. intra-rack: one process driving every GPU of the rack's node (``-g``),
    or, for a rack of several nodes, one process per GPU on every node through the launcher.

    Raises:
        CalibrationError: an empty ``launcher`` for a run that spans nodes.
        NcclTestsError: a failed run, a table that stops before ``max(sizes)`` (see
            ``check_sweep``), or an inter-rack table of fewer than 2 ranks.
    """
    import ray

    from comm.nccl_tests import NcclTestsError

    if link_class == "inter-rack":
        hosts = [nodes[racks[0]][0], nodes[racks[1]][0]]
        slots, gpus_per_process = [1, 1], 1
    else:
        hosts = nodes[racks[0]]
        slots = [max(1, h["gpus"]) for h in hosts]
        gpus_per_process = slots[0] if len(hosts) == 1 else 1
    prefix: list[str] = []
    if len(hosts) > 1 or link_class == "inter-rack":
        if not launcher.strip():
            raise CalibrationError(_no_launcher(link_class, racks))
        prefix = shlex.split(launcher.format(nprocs=sum(slots),
                                             hosts=",".join(f"{h['ip']}:{s}" for h, s in zip(hosts, slots,
                                                                                              strict=True))))
    num_gpus = hosts[0]["gpus"]  # reserve the launching node's GPUs so nothing else runs there meanwhile
    task = ray.remote(_run_command).options(num_cpus=1, num_gpus=num_gpus, label_selector={"rack": racks[0]})
    tables = []
    for op in ops:
        argv = nccl_tests_command(directory, op, sizes, iters=iters, gpus_per_process=gpus_per_process,
                                  launcher=prefix)
        result, output = ray.get(task.remote(argv, timeout_s))  # NcclTestsError propagates as itself
        check_sweep(result, sizes)
        if link_class == "inter-rack" and 0 < result.n_ranks < 2:
            raise NcclTestsError(f"{result.binary}: {result.n_ranks} rank (on {', '.join(result.hosts)}): the "
                                 f"launcher did not start one process on each rack, so no inter-rack link was "
                                 f"measured; --launcher must place one process per host it is given ({{hosts}})")
        tables.append(CalibrationTable(link_class, racks, op, "nccl-tests", result, raw_output=output))
    return tables


def check_launcher(launcher: str) -> None:
    """Check ``--launcher`` before connecting: it must split as a shell command line and use no
    placeholder but ``{nprocs}`` and ``{hosts}`` (``{{``/``}}`` for literal braces).

    Raises:
        ValueError: naming ``--launcher`` and what is allowed.
    """
    try:
        shlex.split(launcher.format(nprocs=2, hosts="host1,host2"))
    except (KeyError, IndexError) as e:
        used = f"{{{e.args[0]}}}" if isinstance(e, KeyError) else "a positional placeholder ({} or {0})"
        raise ValueError(f"--launcher uses {used}; allowed: {{nprocs}} (processes), {{hosts}} (comma-separated "
                         "host list), {{ and }} for literal braces") from None
    except ValueError as e:  # an unclosed quote, or a lone brace in str.format
        raise ValueError(f"--launcher is not a valid command line: {e}; placeholders allowed: {{nprocs}}, "
                         "{hosts}") from None


def _no_launcher(link_class: str, racks: tuple[str, ...]) -> str:
    what = ("sendrecv between racks " + " and ".join(racks) if link_class == "inter-rack"
            else f"rack {racks[0]}'s nodes")
    return (f"--launcher '' cannot measure {what}: without a launcher one process runs on one node, which measures "
            f"no link between nodes; give a launcher that starts one process on each host of {{hosts}}, e.g. "
            f"--launcher {DEFAULT_LAUNCHER!r} (the default), or use --method gloo")


def _console():
    """A rich console; when stdout is not a terminal (CI logs, `ray job logs`) one wide enough never to cut a table."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=LOG_WIDTH)


def _size_list(sizes: str | None, used: str) -> list[int]:
    """``--sizes`` (None: the method's defaults) as bytes, bounded for the method (``parse_sizes``)."""
    if used == "gloo":
        limit = gloo_max_bytes()
        why = (f"for the gloo probe (at most {MAX_GLOO_SIZE >> 30}G, and 1/{GLOO_MEMORY_FRACTION} of this host's "
               f"available memory: each probe process holds two buffers of the size)")
        return parse_sizes(DEFAULT_GLOO_SIZES if sizes is None else sizes, max_bytes=limit, limit=why)
    return parse_sizes(DEFAULT_NCCL_SIZES if sizes is None else sizes, max_bytes=MAX_NCCL_SIZE,
                       limit="for nccl-tests")


# -------------------------------------------------------------------- driver
def calibrate(*, out: str | Path = DEFAULT_OUT, method: str = "auto", sizes: str | None = None, iters: int = 20,
              nccl_tests_dir: str | None = None, launcher: str = DEFAULT_LAUNCHER, address: str | None = None,
              local_racks: int = 2, console=None) -> dict[str, Any]:
    """Measure, fit and write the link model (see the module docstring).

    Returns:
        ``{"link_model": path, "tables": path, "method": ..., "racks": [...], "fits": {class: {...}}}``.

    Raises:
        ValueError: bad options (checked before connecting: ``--out`` not writable or a
            directory, ``--sizes`` empty or too large), no rack-labelled nodes, nccl-tests
            forced but missing.
        CalibrationError: an empty launcher for a run across nodes; figures that cannot
            make a link model (e.g. busbw 0).
        NcclTestsError: a failed nccl-tests run, named with its error.
    """
    from comm.nccl_tests import NcclTestsError

    console = console or _console()
    if method not in ("auto", "nccl-tests", "gloo"):
        raise ValueError(f"--method must be auto, nccl-tests or gloo, got {method!r}")
    if iters < 1:
        raise ValueError(f"--iters must be >= 1, got {iters}")
    directory = None
    if method != "gloo":
        directory = find_nccl_tests(nccl_tests_dir)
        if directory is None and method == "nccl-tests":
            raise ValueError("--method nccl-tests: no nccl-tests binaries (sendrecv_perf, all_reduce_perf, "
                             "alltoall_perf) in --nccl-tests-dir, $NCCL_TESTS_DIR or on PATH")
    used = "nccl-tests" if directory is not None else "gloo"
    size_list = _size_list(sizes, used)
    if not Path(out).expanduser().is_absolute() and "runtime_resources" in os.getcwd():
        raise ValueError(f"--out {str(out)!r} is relative and this job runs in Ray's temporary copy of its "
                         f"working_dir ({os.getcwd()}): the file would be deleted with it. Pass an absolute path on "
                         "storage you can read afterwards (or run tide calibrate on a node with --address), then "
                         "put the file in the working dir you submit training jobs from")
    out = check_out_path(out)  # before measuring: a bad --out must not cost a calibration
    check_launcher(launcher)

    import ray

    t0 = time.perf_counter()
    conn = connect(address, local_racks, console.print)
    try:
        nodes = racks_of_cluster()
        if not nodes:
            raise ValueError("no node of the Ray cluster carries a `rack` label: start the nodes with "
                             "`ray start --labels rack=<name>` (or run without --address to simulate racks)")
        no_gpu = [r for r, ns in nodes.items() if not sum(n["gpus"] for n in ns)]
        if used == "nccl-tests" and method == "auto" and no_gpu:
            console.print(f"tide calibrate: nccl-tests found in {directory} but rack(s) {', '.join(no_gpu)} report "
                          f"no GPU: --method auto uses the gloo probe (--method nccl-tests forces nccl-tests)")
            used, directory = "gloo", None
            size_list = _size_list(sizes, used)
        if used == "nccl-tests" and not launcher.strip():
            spanning = [("inter-rack", pair) for pair in itertools.combinations(nodes, 2)]
            spanning += [("intra-rack", (r,)) for r, ns in nodes.items() if len(ns) > 1]
            if spanning:
                raise CalibrationError(_no_launcher(*spanning[0]))
        console.print(f"tide calibrate: {conn.mode}; racks "
                      + ", ".join(f"{r} ({len(ns)} node(s), {sum(n['gpus'] for n in ns)} GPU(s))"
                                  for r, ns in nodes.items())
                      + f"; method {used}" + (f" ({directory})" if directory else "")
                      + f"; sizes {size_list[0]}..{size_list[-1]} B, {iters} iters")
        steps = [("inter-rack", pair, INTER_RACK_OPS) for pair in itertools.combinations(nodes, 2)]
        steps += [("intra-rack", (r,), INTRA_RACK_OPS) for r in nodes]
        if len(nodes) == 1:
            console.print("tide calibrate: one rack only: inter-rack keeps the link model's default")
        tables: list[CalibrationTable] = []
        for i, (cls, racks, ops) in enumerate(steps, 1):
            names = [BINARIES[o] if used == "nccl-tests" else o for o in ops]
            what = f"[{i}/{len(steps)}] {cls} {'<->'.join(racks)}: {', '.join(names)}"
            with console.status(what):
                ts = time.perf_counter()
                try:
                    if used == "gloo":
                        new = _gloo_tables(cls, racks, ops, size_list, iters)
                    else:
                        new = _nccl_tables(cls, racks, ops, nodes, directory, size_list, iters, launcher)
                except (NcclTestsError, ray.exceptions.RayTaskError) as e:
                    # a task's NcclTestsError arrives as RayTaskError(NcclTestsError): report the cause alone
                    cause = e.cause if isinstance(e, ray.exceptions.RayTaskError) else e
                    if isinstance(cause, NcclTestsError):
                        raise NcclTestsError(f"{cls} {'<->'.join(racks)}: {cause}") from None
                    raise
            console.print(f"{what}: done in {time.perf_counter() - ts:.1f} s")
            for t in new:
                console.print(render_table(t))
            tables += new
        fits = fit_link_model(tables)
        meta = {"method": used, "cluster": conn.mode, "racks": {r: [n["ip"] for n in ns] for r, ns in nodes.items()},
                "sizes": size_list, "iters": iters, "nccl_tests_dir": str(directory) if directory else None,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        model_path, tables_path = write_calibration(out, fits, tables, meta)
        from cluster.launch.link_model import load_link_model

        load_link_model(model_path)  # read back the way a training run will: fail here, not there
    finally:
        conn.shutdown()
    console.print(render_fits(fits))
    console.print(f"wrote {model_path} (link model) and {tables_path} (tables) in {time.perf_counter() - t0:.1f} s; "
                  f"use it with `parallel: {{link_model: {model_path}}}` in a training config")
    return {"link_model": str(model_path), "tables": str(tables_path), "method": used, "racks": list(nodes),
            "fits": {c: {"latency_us": f.latency_us, "bandwidth_gbps": f.bandwidth_gbps} for c, f in fits.items()}}


def main(ns: argparse.Namespace) -> dict[str, Any]:
    """Run :func:`calibrate` with parsed ``tide calibrate`` options."""
    return calibrate(out=ns.out, method=ns.method, sizes=ns.sizes, iters=ns.iters, nccl_tests_dir=ns.nccl_tests_dir,
                     launcher=ns.launcher, address=ns.address, local_racks=ns.local_racks)
