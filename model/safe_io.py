"""Secure file loading: tensors only from safetensors, never anything unpickled.

Unpickling a file runs whatever code its author put in it (a ``__reduce__`` that calls
``os.system``), and ``torch.save``'s ``.pt`` / ``.pth`` / ``.bin`` files are pickles
(the newer ones inside a zip archive). So tide reads:

- tensors only from safetensors files (:func:`load_safetensors`, :func:`open_safetensors`);
- configs, manifests and metadata only as JSON or YAML through ``yaml.safe_load`` (or a
  ``yaml.SafeLoader`` subclass), which refuses tags that build Python objects
  (``!!python/object/apply:os.system``);
- tokenizers only as ``tokenizers`` JSON files; token caches only as ``.npy`` with
  ``allow_pickle=False``.

:func:`refuse_pickle` sniffs a file's first bytes, so a pickle handed in under any name
(``model.safetensors``, ``tokenizer.json``) is refused with an error that names the
file and what is allowed, before any library parses it.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

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


YAML_ALLOWED = ("allowed: plain YAML only (mappings, lists, strings, numbers, booleans, null; read with "
                "yaml.safe_load): tags that build Python objects such as !!python/object are refused")


def yaml_refusal_hint(e: Exception) -> str:
    """For a ``yaml.YAMLError``: ``"; <what is allowed>"`` when a tag was refused, else ``""``."""
    import yaml

    return f"; {YAML_ALLOWED}" if isinstance(e, yaml.constructor.ConstructorError) else ""
