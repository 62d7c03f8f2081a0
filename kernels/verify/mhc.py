"""Z3 models of the mHC kernels' index arithmetic (``kernels/mhc.py``).

Every load and store of ``mhc_fwd_kernel`` and ``mhc_bwd_kernel`` is described with the
kernels' own index helpers (``row_lanes``, ``tile2``, ``tile3``, called on symbolic lanes),
for every shape in the declared range: token rows ``T`` in ``[1, 2^22]``, hidden ``D`` in
``[1, 16384]``, each stream count ``N`` the model allows, and each block size the
launchers pick. ``helpers`` can replace the index functions (the tests plant bugs that way).
"""

from __future__ import annotations

from .prove import Access, Model, Var

T_MAX = 1 << 22
D_MAX = 1 << 14
BLOCK_T = 16
BLOCK_KS = (16, 32, 64, 128)
BLOCK_DS = (1, 2, 4, 8, 16, 32, 64, 128)
STREAMS = (1, 2, 3, 4, 8)


def default_helpers() -> dict:
    """The index helpers of ``kernels/mhc.py`` as plain Python functions (imports triton)."""
    from kernels import mhc

    return {name: getattr(mhc, name).fn for name in ("row_lanes", "tile2", "tile3")}


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _params():
    return [Var("T", 1, T_MAX + 1), Var("D", 1, D_MAX + 1)]


def _rows(h, p, L, BT):
    return h["row_lanes"](L["pid"], L["lt"], p["T"], BT)


