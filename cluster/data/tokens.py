"""The token cache: a tokenized corpus as one memory-mapped ``uint32`` stream.

``tokenize_corpus`` encodes every document followed by the eos token
``<|endoftext|>`` (the eos belongs to the document it ends; the stream is the
concatenation) and caches it as ``cache_dir/tokens-<key>.npy``, memory-mapped
read-only (never unpickled) on reload. ``TokenStream`` wraps the array with its
document boundaries. ``prepare_data`` runs corpus -> tokenizer -> token stream in one
call; ``default_cache_dir`` is where the caches live by default.

Shape legend: N tokens in the stream, D documents.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from .corpus import STDLIB, Corpus, _docs_and_fingerprint, _sha256
from .tokenizer import EOS_TOKEN, tokenizer_eos_id, train_or_load_tokenizer

log = logging.getLogger(__name__)

# Bump when the meaning of a cached file changes (invalidates old caches).
_TOKENS_CACHE_VERSION = 1


# =================================================================== progress
@contextmanager
def _progress(enabled: bool | None, description: str):
    """Yields ``advance(docs, tokens)``; a rich progress line on stderr when enabled
    (``None``: when stderr is a terminal)."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield lambda docs, tokens=0: None
        return
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TextColumn("{task.completed:,.0f} docs"),
                  TextColumn("{task.fields[tokens]:,} tokens"), TimeElapsedColumn(),
                  console=Console(stderr=True)) as bar:
        task = bar.add_task(description, total=None, tokens=0)
        state = {"tokens": 0}

        def advance(docs: int, tokens: int = 0) -> None:
            state["tokens"] += tokens
            bar.update(task, advance=docs, tokens=state["tokens"])

        yield advance


