"""tide.model: the DeepSeek-V4 architecture in plain PyTorch (single device).

Public API::

    from model import ModelArgs, Transformer, load_hf, save_hf
    args = ModelArgs.flavor("debug")
    m = Transformer(args)
    logits = m(input_ids)              # [B, S] int64 -> [B, S, vocab]
    state = m.new_state(batch)         # decode state; m(ids, state) continues a sequence

This package imports neither ray nor torch.distributed (see DESIGN.md).
"""

from .config import FLAVORS, ModelArgs
from .hf_io import load_hf, save_hf
from .state import ModelState
from .transformer import Transformer

__all__ = ["FLAVORS", "ModelArgs", "ModelState", "Transformer", "load_hf", "save_hf"]
