"""Expert-parallel wave plans without processes: who sends which rows where, per wave."""

import pytest
import torch

from comm.expert_parallel import _Plan, wave_bounds


def test_wave_bounds():
    assert wave_bounds(4, 1) == [0, 4]
    assert wave_bounds(4, 4) == [0, 1, 2, 3, 4]
    assert wave_bounds(5, 2) == [0, 2, 5]
    with pytest.raises(ValueError, match="between 1 and"):
        wave_bounds(4, 5)


def test_plan_routes_every_pair_once_and_groups_by_expert():
    # 2 shards x 4 local experts; this shard's pair counts per (dest shard, local expert)
    send = torch.tensor([[2, 0, 1, 3], [1, 1, 0, 2]])
    recv = torch.tensor([[1, 2, 0, 1], [0, 3, 1, 1]])  # rows each source sends to my experts
    plan = _Plan(send, recv, wave_bounds(4, 2))
    sent = torch.cat([w["send_idx"] for w in plan.waves])
    assert sorted(sent.tolist()) == list(range(int(send.sum())))  # each sorted pair exactly once
    w0, w1 = plan.waves
    assert w0["send_splits"] == [2, 2] and w1["send_splits"] == [4, 2]  # experts 0-1, then 2-3, per dest
    assert w0["send_idx"].tolist() == [0, 1, 6, 7]  # dest 0 experts 0-1 = sorted rows 0,1; dest 1 = rows 6,7
    assert w0["recv_splits"] == [3, 3] and w1["recv_splits"] == [1, 2]
    assert w0["counts"] == [1, 5] and w1["counts"] == [1, 2]
    # received rows arrive (src, expert)-ordered; perm groups them by expert
    eid = torch.tensor([0, 1, 1, 1, 1, 1])  # src0: e0 x1, e1 x2; src1: e1 x3
    assert torch.equal(eid[w0["perm"]], torch.sort(eid, stable=True).values)
