"""Run a function on N local processes joined by a gloo process group (tests and benchmarks).

``spawn_local(fn, world, *args)`` starts ``world`` processes (``spawn``), each
calling ``init_process_group("gloo", rank, world)`` on a free localhost port and then
``fn(rank, world, *args)``; it waits for all and raises ``RuntimeError`` with the
failing rank's traceback if any process fails or the ``timeout_s`` passes.
``fn`` must be importable (a module-level function). Each process uses
``threads`` intra-op threads (default 1: several processes share the cores).
"""

from __future__ import annotations

import os
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, threads, fn, args, errors):
    try:
        torch.set_num_threads(threads)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        try:
            fn(rank, world, *args)
        finally:
            dist.destroy_process_group()
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        raise


def spawn_local(fn, world: int, *args, threads: int = 1, timeout_s: float = 600.0) -> None:
    """Run ``fn(rank, world, *args)`` on ``world`` local gloo processes (see module docstring)."""
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = free_port()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    procs = [ctx.Process(target=_entry, args=(r, world, port, threads, fn, args, errors), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    import time
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    alive = [i for i, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    msgs = []
    while not errors.empty():
        rank, tb = errors.get()
        msgs.append(f"--- rank {rank} ---\n{tb}")
    if msgs:
        raise RuntimeError("distributed run failed:\n" + "\n".join(msgs))
    if alive:
        raise RuntimeError(f"ranks {alive} still running after {timeout_s:.0f} s (deadlock?); killed")
    bad = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode != 0]
    if bad:
        raise RuntimeError(f"processes exited with non-zero codes {bad}")
