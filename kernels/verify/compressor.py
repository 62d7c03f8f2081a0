"""Z3 models of the compressor pooling kernels' index arithmetic (``kernels/compressor.py``).

Declared range: batch ``B`` in ``[1, 4096]``, tokens ``L`` in ``[M, 2^20]`` (the launcher
returns early without a complete block), head dim ``D`` in ``[1, 1024]``; CSA
(``overlap``, ``C = 2D``, M = 4) and HCA (``C = D``, M = 128 and the small test rates),
each channel block size the launcher picks. The loads' masks are modelled without the
data-dependent ``prev_ok`` (a weaker mask: the bounds proofs still hold).
"""

from __future__ import annotations

from .prove import Access, Model, Var

B_MAX = 1 << 12
L_MAX = 1 << 20
D_MAX = 1 << 10
CONFIGS = ((True, 4), (False, 128), (True, 8), (False, 8), (False, 16))
BLOCK_CS = (1, 8, 32, 128)


def default_helpers() -> dict:
    """The index helpers of ``kernels/compressor.py`` as plain Python functions (imports triton)."""
    from kernels import compressor

    return {name: getattr(compressor, name).fn for name in ("block_tile", "bias_tile", "entry_offset")}


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _params(M):
    return [Var("B", 1, B_MAX + 1), Var("L", M, L_MAX + 1), Var("D", 1, D_MAX + 1)]


def _loads(h, p, b, i, s, c, c_ok, M, overlap, tag):
    """The loads of ``_entry_softmax`` for entry ``i`` (``tag`` names them)."""
    L, D = p["L"], p["D"]
    C = 2 * D if overlap else D
    n = L // M
    cur = c + D if overlap else c
    off, m = h["block_tile"](b, i, s, cur, L, C, M, c_ok)
    boff, bm = h["bias_tile"](s, cur, C, M, c_ok)
    out = [Access(f"kv/gate current series {tag}", "load", (b, i * M + s, cur), (p["B"], L, C), off, m & (i < n)),
           Access(f"position_bias current {tag}", "load", (s, cur), (M, C), boff, bm)]
    if overlap:
        off, m = h["block_tile"](b, i - 1, s, c, L, C, M, c_ok)
        boff, bm = h["bias_tile"](s, c, C, M, c_ok)
        out += [Access(f"kv/gate previous block {tag}", "load", (b, (i - 1) * M + s, c), (p["B"], L, C), off,
                       m & (i > 0)),
                Access(f"position_bias previous {tag}", "load", (s, c), (M, C), boff, bm),
                Access(f"prev_ok {tag}", "load", (b, i), (p["B"], n), b * n + i, i < n)]
    return out


def forward_model(overlap: bool, M: int, BLOCK_C: int, helpers: dict | None = None) -> Model:
    """``pool_fwd_kernel`` on ``(n, cdiv(D, BLOCK_C), B)`` programs."""
    h = helpers or default_helpers()

    def lanes(p):
        n = p["L"] // M
        return [Var("pid0", 0, n), Var("pid1", 0, (p["D"] + BLOCK_C - 1) // BLOCK_C), Var("pid2", 0, p["B"]),
                Var("s", 0, _pow2(M)), Var("lc", 0, BLOCK_C)]

    def build(p, L_):
        n = p["L"] // M
        i, b = L_["pid0"], L_["pid2"]
        c = L_["pid1"] * BLOCK_C + L_["lc"]
        c_ok = c < p["D"]
        out = h["entry_offset"](b, i, n, p["D"], c)
        return _loads(h, p, b, i, L_["s"], c, c_ok, M, overlap, "") + [
            Access("pooled [B, n, D]", "store", (b, i, c), (p["B"], n, p["D"]), out, c_ok,
                   lambda eb, ei, ec: {"pid0": ei, "pid2": eb, "pid1": ec // BLOCK_C, "lc": ec % BLOCK_C},
                   ("pid0", "pid1", "pid2", "lc"))]

    kind = "CSA" if overlap else "HCA"
    return Model(f"pool_fwd_kernel {kind} M={M} BLOCK_C={BLOCK_C}", _params(M), lambda p: [], lanes, build,
                 f"B <= {B_MAX}, {M} <= L <= {L_MAX}, D <= {D_MAX}")


def backward_model(overlap: bool, M: int, BLOCK_C: int, helpers: dict | None = None) -> Model:
    """``pool_bwd_kernel`` on ``(cdiv(L, M), cdiv(D, BLOCK_C), B)`` programs."""
    h = helpers or default_helpers()

    def lanes(p):
        nb = (p["L"] + M - 1) // M
        return [Var("pid0", 0, nb), Var("pid1", 0, (p["D"] + BLOCK_C - 1) // BLOCK_C), Var("pid2", 0, p["B"]),
                Var("s", 0, _pow2(M)), Var("lc", 0, BLOCK_C)]

    def build(p, L_):
        B, L, D = p["B"], p["L"], p["D"]
        C = 2 * D if overlap else D
        n = L // M
        j, b = L_["pid0"], L_["pid2"]
        s, c = L_["s"], L_["pid1"] * BLOCK_C + L_["lc"]
        c_ok = c < D
        acc = _loads(h, p, b, j, s, c, c_ok, M, overlap, "(entry j)")
        g = h["entry_offset"](b, j, n, D, c)
        acc.append(Access("dpooled (entry j)", "load", (b, j, c), (B, n, D), g, c_ok & (j < n)))
        cur = c + D if overlap else c
        off, m = h["block_tile"](b, j, s, cur, L, C, M, c_ok)

        def inv(first):
            return lambda eb, er, ec: {"pid0": er // M, "pid2": eb, "s": er % M, "pid1": (ec - first) // BLOCK_C,
                                       "lc": (ec - first) % BLOCK_C}

        own = ("pid0", "pid1", "pid2", "s", "lc")
        for t in ("dkv", "dgate"):
            acc.append(Access(f"{t} current series", "store", (b, j * M + s, cur), (B, L, C), off, m,
                              inv(D if overlap else 0), own, t,
                              (lambda eb, er, ec: ec >= D) if overlap else None))
        if overlap:
            acc += _loads(h, p, b, j + 1, s, c, c_ok, M, overlap, "(entry j+1)")
            g1 = h["entry_offset"](b, j + 1, n, D, c)
            acc.append(Access("dpooled (entry j+1)", "load", (b, j + 1, c), (B, n, D), g1, c_ok & (j + 1 < n)))
            off, m = h["block_tile"](b, j, s, c, L, C, M, c_ok)
            for t in ("dkv", "dgate"):
                acc.append(Access(f"{t} previous-block series", "store", (b, j * M + s, c), (B, L, C), off, m,
                                  inv(0), own, t, lambda eb, er, ec: ec < D))
        return acc

    kind = "CSA" if overlap else "HCA"
    return Model(f"pool_bwd_kernel {kind} M={M} BLOCK_C={BLOCK_C}", _params(M), lambda p: [], lanes, build,
                 f"B <= {B_MAX}, {M} <= L <= {L_MAX}, D <= {D_MAX}")


def models(helpers: dict | None = None, quick: bool = False) -> list[Model]:
    """Every launch configuration of the pooling kernels (``quick``: CSA M=4 and HCA M=128, BLOCK_C=128)."""
    out = []
    for overlap, M in (CONFIGS[:2] if quick else CONFIGS):
        for bc in ((128,) if quick else BLOCK_CS):
            out += [forward_model(overlap, M, bc, helpers), backward_model(overlap, M, bc, helpers)]
    return out
