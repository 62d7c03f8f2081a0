"""Per-sequence decode state (the "KV cache") of a DeepSeek-V4 model.

Everything here is bounded except the compressed entries, which grow by one
entry every m tokens (m = 4 for CSA, 128 for HCA) -- that growth *is* V4's cache:

- ``window``: a ring buffer of the last ``sliding_window`` kv vectors (post-norm,
  post-RoPE), slot ``p % W`` holds position ``p``;
- ``comp``: compressed kv entries ``[B, T, D]`` (CSA and HCA layers);
- ``tail_kv`` / ``tail_gate``: projected source tokens of the block that is not
  yet full (< m tokens);
- ``overlap_kv`` / ``overlap_gate``: CSA only, the last closed block's
  series-a slice (the previous-block half of the overlapping window);
- ``indexer``: for CSA layers the Lightning Indexer's own ``comp``/tail/overlap
  at ``index_head_dim``.

All rows of a batch share one position counter ``pos`` (number of tokens
already consumed). Letters: B batch, W window, T entries, D head_dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class Growable:
    """An append-only ``[B, n, D]`` tensor with amortised O(1) appends (capacity doubling)."""

    def __init__(self, batch: int, dim: int, dtype: torch.dtype, device: torch.device | str):
        self._buf = torch.empty(batch, 16, dim, dtype=dtype, device=device)
        self.n = 0

    @property
    def data(self) -> torch.Tensor:
        """The filled prefix ``[B, n, D]`` (a view; do not keep across appends)."""
        return self._buf[:, : self.n]

    def append(self, x_BnD: torch.Tensor) -> None:
        k = x_BnD.shape[1]
        if k == 0:
            return
        if self.n + k > self._buf.shape[1]:
            cap = max(2 * self._buf.shape[1], self.n + k)
            buf = torch.empty(self._buf.shape[0], cap, self._buf.shape[2], dtype=self._buf.dtype,
                              device=self._buf.device)
            buf[:, : self.n] = self._buf[:, : self.n]
            self._buf = buf
        self._buf[:, self.n: self.n + k] = x_BnD.to(self._buf.dtype)
        self.n += k

    def nbytes(self) -> int:
        """Bytes of the filled part (what the state logically holds)."""
        return self.n * self._buf.shape[0] * self._buf.shape[2] * self._buf.element_size()


@dataclass
class CompressorState:
    """Streaming state of one compressor (main or indexer) of one layer."""

    comp: Growable
    tail_kv: torch.Tensor | None = None  # [B, r < m, C]
    tail_gate: torch.Tensor | None = None
    overlap_kv: torch.Tensor | None = None  # [B, m, D] (CSA only)
    overlap_gate: torch.Tensor | None = None

    def nbytes(self) -> int:
        n = self.comp.nbytes()
        for t in (self.tail_kv, self.tail_gate, self.overlap_kv, self.overlap_gate):
            if t is not None:
                n += t.numel() * t.element_size()
        return n


@dataclass
class LayerState:
    """Decode state of one attention layer."""

    window: torch.Tensor  # [B, W, D] ring buffer
    compressor: CompressorState | None = None
    indexer: CompressorState | None = None

    def nbytes(self) -> int:
        n = self.window.numel() * self.window.element_size()
        for c in (self.compressor, self.indexer):
            if c is not None:
                n += c.nbytes()
        return n


@dataclass
class ModelState:
    """Decode state of a whole model for one batch of sequences of equal length.

    ``pos``: tokens consumed so far; ``layers``: one ``LayerState`` per decoder
    layer; ``mtp``: state of the MTP block (used by speculative decoding).
    """

    layers: list[LayerState]
    pos: int = 0
    mtp: LayerState | None = None
    last_hidden: torch.Tensor | None = field(default=None, repr=False)

    def nbytes(self) -> int:
        """Bytes held by the state (window rings + compressed entries + tails)."""
        return sum(l.nbytes() for l in self.layers) + (self.mtp.nbytes() if self.mtp else 0)


def window_positions(pos: int, window: int, device=None) -> torch.Tensor:
    """Position held by each ring slot ``[W]`` after ``pos`` tokens (negative = empty).

    Slot ``s`` holds the largest position ``p < pos`` with ``p % W == s``.
    """
    slots = torch.arange(window, device=device)
    return pos - 1 - torch.remainder(pos - 1 - slots, window)


# ----------------------------------------------------------------- ragged batches
# Continuous batching (deploy/) runs one decode step for many sequences at once, each at
# its own position with its own state: ``state`` is then a list of batch-1 ``ModelState``s,
# one per row of ``input_ids``. These helpers let the model code take either form.

def is_ragged(state) -> bool:
    """True when ``state`` is a list of per-row ``ModelState``s (a ragged batch)."""
    return isinstance(state, (list, tuple))


def check_rows(state, batch: int, seq: int, max_positions: int) -> None:
    """Validate a state (single or ragged) against ``input_ids [batch, seq]``.

    Raises:
        ValueError: the state was made for another batch size, a ragged row is not a
            batch-1 state, or a row would run past ``max_positions``.
    """
    if state is None:
        return
    if is_ragged(state):
        if len(state) != batch:
            raise ValueError(f"a ragged batch needs one state per row: {len(state)} states for batch {batch}")
        for i, st in enumerate(state):
            if st.layers and st.layers[0].window.shape[0] != 1:
                raise ValueError(f"ragged row {i}: its state holds {st.layers[0].window.shape[0]} sequences, "
                                 f"expected 1")
            if st.pos + seq > max_positions:
                raise ValueError(f"ragged row {i} reaches position {st.pos + seq}, beyond "
                                 f"max_position_embeddings = {max_positions}")
        return
    if state.layers and state.layers[0].window.shape[0] != batch:
        raise ValueError(f"state was created for batch {state.layers[0].window.shape[0]}, input_ids has "
                         f"batch {batch}")
    if state.pos + seq > max_positions:
        raise ValueError(f"sequence reaches position {state.pos + seq}, beyond "
                         f"max_position_embeddings = {max_positions}")


def start_positions(state):
    """``state.pos`` (int), a list of each row's position for a ragged batch, or 0 without a state."""
    if state is None:
        return 0
    return [st.pos for st in state] if is_ragged(state) else state.pos


def layer_state(state, i: int):
    """Layer ``i``'s state: a ``LayerState``, a list of them (ragged), or None."""
    if state is None:
        return None
    return [st.layers[i] for st in state] if is_ragged(state) else state.layers[i]


def advance(state, n: int) -> None:
    """Move every row of ``state`` forward by ``n`` consumed tokens."""
    if state is None:
        return
    for st in (state if is_ragged(state) else [state]):
        st.pos += n
