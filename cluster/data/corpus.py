"""Corpus readers: a deterministic sequence of text documents from one source.

``Corpus("stdlib" | path)`` yields documents (``str``) in a fixed order, nothing
downloaded: the running interpreter's standard library (the default), a text file, a
JSONL / Parquet file (one document per line / row), or a directory walked
recursively (sorted by relative path). ``load_documents`` is the one-call form.

Every later cache key (tokenizer, token stream) starts from a corpus fingerprint:
``Corpus.fingerprint()`` hashes file metadata (cheap, like ``make``), and
``_docs_and_fingerprint`` also accepts an in-memory iterable of ``str`` (hashed by
content).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

log = logging.getLogger(__name__)

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


# ================================================================ fingerprints
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
