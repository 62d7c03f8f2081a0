"""Z3 model of the Lightning Indexer kernel's index arithmetic (``kernels/indexer.py``).

Declared range: batch ``B`` in ``[1, 1024]``, query rows ``Q`` in ``[1, 2^17]`` (one chunk
of queries per launch), compressed entries ``T`` in ``[1, 2^18]`` (1M tokens at M = 4),
``K = min(index_topk, T)`` with ``index_topk`` in ``[1, 2048]``; the V4 shapes of heads and
head dim (64 x 128) and the test ones. The selection's output slot ``pos`` is a running
count of picked entries: that it stays below the number picked (``taken <= K``) is an
invariant of the data (the count of picks is ``min(eligible, K)``), taken here as the
declared range of the ``pos`` / ``taken`` lanes; the proof covers the rest.
"""

from __future__ import annotations

from .prove import Access, Model, Var

B_MAX = 1 << 10
Q_MAX = 1 << 17
T_MAX = 1 << 18
TOPK_MAX = 2048
SHAPES = ((64, 128), (16, 16), (4, 32), (16, 24))  # (index_n_heads, index_head_dim)
BLOCK_SS = (16, 128)


def default_helpers() -> dict:
    from kernels import indexer

    return {name: getattr(indexer, name).fn for name in ("row_tile", "key_tile", "head_tile")}


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def model(H: int, Di: int, BLOCK_S: int, BLOCK_K: int, helpers: dict | None = None) -> Model:
    """``indexer_topk_kernel`` on ``(Q, B)`` programs."""
    h = helpers or default_helpers()
    IP, DP = max(16, _pow2(H)), max(16, _pow2(Di))
    params = [Var("B", 1, B_MAX + 1), Var("Q", 1, Q_MAX + 1), Var("T", 1, T_MAX + 1), Var("topk", 1, TOPK_MAX + 1)]

    def K(p):
        from z3 import If

        from .sym import Sym

        return Sym(If(p["topk"].t < p["T"].t, p["topk"].t, p["T"].t))

    def lanes(p):
        k = K(p)
        return [Var("t", 0, p["Q"]), Var("b", 0, p["B"]), Var("h", 0, IP), Var("dd", 0, DP),
                Var("s0", 0, p["T"], BLOCK_S), Var("ls", 0, BLOCK_S), Var("taken", 0, k + 1, per=("t", "b")),
                Var("pos", 0, k), Var("k0", 0, k, BLOCK_K), Var("lk", 0, BLOCK_K)]

    def build(p, L):
        B, Q, T = p["B"], p["Q"], p["T"]
        k = K(p)
        b, t, hh, dd = L["b"], L["t"], L["h"], L["dd"]
        s = L["s0"] + L["ls"]
        qo, qm = h["head_tile"](b, t, Q, hh, H, dd, Di, hh < H, dd < Di)
        wo, wm = h["row_tile"](b, t, Q, H, hh, hh < H)
        ko, km = h["key_tile"](b, s, T, dd, Di, s < T, dd < Di)
        so, sm = h["row_tile"](b, t, Q, T, s, s < T)
        eo, em = h["row_tile"](b, 0, 1, T, s, s < T)
        qdo, _ = h["row_tile"](b, 0, 1, Q, t, True)
        pos, taken = L["pos"], L["taken"]
        po, pm = h["row_tile"](b, t, Q, k, pos, pos < taken)
        kk = L["k0"] + L["lk"]
        fo, fm = h["row_tile"](b, t, Q, k, kk, (kk < k) & (kk >= taken))
        prog = ("t", "b")
        return [
            Access("q [B, Q, H, Di]", "load", (b, t, hh, dd), (B, Q, H, Di), qo, qm),
            Access("w [B, Q, H]", "load", (b, t, hh), (B, Q, H), wo, wm),
            Access("q_pos [Q]", "load", (t,), (Q,), t),
            Access("query_doc [B, Q]", "load", (b, t), (B, Q), qdo),
            Access("keys [B, T, Di]", "load", (b, s, dd), (B, T, Di), ko, km),
            Access("scores [B, Q, T]", "store", (b, t, s), (B, Q, T), so, sm,
                   lambda eb, et, es: {"b": eb, "t": et, "s0": es - es % BLOCK_S, "ls": es % BLOCK_S},
                   prog + ("s0", "ls")),
            Access("entry_doc [B, T]", "load", (b, s), (B, T), eo, em),
            Access("idx/valid: picks", "store", (b, t, pos), (B, Q, k), po, pm,
                   lambda eb, et, ek: {"b": eb, "t": et, "pos": ek}, prog + ("pos",), "idx",
                   lambda eb, et, ek: ek < taken),
            Access("idx/valid: empty slots", "store", (b, t, kk), (B, Q, k), fo, fm,
                   lambda eb, et, ek: {"b": eb, "t": et, "k0": ek - ek % BLOCK_K, "lk": ek % BLOCK_K},
                   prog + ("k0", "lk"), "idx", lambda eb, et, ek: ek >= taken),
        ]

    return Model(f"indexer_topk_kernel H={H} Di={Di} BLOCK_S={BLOCK_S} BLOCK_K={BLOCK_K}", params, lambda p: [],
                 lanes, build, f"B <= {B_MAX}, Q <= {Q_MAX}, T <= {T_MAX}, topk <= {TOPK_MAX}")


def models(helpers: dict | None = None, quick: bool = False) -> list[Model]:
    out = []
    for H, Di in (SHAPES[:1] if quick else SHAPES):
        for bs in ((128,) if quick else BLOCK_SS):
            for bk in ((128,) if quick else (1, 128)):
                out.append(model(H, Di, bs, bk, helpers))
    return out
