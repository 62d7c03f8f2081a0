#!/usr/bin/env python
"""Muon against AdamW on a small DeepSeek-V4 model, each at its best learning rate.

Protocol (same data, same token budget, same initial weights for every run):

- Data: the ``stdlib`` corpus through ``cluster.data.prepare_data`` (byte-level BPE,
  cached under ``--cache-dir``). The token stream is split *by document*: a seeded
  random permutation of the documents is walked until ``--eval-frac`` of the tokens
  (at least enough for the evaluation batches) is set aside as a held-out stream;
  the remaining documents, in their original order, form the training stream. No
  held-out document is ever trained on (documents that are near-duplicates of each
  other across the split are possible in a source tree, and are not searched for).
- Evaluation: ``--eval-batches`` fixed batches of ``[B, S]`` built once from windows
  evenly spaced over the whole held-out stream; the eval loss is the token-weighted mean next-token cross-entropy
  over them (``model.eval()``, ``torch.no_grad()``), measured at step 0, every
  ``--eval-every`` optimizer steps and after the last step.
- Training: for each optimizer and each learning rate of its grid, a fresh
  ``Transformer(ModelArgs.flavor(--flavor))`` built after ``torch.manual_seed(--seed)``
  (identical initial weights, checked by a checksum), a fresh ``TokenLoader`` over the
  training stream with seed ``--data-seed`` (identical batches in identical order,
  checked by a hash of every batch), ``--steps`` steps of ``--batch-tokens`` tokens
  (``--seq-len`` per sequence), dense attention, loss ``ce + 0.3 * mtp + 1e-4 *
  balance`` (``model.training.compute_losses``), gradient clipping at 1.0, router-bias
  update after every step. Schedule ``model.optim.lr_at``: linear warmup over
  ``--warmup-steps``, constant, cosine decay from ``--decay-frac * steps`` to
  ``lr * --min-lr-ratio`` at the last step. ``use_muon=True``: Muon for projection
  matrices + AdamW for embeddings / head / norms / biases (same LR); ``use_muon=False``:
  AdamW (0.9, 0.95, eps 1e-20, wd 0.1) for everything.
- Selection: each optimizer's best LR is the one with the lowest final eval loss (a
  run whose loss turns non-finite is marked diverged and excluded).
- Headline: ``muon_step_ratio`` = the first step at which the best Muon run's eval
  loss is <= the best AdamW run's *final* eval loss (linearly interpolated between
  eval points), divided by ``--steps``; AdamW then needs ``1 / ratio`` times the steps
  (``adamw_steps_multiplier``). ``null`` when Muon never gets there. The Muon curve
  read at an intermediate step comes from a run whose LR has not decayed yet, so the
  ratio is conservative (a run scheduled to end there would be at least as good).

Output: human progress on stderr; ONE JSON line on stdout at the end.

    PYTHONPATH=. python bench/bench_muon.py              # 2 x 3 runs of 80 steps
    PYTHONPATH=. python bench/bench_muon.py --quick      # 1 LR each, 6 steps (smoke test)
    PYTHONPATH=. python bench/bench_muon.py --plot /tmp/muon.png
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

DEFAULT_MUON_LRS = (1e-3, 3e-3, 1e-2)
DEFAULT_ADAMW_LRS = (1e-3, 3e-3, 1e-2)
QUICK_LR = 3e-3
OPTIMIZERS = ("muon", "adamw")

# Defaults of the full run; --quick changes those the user did not give.
FULL = dict(steps=80, eval_every=10, eval_batches=8, muon_lrs=DEFAULT_MUON_LRS, adamw_lrs=DEFAULT_ADAMW_LRS,
            max_bytes=4_000_000)
QUICK = dict(steps=6, eval_every=3, eval_batches=2, muon_lrs=(QUICK_LR,), adamw_lrs=(QUICK_LR,),
             max_bytes=1_000_000)


def _log(msg: str) -> None:
    print(f"[bench_muon {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _lr_list(text: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated learning rates, got {text!r}") from None
    if not vals or any(not (v > 0 and math.isfinite(v)) for v in vals):
        raise argparse.ArgumentTypeError(f"learning rates must be positive and finite, got {text!r}")
    return vals


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Muon vs AdamW, each at its best LR from a small sweep, on a small DeepSeek-V4 model: "
                    "same data, same token budget, same initial weights. Progress on stderr, one JSON line "
                    "on stdout.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: one LR each ({QUICK_LR}), {QUICK['steps']} steps, eval every "
                        f"{QUICK['eval_every']}, {QUICK['eval_batches']} eval batches, "
                        f"{QUICK['max_bytes']:,} corpus bytes (explicit options still win)")
    g = p.add_argument_group("sweep")
    g.add_argument("--muon-lrs", type=_lr_list, default=None,
                   help=f"comma-separated Muon LR grid (default {','.join(map(str, DEFAULT_MUON_LRS))})")
    g.add_argument("--adamw-lrs", type=_lr_list, default=None,
                   help=f"comma-separated AdamW LR grid (default {','.join(map(str, DEFAULT_ADAMW_LRS))})")
    g.add_argument("--steps", type=int, default=None, help=f"optimizer steps per run (default {FULL['steps']})")
    g.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    g.add_argument("--batch-tokens", type=int, default=1024, help="tokens per step (batch = this // seq-len)")
    g.add_argument("--eval-every", type=int, default=None, help=f"eval period in steps (default {FULL['eval_every']})")
    g.add_argument("--eval-batches", type=int, default=None,
                   help=f"fixed held-out batches per evaluation (default {FULL['eval_batches']})")
    g.add_argument("--warmup-steps", type=int, default=None, help="LR warmup steps (default: 10%% of --steps, >= 1)")
    g.add_argument("--decay-frac", type=float, default=0.8, help="cosine decay starts at this fraction of --steps")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="min_lr = lr * this")
    g.add_argument("--mtp-weight", type=float, default=0.3, help="weight of the MTP loss in training")
    m = p.add_argument_group("model and data")
    m.add_argument("--flavor", default="debug", help="ModelArgs flavor")
    m.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary = model vocab_size")
    m.add_argument("--source", default="stdlib", help="corpus: 'stdlib' or a path (see cluster.data.Corpus)")
    m.add_argument("--max-bytes", type=int, default=None,
                   help=f"corpus text budget in bytes (default {FULL['max_bytes']:,})")
    m.add_argument("--cache-dir", default=None, help="tokenizer / token cache (default cluster.data.default_cache_dir())")
    m.add_argument("--eval-frac", type=float, default=0.05, help="fraction of the stream's tokens held out")
    m.add_argument("--seed", type=int, default=0, help="model-init seed (the same for every run)")
    m.add_argument("--data-seed", type=int, default=0,
                   help="training-loader seed (the same for every run); also seeds the held-out document split")
    o = p.add_argument_group("run")
    o.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    o.add_argument("--plot", default=None, metavar="PATH", help="write a PNG of the two best eval curves")
    o.add_argument("--json-out", default=None, metavar="PATH", help="also write the JSON result to this file")
    a = p.parse_args(argv)
    base = QUICK if a.quick else FULL
    for key, val in base.items():
        if getattr(a, key) is None:
            setattr(a, key, val)
    if a.warmup_steps is None:
        a.warmup_steps = max(1, round(0.1 * a.steps))
    for name in ("steps", "seq_len", "batch_tokens", "eval_every", "eval_batches", "warmup_steps", "vocab_size",
                 "max_bytes", "threads"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 < a.eval_frac < 1:
        p.error("--eval-frac must be in (0, 1)")
    if not 0 <= a.decay_frac <= 1 or not 0 < a.min_lr_ratio <= 1:
        p.error("--decay-frac must be in [0, 1] and --min-lr-ratio in (0, 1]")
    return a


# ======================================================================== data
def split_stream(stream, eval_frac: float, min_eval_tokens: int, seed: int):
    """(train_stream, eval_stream, info): a document-level split of a ``TokenStream``.

    Documents are visited in a seeded random order and moved to the held-out side
    until it holds ``max(eval_frac * N, min_eval_tokens)`` tokens; the rest keep their
    original order. Both sides end with eos (every document does).
    """
    from cluster.data import TokenStream

    starts = np.asarray(stream.doc_starts)
    lengths = np.diff(starts)
    D = lengths.size
    if D < 2:
        raise ValueError(f"need at least 2 documents to hold some out, the stream has {D}")
    perm = np.random.Generator(np.random.PCG64([seed, 0x5EED])).permutation(D)
    want = max(int(eval_frac * len(stream)), min_eval_tokens)
    cum = np.cumsum(lengths[perm])
    k = int(np.searchsorted(cum, want)) + 1  # documents held out
    if k >= D:
        raise ValueError(f"held-out set needs {want:,} tokens, which leaves no training document "
                         f"(stream of {len(stream):,} tokens; raise --max-bytes or lower --eval-frac)")
    held = np.zeros(D, dtype=bool)
    held[perm[:k]] = True
    toks = np.asarray(stream.tokens)

    def gather(mask: np.ndarray) -> np.ndarray:
        idx = np.flatnonzero(mask)
        return np.concatenate([toks[starts[i]:starts[i + 1]] for i in idx]).astype(np.int64)

    eval_tokens, train_tokens = gather(held), gather(~held)
    info = {"documents": int(D), "train_documents": int(D - k), "eval_documents": int(k),
            "train_tokens": int(train_tokens.size), "eval_tokens_held_out": int(eval_tokens.size),
            "split": "document-level, seeded random; no held-out document is trained on"}
    return TokenStream(train_tokens, stream.eos_id), TokenStream(eval_tokens, stream.eos_id), info


def fixed_eval_batches(eval_stream, seq_len: int, batch_size: int, n_batches: int) -> list[dict]:
    """``n_batches`` batches of ``[B, S]`` windows evenly spaced over the whole held-out
    stream (so every held-out document is sampled, not just the first few)."""
    from cluster.data import PackedDataset

    ds = PackedDataset(eval_stream, seq_len)
    n = n_batches * batch_size
    if len(ds) < n:
        raise ValueError(f"held-out stream has {len(ds)} sequences of {seq_len}, need {n}")
    idx = np.linspace(0, len(ds) - 1, n).round().astype(np.int64)  # distinct since len(ds) >= n
    items = [ds[int(i)] for i in idx]
    return [{k: torch.stack([it[k] for it in items[j * batch_size:(j + 1) * batch_size]]) for k in items[0]}
            for j in range(n_batches)]


# ===================================================================== training
def param_checksum(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def evaluate(model, eval_batches) -> float:
    """Token-weighted mean next-token CE over the fixed held-out batches."""
    from model.losses import IGNORE, LossConfig
    from model.training import compute_losses

    cfg = LossConfig(mode="dense", mtp_weight=0.0, balance_weight=0.0)  # ce does not depend on these
    model.eval()
    total = n = 0.0
    try:
        for b in eval_batches:
            _, metrics, _ = compute_losses(model, b, cfg)
            k = float((b["labels"] != IGNORE).sum())
            total += metrics["ce"] * k
            n += k
    finally:
        model.train()
    return total / n


def train_run(opt_name: str, lr: float, a: argparse.Namespace, train_stream, eval_batches) -> dict:
    from cluster.data import TokenLoader, sequences_per_batch
    from model import ModelArgs, Transformer
    from model.optim import CombinedOptimizer, OptimConfig, lr_at
    from model.training import LossConfig, compute_losses, set_attention_mode, update_router_biases

    t0 = time.perf_counter()
    margs = ModelArgs.flavor(a.flavor, vocab_size=a.vocab_size)
    torch.manual_seed(a.seed)
    model = Transformer(margs)
    set_attention_mode(model, "dense")
    model.train()
    init_sum = param_checksum(model)
    cfg = OptimConfig(lr=lr, min_lr=lr * a.min_lr_ratio, warmup_steps=a.warmup_steps,
                      decay_start=int(a.decay_frac * a.steps), total_steps=a.steps, use_muon=opt_name == "muon")
    opt = CombinedOptimizer(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    loader = TokenLoader(train_stream, a.seq_len, sequences_per_batch(a.batch_tokens, a.seq_len), seed=a.data_seed)
    loss_cfg = LossConfig(mode="dense", mtp_weight=a.mtp_weight)
    data_hash = hashlib.sha256()

    curve = [(0, evaluate(model, eval_batches))]
    train_ce: list[float] = []
    diverged_at = None
    for step in range(a.steps):
        batch = loader.next_batch()
        data_hash.update(batch["input_ids"].numpy().tobytes())
        opt.set_lr(lr_at(step, cfg))
        opt.zero_grad()
        loss, metrics, aux = compute_losses(model, batch, loss_cfg)
        if not math.isfinite(metrics["loss"]):
            diverged_at = step
            break
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        update_router_biases(model, aux.routing)
        train_ce.append(metrics["ce"])
        done = step + 1
        if done % a.eval_every == 0 or done == a.steps:
            ev = evaluate(model, eval_batches)
            curve.append((done, ev))
            _log(f"  {opt_name} lr={lr:g} step {done}/{a.steps}: train ce {metrics['ce']:.4f}  eval ce {ev:.4f}  "
                 f"({time.perf_counter() - t0:.0f}s)")
            if not math.isfinite(ev):
                diverged_at = done
                break
    diverged = diverged_at is not None
    final = None if diverged else curve[-1][1]
    last = train_ce[-min(10, len(train_ce)):] if train_ce else []
    return {"optimizer": opt_name, "lr": lr, "final_eval_loss": _r(final), "diverged": diverged,
            "diverged_at_step": diverged_at,
            "train_ce_last10_mean": _r(sum(last) / len(last)) if last else None,
            "curve": [[s, _r(v)] for s, v in curve], "wall_s": round(time.perf_counter() - t0, 1),
            "_init": init_sum, "_data": data_hash.hexdigest()[:16]}


def _r(x: float | None, nd: int = 5) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), nd)


def crossing_step(curve: list[list[float]], target: float) -> float | None:
    """First step at which ``curve`` (``[[step, loss], ...]``) is <= ``target``,
    linearly interpolated between eval points; ``None`` if never."""
    prev = None
    for s, v in curve:
        if v is None:
            return None
        if v <= target:
            if prev is None or prev[1] <= target:
                return float(s)
            s0, v0 = prev
            return float(s0 + (v0 - target) / (v0 - v) * (s - s0))
        prev = (s, v)
    return None


def plot_curves(path: str, best: dict, target: float, cross: float | None, a: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, color in (("muon", "tab:red"), ("adamw", "tab:blue")):
        r = best[name]
        xs, ys = zip(*r["curve"])
        ax.plot(xs, ys, "o-", color=color, ms=3, label=f"{name} (lr={r['lr']:g}): final {r['final_eval_loss']:.3f}")
    ax.axhline(target, color="tab:blue", ls=":", lw=1, label="AdamW final")
    if cross is not None:
        ax.axvline(cross, color="tab:red", ls=":", lw=1, label=f"Muon reaches it at step {cross:.1f}")
    ax.set_xlabel(f"step ({a.batch_tokens} tokens each)")
    ax.set_ylabel("held-out next-token CE")
    ax.set_title(f"Muon vs AdamW, {a.flavor} DeepSeek-V4, best LR of each")
    lo = min(v for r in best.values() for _, v in r["curve"])
    later = [v for r in best.values() for _, v in r["curve"][1:]]  # step 0 (~ln V) would flatten the view
    hi = max(later) if later else lo
    if hi > lo:
        ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ========================================================================= main
def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    t_start = time.perf_counter()
    torch.set_num_threads(a.threads)
    from cluster.data import default_cache_dir, prepare_data, sequences_per_batch
    from model import ModelArgs, Transformer

    B = sequences_per_batch(a.batch_tokens, a.seq_len)
    cache_dir = Path(a.cache_dir).expanduser() if a.cache_dir else default_cache_dir()
    _log(f"data: {a.source}, max_bytes={a.max_bytes:,}, vocab={a.vocab_size}, cache {cache_dir}")
    t = time.perf_counter()
    _, stream = prepare_data(a.source, vocab_size=a.vocab_size, cache_dir=cache_dir, max_bytes=a.max_bytes,
                             progress=False)
    prep_s = time.perf_counter() - t
    need_eval = a.eval_batches * B * a.seq_len + 1
    train_stream, eval_stream, split_info = split_stream(stream, a.eval_frac, need_eval, a.data_seed)
    eval_batches = fixed_eval_batches(eval_stream, a.seq_len, B, a.eval_batches)
    tokens_per_run = a.steps * B * a.seq_len
    if tokens_per_run + 1 > len(train_stream):
        _log(f"note: {tokens_per_run:,} training tokens per run > {len(train_stream):,} in the training stream; "
             "the loader starts another epoch (data repeats)")
    _log(f"stream {len(stream):,} tokens -> train {len(train_stream):,} / held-out {len(eval_stream):,} "
         f"({split_info['eval_documents']} docs); prepared in {prep_s:.1f}s")
    n_params = sum(p.numel() for p in Transformer(ModelArgs.flavor(a.flavor, vocab_size=a.vocab_size)).parameters())

    grids = {"muon": a.muon_lrs, "adamw": a.adamw_lrs}
    n_runs = sum(len(v) for v in grids.values())
    _log(f"{n_runs} runs x {a.steps} steps x {B}x{a.seq_len} tokens, flavor {a.flavor} ({n_params:,} params), "
         f"{a.threads} thread(s)")
    runs = []
    for name in OPTIMIZERS:
        for lr in grids[name]:
            _log(f"run {len(runs) + 1}/{n_runs}: {name} lr={lr:g}")
            r = train_run(name, lr, a, train_stream, eval_batches)
            runs.append(r)
            _log(f"  -> final eval ce {r['final_eval_loss']}{'  DIVERGED' if r['diverged'] else ''} "
                 f"({r['wall_s']}s)")
    same_init = len({r.pop("_init") for r in runs}) == 1
    data_hashes = {r.pop("_data") for r in runs if not r["diverged"]}
    same_data = len(data_hashes) <= 1

    best: dict[str, dict | None] = {}
    for name in OPTIMIZERS:
        ok = [r for r in runs if r["optimizer"] == name and r["final_eval_loss"] is not None]
        if not ok:
            best[name] = None
            continue
        r = min(ok, key=lambda r: r["final_eval_loss"])
        grid = sorted(grids[name])
        best[name] = {"lr": r["lr"], "final_eval_loss": r["final_eval_loss"], "curve": r["curve"],
                      "lr_at_grid_edge": len(grid) > 1 and r["lr"] in (grid[0], grid[-1])}

    ratio = mult = cross = target = None
    if best["muon"] and best["adamw"]:
        target = best["adamw"]["final_eval_loss"]
        cross = crossing_step(best["muon"]["curve"], target)
        if cross is not None:
            ratio = cross / a.steps
            mult = (1.0 / ratio) if ratio > 0 else None
    if best["muon"] and best["adamw"]:
        if ratio is None:
            summary = (f"Muon (lr={best['muon']['lr']:g}) never reached AdamW's final eval loss "
                       f"{target:.4f} (lr={best['adamw']['lr']:g}) within {a.steps} steps "
                       f"(Muon final {best['muon']['final_eval_loss']:.4f})")
        else:
            summary = (f"Muon (lr={best['muon']['lr']:g}) reaches AdamW's final eval loss {target:.4f} "
                       f"(lr={best['adamw']['lr']:g}, {a.steps} steps) at step {cross:.1f} = {ratio:.3f} of the "
                       f"steps: AdamW needs {mult:.2f}x the steps of Muon; final eval loss Muon "
                       f"{best['muon']['final_eval_loss']:.4f} vs AdamW {target:.4f}")
    else:
        summary = "no comparison: every run of " + " and ".join(n for n in OPTIMIZERS if not best[n]) + " diverged"

    if a.plot and best["muon"] and best["adamw"]:
        try:
            plot_curves(a.plot, best, target, cross, a)
            _log(f"plot written to {a.plot}")
        except Exception as e:  # a plot is optional: report, never fail the benchmark
            _log(f"plot failed: {type(e).__name__}: {e}")

    result = {
        "benchmark": "muon_vs_adamw",
        "quick": a.quick,
        "flavor": a.flavor,
        "params": n_params,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": a.threads,
        "steps": a.steps,
        "seq_len": a.seq_len,
        "batch_size": B,
        "tokens_per_step": B * a.seq_len,
        "tokens_per_run": tokens_per_run,
        "eval_every": a.eval_every,
        "eval_batches": a.eval_batches,
        "eval_tokens": int(sum(int((b["labels"] != -100).sum()) for b in eval_batches)),
        "schedule": {"warmup_steps": a.warmup_steps, "decay_start": int(a.decay_frac * a.steps),
                     "min_lr_ratio": a.min_lr_ratio},
        "mtp_weight": a.mtp_weight,
        "seed": a.seed,
        "data_seed": a.data_seed,
        "data": {"source": a.source, "vocab_size": a.vocab_size, "max_bytes": a.max_bytes,
                 "stream_tokens": len(stream), **split_info},
        "lr_grid": {"muon": list(a.muon_lrs), "adamw": list(a.adamw_lrs)},
        "same_init": same_init,
        "same_data": same_data,
        "runs": [{k: v for k, v in r.items() if k != "curve"} for r in runs],
        "best": best,
        "muon_best_lr": best["muon"]["lr"] if best["muon"] else None,
        "adamw_best_lr": best["adamw"]["lr"] if best["adamw"] else None,
        "muon_final_eval_loss": best["muon"]["final_eval_loss"] if best["muon"] else None,
        "adamw_final_eval_loss": target,
        "muon_reaches_adamw_final_at_step": _r(cross, 2),
        "muon_step_ratio": _r(ratio, 4),
        "adamw_steps_multiplier": _r(mult, 3),
        "summary": summary,
        "all_runs_curves": {f"{r['optimizer']}@{r['lr']:g}": r["curve"] for r in runs},
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    _log(summary)
    line = json.dumps(result)
    if a.json_out:
        Path(a.json_out).write_text(line + "\n")
    print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
