"""Triton kernels vs their torch references: time, achieved bandwidth / TFLOP/s, parity, mHC's share of a layer.

The prepared device check (one H200 run): for each kernel at realistic V4-flash
shapes (hidden 4096, 4 streams, 64 heads x 512 with one shared KV head, indexer 64 x 128,
top-k 512, compress rates 4 / 128, a 64K context for the indexer and attention), it times the
Triton kernel and the torch reference (CUDA events, median of ``--iters`` after warm-up),
checks they agree, and prints one JSON line: per kernel ``ms``, ``ref_ms``, ``speedup``,
``GB/s`` (bytes the kernel must move / time) or ``TFLOP/s``, ``max_abs_err``; and mHC's
share of a decoder layer's forward+backward time (the paper holds it to 6.7% of a stage).

``--smoke`` runs tiny shapes on the CPU under ``TRITON_INTERPRET=1`` (set it yourself): the
harness and the parity checks, not meaningful timings; the tests run it that way.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _timer(device: str):
    if device == "cuda":
        def run(fn, iters: int, warmup: int) -> float:
            for _ in range(warmup):
                fn()
            torch.cuda.synchronize()
            times = []
            for _ in range(iters):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b))
            return statistics.median(times)
    else:
        def run(fn, iters: int, warmup: int) -> float:
            for _ in range(warmup):
                fn()
            times = []
            for _ in range(iters):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            return statistics.median(times)
    return run


def _err(a, b) -> float:
    if isinstance(a, (tuple, list)):
        return max(_err(x, y) for x, y in zip(a, b, strict=True))
    return float((a.detach().float() - b.detach().float()).abs().max()) if a.numel() else 0.0


def shapes(smoke: bool) -> dict:
    """Kernel shapes: V4-flash's (``smoke``: tiny ones for the CPU interpreter)."""
    if smoke:
        return dict(T=32, N=4, D=64, B=1, S=64, H=4, Dh=64, window=16, topk=8, IH=16, ID=16, csa=4, hca=16,
                    ctx=64)
    return dict(T=8192, N=4, D=4096, B=1, S=4096, H=64, Dh=512, window=128, topk=512, IH=64, ID=128, csa=4,
                hca=128, ctx=65536)


def bench_mhc(sh, dev, dt, run, iters, warmup) -> dict:
    import kernels
    from model.layers import HyperConnection

    hc = HyperConnection(sh["D"], sh["N"], 20, 1e-6, 1e-6).to(dev)
    x = torch.randn(1, sh["T"], sh["N"], sh["D"], device=dev, dtype=dt, requires_grad=True)
    g = [torch.randn(1, sh["T"], sh["N"], device=dev), torch.randn(1, sh["T"], sh["N"], sh["N"], device=dev),
         torch.randn(1, sh["T"], sh["D"], device=dev, dtype=dt)]

    def fwd_bwd(on):
        def f():
            with kernels.forced(on):
                outs = hc(x)
            sum((o.float() * gg.float()).sum() for o, gg in zip(outs, g, strict=True)).backward()
        return f

    with kernels.forced(True):
        got = hc(x)
    with kernels.forced(False):
        want = hc(x)
    ms, ref = run(fwd_bwd(True), iters, warmup), run(fwd_bwd(False), iters, warmup)
    nbytes = 3 * x.numel() * x.element_size()  # read X twice (norm+projection, collapse), write dX; fwd+bwd ~3x X
    return {"ms": ms, "ref_ms": ref, "speedup": ref / ms, "GB/s": nbytes / ms / 1e6,
            "max_abs_err": _err([t.detach() for t in got], [t.detach() for t in want]), "shape": [sh["T"], sh["N"],
                                                                                                sh["D"]]}


def _bench_pool(sh, dev, dt, run, iters, warmup, overlap: bool, rate: int) -> dict:
    from kernels.ops import compressor_pool
    from model.attention import Compressor

    comp = Compressor(sh["D"], sh["Dh"], rate, overlap, 1e-6, 0.02).to(dev)
    C = 2 * sh["Dh"] if overlap else sh["Dh"]
    kv = torch.randn(sh["B"], sh["S"] if sh.get("smoke") else sh["ctx"], C, device=dev, dtype=dt)
    gate = torch.randn_like(kv)
    n = kv.shape[1] // rate

    def ref():
        k = kv[:, :n * rate].view(kv.shape[0], n, rate, -1).float()
        gg = gate[:, :n * rate].view(kv.shape[0], n, rate, -1).float() + comp.position_bias
        if overlap:
            D = sh["Dh"]
            prev_k = torch.cat([torch.zeros_like(k[:, :1, :, :D]), k[:, :-1, :, :D]], 1)
            prev_g = torch.cat([torch.full_like(gg[:, :1, :, :D], float("-inf")), gg[:, :-1, :, :D]], 1)
            k = torch.cat([prev_k, k[..., D:]], 2)
            gg = torch.cat([prev_g, gg[..., D:]], 2)
        return (k * gg.softmax(2)).sum(2)

    def ker():
        return compressor_pool(kv, gate, comp.position_bias, rate, overlap, None)

    ms, ref_ms = run(ker, iters, warmup), run(ref, iters, warmup)
    nbytes = 2 * kv.numel() * kv.element_size()
    return {"ms": ms, "ref_ms": ref_ms, "speedup": ref_ms / ms, "GB/s": nbytes / ms / 1e6,
            "max_abs_err": _err(ker(), ref()), "shape": list(kv.shape)}


def bench_compressor(sh, dev, dt, run, iters, warmup) -> dict:
    return {name: _bench_pool(sh, dev, dt, run, iters, warmup, overlap, rate)
            for name, overlap, rate in (("csa", True, sh["csa"]), ("hca", False, sh["hca"]))}


