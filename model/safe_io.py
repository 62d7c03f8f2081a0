"""Secure file loading: tensors only from safetensors, never anything unpickled.

Unpickling a file runs whatever code its author put in it (a ``__reduce__`` that calls
``os.system``), and ``torch.save``'s ``.pt`` / ``.pth`` / ``.bin`` files are pickles
(the newer ones inside a zip archive). So tide reads:

- tensors only from safetensors files (:func:`load_safetensors`, :func:`open_safetensors`;
  written with :func:`write_safetensors`, which returns the file's sha256);
- configs, manifests and metadata only as JSON, or as YAML through :func:`read_yaml` --
  the one YAML reader of the project (training configs, topologies, link models, model
  YAMLs, the cluster YAML): a ``yaml.SafeLoader`` subclass, which refuses tags that build
  Python objects (``!!python/object/apply:os.system``), refuses a key given twice in one
  mapping (naming both lines), and reads YAML 1.2 floats such as ``1e-6``;
- tokenizers only as ``tokenizers`` JSON files; token caches only as ``.npy`` with
  ``allow_pickle=False``.

:func:`refuse_pickle` sniffs a file's first bytes, so a pickle handed in under any name
(``model.safetensors``, ``tokenizer.json``) is refused with an error that names the
file and what is allowed, before any library parses it.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where tensors are read, so the YAML reader loads without it
    import torch

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt", ".tar")
SAFETENSORS_ALLOWED = ("allowed: safetensors tensor files (*.safetensors; convert a PyTorch file you trust with "
                       "torch.load(path, weights_only=True) and safetensors.torch.save_file)")
NEVER_UNPICKLED = "tide never unpickles files (unpickling can run arbitrary code)"

_ZIP_MAGIC = b"PK\x03\x04"


def pickle_kind(path: str | os.PathLike) -> str | None:
    """What pickle-based format the file at ``path`` is, or None if it is not one.

    Looks at the first bytes only: a pickle stream (protocol 2..5, what ``pickle.dump``
    and legacy ``torch.save`` write), a zip archive (``torch.save``'s default format:
    ``data.pkl`` inside), or -- for a file whose content says nothing -- a pickle-style
    suffix (``.pt``, ``.pth``, ``.bin``, ``.pkl``, ``.ckpt``).
    """
    p = Path(path)
    try:
        with open(p, "rb") as f:
            head = f.read(16)
    except OSError:
        return None
    if len(head) >= 9 and head[8:9] == b"{":  # safetensors: u64 header length, then a JSON header
        return None
    if head.startswith(_ZIP_MAGIC):
        return "a zip archive (torch.save's format: its tensors are pickled)"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return f"a pickle (protocol {head[1]}; e.g. pickle.dump or legacy torch.save)"
    if p.suffix.lower() in PICKLE_SUFFIXES:
        return f"a {p.suffix} file (a pickle-based PyTorch/pickle format)"
    return None


def refuse_pickle(path: str | os.PathLike, allowed: str) -> None:
    """Raise ValueError if ``path`` is a pickle-based file (see :func:`pickle_kind`).

    Args:
        path: the file about to be read.
        allowed: what the caller reads instead, for the message (e.g.
            ``SAFETENSORS_ALLOWED`` or ``"allowed: a tokenizers JSON file (tokenizer.json)"``).

    Raises:
        ValueError: ``"<path>: refused: it is <kind>; tide never unpickles ...; <allowed>"``.
    """
    kind = pickle_kind(path)
    if kind is not None:
        raise ValueError(f"{path}: refused: it is {kind}; {NEVER_UNPICKLED}; {allowed}")


def load_safetensors(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file (``safetensors.torch.load_file``), pickles refused.

    Raises:
        ValueError: the file is pickle-based (named, with what is allowed), or not a
            readable safetensors file (truncated or corrupt).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    refuse_pickle(path, SAFETENSORS_ALLOWED)
    try:
        return load_file(str(path), device=str(device))
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}; "
                         f"{SAFETENSORS_ALLOWED}") from None


@contextmanager
def open_safetensors(path: str | os.PathLike, *, device: str | torch.device = "cpu"):
    """``safetensors.safe_open(path, framework="pt")`` with pickles refused and errors named.

    Raises:
        ValueError: as :func:`load_safetensors`.
    """
    from safetensors import SafetensorError, safe_open

    refuse_pickle(path, SAFETENSORS_ALLOWED)
    try:
        sf = safe_open(str(path), framework="pt", device=str(device))
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}; "
                         f"{SAFETENSORS_ALLOWED}") from None
    with sf:
        try:
            yield sf
        except SafetensorError as e:
            raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}; "
                             f"{SAFETENSORS_ALLOWED}") from None


def prepare_tensors(tensors: dict, what: str) -> dict:
    """CPU, contiguous tensors with no two sharing storage (what safetensors writes), cloned only where needed.

    Raises:
        TypeError: ``tensors`` is not a ``dict[str, Tensor]`` (``what`` names it).
    """
    import torch

    if not isinstance(tensors, dict):
        raise TypeError(f"{what} must be a dict[str, Tensor], got {type(tensors).__name__}")
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"{what}: key {name!r} is not a str")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}: {name!r} is a {type(t).__name__}, not a Tensor")
        t = t.detach()
        if t.device.type != "cpu":
            t = t.to("cpu")  # a fresh storage
        ptr = t.untyped_storage().data_ptr()
        if not t.is_contiguous() or (ptr != 0 and ptr in seen):
            t = t.clone(memory_format=torch.contiguous_format)
            ptr = t.untyped_storage().data_ptr()
        if ptr != 0:
            seen.add(ptr)
        out[name] = t
    return out


def file_digest(path: str | os.PathLike, chunk: int = 8 << 20) -> tuple[int, str]:
    """``(size in bytes, sha256 hex)`` of a file, read in chunks."""
    import hashlib

    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            size += len(block)
    return size, h.hexdigest()


def write_safetensors(path: str | os.PathLike, tensors: dict, *, mode: int = 0o644) -> tuple[int, str]:
    """Write ``tensors`` to a new safetensors file, fsynced; return its ``(size, sha256)``.

    The digest is computed by reading the file back (what a later reader will see).
    Raises:
        FileExistsError: ``path`` exists.
        TypeError: as :func:`prepare_tensors`.
        OSError: the write failed (the partial file is removed).
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists")
    prepared = prepare_tensors(tensors, str(path))
    try:
        save_file(prepared, str(path))
        os.chmod(path, mode)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return file_digest(path)


