"""Packing and the resumable loader: a token stream cut into training batches.

``TokenLoader`` yields ``{"input_ids", "labels", "doc_ids"}`` batches, ``[B, S]``
int64: deterministic, checkpointable and rank-sharded. ``PackedDataset`` is a
map-style view for torch's DataLoader / evaluation; ``pack_windows`` packs windows
for both, ``mtp_labels`` derives multi-token-prediction targets, and
``sequences_per_batch`` converts a batch given in tokens.

Packing conventions (shared by ``PackedDataset`` and ``TokenLoader``):

- Every document is followed by the eos token ``<|endoftext|>``; the eos belongs to
  the document it ends (same ``doc_id``). The stream is the concatenation.
- A sequence is a window of ``S + 1`` consecutive stream tokens ``w``; ``input_ids =
  w[:-1]``, ``labels = w[1:]``. Consecutive windows overlap by one token (stride
  ``S``), so every stream token after the first is a label exactly once per epoch.
- ``labels[i] = -100`` (``IGNORE_INDEX``, ``F.cross_entropy``'s default) where
  ``input_ids[i]`` is the eos: the next token is the first token of an unrelated
  document, which cannot be predicted from this one. Predicting the eos itself (the
  label of a document's last text token) is kept: the model learns where documents end.
- ``doc_ids`` restart at 0 in every sequence and increase by one right after each
  eos, so they are non-decreasing; pass them to the model (``doc_ids=``) so packed
  documents do not attend to each other. A sequence that starts mid-document gives
  that document id 0.
- No padding is ever produced; ``<|pad|>`` exists in the vocabulary for inference.

Shape legend: B sequences per batch on this rank, S sequence length (``seq_len``),
W data-parallel world size, N tokens in the stream, D documents.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .tokens import TokenStream

IGNORE_INDEX = -100
# Bump when the meaning of a saved state changes.
_LOADER_STATE_VERSION = 1


# ===================================================================== packing
def pack_windows(windows_BW: np.ndarray, eos_id: int) -> dict[str, torch.Tensor]:
    """Turn windows of ``S + 1`` stream tokens into a training batch.

    Args:
        windows_BW: ``[B, S + 1]`` integer token windows (W = S + 1).
        eos_id: the document separator.

    Returns:
        ``{"input_ids": [B, S], "labels": [B, S], "doc_ids": [B, S]}``, all int64:
        ``input_ids = w[:, :-1]``; ``labels = w[:, 1:]`` except ``-100`` where the
        input is eos; ``doc_ids`` start at 0 and increase by one after each eos.
    """
    w = np.asarray(windows_BW).astype(np.int64)
    assert w.ndim == 2 and w.shape[1] >= 2, w.shape
    input_BS = w[:, :-1]
    labels_BS = w[:, 1:].copy()
    is_eos_BS = input_BS == eos_id
    labels_BS[is_eos_BS] = IGNORE_INDEX
    doc_BS = np.zeros_like(input_BS)
    np.cumsum(is_eos_BS[:, :-1], axis=1, out=doc_BS[:, 1:])
    return {"input_ids": torch.from_numpy(np.ascontiguousarray(input_BS)),
            "labels": torch.from_numpy(labels_BS), "doc_ids": torch.from_numpy(doc_BS)}


def mtp_labels(labels_BS: torch.Tensor) -> torch.Tensor:
    """Targets for a depth-1 multi-token-prediction head, ``[B, S - 1]`` int64.

    MTP row ``i`` predicts the token two ahead (``labels[:, i + 1]``) from position
    ``i`` and token ``i + 1``. It is ignored (``-100``) where ``labels[:, i]`` is
    ignored (input ``i`` is an eos: token ``i + 1`` already belongs to the next
    document) and wherever ``labels[:, i + 1]`` is.
    """
    return labels_BS[:, 1:].masked_fill(labels_BS[:, :-1] == IGNORE_INDEX, IGNORE_INDEX)


def _check_pos_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


class PackedDataset(torch.utils.data.Dataset):
    """Map-style view of a stream as fixed-length packed sequences, in stream order.

    Item ``i`` is the window ``stream[i*S : i*S + S + 1]`` packed by
    ``pack_windows`` (see the module docstring): ``{"input_ids", "labels",
    "doc_ids"}``, each ``[S]`` int64. ``len = (N - 1) // S``; the tail that does not
    fill a sequence is dropped. torch's default collate stacks items into ``[B, S]``.
    For training prefer ``TokenLoader`` (shuffled, resumable, sharded).

    Raises:
        ValueError: ``seq_len < 1`` or a stream too short for one sequence.
    """

    def __init__(self, stream: TokenStream, seq_len: int) -> None:
        self.stream = stream
        self.seq_len = _check_pos_int("seq_len", seq_len)
        self._len = (len(stream) - 1) // self.seq_len
        if self._len == 0:
            raise ValueError(f"stream of {len(stream)} tokens is too short for one sequence of "
                             f"seq_len + 1 = {self.seq_len + 1} tokens")

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -self._len <= i < self._len:
            raise IndexError(f"index {i} out of range for {self._len} sequences")
        i %= self._len
        s = i * self.seq_len
        batch = pack_windows(self.stream.tokens[None, s: s + self.seq_len + 1], self.stream.eos_id)
        return {k: v[0] for k, v in batch.items()}


# ====================================================================== loader
def sequences_per_batch(batch_tokens: int, seq_len: int, world_size: int = 1) -> int:
    """Sequences per rank for a curriculum batch given in tokens.

    ``max(1, batch_tokens // seq_len // world_size)``: ``batch_tokens`` is the global
    batch (all ranks together); each rank then takes that many sequences.

    Raises:
        ValueError: a non-positive argument.
    """
    batch_tokens = _check_pos_int("batch_tokens", batch_tokens)
    seq_len = _check_pos_int("seq_len", seq_len)
    world_size = _check_pos_int("world_size", world_size)
    return max(1, batch_tokens // seq_len // world_size)


class TokenLoader:
    """Deterministic, resumable, rank-sharded batches of packed sequences.

    Each epoch reads a *virtual stream*: the documents of ``stream`` (each with its
    eos) in an order that is a function of ``(seed, epoch)`` only (a PCG64
    permutation of the documents; the stream order when ``shuffle=False``), always
    ``N`` tokens long. The loader keeps a global token ``position`` in it. One step
    (all ranks together) takes ``W * B`` consecutive windows of ``S + 1`` tokens at
    stride ``S`` from ``position``; rank ``r`` gets windows ``r*B .. r*B + B - 1``, so
    ranks get disjoint sequences and the ranks' batches concatenated equal the
    batch of a single process with batch size ``W * B``. ``position`` then advances
    by ``W * B * S``. When the next step would run past the end (``position + W*B*S
    + 1 > N``), the rest of the epoch is dropped and the next epoch starts at
    position 0. Batches are packed by ``pack_windows`` (see the module docstring).

    ``set_shape(seq_len, batch_size)`` (a curriculum stage change) keeps ``epoch``
    and ``position``: the next batch starts at the first token not yet used as an
    input, now cut into the new shape; no token is skipped or repeated.

    ``state_dict()`` is the same on every rank (the position is global), a small
    JSON-serialisable dict; ``load_state_dict`` restores ``seed``, ``shuffle``,
    ``epoch``, ``position``, ``seq_len`` and ``batch_size``, after which the loader
    yields exactly the batches the saved one would have. A different
    ``world_size`` on resume continues from the same global position.

    Args:
        stream: the ``TokenStream``.
        seq_len: S, tokens per sequence (inputs; each window has S + 1).
        batch_size: B, sequences per batch on this rank (``sequences_per_batch``
            converts a curriculum batch in tokens).
        seed: non-negative int seeding the document order.
        rank, world_size: this rank and the number of data-parallel ranks.
        shuffle: shuffle documents per epoch (``False``: stream order every epoch).

    Yields (iterating, forever; or ``next_batch()``):
        ``{"input_ids": [B, S], "labels": [B, S], "doc_ids": [B, S]}``, int64 CPU tensors.

    Raises:
        ValueError: bad arguments, or a stream too short for one step
            (``W * B * S + 1 > N``).
    """

    def __init__(self, stream: TokenStream, seq_len: int, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, *, shuffle: bool = True) -> None:
        if not isinstance(stream, TokenStream):
            raise ValueError(f"stream must be a TokenStream, got {type(stream).__name__}")
        self.stream = stream
        self.world_size = _check_pos_int("world_size", world_size)
        self.rank = _check_pos_int("rank", rank, minimum=0)
        if self.rank >= self.world_size:
            raise ValueError(f"rank must be in [0, world_size) = [0, {self.world_size}), got {rank}")
        self.seed = _check_pos_int("seed", seed, minimum=0)
        self.shuffle = bool(shuffle)
        self.epoch = 0
        self.position = 0
        self.consumed_tokens = 0  # global tokens advanced over, all epochs (for logging)
        self._order: tuple[int, np.ndarray, np.ndarray] | None = None  # (epoch, starts[D], cum[D+1])
        self.set_shape(seq_len, batch_size)

    # ------------------------------------------------------------------ shape
    def set_shape(self, seq_len: int, batch_size: int) -> None:
        """Switch to ``seq_len`` / ``batch_size`` from the current position (see class).

        Raises:
            ValueError: non-positive values or a step longer than the stream.
        """
        seq_len = _check_pos_int("seq_len", seq_len)
        batch_size = _check_pos_int("batch_size", batch_size)
        need = self.world_size * batch_size * seq_len + 1
        if need > len(self.stream):
            raise ValueError(f"one step needs world_size * batch_size * seq_len + 1 = {self.world_size} * "
                             f"{batch_size} * {seq_len} + 1 = {need} tokens; the stream has {len(self.stream)}")
        self.seq_len, self.batch_size = seq_len, batch_size

    @property
    def tokens_per_step(self) -> int:
        """Input tokens per step over all ranks, ``W * B * S``."""
        return self.world_size * self.batch_size * self.seq_len

    # ------------------------------------------------------------------ order
    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(``starts[D]``: stream offset of the k-th document of the epoch,
        ``cum[D+1]``: its offset in the virtual stream)."""
        if self._order is None or self._order[0] != epoch:
            ds = self.stream.doc_starts
            lengths = np.diff(ds)
            if self.shuffle:
                perm = np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(lengths.size)
            else:
                perm = np.arange(lengths.size)
            cum = np.zeros(lengths.size + 1, dtype=np.int64)
            np.cumsum(lengths[perm], out=cum[1:])
            self._order = (epoch, ds[:-1][perm], cum)
        return self._order[1], self._order[2]

    def _gather(self, epoch: int, positions: np.ndarray) -> np.ndarray:
        """Tokens at virtual-stream ``positions`` (any shape) of ``epoch``."""
        starts, cum = self._epoch_order(epoch)
        k = np.searchsorted(cum, positions, side="right") - 1
        return self.stream.tokens[starts[k] + (positions - cum[k])]

    def virtual_stream(self, epoch: int) -> np.ndarray:
        """The ``[N]`` token stream epoch ``epoch`` reads (documents reordered)."""
        return self._gather(epoch, np.arange(len(self.stream), dtype=np.int64))

    # ------------------------------------------------------------------ batches
    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next batch of this rank (see the class docstring for the layout)."""
        step = self.tokens_per_step
        if self.position + step + 1 > len(self.stream):
            self.epoch += 1
            self.position = 0
        S, B = self.seq_len, self.batch_size
        first = self.position + (self.rank * B + np.arange(B, dtype=np.int64)) * S  # [B]
        windows = self._gather(self.epoch, first[:, None] + np.arange(S + 1, dtype=np.int64))  # [B, S+1]
        self.position += step
        self.consumed_tokens += step
        return pack_windows(windows, self.stream.eos_id)

    def __iter__(self) -> TokenLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return self.next_batch()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot (identical on every rank)."""
        return {"version": _LOADER_STATE_VERSION, "seed": self.seed, "shuffle": self.shuffle,
                "epoch": self.epoch, "position": self.position, "seq_len": self.seq_len,
                "batch_size": self.batch_size, "world_size": self.world_size,
                "consumed_tokens": self.consumed_tokens, "stream_tokens": len(self.stream),
                "stream_fingerprint": self.stream.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict()`` (see the class docstring).

        Raises:
            ValueError: a missing key, another version, or a state saved over another
                token stream (different length or fingerprint).
        """
        keys = ("version", "seed", "shuffle", "epoch", "position", "seq_len", "batch_size", "world_size",
                "consumed_tokens", "stream_tokens", "stream_fingerprint")
        missing = [k for k in keys if k not in state]
        if missing:
            raise ValueError(f"loader state is missing {missing}")
        if state["version"] != _LOADER_STATE_VERSION:
            raise ValueError(f"loader state version {state['version']} is not supported "
                             f"(expected {_LOADER_STATE_VERSION})")
        if state["stream_tokens"] != len(self.stream) or state["stream_fingerprint"] != self.stream.fingerprint:
            raise ValueError(
                f"loader state was saved over another token stream ({state['stream_tokens']} tokens, "
                f"fingerprint {str(state['stream_fingerprint'])[:16]}) than this one ({len(self.stream)} tokens, "
                f"fingerprint {self.stream.fingerprint[:16]}): the corpus or tokenizer changed")
        position = _check_pos_int("position", state["position"], minimum=0)
        if position > len(self.stream):
            raise ValueError(f"loader state position {position} is past the stream end {len(self.stream)}")
        self.seed = _check_pos_int("seed", state["seed"], minimum=0)
        self.shuffle = bool(state["shuffle"])
        self._order = None
        self.set_shape(state["seq_len"], state["batch_size"])
        self.epoch = _check_pos_int("epoch", state["epoch"], minimum=0)
        self.position = position
        self.consumed_tokens = _check_pos_int("consumed_tokens", state["consumed_tokens"], minimum=0)
