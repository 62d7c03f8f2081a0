"""Z3 proofs that a kernel's memory accesses stay in bounds and its stores write every element once.

A *kernel model* (``kernels/verify/<op>.py``) describes one launch symbolically: the
shape parameters and their declared range, the program ids and ``tl.arange`` lanes (each
a variable with its range), loop iterations, and every ``tl.load`` / ``tl.store`` as an
``Access`` whose logical index, flat offset and mask come from calling the kernel's own
``@triton.jit`` index helpers on ``Sym`` values (``kernels.verify.sym``). For every shape
in the declared range -- not just test shapes -- ``prove`` checks:

- **bounds**: an unmasked lane's logical index lies inside the tensor, its flat offset is
  the row-major offset of that index and lies in ``[0, numel)``, the offset fits the
  integer width it is computed in (int32 unless widened with ``.to(tl.int64)``), and so
  does every int32 intermediate of the index arithmetic;
- **exactly once** (stores): two different lanes never write the same element
  (injectivity), and every element is written by some lane (coverage, via the store's
  ``inverse``: the lane that should write a given element is computed and checked).

Each obligation is a Z3 query whose negation must be unsatisfiable; a satisfiable one
yields a counterexample (the shape and lanes) in the ``Result``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import z3

from .sym import Sym, collecting, sym

INT32_MAX = 2 ** 31 - 1
INT64_MAX = 2 ** 63 - 1


@dataclass
class Var:
    """A symbolic integer ranging over ``[lo, hi)`` (``hi`` may be symbolic), optionally a multiple of ``step``."""

    name: str
    lo: object
    hi: object
    step: int = 1
    per: tuple[str, ...] = ()  # a data-dependent value fixed per program: equal when these lanes are
    z: z3.ArithRef = field(init=False)

    def __post_init__(self):
        self.z = z3.Int(self.name)

    @property
    def s(self) -> Sym:
        return Sym(self.z)

    def constraint(self, z=None):
        z = self.z if z is None else z
        c = [z >= _t(self.lo), z < _t(self.hi)]
        if self.step != 1:
            c.append((z - _t(self.lo)) % self.step == 0)
        return z3.And(*c)


def _t(x):
    return sym(x).t


@dataclass
class Access:
    """One ``tl.load`` / ``tl.store`` of a kernel model.

    ``index`` / ``shape``: the element's logical index and the tensor's extents (same
    length); ``offset``: the flat offset the kernel computes; ``mask``: the lane's mask
    (None: unmasked). ``lanes``: the lane variables the access runs over (a store after a
    loop does not run over the loop's iterations). Stores also give ``inverse(index) ->
    {lane name: expr}`` for those lanes: the lane that must write a given element
    (for the coverage proof).
    """

    name: str
    kind: str
    index: tuple
    shape: tuple
    offset: Sym
    mask: Sym | None = None
    inverse: Callable | None = None
    lanes: tuple[str, ...] | None = None  # the lane variables this access runs over (None: all)
    tensor: str | None = None  # stores into the same tensor from several accesses: its name (default: name)
    region: Callable | None = None  # the part of the tensor this store must cover: region(*index) -> Sym bool


@dataclass
class Model:
    """A kernel launch: ``params`` (shape variables, with ``assume`` their declared range),
    ``lanes`` (program ids, aranges, loop iterations), ``accesses``; built by a function
    of the params' ``Sym`` values (``build(p) -> list[Access]``)."""

    name: str
    params: list[Var]
    assume: Callable
    lanes: Callable
    build: Callable
    declared: str = ""


@dataclass
class Result:
    kernel: str
    access: str
    check: str
    ok: bool
    seconds: float
    counterexample: dict | None = None

    def __str__(self):
        s = f"{self.kernel}: {self.access}: {self.check}: {'proved' if self.ok else 'FAILED'} ({self.seconds:.2f} s)"
        if self.counterexample:
            s += f" counterexample {self.counterexample}"
        return s


def _solve(constraints, names: dict, timeout_ms: int) -> tuple[bool, dict | None]:
    """True when ``constraints`` are unsatisfiable (the obligation holds)."""
    s = z3.Solver()
    s.set("timeout", timeout_ms)
    s.add(*constraints)
    r = s.check()
    if r == z3.unsat:
        return True, None
    if r == z3.unknown:
        return False, {"solver": f"unknown ({s.reason_unknown()})"}
    m = s.model()
    return False, {k: m.eval(v, model_completion=True).as_long() for k, v in names.items()}


def prove(model: Model, timeout_ms: int = 60_000) -> list[Result]:
    """Run every obligation of ``model``; one ``Result`` per (access, check)."""
    P = {v.name: v for v in model.params}
    ps = {k: v.s for k, v in P.items()}
    base = [v.constraint() for v in P.values()] + [_t(c) for c in model.assume(ps)]
    lanes: list[Var] = model.lanes(ps)
    lane_c = [v.constraint() for v in lanes]
    with collecting() as int32_terms:
        accesses: list[Access] = model.build(ps, {v.name: v.s for v in lanes})
    names = {**{k: v.z for k, v in P.items()}, **{v.name: v.z for v in lanes}}
    out = []
    seen = set()
    for t in int32_terms:  # every int32 intermediate of the index arithmetic fits int32
        key = str(t)
        if key in seen or not z3.is_expr(t) or z3.is_int_value(z3.simplify(t)):
            continue
        seen.add(key)
        t0 = time.perf_counter()
        ok, cex = _solve(base + lane_c + [z3.Or(t > INT32_MAX, t < -INT32_MAX - 1)], names, timeout_ms)
        if not ok:
            out.append(Result(model.name, f"int32 arithmetic {key}", "fits int32", ok,
                              time.perf_counter() - t0, cex))
    n_terms = len(seen)
    out.append(Result(model.name, f"{n_terms} int32 intermediate(s)", "fit int32",
                      all(r.ok for r in out), 0.0, None))

    def run(acc, check, constraints, extra_names=None):
        t0 = time.perf_counter()
        ok, cex = _solve(constraints, {**names, **(extra_names or {})}, timeout_ms)
        out.append(Result(model.name, f"{acc.kind} {acc.name}", check, ok, time.perf_counter() - t0, cex))

    stores: dict[str, list[Access]] = {}
    for acc in accesses:
        if acc.kind == "store":
            stores.setdefault(acc.tensor or acc.name, []).append(acc)
        mask = [_t(acc.mask)] if acc.mask is not None else []
        inside = z3.And(*[z3.And(_t(i) >= 0, _t(i) < _t(n)) for i, n in zip(acc.index, acc.shape, strict=True)])
        run(acc, "index in bounds", base + lane_c + mask + [z3.Not(inside)])
        numel = 1
        for n in acc.shape:
            numel = numel * _t(n)
        off = _t(acc.offset)
        limit = INT64_MAX if acc.offset.wide else INT32_MAX
        run(acc, "offset in [0, numel)", base + lane_c + mask + [z3.Not(z3.And(off >= 0, off < numel))])
        run(acc, f"offset fits int{64 if acc.offset.wide else 32}", base + lane_c + mask + [off > limit])
        lin = _t(acc.index[0])
        for i, n in zip(acc.index[1:], acc.shape[1:], strict=True):
            lin = lin * _t(n) + _t(i)
        run(acc, "offset is the row-major offset of the index", base + lane_c + mask + [off != lin])
        if acc.kind != "store":
            continue
        own = [v for v in lanes if acc.lanes is None or v.name in acc.lanes]
        unknown = sorted(set(acc.lanes or ()) - {v.name for v in lanes})
        if unknown:
            raise ValueError(f"{model.name}: {acc.name} names unknown lanes {unknown}")
        # injectivity: a second copy of the access's lane variables
        twin = {v.name: z3.Int(v.name + "'") for v in own}
        sub = [(v.z, twin[v.name]) for v in own]
        twin_c = [v.constraint(twin[v.name]) for v in own]
        differ = z3.Or(*[v.z != twin[v.name] for v in own])
        same = z3.And(*[_t(i) == z3.substitute(_t(i), *sub) for i in acc.index])
        mask2 = [z3.substitute(m, *sub) for m in mask]
        run(acc, "no element written twice", base + lane_c + twin_c + mask + mask2 + [differ, same],
            {k + "'": v for k, v in twin.items()})
        # coverage: for any element, the inverse names a valid lane that writes it
        if acc.inverse is None:
            out.append(Result(model.name, f"{acc.kind} {acc.name}", "every element written", False, 0.0,
                              {"model": "no inverse given"}))
            continue
        e = [z3.Int(f"e{d}") for d in range(len(acc.index))]
        e_in = [z3.And(x >= 0, x < _t(n)) for x, n in zip(e, acc.shape, strict=True)]
        if acc.region is not None:
            e_in.append(_t(acc.region(*[Sym(x) for x in e])))
        inv = {k: _t(v) for k, v in acc.inverse(*[Sym(x) for x in e]).items()}
        missing = sorted(set(v.name for v in own) - set(inv))
        if missing:
            raise ValueError(f"{model.name}: inverse of {acc.name} does not give lanes {missing}")
        at = [(v.z, inv[v.name]) for v in own]
        writes = z3.And(*[v.constraint(inv[v.name]) for v in own],
                        *[z3.substitute(m, *at) for m in mask],
                        *[z3.substitute(_t(i), *at) == x for i, x in zip(acc.index, e, strict=True)])
        run(acc, "every element written", base + e_in + [z3.Not(writes)], {f"e{d}": x for d, x in enumerate(e)})
    for tensor, accs in stores.items():  # several stores into one tensor: their regions partition it
        if len(accs) < 2:
            continue
        e = [z3.Int(f"e{d}") for d in range(len(accs[0].index))]
        e_in = [z3.And(x >= 0, x < _t(n)) for x, n in zip(e, accs[0].shape, strict=True)]
        regions = [_t(a.region(*[Sym(x) for x in e])) if a.region else z3.BoolVal(True) for a in accs]
        t0 = time.perf_counter()
        ok, cex = _solve(base + e_in + [z3.Not(z3.Or(*regions))], {**names, **{f"e{d}": x for d, x in enumerate(e)}},
                         timeout_ms)
        out.append(Result(model.name, f"stores into {tensor}", "regions cover the tensor", ok,
                          time.perf_counter() - t0, cex))
        for x in range(len(accs)):
            for y in range(x + 1, len(accs)):
                a, b = accs[x], accs[y]
                twin = {v.name: z3.Int(v.name + "'") for v in lanes}
                sub = [(v.z, twin[v.name]) for v in lanes]
                cond = base + lane_c + [v.constraint(twin[v.name]) for v in lanes]
                by = {v.name: v for v in lanes}
                cond += [z3.Implies(z3.And(*[by[q].z == twin[q] for q in v.per]), v.z == twin[v.name])
                         for v in lanes if v.per]
                cond += [_t(a.mask)] if a.mask is not None else []
                cond += [z3.substitute(_t(b.mask), *sub)] if b.mask is not None else []
                cond += [_t(i) == z3.substitute(_t(k), *sub) for i, k in zip(a.index, b.index, strict=True)]
                t0 = time.perf_counter()
                ok, cex = _solve(cond, {**names, **{k + "'": v for k, v in twin.items()}}, timeout_ms)
                out.append(Result(model.name, f"stores into {tensor}", f"{a.name} and {b.name} disjoint", ok,
                                  time.perf_counter() - t0, cex))
    return out
