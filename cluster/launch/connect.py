"""Join a Ray cluster or start an embedded one: the one decision every entry point shares.

``tide train``, ``python -m cluster.train`` (what ``ray job submit`` runs), ``tide serve``
and ``tide calibrate`` all call :func:`connect_ray`:

1. already connected (inside a Ray job driver): use it;
2. an explicit address (``--address`` or ``RAY_ADDRESS``): join it, or fail naming it;
3. a live local head (Ray's ``ray_current_cluster`` file, checked for a live GCS first):
   join it when it has the rack-labelled nodes the job needs, else leave it alone;
4. otherwise, with ``simulate``: start an embedded cluster on this machine -- one labelled
   raylet per rack the job needs (``cluster.launch.local_racks``), or a plain local
   instance when the actors name no rack.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

from .local_racks import LocalRacks, reachable_ray_address, start_local_racks


@dataclass
class Connection:
    """How this process is connected: ``mode`` (a sentence for the log) and the embedded cluster
    it started (``local``, None when it joined one). ``shutdown()`` stops what it started."""

    mode: str
    local: LocalRacks | None = None
    started_plain: bool = False

    def shutdown(self) -> None:
        import ray

        if self.local is not None:
            self.local.shutdown()
        elif self.started_plain and ray.is_initialized():
            ray.shutdown()


def cluster_racks() -> dict[str, float]:
    """CPUs per ``rack`` label over the alive nodes of the connected cluster."""
    import ray

    have: dict[str, float] = {}
    for node in ray.nodes():
        r = (node.get("Labels") or {}).get("rack")
        if node.get("Alive") and r:
            have[r] = have.get(r, 0) + node.get("Resources", {}).get("CPU", 0)
    return have


def connect_ray(need: dict[str | None, float] | None, *, address: str | None = None, simulate: bool = True,
                simulated: dict[str, float] | None = None, log: Callable[[str], None] = print) -> Connection:
    """Connect this process to Ray (see the module docstring).

    Args:
        need: CPUs per rack label the job's actors need (key None: any node); None: any
            rack-labelled cluster will do (``tide calibrate``).
        address: the cluster to join (default ``RAY_ADDRESS``); with it nothing is simulated.
        simulate: start an embedded cluster when there is nothing suitable to join.
        simulated: the racks to simulate (default: the labelled racks of ``need``).
        log: where notes go (a borrowed-cluster refusal, racks still missing on a joined one).

    Raises:
        ValueError: an explicit address that does not answer, or nothing to join and ``simulate`` off.
    """
    conn = _connect(need, address=address, simulate=simulate, simulated=simulated, log=log)
    _terminate_as_interrupt()
    return conn


def _terminate_as_interrupt() -> None:
    """SIGTERM (what schedulers, systemd and ``kill`` send) raises ``KeyboardInterrupt`` in the main
    thread, as Ctrl-C does, so a run stops through the same cleanup (embedded raylets stopped, the
    Ray address file restored, the resume hint printed) instead of through Ray's fatal-signal handler,
    which ``ray.init`` installs and which aborts the process. Only from the main thread."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)


def _connect(need, *, address, simulate, simulated, log) -> Connection:
    import ray

    if ray.is_initialized():
        return Connection("joined Ray cluster (already connected)")
    explicit = address or os.environ.get("RAY_ADDRESS")
    labelled = {r: c for r, c in (need or {}).items() if r is not None}
    target = explicit or reachable_ray_address()  # a stale address file would make "auto" wait for a dead GCS
    if target is not None:
        try:
            ray.init(address=target, log_to_driver=True)
        except ConnectionError as e:
            if explicit:
                raise ValueError(f"no Ray cluster answers at {explicit}: {e} (a token-auth cluster needs "
                                 f"RAY_AUTH_MODE=token and its token)") from None
        else:
            have = cluster_racks()
            missing = sorted(set(labelled) - set(have)) if need is not None else ([] if have else ["<any>"])
            if not missing or explicit:
                if missing:
                    log(f"tide: warning: no node of the cluster carries rack label(s) {missing} yet; waiting for "
                        f"the autoscaler to add them (placement times out otherwise)")
                return Connection(f"joined Ray cluster at {target}")
            # a cluster found by "auto" (e.g. someone else's) without our racks: do not borrow it
            log(f"tide: the Ray cluster on this machine has no node labelled rack={missing}; not using it")
            ray.shutdown()
    if not simulate:
        raise ValueError(f"no Ray cluster to join at {explicit or 'this machine'}; start one whose nodes carry the "
                         f"racks' labels (`ray start --labels rack=<name>`)")
    racks = simulated if simulated is not None else labelled
    if racks:
        cores = os.cpu_count() or 1
        if sum(racks.values()) > cores:
            log(f"tide: note: the simulated racks declare {sum(racks.values()):g} CPUs on a {cores}-core machine; "
                f"actors will time-slice the cores")
        local = start_local_racks({r: math.ceil(c) for r, c in racks.items()})  # raylets take whole CPUs
        return Connection(f"embedded Ray cluster ({len(racks)} simulated rack(s): "
                          + ", ".join(f"{r}={c:g} CPU" for r, c in racks.items()) + ")", local)
    cpus = sum((need or {}).values())
    ray.init(address="local", log_to_driver=True, num_cpus=max(os.cpu_count() or 1, math.ceil(cpus)))
    return Connection("embedded Ray cluster (one local node)", started_plain=True)