def forward_model(N: int, BLOCK_K: int, BLOCK_D: int, helpers: dict | None = None) -> Model:
    """``mhc_fwd_kernel`` launched on ``cdiv(T, BLOCK_T)`` programs with ``N`` streams."""
    h = helpers or default_helpers()
    NP, NC = _pow2(N), (2 + N) * N
    NCP = max(16, _pow2(NC))

    def lanes(p):
        K = p["D"] * N
        return [Var("pid", 0, (p["T"] + BLOCK_T - 1) // BLOCK_T), Var("lt", 0, BLOCK_T),
                Var("k0", 0, K, BLOCK_K), Var("lk", 0, BLOCK_K), Var("o", 0, NCP),
                Var("j", 0, NP), Var("j2", 0, NP), Var("d0", 0, p["D"], BLOCK_D), Var("ld", 0, BLOCK_D)]

    def build(p, L):
        T, D = p["T"], p["D"]
        K = D * N
        rows, rmask = _rows(h, p, L, BLOCK_T)
        k = L["k0"] + L["lk"]
        o, j, j2, d = L["o"], L["j"], L["j2"], L["d0"] + L["ld"]
        xo, xm = h["tile2"](rows, rmask, K, k, k < K, 1)
        wo, wm = h["tile2"](k, k < K, 1, o, o < NC, K)
        mo, mm = h["tile2"](rows, rmask, NC, o, o < NC, 1)
        po, pm = h["tile2"](rows, rmask, N, j, j < N, 1)
        co, cm = h["tile3"](rows, rmask, N * N, j, j < N, N, j2, j2 < N, 1)
        x3o, x3m = h["tile3"](rows, rmask, K, j, j < N, D, d, d < D, 1)
        oo, om = h["tile2"](rows, rmask, D, d, d < D, 1)

        def row_inv(r):
            return {"pid": r // BLOCK_T, "lt": r % BLOCK_T}

        return [
            Access("X [T, N*D] (projection)", "load", (rows, k), (T, K), xo, xm),
            Access("fn^T [N*D, NC]", "load", (o, k), (NC, K), wo, wm),
            Access("mix [T, NC]", "store", (rows, o), (T, NC), mo, mm, lambda r, c: {**row_inv(r), "o": c},
                   ("pid", "lt", "o")),
            Access("rstd [T]", "store", (rows,), (T,), rows, rmask, row_inv, ("pid", "lt")),
            Access("base [NC]", "load", (o,), (NC,), o, o < NC),
            Access("post [T, N]", "store", (rows, j), (T, N), po, pm, lambda r, c: {**row_inv(r), "j": c},
                   ("pid", "lt", "j")),
            Access("comb [T, N, N]", "store", (rows, j, j2), (T, N, N), co, cm,
                   lambda r, a, b: {**row_inv(r), "j": a, "j2": b}, ("pid", "lt", "j", "j2")),
            Access("X [T, N, D] (collapse)", "load", (rows, j, d), (T, N, D), x3o, x3m),
            Access("out [T, D]", "store", (rows, d), (T, D), oo, om,
                   lambda r, c: {**row_inv(r), "d0": c - c % BLOCK_D, "ld": c % BLOCK_D}, ("pid", "lt", "d0", "ld")),
        ]

    return Model(f"mhc_fwd_kernel N={N} BLOCK_K={BLOCK_K} BLOCK_D={BLOCK_D}", _params(), lambda p: [], lanes,
                 build, f"T <= {T_MAX}, D <= {D_MAX}")


def backward_model(N: int, BLOCK_D: int, helpers: dict | None = None) -> Model:
    """``mhc_bwd_kernel`` launched on ``cdiv(T, BLOCK_T)`` programs with ``N`` streams."""
    h = helpers or default_helpers()
    NP, NC = _pow2(N), (2 + N) * N
    NCP = max(16, _pow2(NC))

    def lanes(p):
        return [Var("pid", 0, (p["T"] + BLOCK_T - 1) // BLOCK_T), Var("lt", 0, BLOCK_T), Var("o", 0, NCP),
                Var("j", 0, NP), Var("j2", 0, NP), Var("d0", 0, p["D"], BLOCK_D), Var("ld", 0, BLOCK_D)]

    def build(p, L):
        T, D = p["T"], p["D"]
        K = D * N
        rows, rmask = _rows(h, p, L, BLOCK_T)
        o, j, j2, d = L["o"], L["j"], L["j2"], L["d0"] + L["ld"]
        mo, mm = h["tile2"](rows, rmask, NC, o, o < NC, 1)
        go, gm = h["tile2"](rows, rmask, D, d, d < D, 1)
        xo, xm = h["tile3"](rows, rmask, K, j, j < N, D, d, d < D, 1)
        po, pm = h["tile2"](rows, rmask, N, j, j < N, 1)
        co, cm = h["tile3"](rows, rmask, N * N, j, j < N, N, j2, j2 < N, 1)

        def row_inv(r):
            return {"pid": r // BLOCK_T, "lt": r % BLOCK_T}

        return [
            Access("mix [T, NC]", "load", (rows, o), (T, NC), mo, mm),
            Access("dout [T, D]", "load", (rows, d), (T, D), go, gm),
            Access("X [T, N, D]", "load", (rows, j, d), (T, N, D), xo, xm),
            Access("dX collapse part [T, N, D]", "store", (rows, j, d), (T, N, D), xo, xm,
                   lambda r, a, c: {**row_inv(r), "j": a, "d0": c - c % BLOCK_D, "ld": c % BLOCK_D},
                   ("pid", "lt", "j", "d0", "ld")),
            Access("dpost [T, N]", "load", (rows, j), (T, N), po, pm),
            Access("dcomb [T, N, N]", "load", (rows, j, j2), (T, N, N), co, cm),
            Access("dz [T, NC]", "store", (rows, o), (T, NC), mo, mm, lambda r, c: {**row_inv(r), "o": c},
                   ("pid", "lt", "o")),
        ]

    return Model(f"mhc_bwd_kernel N={N} BLOCK_D={BLOCK_D}", _params(), lambda p: [], lanes, build,
                 f"T <= {T_MAX}, D <= {D_MAX}")


def models(helpers: dict | None = None, quick: bool = False) -> list[Model]:
    """Every launch configuration of the mHC kernels (``quick``: N = 4 with the largest blocks only)."""
    out = []
    for N in ((4,) if quick else STREAMS):
        for bk in ((128,) if quick else BLOCK_KS):
            out.append(forward_model(N, bk, 128, helpers))
        for bd in ((128,) if quick else (1, 16, 128)):
            if not quick:
                out.append(forward_model(N, 128, bd, helpers))
            out.append(backward_model(N, bd, helpers))
    return out
