"""Data-parallel replicas (D x P x E actors, gloo) equal the single-process model.

Each rank is a real ``StageWorker`` (``dp_worker``): the step's loss and every gradient on the
same global batch, and the parameters after several ZeRO-1 optimizer steps, against the
single-process reference. The gradient buckets must go out *during* the last backward (trace),
and ZeRO-1 must hold each parameter's optimizer state on exactly one replica.
"""

import json
from pathlib import Path

import pytest

from comm.data_parallel import assign_owners
from comm.launch import spawn_local
from tests.comm import dp_worker
from tests.comm.test_pipeline_parallel import GRAD_TOL, PARAM_TOL


def _run(tmp_path: Path, D: int, P: int, E: int) -> list[dict]:
    # 2 microbatches x 2 waves; 0.05 MiB buckets so that a debug stage has many
    spawn_local(dp_worker.run, D * P * E, D, P, E, 2, 2, 3, 0.05, str(tmp_path), timeout_s=420)
    rows = [json.loads(f.read_text()) for f in sorted(tmp_path.glob("rank*.json"))]
    assert [r["rank"] for r in rows] == list(range(D * P * E))
    return rows


def _check(rows: list[dict], D: int) -> None:
    for r in rows:
        where = f"rank {r['rank']} (replica {r['dp']}, stage {r['stage']}, shard {r['ep']})"
        assert r["n_grads"] > 0, where
        assert abs(r["loss"] - r["ref_loss"]) <= GRAD_TOL * max(1.0, abs(r["ref_loss"])), where
        assert r["grad_err"] <= GRAD_TOL, f"{where}: grad error {r['grad_err']} at {r['grad_where']}"
        assert r["param_err"] <= PARAM_TOL, f"{where}: param error {r['param_err']} at {r['param_where']}"
        assert r["bias_err"] <= 1e-6, where
    # ZeRO-1: every parameter of a (stage, shard) is owned by exactly one of its D replicas, and
    # the optimizer state is split: no replica holds more than ~1/D of the position's total
    by_pos: dict[tuple, list[dict]] = {}
    for r in rows:
        by_pos.setdefault((r["stage"], r["ep"]), []).append(r)
    for pos, reps in by_pos.items():
        assert len(reps) == D
        owned = [set(r["owned"]) for r in reps]
        union = set().union(*owned)
        assert sum(len(o) for o in owned) == len(union), f"{pos}: a parameter owned twice"
        total = sum(r["memory"]["optimizer"] for r in reps)
        for r in reps:
            assert r["memory"]["optimizer"] <= total / D * 1.25, (pos, [x["memory"]["optimizer"] for x in reps])
            assert r["memory"]["params"] == reps[0]["memory"]["params"]  # parameters stay whole


def _overlapped(events: list[dict]) -> tuple[int, int]:
    """(buckets, buckets that started before the last backward compute span ended)."""
    spans = [e for e in events if e.get("ph") == "X"]
    backward = [e for e in spans if e["name"].startswith("B")]
    end_b = max(e["ts"] + e["dur"] for e in backward)
    buckets = [e for e in spans if e["name"].startswith("allreduce b")]
    return len(buckets), sum(e["ts"] < end_b for e in buckets)


def test_dp2_pp2_ep1(tmp_path):
    rows = _run(tmp_path, 2, 2, 1)
    _check(rows, 2)
    for r in rows:
        n, early = _overlapped(r["events"])
        assert n > 1 and early > 0, f"rank {r['rank']}: {early} of {n} buckets started during backward"


def test_dp2_pp1_ep2(tmp_path):
    rows = _run(tmp_path, 2, 1, 2)
    _check(rows, 2)
    for r in rows:  # replicated tensors over 4 ranks, routed experts over their 2 copies
        n, early = _overlapped(r["events"])
        assert n > 1 and early > 0, f"rank {r['rank']}: {early} of {n} buckets started during backward"


def test_assign_owners_balances_and_is_deterministic():
    sizes = {f"p{i}": s for i, s in enumerate([100, 90, 50, 40, 30, 20, 10, 10])}
    owners = assign_owners(sizes, 2)
    assert owners == assign_owners(dict(reversed(list(sizes.items()))), 2)  # order of the dict is irrelevant
    load = [sum(s for n, s in sizes.items() if owners[n] == d) for d in range(2)]
    assert sorted(load) == [170, 180]
    assert set(assign_owners(sizes, 1).values()) == {0}
    with pytest.raises(ValueError, match="replicas"):
        assign_owners(sizes, 0)
