"""Symbolic integers for proving a kernel's index arithmetic with Z3.

A kernel's index expressions live in small ``@triton.jit`` helpers (``kernels/<op>.py``)
written with ``+ - * // %``, comparisons, ``&`` / ``|`` of masks, ``[:, None]``
broadcasting and ``.to(tl.int64)``. The kernel calls them on ``tl.program_id`` /
``tl.arange`` values; the proofs call the *same* Python functions (``helper.fn``) on
``Sym`` values wrapping Z3 terms: a program id is a variable in ``[0, grid)``, a lane of
``tl.arange(0, B)`` a variable in ``[0, B)``. Broadcasting needs no work: every lane is
its own variable, so ``x[:, None]`` is ``x``.

``Sym`` also tracks the integer width an expression is computed in (int32 unless an
operand went through ``.to(tl.int64)``), so a proof can check that no offset overflows.
"""

from __future__ import annotations

import contextlib

import z3


def _term(x):
    if isinstance(x, Sym):
        return x.t
    if isinstance(x, bool):
        return z3.BoolVal(x)
    if isinstance(x, int):
        return z3.IntVal(x)
    return x


def _wide(*xs) -> bool:
    return any(isinstance(x, Sym) and x.wide for x in xs)


# int32 intermediate results of index arithmetic, collected while a kernel model is built
# (``collecting()``), so that the proofs can check none of them overflows.
_collectors: list[list] = []


@contextlib.contextmanager
def collecting():
    """Collect every int32 arithmetic result computed with ``Sym``s inside the block (yields the list)."""
    terms: list = []
    _collectors.append(terms)
    try:
        yield terms
    finally:
        _collectors.pop()


def _arith(t, wide: bool) -> Sym:
    out = Sym(t, wide)
    if not wide and _collectors:
        _collectors[-1].append(t)
    return out


class Sym:
    """A Z3 integer or boolean term with Triton-like operators (see module docstring).

    ``//`` and ``%`` follow C / Triton semantics (truncation toward zero) for the
    non-negative operands index arithmetic uses; the proofs constrain operands >= 0
    where that matters.
    """

    __slots__ = ("t", "wide")

    def __init__(self, t, wide: bool = False):
        self.t = t
        self.wide = wide

    # --- arithmetic
    def __add__(self, o):
        return _arith(self.t + _term(o), _wide(self, o))

    __radd__ = __add__

    def __sub__(self, o):
        return _arith(self.t - _term(o), _wide(self, o))

    def __rsub__(self, o):
        return _arith(_term(o) - self.t, _wide(self, o))

    def __mul__(self, o):
        return _arith(self.t * _term(o), _wide(self, o))

    __rmul__ = __mul__

    def __floordiv__(self, o):
        return _arith(self.t / _term(o), _wide(self, o))  # z3 Int division (operands >= 0 here)

    def __rfloordiv__(self, o):
        return _arith(_term(o) / self.t, _wide(self, o))

    def __mod__(self, o):
        return _arith(self.t % _term(o), _wide(self, o))

    def __neg__(self):
        return Sym(-self.t, self.wide)

    # --- comparisons -> boolean Sym
    def __lt__(self, o):
        return Sym(self.t < _term(o))

    def __le__(self, o):
        return Sym(self.t <= _term(o))

    def __gt__(self, o):
        return Sym(self.t > _term(o))

    def __ge__(self, o):
        return Sym(self.t >= _term(o))

    def __eq__(self, o):  # noqa: D105 - symbolic, like a Triton tensor
        return Sym(self.t == _term(o))

    def __ne__(self, o):
        return Sym(self.t != _term(o))

    __hash__ = None

    # --- masks
    def __and__(self, o):
        return Sym(z3.And(self.t, _term(o)))

    __rand__ = __and__

    def __or__(self, o):
        return Sym(z3.Or(self.t, _term(o)))

    __ror__ = __or__

    def __invert__(self):
        return Sym(z3.Not(self.t))

    # --- tensor-isms that do not change a lane's value
    def __getitem__(self, _):
        return self

    def to(self, dtype, **_):
        return Sym(self.t, wide=self.wide or "64" in str(dtype))

    def __bool__(self):
        raise TypeError("a symbolic value has no truth value: use & / | and keep Python `if`s out of index helpers")

    def __repr__(self):
        return f"Sym({self.t}{', int64' if self.wide else ''})"


def sym(x) -> Sym:
    """Wrap an int or Z3 term."""
    return x if isinstance(x, Sym) else Sym(_term(x))
