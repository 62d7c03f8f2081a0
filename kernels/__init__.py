"""Triton kernels: the optional fast path of the model.

Each op lives in ``kernels/<op>.py`` with its ``@triton.jit`` kernels (index arithmetic in
small ``@triton.jit`` helpers) and launchers; ``kernels/ops.py`` registers them as
``torch.library.custom_op``s with fake implementations (``torch.compile`` traces them)
and autograd; the torch reference (same math) lives in ``model``; a Z3 model of every
kernel's index arithmetic lives in ``kernels/verify/`` (``tide verify``).

The model calls a kernel when ``use_kernels(tensor)`` is true: the tensor is on CUDA,
Triton imports, and ``TIDE_KERNELS`` is not ``0``. On CPU the torch reference runs,
except inside ``forced()`` (tests run the kernels under ``TRITON_INTERPRET=1``).
Importing this package does not import triton.
"""

from __future__ import annotations

import contextlib
import functools
import os

_forced: list[bool] = []
_failed: dict[str, str] = {}  # kernel name -> the error that disabled it in this process


@functools.cache
def triton_available() -> bool:
    """True when Triton imports (the optional ``kernels`` extra)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_kernels(t) -> bool:
    """Whether the model should run the Triton kernels for tensor ``t`` (see module docstring)."""
    if _forced:
        return _forced[-1]
    return bool(getattr(t, "is_cuda", False)) and os.environ.get("TIDE_KERNELS", "1") != "0" and triton_available()


@contextlib.contextmanager
def forced(on: bool = True):
    """Run the kernels (``on``) or the torch references (``not on``) whatever the device."""
    _forced.append(on)
    try:
        yield
    finally:
        _forced.pop()


def run(name: str, kernel, reference):
    """``kernel()``, or ``reference()`` once ``name`` has failed in this process.

    The CUDA path of a kernel that fails to compile or launch (a Triton version or GPU it
    was never run on) is disabled with one warning naming the error, and the torch
    reference runs from then on, so a run does not die on the fast path. Inside
    ``forced()`` (tests) errors propagate.
    """
    if name not in _failed:
        try:
            return kernel()
        except Exception as e:  # noqa: BLE001 - any compile / launch failure falls back, once, loudly
            if _forced:
                raise
            import warnings

            _failed[name] = f"{type(e).__name__}: {e}"
            warnings.warn(f"tide: the Triton kernel {name!r} failed ({_failed[name][:300]}); using the torch "
                          f"reference from now on (TIDE_KERNELS=0 silences this)", RuntimeWarning, stacklevel=2)
    return reference()