# ================================================================ token stream
class TokenStream:
    """A tokenized corpus: documents, each followed by the eos token, concatenated.

    Args:
        tokens: ``[N]`` unsigned/signed integer array (``uint32`` from
            ``tokenize_corpus``; may be a read-only memmap). Must end with ``eos_id``.
        eos_id: the document separator.
        fingerprint: identifies the content (checked by ``TokenLoader.load_state_dict``);
            by default the SHA-256 of the tokens.

    Attributes:
        doc_starts: ``[D + 1]`` int64, document ``d`` is ``tokens[doc_starts[d]:
            doc_starts[d + 1]]`` (its eos last); ``doc_starts[-1] == N``.

    Raises:
        ValueError: not 1-D integer, empty, or not ending with ``eos_id``.
    """

    def __init__(self, tokens: np.ndarray, eos_id: int, fingerprint: str | None = None) -> None:
        tokens = np.asanyarray(tokens)  # keeps a memmap a memmap
        if tokens.ndim != 1 or tokens.dtype.kind not in "ui" or tokens.size == 0:
            raise ValueError(f"tokens must be a non-empty 1-D integer array, got shape {tokens.shape} "
                             f"dtype {tokens.dtype}")
        if int(tokens[-1]) != eos_id:
            raise ValueError(f"a token stream must end with the eos id {eos_id} (every document is "
                             f"followed by it), last token is {int(tokens[-1])}")
        self.tokens = tokens
        self.eos_id = int(eos_id)
        self.fingerprint = fingerprint or hashlib.sha256(np.ascontiguousarray(tokens).tobytes()).hexdigest()
        ends = np.flatnonzero(tokens == eos_id)
        self.doc_starts = np.concatenate([[0], ends + 1]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_documents(self) -> int:
        return int(self.doc_starts.shape[0] - 1)

    def __repr__(self) -> str:
        return f"TokenStream({len(self):,} tokens, {self.num_documents:,} documents, eos_id={self.eos_id})"


def tokenize_corpus(documents: Corpus | Iterable[str], tokenizer, cache_dir: str | os.PathLike, *,
                    eos_token: str = EOS_TOKEN, progress: bool | None = None, batch_docs: int = 64) -> TokenStream:
    """Tokenize every document (followed by eos) into one ``uint32`` stream, cached.

    The stream is saved as ``cache_dir/tokens-<key>.npy`` (``key`` hashes the corpus
    fingerprint and the tokenizer's JSON) and memory-mapped read-only when found
    again. Special-token strings inside documents (e.g. a literal
    ``"<|endoftext|>"``) are encoded as ordinary text, so the eos id only ever marks
    document ends; no template tokens (bos) are added.

    Args:
        documents: a ``Corpus`` or an iterable of ``str``.
        tokenizer: a ``tokenizers.Tokenizer`` with ``eos_token``.
        cache_dir: cache directory (created if needed).
        eos_token: the separator token's string.
        progress: a rich progress line on stderr (``None``: when stderr is a tty).
        batch_docs: documents per ``encode_batch`` call.

    Returns:
        ``TokenStream`` (``tokens``: ``[N]`` uint32).

    Raises:
        ValueError: the tokenizer lacks ``eos_token`` or encodes text to the eos id,
            a vocabulary over 2**32, an empty corpus, bad corpus content.
    """
    eos = tokenizer_eos_id(tokenizer, eos_token)
    if tokenizer.get_vocab_size() > 2**32:
        raise ValueError(f"vocabulary of {tokenizer.get_vocab_size()} tokens does not fit uint32")
    make_docs, corpus_fp, desc = _docs_and_fingerprint(documents)
    tok_fp = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()
    key = _sha256({"v": _TOKENS_CACHE_VERSION, "corpus": corpus_fp, "tokenizer": tok_fp, "eos": eos})[:16]
    path = Path(cache_dir).expanduser() / f"tokens-{key}.npy"
    if path.is_file():
        try:  # never unpickled: an object array (or any other non-uint32 file) is refused
            tokens = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as e:
            raise ValueError(f"{path}: refused: not a tide token cache ({e}); allowed: a plain 1-D uint32 .npy "
                             f"(object arrays are never unpickled); delete it to rebuild the cache") from None
        if tokens.dtype != np.uint32 or tokens.ndim != 1:
            raise ValueError(f"{path}: not a tide token cache (expected a 1-D uint32 .npy, got {tokens.dtype} "
                             f"{tokens.shape}); delete it to rebuild the cache")
        log.info("loaded cached token stream %s (%d tokens)", path, tokens.shape[0])
        return TokenStream(tokens, eos, fingerprint=key)

    t0 = time.perf_counter()
    chunks: list[np.ndarray] = []
    n_docs = n_tokens = 0
    eos_arr = np.array([eos], dtype=np.uint32)
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # _fast: no offsets (>= 0.20)
    saved = tokenizer.encode_special_tokens
    tokenizer.encode_special_tokens = True  # a literal "<|endoftext|>" in text is text
    try:
        log.info("tokenizing %s", desc)
        with _progress(progress, "tokenizing") as advance:
            batch: list[str] = []
            docs = make_docs()
            while True:
                batch.clear()
                for d in docs:
                    batch.append(d)
                    if len(batch) == batch_docs:
                        break
                if not batch:
                    break
                added = 0
                for i, enc in enumerate(encode(batch, add_special_tokens=False)):
                    ids = np.asarray(enc.ids, dtype=np.uint32)
                    if (ids == eos).any():
                        raise ValueError(f"document {n_docs + i} of {desc} encodes to the eos id {eos}; "
                                         f"the tokenizer must keep {eos_token!r} out of ordinary text")
                    chunks += [ids, eos_arr]
                    added += ids.size + 1
                n_docs += len(batch)
                n_tokens += added
                advance(len(batch), added)
    finally:
        tokenizer.encode_special_tokens = saved
    tokens = np.concatenate(chunks)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as fh:
        np.save(fh, tokens)
    os.replace(tmp, path)
    log.info("tokenized %d documents -> %d tokens in %.1fs -> %s", n_docs, n_tokens, time.perf_counter() - t0, path)
    return TokenStream(tokens, eos, fingerprint=key)


def prepare_data(source: str | os.PathLike | Corpus = STDLIB, *, vocab_size: int, cache_dir: str | os.PathLike,
                 tokenizer_path: str | os.PathLike | None = None, progress: bool | None = None,
                 **corpus_kwargs: Any):
    """Corpus -> tokenizer -> token stream in one call (each step cached in ``cache_dir``).

    Args:
        source: ``"stdlib"``, a path, or a ``Corpus``; ``corpus_kwargs`` (``max_bytes``,
            ``globs``, ``text_field``, ``format``) build the ``Corpus`` from a path.
        vocab_size: the model's ``vocab_size`` (the tokenizer has at most this many).
        cache_dir: where the tokenizer and the token stream are cached.
        tokenizer_path: a ``tokenizer.json`` to use instead of training one.
        progress: progress display (``None``: when stderr is a tty).

    Returns:
        ``(tokenizer, stream)``: a ``tokenizers.Tokenizer`` and a ``TokenStream``.

    Raises:
        ValueError: see ``Corpus``, ``train_or_load_tokenizer``, ``tokenize_corpus``.
    """
    if isinstance(source, Corpus) and corpus_kwargs:
        raise ValueError(f"options {sorted(corpus_kwargs)} apply when building a Corpus, not to an existing one")
    corpus = source if isinstance(source, Corpus) else Corpus(source, **corpus_kwargs)
    tok = train_or_load_tokenizer(corpus, vocab_size, cache_dir, tokenizer_path=tokenizer_path, progress=progress)
    return tok, tokenize_corpus(corpus, tok, cache_dir, progress=progress)


def default_cache_dir() -> Path:
    """``$TIDE_CACHE_DIR``, else ``~/.cache/tide/data``."""
    env = os.environ.get("TIDE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tide" / "data"
