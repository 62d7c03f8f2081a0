"""Z3 models of the sparse attention kernels' index arithmetic (``kernels/sparse_attention.py``):
the forward, and the backward's query-major (dq), key-major (dkv) and entry-major (dcomp) kernels.

Declared range: batch ``B`` in ``[1, 1024]``, sequence ``S`` in ``[1, 2^20]``, a query chunk of
``Q`` rows starting at ``q_start`` (``q_start + Q <= S``, as the launcher checks), compressed
entries ``T`` in ``[0, 2^18]``, picks ``K`` in ``[0, 2048]``, compress rates 4 (dense CSA),
8 and 128 (HCA); heads x head dim and window of each flavor. A picked entry id comes from the
indexer (data): the kernel masks ids outside ``[0, T)`` itself, so it is a free variable here;
likewise the query rows of the backward's inverted index (masked to ``[0, Q)`` and to the
index's length in the kernel).
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

    return {name: getattr(sparse_attention, name).fn for name in ("seq_tile", "head_rows", "pick_offset",
                                                                    "rows_tile")}


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


def _params():
    return [Var("B", 1, B_MAX + 1), Var("S", 1, S_MAX + 1), Var("Q", 1, Q_MAX + 1), Var("q_start", 0, S_MAX),
            Var("T", 0, T_MAX + 1), Var("K", 0, K_MAX + 1)]


def _assume(p):
    return [p["q_start"] + p["Q"] <= p["S"]]


def dq_model(H: int, D: int, window: int, mode: int, rate: int = 128, helpers: dict | None = None) -> Model:
    """``sparse_attn_bwd_dq_kernel``: the forward's reads plus out / dout, and its dq, dsink, delta stores."""
    fwd = model(H, D, window, mode, rate, helpers)
    h_ = helpers or default_helpers()

    def build(p, L):
        acc = [a for a in fwd.build(p, L) if a.kind == "load"]
        B, Q = p["B"], p["Q"]
        b, i, h, dd = L["b"], L["i"], L["h"], L["dd"]
        qo, qm = h_["head_rows"](b, i, Q, h, H, dd, D, h < H, dd < D)
        lo, lm = h_["pick_offset"](b, i, Q, H, h, h < H)
        acc += [Access("out / dout [B, Q, H, D]", "load", (b, i, h, dd), (B, Q, H, D), qo, qm),
                Access("lse [B, Q, H]", "load", (b, i, h), (B, Q, H), lo, lm),
                Access("dq [B, Q, H, D]", "store", (b, i, h, dd), (B, Q, H, D), qo, qm,
                       lambda eb, ei, eh, ed: {"b": eb, "i": ei, "h": eh, "dd": ed}, ("i", "b", "h", "dd"))]
        for name in ("dsink terms", "delta"):
            acc.append(Access(f"{name} [B, Q, H]", "store", (b, i, h), (B, Q, H), lo, lm,
                              lambda eb, ei, eh: {"b": eb, "i": ei, "h": eh}, ("i", "b", "h"), name))
        return acc

    return Model(fwd.name.replace("fwd", "bwd_dq"), fwd.params, fwd.assume, fwd.lanes, build, fwd.declared)


def _row_loads(h_, p, b, i, ok, h, dd, H, D):
    off, m2, row, m1 = h_["rows_tile"](b, i, p["Q"], h, H, dd, D, ok)
    return [Access("q / dout rows [B, Q, H, D]", "load", (b, i, h, dd), (p["B"], p["Q"], H, D), off, m2),
            Access("lse / delta rows [B, Q, H]", "load", (b, i, h), (p["B"], p["Q"], H), row, m1)]


def dkv_model(H: int, D: int, window: int, helpers: dict | None = None) -> Model:
    """``sparse_attn_bwd_dkv_kernel`` on ``(S, B)`` programs (one sequence position each)."""
    h_ = helpers or default_helpers()
    HP, DP, BM = max(16, _pow2(H)), max(16, _pow2(D)), 16

    def lanes(p):
        return [Var("pos", 0, p["S"]), Var("b", 0, p["B"]), Var("m0", 0, 2 * window, BM), Var("lm", 0, BM),
                Var("h", 0, HP), Var("dd", 0, DP)]

    def build(p, L):
        B, S = p["B"], p["S"]
        b, pos, dd = L["b"], L["pos"], L["dd"]
        t = pos + L["m0"] + L["lm"]
        i = t - p["q_start"]
        ok = (L["m0"] + L["lm"] < window) & (i >= 0) & (i < p["Q"])
        ko, km = h_["seq_tile"](b, pos, S, dd, D, Sym(z3.BoolVal(True)), dd < D)
        do_, dm = h_["pick_offset"](b, 0, 1, S, t, ok)
        kd, _ = h_["pick_offset"](b, 0, 1, S, pos, True)
        return [Access("kv [B, S, D]", "load", (b, pos, dd), (B, S, D), ko, km),
                Access("doc_ids (key) [B, S]", "load", (b, pos), (B, S), kd),
                Access("doc_ids (queries) [B, S]", "load", (b, t), (B, S), do_, dm),
                *_row_loads(h_, p, b, i, ok, L["h"], dd, H, D),
                Access("dkv [B, S, D]", "store", (b, pos, dd), (B, S, D), ko, km,
                       lambda eb, ep, ed: {"b": eb, "pos": ep, "dd": ed}, ("pos", "b", "dd"))]

    return Model(f"sparse_attn_bwd_dkv_kernel H={H} D={D} W={window}", _params(), _assume, lanes, build,
                 f"B <= {B_MAX}, q_start + Q <= S <= {S_MAX}")


