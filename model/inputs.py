"""Validation of model inputs, split by what it costs.

- :func:`check_shapes` reads only shapes and dtypes (host metadata): the forward runs it
  on every call.
- :func:`check_tokens` reads token *values* (min / max, document-id order), which on an
  accelerator means waiting for the device: it is run once per training batch or
  serving request (by the trainer's stage actors, the serving engine, ``prefill`` /
  ``generate``), never inside the forward.

Letters: B batch, S sequence.
"""

from __future__ import annotations

import torch


def check_shapes(input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None) -> None:
    """Host-side checks of ``input_ids [B,S]`` (and ``doc_ids [B,S]``): type, rank, dtype, non-empty.

    Raises:
        ValueError: naming what is wrong and what is allowed.
    """
    if not isinstance(input_ids, torch.Tensor):
        raise ValueError(f"input_ids must be a torch.LongTensor [batch, seq], got {type(input_ids).__name__}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    if input_ids.shape[0] == 0:
        raise ValueError("input_ids has batch size 0")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be int64 (or int32) token ids, got {input_ids.dtype}")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids has no tokens (sequence length 0)")
    if doc_ids is not None and doc_ids.shape != input_ids.shape:
        raise ValueError(f"doc_ids shape {tuple(doc_ids.shape)} must equal input_ids shape {tuple(input_ids.shape)}")


def check_tokens(input_ids: torch.Tensor, vocab_size: int, doc_ids: torch.Tensor | None = None) -> None:
    """:func:`check_shapes`, then the values: token ids in ``[0, vocab_size)``, ``doc_ids``
    non-decreasing along each sequence. Synchronises with the device: once per batch / request.

    Raises:
        ValueError: naming the offending range or order.
    """
    check_shapes(input_ids, doc_ids)
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"token ids must be in [0, {vocab_size}), got min {lo}, max {hi}")
    if doc_ids is not None and input_ids.shape[1] > 1 and bool((doc_ids[:, 1:] < doc_ids[:, :-1]).any()):
        raise ValueError("doc_ids must be non-decreasing along the sequence (one id per packed document)")
