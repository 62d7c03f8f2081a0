"""Training data: real-text corpora, a byte-level BPE tokenizer, packed token streams
and a deterministic, checkpointable, rank-sharded loader.

Pipeline (every step cached under one ``cache_dir``, nothing downloaded)::

    Corpus("stdlib" | path)          documents (str), deterministic order
      -> train_or_load_tokenizer     byte-level BPE, cache_dir/tokenizer-<key>/tokenizer.json
      -> tokenize_corpus             TokenStream: every document + <|endoftext|>, uint32,
                                     cache_dir/tokens-<key>.npy (memory-mapped on reload)
      -> TokenLoader                 {"input_ids", "labels", "doc_ids"} batches, [B, S] int64
         (or PackedDataset, a map-style view for torch's DataLoader / evaluation)

``prepare_data`` runs the first three steps in one call.

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

Special tokens of a trained tokenizer: ``<|bos|>`` = 0, ``<|endoftext|>`` = 1 (eos,
the document separator), ``<|pad|>`` = 2, matching ``ModelArgs`` defaults
(``bos_token_id=0``, ``eos_token_id=1``). ``<|bos|>`` is not inserted by packing.

Shape legend: B sequences per batch on this rank, S sequence length (``seq_len``),
W data-parallel world size, N tokens in the stream, D documents.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import sysconfig
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)  # ids 0, 1, 2 in a trained tokenizer
IGNORE_INDEX = -100

STDLIB = "stdlib"
DEFAULT_GLOBS = ("*.txt", "*.md", "*.py", "*.rst")
TEXT_EXTENSIONS = (".txt", ".text", ".md", ".markdown", ".py", ".rst")
JSONL_EXTENSIONS = (".jsonl", ".ndjson")
PARQUET_EXTENSIONS = (".parquet",)
FORMATS = ("text", "jsonl", "parquet")
# Directories never read from the standard library: test suites (Lib/test,
# idlelib/idle_test, lib2to3/tests, unittest/test, ...), installed packages, caches.
STDLIB_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
_USER_SKIP_DIRS = frozenset({"__pycache__"})

# Bump when the meaning of a cached file changes (invalidates old caches).
_TOKENIZER_CACHE_VERSION = 1
_TOKENS_CACHE_VERSION = 1
_LOADER_STATE_VERSION = 1


def _sha256(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


# ====================================================================== corpus
class Corpus:
    """A deterministic sequence of text documents from one source.

    Args:
        source: ``"stdlib"`` (default): every ``.py`` file of the running
            interpreter's standard library (``sysconfig.get_paths()["stdlib"]``), one
            document per file, sorted by relative path, skipping test suites and
            installed packages (``STDLIB_SKIP_DIRS``), hidden directories and files
            that are not UTF-8. Otherwise a path (write ``./stdlib`` for a file or
            directory of that name):

            - a file: ``.txt/.text/.md/.markdown/.py/.rst`` is one document;
              ``.jsonl/.ndjson`` is one document per non-blank line (a JSON object
              with a string field ``text_field``); ``.parquet`` is one document per
              row of the string column ``text_field``.
            - a directory: every file below it (recursively, sorted by relative path,
              hidden directories and ``__pycache__`` skipped) whose relative path
              matches one of ``globs``; each is read by its extension as above, and
              a matched file with another extension is read as plain text.
        max_bytes: stop after this many UTF-8 bytes of document text (the last
            document is cut at a character boundary); ``None`` reads everything.
        globs: file patterns for directories (``PurePosixPath.match`` on the
            relative path, so ``"*.md"`` matches at any depth).
        text_field: the JSONL field / Parquet column holding the text.
        format: ``"text"``, ``"jsonl"`` or ``"parquet"`` to override the choice by
            extension for every file; ``None`` chooses by extension.

    Raises:
        ValueError: at construction for a path that does not exist, a file with an
            unknown extension, a directory with no matching file, bad arguments;
            while iterating ``documents()`` for a file that is not UTF-8, a JSONL
            line that is not a JSON object or lacks the field (with its line
            number), a Parquet file without the column, and an empty corpus (no
            non-empty document at all). Every message names the file.
    """

    def __init__(self, source: str | os.PathLike = STDLIB, *, max_bytes: int | None = None,
                 globs: Sequence[str] = DEFAULT_GLOBS, text_field: str = "text",
                 format: str | None = None) -> None:
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int)
                                      or max_bytes <= 0):
            raise ValueError(f"max_bytes must be a positive int or None (no limit), got {max_bytes!r}")
        if format is not None and format not in FORMATS:
            raise ValueError(f"unknown format {format!r}; allowed: {', '.join(FORMATS)} or None (by extension)")
        if isinstance(globs, str):
            globs = (globs,)
        if not globs or not all(isinstance(g, str) and g for g in globs):
            raise ValueError(f"globs must be a non-empty list of file patterns, got {globs!r}")
        if not isinstance(text_field, str) or not text_field:
            raise ValueError(f"text_field must be a non-empty string, got {text_field!r}")
        self.max_bytes = max_bytes
        self.globs = tuple(globs)
        self.text_field = text_field
        self.format = format
        self.is_stdlib = str(source) == STDLIB
        if self.is_stdlib:
            self.root = Path(sysconfig.get_paths()["stdlib"]).resolve()
            self._files = [(p, "text") for p in _walk(self.root, ("*.py",), STDLIB_SKIP_DIRS)]
            if not self._files:
                raise ValueError(f"stdlib corpus: no .py files under {self.root}")
            return
        path = Path(source).expanduser()
        if not path.exists():
            raise ValueError(f"corpus path not found: {path} (give a file, a directory or {STDLIB!r})")
        self.root = path.resolve()
        if self.root.is_dir():
            files = _walk(self.root, self.globs, _USER_SKIP_DIRS)
            if not files:
                raise ValueError(f"corpus directory {self.root} has no file matching {list(self.globs)}")
            self._files = [(p, self.format or _format_of(p) or "text") for p in files]
        else:
            fmt = self.format or _format_of(self.root)
            if fmt is None:
                raise ValueError(
                    f"{self.root}: unknown extension {self.root.suffix!r}; allowed: "
                    f"{', '.join(TEXT_EXTENSIONS)} (text), {', '.join(JSONL_EXTENSIONS)} (JSONL), "
                    f"{', '.join(PARQUET_EXTENSIONS)} (Parquet), or pass format=")
            self._files = [(self.root, fmt)]

    def __repr__(self) -> str:
        return f"Corpus({self.describe()})"

    def describe(self) -> str:
        """A one-line human description (source, file count, budget)."""
        src = f"stdlib {self.root}" if self.is_stdlib else str(self.root)
        budget = f", max_bytes={self.max_bytes}" if self.max_bytes else ""
        return f"{src}, {len(self._files)} file(s){budget}"

    @property
    def files(self) -> list[Path]:
        """The files read, in reading order."""
        return [p for p, _ in self._files]

    def fingerprint(self) -> str:
        """A hex digest identifying the corpus content, cheap to compute.

        Hashes the options and every file's path, size and modification time (not
        the text), like ``make``: editing or replacing a file changes it.
        """
        files = []
        for p, fmt in self._files:
            st = p.stat()
            files.append([str(p), fmt, st.st_size, st.st_mtime_ns])
        return _sha256({"stdlib": self.is_stdlib, "python": sys.version if self.is_stdlib else None,
                        "root": str(self.root), "max_bytes": self.max_bytes, "globs": list(self.globs),
                        "text_field": self.text_field, "format": self.format, "files": files})

    def documents(self) -> Iterator[str]:
        """Yield the documents (non-empty ``str``), in a fixed order.

        Raises:
            ValueError: see the class docstring (bad file content, empty corpus).
        """
        n_docs = 0
        remaining = self.max_bytes
        for path, fmt in self._files:
            for doc in self._read(path, fmt):
                if not doc:
                    continue
                if remaining is not None:
                    b = doc.encode("utf-8")
                    if len(b) >= remaining:
                        doc = b[:remaining].decode("utf-8", "ignore")  # drop a cut multi-byte char
                        if doc:
                            n_docs += 1
                            yield doc
                        remaining = 0
                        break
                    remaining -= len(b)
                n_docs += 1
                yield doc
            if remaining == 0:
                break
        if n_docs == 0:
            raise ValueError(f"empty corpus: {self.describe()} has no non-empty document "
                             f"(files: {[str(p) for p in self.files[:5]]}{' ...' if len(self._files) > 5 else ''})")

    def _read(self, path: Path, fmt: str) -> Iterator[str]:
        if fmt == "jsonl":
            yield from _read_jsonl(path, self.text_field)
        elif fmt == "parquet":
            yield from _read_parquet(path, self.text_field)
        else:
            try:
                data = path.read_bytes()
            except OSError as e:
                raise ValueError(f"{path}: cannot read ({e.strerror or e})") from None
            try:
                yield data.decode("utf-8")
            except UnicodeDecodeError as e:
                if self.is_stdlib:  # a few stdlib files are Latin-1 test data: skip them
                    log.debug("skipping non-UTF-8 stdlib file %s", path)
                    return
                raise ValueError(f"{path}: not valid UTF-8 (byte {e.start}: {e.reason})") from None


def load_documents(spec: str | os.PathLike | Corpus = STDLIB, **kwargs: Any) -> Iterator[str]:
    """Documents of ``spec`` (``"stdlib"``, a path, or a ``Corpus``); ``kwargs`` go to
    ``Corpus`` (``max_bytes``, ``globs``, ``text_field``, ``format``).

    Path errors (not found, unknown extension, empty directory) raise ``ValueError``
    here; content errors while iterating (see ``Corpus``).
    """
    if isinstance(spec, Corpus):
        if kwargs:
            raise ValueError(f"options {sorted(kwargs)} apply when building a Corpus, not to an existing one")
        return spec.documents()
    return Corpus(spec, **kwargs).documents()


def _format_of(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix in TEXT_EXTENSIONS:
        return "text"
    if suffix in JSONL_EXTENSIONS:
        return "jsonl"
    if suffix in PARQUET_EXTENSIONS:
        return "parquet"
    return None


def _walk(root: Path, globs: Sequence[str], skip_dirs: frozenset[str]) -> list[Path]:
    """Files below ``root`` matching ``globs``, sorted by relative POSIX path."""
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip_dirs and not d.startswith(".")]
        for name in filenames:
            if name.startswith("."):
                continue
            p = Path(dirpath, name)
            rel = PurePosixPath(p.relative_to(root).as_posix())
            if any(rel.match(g) for g in globs) and p.is_file():
                found.append((rel.as_posix(), p))
    found.sort(key=lambda t: t[0])
    return [p for _, p in found]


def _read_jsonl(path: Path, field: str) -> Iterator[str]:
    try:
        fh = path.open("rb")
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror or e})") from None
    with fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid UTF-8 (byte {e.start} of the line)") from None
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object with a {field!r} field, "
                                 f"got {type(obj).__name__}")
            if field not in obj:
                raise ValueError(f"{path}:{lineno}: missing field {field!r} (keys: {sorted(obj)[:10]})")
            text = obj[field]
            if not isinstance(text, str):
                raise ValueError(f"{path}:{lineno}: field {field!r} must be a string, got {type(text).__name__}")
            yield text


def _read_parquet(path: Path, field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: not a readable Parquet file ({e})") from None
    schema = pf.schema_arrow
    if field not in schema.names:
        raise ValueError(f"{path}: no column {field!r} (columns: {schema.names})")
    typ = schema.field(field).type
    is_str = (pa.types.is_string(typ) or pa.types.is_large_string(typ)
              or getattr(pa.types, "is_string_view", lambda _: False)(typ))
    if not is_str:
        raise ValueError(f"{path}: column {field!r} must hold strings, has type {typ}")
    row = 0
    try:
        for batch in pf.iter_batches(columns=[field], batch_size=1024):
            col = batch.column(0)
            values = col.to_pylist()
            if col.null_count:
                i = next(i for i, v in enumerate(values) if v is None)
                raise ValueError(f"{path}: row {row + i}: column {field!r} is null")
            yield from values
            row += len(values)
    except (pa.ArrowException, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read column {field!r} near row {row} ({e})") from None


def _docs_and_fingerprint(documents: Corpus | Iterable[str]) -> tuple[Any, str, str]:
    """(a callable giving a fresh document iterator, a content fingerprint, a description)."""
    if isinstance(documents, Corpus):
        return documents.documents, documents.fingerprint(), documents.describe()
    if isinstance(documents, (str, bytes)):
        raise ValueError("documents must be a Corpus or an iterable of str documents, not a single string "
                         "(use Corpus(path) for a file)")
    docs = list(documents)
    h = hashlib.sha256()
    for i, d in enumerate(docs):
        if not isinstance(d, str):
            raise ValueError(f"document {i} is a {type(d).__name__}, expected str")
        b = d.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    if not any(docs):
        raise ValueError(f"empty corpus: {len(docs)} document(s), none non-empty")
    return (lambda: (d for d in docs if d)), h.hexdigest(), f"{len(docs)} in-memory document(s)"


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


# ================================================================== tokenizer
def train_or_load_tokenizer(documents: Corpus | Iterable[str] | None, vocab_size: int,
                            cache_dir: str | os.PathLike, *, tokenizer_path: str | os.PathLike | None = None,
                            min_frequency: int = 2, progress: bool | None = None):
    """A byte-level BPE tokenizer for ``documents``: trained once, then loaded from cache.

    The tokenizer is ``tokenizers``' BPE over a ``ByteLevel`` pre-tokenizer (GPT-2
    regex split, no prefix space) with a ``ByteLevel`` decoder, trained by
    ``BpeTrainer`` with the full 256-byte initial alphabet, so every string
    round-trips exactly: ``decode(encode(text).ids) == text``. Special tokens:
    ``<|bos|>`` = 0, ``<|endoftext|>`` = 1 (eos), ``<|pad|>`` = 2.

    Cached as ``cache_dir/tokenizer-<key>/tokenizer.json`` (with ``meta.json``) where
    ``key`` hashes the corpus fingerprint, ``vocab_size``, ``min_frequency`` and the
    special tokens; a second call with the same inputs loads it without reading the
    corpus (for a ``Corpus``) or retraining. Writes are atomic (safe if several
    ranks race: they produce the same file).

    Args:
        documents: a ``Corpus`` (fingerprinted by file metadata) or an iterable of
            ``str`` (materialised and hashed). Ignored when ``tokenizer_path`` is set.
        vocab_size: the largest vocabulary wanted (the model's ``vocab_size``); a
            small corpus may yield fewer tokens (``get_vocab_size()``), never more.
            Must be >= 259 (256 bytes + 3 special tokens).
        cache_dir: directory for the cache (created if needed).
        tokenizer_path: a user-supplied ``tokenizer.json`` to load instead of
            training; it must contain ``<|endoftext|>`` and at most ``vocab_size`` tokens.
        min_frequency: BPE merges need at least this many occurrences.
        progress: show the trainer's progress bar (``None``: when stderr is a tty).

    Returns:
        ``tokenizers.Tokenizer``.

    Raises:
        ValueError: bad ``vocab_size``, an unreadable/invalid ``tokenizer_path`` or one
            without the eos token or with too many tokens, an empty corpus, bad
            corpus content (see ``Corpus``).
    """
    from tokenizers import Tokenizer

    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be an int >= {256 + len(SPECIAL_TOKENS)} "
                         f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens), got {vocab_size!r}")
    if tokenizer_path is not None:
        path = Path(tokenizer_path).expanduser()
        if not path.is_file():
            raise ValueError(f"tokenizer file not found: {path}")
        from model.safe_io import refuse_pickle

        refuse_pickle(path, "allowed: a tokenizers JSON file (tokenizer.json)")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on a bad file
            raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from None
        tokenizer_eos_id(tok)
        if tok.get_vocab_size() > vocab_size:
            raise ValueError(f"{path}: tokenizer has {tok.get_vocab_size()} tokens, more than "
                             f"vocab_size={vocab_size} (the model's embedding rows)")
        log.info("loaded tokenizer %s (%d tokens)", path, tok.get_vocab_size())
        return tok
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 1:
        raise ValueError(f"min_frequency must be an int >= 1, got {min_frequency!r}")

    make_docs, corpus_fp, desc = _docs_and_fingerprint(documents)
    key = _sha256({"v": _TOKENIZER_CACHE_VERSION, "corpus": corpus_fp, "vocab_size": vocab_size,
                   "min_frequency": min_frequency, "special": list(SPECIAL_TOKENS)})[:16]
    out_dir = Path(cache_dir).expanduser() / f"tokenizer-{key}"
    path = out_dir / "tokenizer.json"
    if path.is_file():
        from model.safe_io import refuse_pickle

        refuse_pickle(path, "allowed: a tokenizers JSON file (tokenizer.json)")
        log.info("loaded cached tokenizer %s", path)
        return Tokenizer.from_file(str(path))

    log.info("training byte-level BPE tokenizer (vocab_size=%d) on %s", vocab_size, desc)
    t0 = time.perf_counter()
    tok = _train_bpe(make_docs(), vocab_size, min_frequency, progress)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".tokenizer.json.{os.getpid()}.tmp"
    tok.save(str(tmp))
    os.replace(tmp, path)
    meta = {"corpus": desc, "corpus_fingerprint": corpus_fp, "vocab_size_requested": vocab_size,
            "vocab_size": tok.get_vocab_size(), "min_frequency": min_frequency,
            "special_tokens": {t: i for i, t in enumerate(SPECIAL_TOKENS)}}
    _atomic_write_text(out_dir / "meta.json", json.dumps(meta, indent=2) + "\n")
    log.info("trained tokenizer: %d tokens in %.1fs -> %s", tok.get_vocab_size(), time.perf_counter() - t0, path)
    return tok


def _train_bpe(documents: Iterator[str], vocab_size: int, min_frequency: int, progress: bool | None):
    """Train a fresh byte-level BPE on ``documents`` (the uncached path)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=sys.stderr.isatty() if progress is None else progress)
    tok.train_from_iterator(documents, trainer=trainer)
    return tok


