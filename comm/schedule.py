"""Pipeline schedules as data: per-stage action lists.

A schedule is, for each pipeline stage, an ordered list of ``Action``s:
``RECV_ACT`` / ``F`` / ``SEND_ACT`` for a microbatch's forward and
``RECV_GRAD`` / ``B`` / ``SEND_GRAD`` for its backward. Sends are asynchronous
(isend), receives block until the peer's send arrived. Schedules can be printed,
checked and simulated without any process (``simulate``), which is how they are
tested; the comm layer executes the same lists with torch.distributed.

- ``gpipe(P, M)``: all forwards, then all backwards (the no-interleave baseline).
- ``one_f_one_b(P, M)``: 1F1B (PipeDream-flush / Megatron): stage s runs
  ``min(P - s - 1, M)`` warm-up forwards, then alternates one forward and one
  backward, then drains the remaining backwards. Peak live activations per stage
  drop from M (GPipe) to at most P - s; the bubble stays ``(P - 1) / (M + P - 1)``
  of the time when forward and backward cost the same (``simulate`` reports it
  for any costs).
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("RECV_ACT", "F", "SEND_ACT", "RECV_GRAD", "B", "SEND_GRAD")


@dataclass(frozen=True)
class Action:
    """One step of a stage: ``kind`` in ``KINDS``, microbatch ``mb``, ``peer`` stage for comm."""

    kind: str
    mb: int
    peer: int | None = None

    def __str__(self) -> str:
        if self.peer is None:
            return f"{self.kind}({self.mb})"
        arrow = "->" if self.kind.startswith("SEND") else "<-"
        return f"{self.kind}({self.mb}{arrow}{self.peer})"


def _fwd(s: int, P: int, mb: int) -> list[Action]:
    acts = [Action("RECV_ACT", mb, s - 1)] if s > 0 else []
    acts.append(Action("F", mb))
    if s < P - 1:
        acts.append(Action("SEND_ACT", mb, s + 1))
    return acts


def _bwd(s: int, P: int, mb: int) -> list[Action]:
    acts = [Action("RECV_GRAD", mb, s + 1)] if s < P - 1 else []
    acts.append(Action("B", mb))
    if s > 0:
        acts.append(Action("SEND_GRAD", mb, s - 1))
    return acts


def _check(P: int, M: int) -> None:
    if P < 1 or M < 1:
        raise ValueError(f"need at least 1 stage and 1 microbatch, got stages={P}, microbatches={M}")


def gpipe(P: int, M: int) -> list[list[Action]]:
    """GPipe: every stage runs all M forwards, then all M backwards (in reverse)."""
    _check(P, M)
    return [[a for mb in range(M) for a in _fwd(s, P, mb)] + [a for mb in reversed(range(M)) for a in _bwd(s, P, mb)]
            for s in range(P)]


def one_f_one_b(P: int, M: int) -> list[list[Action]]:
    """1F1B: warm-up forwards, steady one-forward-one-backward, cool-down backwards."""
    _check(P, M)
    out = []
    for s in range(P):
        warm = min(P - s - 1, M)
        acts: list[Action] = []
        f = b = 0
        for _ in range(warm):
            acts += _fwd(s, P, f)
            f += 1
        while f < M:
            acts += _fwd(s, P, f)
            f += 1
            acts += _bwd(s, P, b)
            b += 1
        while b < M:
            acts += _bwd(s, P, b)
            b += 1
        out.append(acts)
    return out


def format_schedule(schedule: list[list[Action]]) -> str:
    """One line per stage, compute actions only (``F0 F1 B0 ...``)."""
    return "\n".join(f"stage {s}: " + " ".join(f"{a.kind}{a.mb}" for a in acts if a.kind in ("F", "B"))
                     for s, acts in enumerate(schedule))


@dataclass
class SimResult:
    makespan: float
    busy: list[float]  # compute time per stage
    peak_live: list[int]  # max microbatches with stored activations per stage
    order: list[list[tuple[str, int, float, float]]]  # per stage: (kind, mb, start, end) of F/B

    @property
    def bubble(self) -> float:
        """Idle fraction of the stages' time (1 - mean utilisation)."""
        return 1 - sum(self.busy) / (len(self.busy) * self.makespan)


def simulate(schedule: list[list[Action]], f_cost: float = 1.0, b_cost: float = 1.0,
             comm_latency: float = 0.0) -> SimResult:
    """Execute the action lists in virtual time (sends async, receives blocking).

    Raises:
        ValueError: on a deadlock (some stage waits forever) or a malformed schedule
            (a backward before its forward, a receive that no one sends).
    """
    P = len(schedule)
    pc = [0] * P
    clock = [0.0] * P
    arrived: dict[tuple[str, int, int], float] = {}  # (kind, mb, dst) -> arrival time
    live = [set() for _ in range(P)]
    peak = [0] * P
    busy = [0.0] * P
    order: list[list[tuple[str, int, float, float]]] = [[] for _ in range(P)]
    done_f = [set() for _ in range(P)]
    while any(pc[s] < len(schedule[s]) for s in range(P)):
        progressed = False
        for s in range(P):
            while pc[s] < len(schedule[s]):
                a = schedule[s][pc[s]]
                if a.kind in ("RECV_ACT", "RECV_GRAD"):
                    key = ("ACT" if a.kind == "RECV_ACT" else "GRAD", a.mb, s)
                    if key not in arrived:
                        break
                    clock[s] = max(clock[s], arrived.pop(key))
                elif a.kind in ("SEND_ACT", "SEND_GRAD"):
                    arrived[("ACT" if a.kind == "SEND_ACT" else "GRAD", a.mb, a.peer)] = clock[s] + comm_latency
                else:
                    cost = f_cost if a.kind == "F" else b_cost
                    if a.kind == "B" and a.mb not in done_f[s]:
                        raise ValueError(f"stage {s}: backward of microbatch {a.mb} before its forward")
                    order[s].append((a.kind, a.mb, clock[s], clock[s] + cost))
                    clock[s] += cost
                    busy[s] += cost
                    if a.kind == "F":
                        done_f[s].add(a.mb)
                        live[s].add(a.mb)
                        peak[s] = max(peak[s], len(live[s]))
                    else:
                        live[s].discard(a.mb)
                pc[s] += 1
                progressed = True
        if not progressed:
            stuck = {s: str(schedule[s][pc[s]]) for s in range(P) if pc[s] < len(schedule[s])}
            raise ValueError(f"deadlock: stages wait forever at {stuck}")
    return SimResult(max(clock), busy, peak, order)
