"""Link model: latency and bandwidth per link class, to emulate inter-rack networks.

``transfer_time(nbytes, link_class) = latency_s + nbytes / bandwidth_Bps``. With
``enabled`` the comm layer holds each transfer for that long, so the overlap of
communication and compute can be measured honestly on one machine. Off by
default. A calibration file (JSON or YAML, e.g. written from nccl-tests busbw
figures; read by ``cluster.launch.link_model``) replaces the defaults::

    intra-rack: {latency_us: 5, bandwidth_gbps: 400}     # Gbit/s
    inter-rack: {latency_us: 20, bandwidth_gbps: 100}
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

LINK_CLASSES = ("intra-rack", "inter-rack")


def _finite(x) -> bool:
    """A real number (not a bool) that is neither nan nor +-inf (nor an int beyond float range)."""
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:  # an int too large for a float
        return False


@dataclass(frozen=True)
class LinkClass:
    """One class of link: one-way ``latency_s`` (s) and ``bandwidth_Bps`` (bytes/s)."""

    latency_s: float
    bandwidth_Bps: float

    def transfer_time(self, nbytes: int) -> float:
        return self.latency_s + nbytes / self.bandwidth_Bps


def _default_classes() -> dict[str, LinkClass]:
    # NVLink-class inside a rack, a 100 Gbit/s NIC between racks.
    return {"intra-rack": LinkClass(5e-6, 400e9 / 8), "inter-rack": LinkClass(20e-6, 100e9 / 8)}


@dataclass
class LinkModel:
    """Per-class link costs; ``delay`` sleeps for a transfer's modelled time when ``enabled``.

    ``sources``: where each class's figures came from (``"default"`` or the calibration
    file / source name given to :meth:`from_dict`); a class not listed is the default.
    """

    classes: dict[str, LinkClass] = field(default_factory=_default_classes)
    enabled: bool = False
    sources: dict[str, str] = field(default_factory=dict)

    def source_of(self, link_class: str) -> str:
        """Where ``link_class``'s figures came from: ``"default"`` or the file that gave them."""
        return self.sources.get(link_class, "default")

    def transfer_time(self, nbytes: int, link_class: str) -> float:
        """Modelled seconds to move ``nbytes`` over a ``link_class`` link.

        Raises:
            ValueError: unknown link class or negative size.
        """
        if link_class not in self.classes:
            raise ValueError(f"unknown link class {link_class!r}; known: {sorted(self.classes)}")
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        return self.classes[link_class].transfer_time(nbytes)

    def delay(self, nbytes: int, link_class: str, sleep: Callable[[float], None] = time.sleep) -> float:
        """Hold a transfer for its modelled time (no-op when disabled); returns the seconds held."""
        if not self.enabled:
            return 0.0
        t = self.transfer_time(nbytes, link_class)
        sleep(t)
        return t

    def to_dict(self) -> dict:
        return {name: {"latency_us": c.latency_s * 1e6, "bandwidth_gbps": c.bandwidth_Bps * 8 / 1e9}
                for name, c in self.classes.items()}

    @classmethod
    def from_dict(cls, data: dict, *, enabled: bool = True, source: str = "link model") -> LinkModel:
        """Build from ``{class: {latency_us, bandwidth_gbps}}``; classes not given keep their defaults.

        Raises:
            ValueError: unknown class or key, a figure that is not a finite number (a
                boolean, a string, nan, inf), non-positive bandwidth, negative latency.
        """
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a mapping of link classes")
        classes, sources = _default_classes(), {}
        for name, spec in data.items():
            if name not in LINK_CLASSES:
                raise ValueError(f"{source}: unknown link class {name!r}; allowed: {list(LINK_CLASSES)}")
            if not isinstance(spec, dict) or set(spec) - {"latency_us", "bandwidth_gbps"}:
                raise ValueError(f"{source}: {name} needs latency_us and bandwidth_gbps, got {spec!r}")
            lat, bw = spec.get("latency_us", classes[name].latency_s * 1e6), spec.get("bandwidth_gbps")
            if bw is None:
                bw = classes[name].bandwidth_Bps * 8 / 1e9
            if not (_finite(lat) and lat >= 0 and _finite(bw) and bw > 0):
                raise ValueError(f"{source}: {name}: latency_us must be >= 0 and bandwidth_gbps > 0, both finite "
                                 f"numbers (us, Gbit/s), got {spec!r}")
            classes[name] = LinkClass(float(lat) * 1e-6, float(bw) * 1e9 / 8)
            sources[name] = source
        return cls(classes, enabled, sources)