def tokenizer_eos_id(tokenizer, eos_token: str = EOS_TOKEN) -> int:
    """The id of ``eos_token`` in ``tokenizer``.

    Raises:
        ValueError: the tokenizer has no such token.
    """
    eos = tokenizer.token_to_id(eos_token)
    if eos is None:
        raise ValueError(f"tokenizer has no {eos_token!r} token (the document separator); "
                         f"add it as a special token or pass eos_token=")
    return eos


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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


# The chat template served with a run's tokenizer (``tokenizer_config.json``, the field
# transformers' tokenizers read, so an exported model renders chats the same way there).
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}\n{% endfor %}<|assistant|>\n"
EOS_TOKEN = "<|endoftext|>"


def save_tokenizer_files(tokenizer, out_dir: str | Path, chat_template: str = CHAT_TEMPLATE) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` (chat template, end-of-text token) to ``out_dir``."""
    import json

    out = Path(out_dir)
    tokenizer.save(str(out / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": chat_template, "eos_token": EOS_TOKEN,
           "model_max_length": 1 << 30}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def read_chat_template(tokenizer_dir: str | Path) -> str | None:
    """The ``chat_template`` of ``tokenizer_dir/tokenizer_config.json``; None when there is none.

    Raises:
        ValueError: the file exists but is not JSON, or its chat_template is not a string.
    """
    import json

    p = Path(tokenizer_dir) / "tokenizer_config.json"
    if not p.is_file():
        return None
    try:
        tpl = json.loads(p.read_text()).get("chat_template")
    except (ValueError, AttributeError) as e:
        raise ValueError(f"{p}: not a JSON object ({e})") from None
    if tpl is not None and not isinstance(tpl, str):
        raise ValueError(f"{p}: chat_template must be a string (named templates are not supported), "
                         f"got {type(tpl).__name__}")
    return tpl
