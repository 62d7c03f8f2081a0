"""Reading a link-model file (what ``tide calibrate`` writes) into a ``comm.link_model.LinkModel``.

The file maps link classes to latency and bandwidth (``intra-rack: {latency_us: 5,
bandwidth_gbps: 400}``), as YAML -- through the project's one YAML reader
(``model.safe_io.read_yaml``: safe, duplicate keys refused) -- or as JSON when it
ends in ``.json`` (duplicate keys refused as well).
"""

from __future__ import annotations

import json
from pathlib import Path

from comm.link_model import LinkModel


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    seen: dict = {}
    for k, v in pairs:
        if k in seen:
            raise ValueError(f"duplicate key {k!r}")
        seen[k] = v
    return seen


def load_link_model(path: str | Path, *, enabled: bool = True) -> LinkModel:
    """Load a link-model calibration file.

    Raises:
        ValueError: missing file, not UTF-8 text (e.g. a pickle), unparsable (a YAML tag that
            would build a Python object, a duplicate key), or bad fields -- each naming the file.
    """
    from model.safe_io import read_text, read_yaml

    p = Path(path)
    if p.suffix != ".json":
        return LinkModel.from_dict(read_yaml(p, "link calibration file"), enabled=enabled, source=str(p))
    text = read_text(p, "link calibration file", "(allowed: JSON, or plain YAML)")
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates)
    except (json.JSONDecodeError, ValueError) as e:
        raise ValueError(f"{p}: cannot parse: {e}") from None
    return LinkModel.from_dict(data, enabled=enabled, source=str(p))
