"""Pipeline schedules as data: checked and simulated without processes."""

import pytest

from comm.schedule import Action, format_schedule, gpipe, one_f_one_b, simulate


@pytest.mark.parametrize("P,M", [(1, 1), (2, 1), (2, 4), (3, 5), (4, 8), (4, 2)])
@pytest.mark.parametrize("build", [gpipe, one_f_one_b])
def test_every_microbatch_once_and_no_deadlock(P, M, build):
    sched = build(P, M)
    for s, acts in enumerate(sched):
        assert sorted(a.mb for a in acts if a.kind == "F") == list(range(M))
        assert sorted(a.mb for a in acts if a.kind == "B") == list(range(M))
    res = simulate(sched)
    assert res.makespan > 0 and all(b == 2 * M for b in res.busy)


@pytest.mark.parametrize("P,M", [(2, 4), (4, 8), (4, 16)])
def test_1f1b_memory_and_bubble(P, M):
    one, gp = simulate(one_f_one_b(P, M)), simulate(gpipe(P, M))
    assert one.peak_live == [min(P - s, M) for s in range(P)]
    assert gp.peak_live == [M] * P
    expected = (P - 1) / (M + P - 1)
    assert one.bubble == pytest.approx(expected) and gp.bubble == pytest.approx(expected)
    print(f"P={P} M={M}: bubble {one.bubble:.3f}; peak live activations 1F1B {one.peak_live} vs GPipe {gp.peak_live}")


def test_format_and_bad_schedules():
    text = format_schedule(one_f_one_b(2, 3))
    assert text.splitlines() == ["stage 0: F0 F1 B0 F2 B1 B2", "stage 1: F0 B0 F1 B1 F2 B2"]
    with pytest.raises(ValueError, match="deadlock"):
        simulate([[Action("RECV_GRAD", 0, 1), Action("F", 0), Action("SEND_ACT", 0, 1), Action("B", 0)],
                  [Action("RECV_ACT", 0, 0), Action("F", 0), Action("B", 0), Action("SEND_GRAD", 0, 0)]])
    with pytest.raises(ValueError, match="before its forward"):
        simulate([[Action("B", 0), Action("F", 0)]])
    with pytest.raises(ValueError, match="at least 1"):
        one_f_one_b(0, 4)
