"""Z3 model of the sparse attention forward kernel's index arithmetic (``kernels/sparse_attention.py``).

Declared range: batch ``B`` in ``[1, 1024]``, sequence ``S`` in ``[1, 2^20]``, a query chunk of
``Q`` rows starting at ``q_start`` (``q_start + Q <= S``, as the launcher checks), compressed
entries ``T`` in ``[0, 2^18]``, picks ``K`` in ``[0, 2048]``, compress rates 4 (dense CSA),
8 and 128 (HCA); heads x head dim and window of each flavor. A picked entry id comes from the
indexer (data): the kernel masks ids outside ``[0, T)`` itself, so it is a free variable here.
"""

from __future__ import annotations

import z3

from .prove import Access, Model, Var
from .sym import Sym

B_MAX = 1 << 10
S_MAX = 1 << 20
Q_MAX = 1 << 17
T_MAX = 1 << 18
K_MAX = 2048
SHAPES = ((4, 64, 32), (8, 128, 128), (64, 512, 128), (128, 512, 128), (4, 64, 16))  # (heads, head_dim, window)


def default_helpers() -> dict:
    from kernels import sparse_attention

    return {name: getattr(sparse_attention, name).fn for name in ("seq_tile", "head_rows", "pick_offset")}


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def model(H: int, D: int, window: int, mode: int, rate: int = 128, helpers: dict | None = None) -> Model:
    """``sparse_attn_fwd_kernel`` (MODE ``mode``; compress rate ``rate`` for MODE 2) on ``(Q, B)`` programs."""
    h_ = helpers or default_helpers()
    HP, DP = max(16, _pow2(H)), max(16, _pow2(D))
    BN = min(64, max(16, _pow2(window)))
    params = [Var("B", 1, B_MAX + 1), Var("S", 1, S_MAX + 1), Var("Q", 1, Q_MAX + 1), Var("q_start", 0, S_MAX),
              Var("T", 0, T_MAX + 1), Var("K", 0, K_MAX + 1)]

    def assume(p):
        return [p["q_start"] + p["Q"] <= p["S"]]

    def lanes(p):
        return [Var("i", 0, p["Q"]), Var("b", 0, p["B"]), Var("h", 0, HP), Var("dd", 0, DP),
                Var("w0", 0, 2 * window, BN), Var("ln", 0, BN), Var("k0", 0, p["K"], BN),
                Var("e0", 0, p["T"], BN)]

    def build(p, L):
        B, S, Q, T, K = p["B"], p["S"], p["Q"], p["T"], p["K"]
        i, b, h, dd = L["i"], L["b"], L["h"], L["dd"]
        t = p["q_start"] + i
        out = []
        qo, qm = h_["head_rows"](b, i, Q, h, H, dd, D, h < H, dd < D)
        out.append(Access("q [B, Q, H, D]", "load", (b, i, h, dd), (B, Q, H, D), qo, qm))
        do, _ = h_["pick_offset"](b, 0, 1, S, t, True)
        out.append(Access("doc_ids (query) [B, S]", "load", (b, t), (B, S), do))
        pw = t - window + 1 + L["w0"] + L["ln"]
        ok = (pw >= 0) & (pw <= t) & (L["w0"] + L["ln"] < window)
        do, dm = h_["pick_offset"](b, 0, 1, S, pw, ok)
        out.append(Access("doc_ids (window) [B, S]", "load", (b, pw), (B, S), do, dm))
        ko, km = h_["seq_tile"](b, pw, S, dd, D, ok, dd < D)
        out.append(Access("kv window [B, S, D]", "load", (b, pw, dd), (B, S, D), ko, km))
        if mode == 1:
            j = L["k0"] + L["ln"]
            io, im = h_["pick_offset"](b, i, Q, K, j, j < K)
            out.append(Access("idx / valid [B, Q, K]", "load", (b, i, j), (B, Q, K), io, im))
            e = Sym(z3.Int("picked_entry"))  # a value read from idx
            ok = (e >= 0) & (e < T)
            ko, km = h_["seq_tile"](b, e, T, dd, D, ok, dd < D)
            out.append(Access("comp (picked) [B, T, D]", "load", (b, e, dd), (B, T, D), ko, km))
        if mode == 2:
            e = L["e0"] + L["ln"]
            lim = (t + 1) // rate
            limit = Sym(z3.If(lim.t < T.t, lim.t, T.t))
            ok = e < limit
            do, dm = h_["pick_offset"](b, 0, 1, T, e, ok)
            out.append(Access("entry_doc [B, T]", "load", (b, e), (B, T), do, dm))
            ko, km = h_["seq_tile"](b, e, T, dd, D, ok, dd < D)
            out.append(Access("comp (visible) [B, T, D]", "load", (b, e, dd), (B, T, D), ko, km))
        out.append(Access("sinks [H]", "load", (h,), (H,), h, h < H))
        oo, om = h_["head_rows"](b, i, Q, h, H, dd, D, h < H, dd < D)
        out.append(Access("out [B, Q, H, D]", "store", (b, i, h, dd), (B, Q, H, D), oo, om,
                          lambda eb, ei, eh, ed: {"b": eb, "i": ei, "h": eh, "dd": ed}, ("i", "b", "h", "dd")))
        lo, lm = h_["pick_offset"](b, i, Q, H, h, h < H)
        out.append(Access("lse [B, Q, H]", "store", (b, i, h), (B, Q, H), lo, lm,
                          lambda eb, ei, eh: {"b": eb, "i": ei, "h": eh}, ("i", "b", "h")))
        return out

    name = {0: "SWA", 1: "CSA", 2: f"dense M={rate}"}[mode]
    return Model(f"sparse_attn_fwd_kernel {name} H={H} D={D} W={window}", params, assume, lanes, build,
                 f"B <= {B_MAX}, q_start + Q <= S <= {S_MAX}, T <= {T_MAX}, K <= {K_MAX}")


def models(helpers: dict | None = None, quick: bool = False) -> list[Model]:
    out = []
    for H, D, W in (SHAPES[2:3] if quick else SHAPES):
        out += [model(H, D, W, 0, helpers=helpers), model(H, D, W, 1, helpers=helpers)]
        out += [model(H, D, W, 2, rate, helpers) for rate in ((128,) if quick else (4, 8, 128))]
    return out