YAML_ALLOWED = ("allowed: plain YAML only (mappings, lists, strings, numbers, booleans, null; read with "
                "yaml.safe_load): tags that build Python objects such as !!python/object are refused")


def yaml_refusal_hint(e: Exception) -> str:
    """For a ``yaml.YAMLError``: ``"; <what is allowed>"`` when a tag was refused, else ``""``."""
    import yaml

    return f"; {YAML_ALLOWED}" if isinstance(e, yaml.constructor.ConstructorError) else ""


def yaml_loader():
    """The ``yaml.SafeLoader`` subclass :func:`read_yaml` uses: duplicate keys refused (with the
    lines of both), YAML 1.2 floats such as ``1e-6`` read as floats (PyYAML: a string)."""
    import yaml

    class DuplicateKeyError(yaml.MarkedYAMLError):
        """A key given twice in one mapping (not a refused tag: no hint about tags)."""

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen: dict = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                try:
                    first = seen.get(key)
                except TypeError:  # unhashable key: SafeLoader reports it
                    continue
                if first is not None:
                    raise DuplicateKeyError(
                        "while constructing a mapping", node.start_mark,
                        f"duplicate key {key!r} (first given on line {first.line + 1})", key_node.start_mark)
                seen[key] = key_node.start_mark
            return super().construct_mapping(node, deep=deep)

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"))
    return Loader


def yaml_error_line(e: Exception) -> str:
    """A ``yaml.YAMLError`` as one line: the problem and, when known, where (1-based)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None)
    if mark is not None:
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem or 'syntax error'}"
    if getattr(e, "position", None) is not None and getattr(e, "reason", None):  # yaml.reader.ReaderError
        return f"character {e.position}: {e.reason} ({e.character!r})"
    return " ".join(str(e).split())


def parse_yaml(text: str, where: str) -> Any:
    """Parse YAML ``text`` with :func:`yaml_loader`; ``where`` names it in errors.

    Raises:
        ValueError: ``"<where>: not valid YAML: line L, column C: <problem>"`` -- a syntax error,
            a duplicate key (``duplicate key 'racks' (first given on line 3)``), or a tag that
            would build a Python object (with what is allowed).
    """
    import yaml

    try:
        return yaml.load(text, Loader=yaml_loader())  # a SafeLoader subclass: no object tags
    except yaml.YAMLError as e:
        raise ValueError(f"{where}: not valid YAML: {yaml_error_line(e)}{yaml_refusal_hint(e)}") from None


def read_yaml(path: str | os.PathLike, what: str) -> Any:
    """Read the YAML file ``path`` (a ``what``: "training config", "topology", ...) with :func:`parse_yaml`.

    Raises:
        ValueError: naming the file: missing or not a regular file, not UTF-8 text (e.g. a
            pickle), or invalid YAML as :func:`parse_yaml`.
    """
    return parse_yaml(read_text(path, what, f"(a {what} is YAML); {YAML_ALLOWED}"), str(path))


def read_text(path: str | os.PathLike, what: str, allowed: str) -> str:
    """The UTF-8 text of the config file ``path`` (a ``what``).

    Raises:
        ValueError: missing or not a regular file, not UTF-8 text (a pickle, say: the message
            ends with ``allowed``), unreadable -- naming the file.
    """
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{what} {p} does not exist")
    if not p.is_file():
        raise ValueError(f"{what} {p} is not a regular file")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{p}: not a UTF-8 text file (byte {e.start}: {e.reason}), refused {allowed}") from None
    except OSError as e:
        raise ValueError(f"cannot read {what} {p}: {e.strerror or e}") from None


def read_yaml_mapping(source: str | os.PathLike | dict, what: str) -> tuple[dict, str]:
    """A YAML file holding a mapping, or a dict already parsed -> ``(mapping, name for messages)``.

    Raises:
        ValueError: as :func:`read_yaml`, or the file does not hold a mapping at the top level.
    """
    if isinstance(source, dict):
        return dict(source), what
    data = read_yaml(source, what)
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a mapping at the top level (a {what})")
    return data, str(source)
