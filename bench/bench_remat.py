#!/usr/bin/env python
"""Memory saved by activation checkpointing: one training step's forward + backward, with and without.

For each setting the step (``model.training.compute_losses`` on one batch of ``--tokens`` tokens in
the ``--mode`` attention mode, then ``backward``) runs in a fresh subprocess (this script with a
hidden ``--worker`` flag): the model is built, the kernel's peak-RSS mark (``VmHWM``) is reset and
read (the baseline), the step runs, and the mark is read again. ``peak_mb`` is the growth of that
high-water mark: activations kept for backward plus gradients (the same with and without; the
difference is the activations), as the allocator sees it (noisy on small inputs: freed memory is
not always given back). ``saved_mb`` is exact: the bytes of the distinct tensors autograd holds for
backward when the forward ends, counted with ``torch.autograd.graph.saved_tensors_hooks`` (inside a
checkpointed block ``torch.utils.checkpoint`` stores nothing but the block's inputs). Also the
step's wall time (checkpointing recomputes every block once more).

Output: progress on stderr, ONE JSON line on stdout::

    PYTHONPATH=. python bench/bench_remat.py                  # small flavor, 4096 tokens, sparse
    PYTHONPATH=. python bench/bench_remat.py --flavor debug --tokens 1024
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

MIB = 1 << 20


def _hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def worker(spec: dict) -> dict:
    import gc

    import torch

    from model import ModelArgs, Transformer
    from model.losses import LossConfig
    from model.remat import checkpointed
    from model.training import compute_losses, set_attention_mode

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    m = Transformer(ModelArgs.flavor(spec["flavor"]))
    set_attention_mode(m, spec["mode"])
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, m.args.vocab_size, (1, spec["tokens"] + 1), generator=g)
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    cfg = LossConfig(mode=spec["mode"], mtp_weight=0.0 if spec["mode"] == "indexer_warmup" else 0.3)
    call = checkpointed if spec["remat"] else None
    gc.collect()
    _reset_hwm()
    base = _hwm_mb()
    held: dict[int, int] = {}

    def pack(t):
        try:
            st = t.untyped_storage()
            held[st.data_ptr()] = st.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    params = {p.untyped_storage().data_ptr() for p in m.parameters()}
    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _, _ = compute_losses(m, batch, cfg, call=call)
    saved = sum(n for ptr, n in held.items() if ptr not in params)  # parameters are not activations
    loss.backward()
    seconds = time.perf_counter() - t0
    peak = _hwm_mb()
    return {"remat": spec["remat"], "peak_mb": max(0.0, peak - base), "peak_abs_mb": peak, "step_s": seconds,
            "saved_mb": saved / MIB, "loss": float(loss)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Peak memory of a training step with and without activation "
                                            "checkpointing (one JSON line on stdout).")
    p.add_argument("--flavor", default="small", help="model flavor (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=4096, help="tokens in the batch (default: %(default)s)")
    p.add_argument("--mode", default="sparse", choices=("dense", "indexer_warmup", "sparse"),
                   help="attention mode (default: %(default)s)")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch threads")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per measurement")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns.worker:
        print(json.dumps(worker(json.loads(ns.worker))))
        return 0
    res = {}
    for remat in (False, True):
        spec = {"flavor": ns.flavor, "tokens": ns.tokens, "mode": ns.mode, "threads": ns.threads, "remat": remat}
        print(f"measuring {'with' if remat else 'without'} activation checkpointing ...", file=sys.stderr)
        out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True,
                             text=True, timeout=ns.timeout, env={**os.environ, "PYTHONPATH": os.getcwd()})
        if out.returncode:
            print(out.stderr[-3000:], file=sys.stderr)
            return 1
        res[remat] = json.loads(out.stdout.strip().splitlines()[-1])
    off, on = res[False], res[True]
    print(json.dumps({"flavor": ns.flavor, "tokens": ns.tokens, "mode": ns.mode, "threads": ns.threads,
                      "saved_for_backward_mb_without": round(off["saved_mb"], 1),
                      "saved_for_backward_mb_with": round(on["saved_mb"], 1),
                      "saved_for_backward_ratio": round(on["saved_mb"] / off["saved_mb"], 3),
                      "peak_mb_without": round(off["peak_mb"], 1), "peak_mb_with": round(on["peak_mb"], 1),
                      "peak_saved_mb": round(off["peak_mb"] - on["peak_mb"], 1),
                      "peak_ratio_with_over_without": round(on["peak_mb"] / off["peak_mb"], 3),
                      "step_s_without": round(off["step_s"], 2), "step_s_with": round(on["step_s"], 2),
                      "time_ratio_with_over_without": round(on["step_s"] / off["step_s"], 3),
                      "same_loss": off["loss"] == on["loss"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