def dcomp_model(H: int, D: int, mode: int, rate: int = 128, helpers: dict | None = None) -> Model:
    """``sparse_attn_bwd_dcomp_kernel`` (MODE 1: inverted index; 2: every later query) on ``(T, B)`` programs."""
    h_ = helpers or default_helpers()
    HP, DP, BM = max(16, _pow2(H)), max(16, _pow2(D)), 16
    params = _params() + [Var("n_rows", 0, (1 << 31) - 1)]

    def lanes(p):
        return [Var("e", 0, p["T"]), Var("b", 0, p["B"]), Var("r", 0, (1 << 31) - 1), Var("m0", 0, p["Q"]),
                Var("lm", 0, BM), Var("h", 0, HP), Var("dd", 0, DP)]

    def build(p, L):
        B, T, Q = p["B"], p["T"], p["Q"]
        b, e, dd = L["b"], L["e"], L["dd"]
        ko, km = h_["seq_tile"](b, e, T, dd, D, Sym(z3.BoolVal(True)), dd < D)
        acc = [Access("comp [B, T, D]", "load", (b, e, dd), (B, T, D), ko, km)]
        if mode == 1:
            so, _ = h_["pick_offset"](b, 0, 1, T, e, True)
            r = L["r"]
            i = Sym(z3.Int("row_from_index"))  # a value read from the inverted index
            ok = (r < p["n_rows"]) & (i >= 0) & (i < Q)
            acc += [Access("starts [B*T + 1] (begin)", "load", (so,), (B * T + 1,), so),
                    Access("starts [B*T + 1] (end)", "load", (so + 1,), (B * T + 1,), so + 1),
                    Access("rows [n_rows]", "load", (r,), (p["n_rows"],), r, r < p["n_rows"]),
                    *_row_loads(h_, p, b, i, ok, L["h"], dd, H, D)]
        else:
            i = L["m0"] + L["lm"]
            ok = i < Q
            ed, _ = h_["pick_offset"](b, 0, 1, T, e, True)
            do_, dm = h_["pick_offset"](b, 0, 1, p["S"], p["q_start"] + i, ok)
            acc += [Access("entry_doc [B, T]", "load", (b, e), (B, T), ed),
                    Access("doc_ids (queries) [B, S]", "load", (b, p["q_start"] + i), (B, p["S"]), do_, dm),
                    *_row_loads(h_, p, b, i, ok, L["h"], dd, H, D)]
        acc.append(Access("dcomp [B, T, D]", "store", (b, e, dd), (B, T, D), ko, km,
                          lambda eb, ee, ed_: {"b": eb, "e": ee, "dd": ed_}, ("e", "b", "dd")))
        return acc

    name = "picked" if mode == 1 else f"dense M={rate}"
    return Model(f"sparse_attn_bwd_dcomp_kernel {name} H={H} D={D}", params, _assume, lanes, build,
                 f"B <= {B_MAX}, q_start + Q <= S <= {S_MAX}, T <= {T_MAX}")


def models(helpers: dict | None = None, quick: bool = False) -> list[Model]:
    out = []
    for H, D, W in (SHAPES[2:3] if quick else SHAPES):
        rates = (128,) if quick else (4, 8, 128)
        out += [model(H, D, W, 0, helpers=helpers), model(H, D, W, 1, helpers=helpers)]
        out += [model(H, D, W, 2, rate, helpers) for rate in rates]
        out += [dq_model(H, D, W, 0, helpers=helpers), dq_model(H, D, W, 1, helpers=helpers)]
        out += [dq_model(H, D, W, 2, rate, helpers) for rate in rates]
        out += [dkv_model(H, D, W, helpers), dcomp_model(H, D, 1, helpers=helpers)]
        out += [dcomp_model(H, D, 2, rate, helpers) for rate in rates]
    return out
