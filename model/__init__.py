"""tide.model: the DeepSeek-V4 architecture in plain PyTorch (single device).

Public API::

    from model import ModelArgs, Transformer, load_hf, save_hf
    args = ModelArgs.flavor("debug")
    m = Transformer(args)
    logits = m(input_ids)              # [B, S] int64 -> [B, S, vocab]
    state = m.new_state(batch)         # decode state; m(ids, state) continues a sequence

This package imports neither ray nor torch.distributed (``docs/design.md``: import
direction). The names above are imported on first use, so that ``model.safe_io`` (the
YAML reader a node's start command uses) loads without torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {"FLAVORS": "config", "ModelArgs": "config", "load_hf": "hf_io", "save_hf": "hf_io",
            "ModelState": "state", "Transformer": "transformer"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
