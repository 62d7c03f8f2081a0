"""When anticipatory routing routes ahead and when a step uses the cached routing.

Anticipatory routing (DeepSeek-V4 report, training stability; ``docs/training.md``):
at step t the features are computed with the current parameters theta_t, but every
learned router's expert choice is the one theta_{t-dt} made for that batch. The batch
of step t is fetched dt steps early; at step t-dt, *before* that step's update, the
stage actors compute its routing (a forward-only pass) and cache it; step t uses it.

It is switched on by a loss-spike rollback and left on for ``steps`` steps. Because
the routing of a forced step must come from parameters dt updates older, and a
rollback has just replaced the parameters (there is nothing dt updates older than
the checkpoint it restored), the first dt steps after the rollback are ordinary steps
that only route ahead ("priming"); from then on every forced step's routing is exactly
dt updates old::

    spike at s, rollback:   s+1 .. s+dt        ordinary steps, each routes batch t+dt ahead
                            s+dt+1 .. s+dt+N   forced steps (lag dt), routing ahead while t+dt <= s+dt+N

A batch can only be fetched early within its curriculum stage (a stage boundary changes
the batch shape), so a forced step whose batch lies across a boundary runs unforced.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RoutingSchedule:
    """The anticipatory-routing window of a run (see the module docstring).

    Args:
        delta: dt, the lag in optimizer updates (>= 1).
        steps: N, forced steps after each rollback.
    """

    delta: int = 1
    steps: int = 10
    first_forced: int = -1  # first step of the current window (-1: none yet)
    last_forced: int = -2

    def __post_init__(self):
        if self.delta < 1 or self.steps < 0:
            raise ValueError(f"anticipatory routing needs delta >= 1 and steps >= 0, got {self.delta}, {self.steps}")

    def rollback(self, spike_step: int) -> None:
        """A spike at ``spike_step`` was rolled back: open a new window after it."""
        self.first_forced = spike_step + 1 + self.delta
        self.last_forced = spike_step + self.delta + self.steps

    def forced(self, step: int) -> bool:
        """Whether ``step`` lies in the window (uses the routing cached for it, if any)."""
        return self.first_forced <= step <= self.last_forced

    def routes_ahead(self, step: int) -> bool:
        """Whether ``step`` computes the routing of step ``step + delta``."""
        return self.forced(step + self.delta)

    def active(self, step: int) -> bool:
        """Whether ``step`` is inside a window or its priming (no checkpoint: batches are fetched early)."""
        return self.first_forced - self.delta <= step <= self.last_forced

    def state_dict(self) -> dict:
        return {"delta": self.delta, "steps": self.steps, "first_forced": self.first_forced,
                "last_forced": self.last_forced}