def bench_indexer(sh, dev, dt, run, iters, warmup) -> dict:
    from kernels.ops import indexer_topk
    from model import ModelArgs
    from model.attention import Indexer

    T = sh["ctx"] // sh["csa"]
    Qn = 64 if not sh.get("smoke") else 4
    args = ModelArgs.flavor("debug", index_topk=sh["topk"], index_n_heads=sh["IH"], index_head_dim=sh["ID"])
    ix = Indexer(args).to(dev)
    q = torch.randn(1, Qn, sh["IH"], sh["ID"], device=dev)
    w = torch.randn(1, Qn, sh["IH"], device=dev)
    keys = torch.randn(1, T, sh["ID"], device=dev)
    pos = torch.arange(sh["ctx"] - Qn, sh["ctx"], device=dev)

    def ker():
        return indexer_topk(q, w, keys, pos, ix.rate, ix.topk, None, None)

    def ref():
        return ix.select(ix.scores(q, w, keys), pos)

    ms, ref_ms = run(ker, iters, warmup), run(ref, iters, warmup)
    flops = 2 * Qn * sh["IH"] * sh["ID"] * T
    idx, valid, scores = ker()
    widx, wvalid = ix.select(scores, pos)
    same = bool(torch.equal(torch.where(valid, idx, -1).sort(-1).values,
                            torch.where(wvalid, widx, -1).sort(-1).values))
    return {"ms": ms, "ref_ms": ref_ms, "speedup": ref_ms / ms, "TFLOP/s": flops / ms / 1e9,
            "max_abs_err": _err(scores, ix.scores(q, w, keys)), "topk_equal": same, "queries": Qn, "entries": T}


def bench_attention(sh, dev, dt, run, iters, warmup) -> dict:
    import kernels
    from model import ModelArgs
    from model.attention import Attention
    from model.config import CSA

    args = ModelArgs.flavor("debug", hidden_size=sh["D"] if not sh.get("smoke") else 128,
                            num_attention_heads=sh["H"], head_dim=sh["Dh"], sliding_window=sh["window"],
                            index_topk=sh["topk"], index_n_heads=sh["IH"], index_head_dim=sh["ID"])
    att = Attention(args, CSA).to(dev).to(dt).eval()
    x = torch.randn(1, sh["S"], args.hidden_size, device=dev, dtype=dt)

    def go(on):
        def f():
            with torch.no_grad(), kernels.forced(on):
                return att(x)
        return f

    ms, ref_ms = run(go(True), iters, warmup), run(go(False), iters, warmup)
    return {"ms": ms, "ref_ms": ref_ms, "speedup": ref_ms / ms, "max_abs_err": _err(go(True)(), go(False)()),
            "layer": "CSA attention, whole layer forward (projections, compressor, indexer, sparse attention)",
            "seq": sh["S"]}


def mhc_share(sh, dev, dt, run, iters, warmup) -> dict:
    """mHC's share of one decoder block's forward+backward with the kernels on."""
    import kernels
    from model import ModelArgs
    from model.transformer import Block

    small = sh.get("smoke")
    args = ModelArgs.flavor("debug" if small else "small", hidden_size=128 if small else 1024)
    blk = Block(args, "compressed_sparse_attention", "moe").to(dev).to(dt)
    T = 64 if small else 2048
    x = torch.randn(1, T, args.hc_mult, args.hidden_size, device=dev, dtype=dt, requires_grad=True)
    ids = torch.randint(0, args.vocab_size, (1, T), device=dev)

    def block():
        with kernels.forced(True):
            blk(x, ids).float().sum().backward()

    def hc_only():
        with kernels.forced(True):
            for hc in (blk.attn_hc, blk.ffn_hc):
                sum(o.float().sum() for o in hc(x)).backward()

    total, hc = run(block, iters, warmup), run(hc_only, iters, warmup)
    return {"block_ms": total, "mhc_ms": hc, "share": hc / total, "paper_share": 0.067, "tokens": T,
            "hidden": args.hidden_size}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (run with TRITON_INTERPRET=1)")
    p.add_argument("--iters", type=int, default=20, help="timed repetitions (median reported)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="activations (GPU)")
    p.add_argument("--only", default="mhc,compressor,indexer,attention,share",
                   help="comma-separated subset of mhc, compressor, indexer, attention, share")
    ns = p.parse_args(argv)
    dev = "cpu" if ns.smoke else "cuda"
    if dev == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device; use --smoke (with TRITON_INTERPRET=1) on a CPU"}))
        return 2
    dt = torch.float32 if ns.smoke else getattr(torch, ns.dtype)
    sh = {**shapes(ns.smoke), "smoke": ns.smoke}
    run = _timer(dev)
    iters, warmup = (1, 0) if ns.smoke else (ns.iters, ns.warmup)
    table = {"mhc": bench_mhc, "compressor": bench_compressor, "indexer": bench_indexer,
             "attention": bench_attention, "share": mhc_share}
    res = {"benchmark": "kernels", "date": time.strftime("%Y-%m-%d"), "device": (torch.cuda.get_device_name()
           if dev == "cuda" else "cpu (TRITON_INTERPRET)"), "torch": torch.__version__, "dtype": str(dt)}
    try:
        import triton

        res["triton"] = triton.__version__
    except ImportError:
        pass
    for name in ns.only.split(","):
        torch.manual_seed(0)
        try:
            res[name] = table[name](sh, dev, dt, run, iters, warmup)
        except Exception as e:  # noqa: BLE001 - one kernel failing must not hide the others' figures
            res[name] = {"error": f"{type(e).__name__}: {e}"}
        print(f"{name}: {res[name]}", file=sys.stderr, flush=True)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
