"""``tide demo``: a DeepSeek-V4 flavor on real text (byte-level tokens): loss, greedy generation,
timings, parameter counts and decode-state size."""

from __future__ import annotations

import argparse
import inspect
import math
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

from cli.common import CLIError
from model.cache_bytes import cache_bytes
from model.config import ACCOUNTING_ONLY_FLAVORS, CSA, FLAVORS, HCA, SWA, ModelArgs

BYTE_VOCAB = 256
# Standard-library modules whose source is the demo's default text: real, always
# present, and readable without network or data downloads.
DEMO_TEXT_MODULES = ("json.decoder", "json.encoder", "textwrap", "string", "heapq", "bisect", "shlex")
# Flavors small enough to build and run on a CPU (the others are for accounting only).
DEMO_FLAVORS = tuple(f for f in FLAVORS if f not in ACCOUNTING_ONLY_FLAVORS)


def load_text(n_bytes: int, path: str | Path | None = None) -> tuple[bytes, list[str]]:
    """Read up to ``n_bytes`` bytes of real text.

    Args:
        n_bytes: maximum number of bytes to return (>= 2: one input, one target).
        path: a file to read; by default the sources of the standard-library
            modules in ``DEMO_TEXT_MODULES`` of the running interpreter,
            concatenated in order until ``n_bytes`` is reached.

    Returns:
        ``(data, sources)``: the bytes and the files they came from.

    Raises:
        CLIError: ``n_bytes < 2``, a missing/unreadable file, or too little text.
    """
    if n_bytes < 2:
        raise CLIError(f"--tokens must be >= 2 (one input and one target token), got {n_bytes}")
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise CLIError(f"text file {p} does not exist")
        try:
            with p.open("rb") as fh:
                data = fh.read(n_bytes)
        except OSError as e:
            raise CLIError(f"cannot read {p}: {e}") from None
        sources = [str(p)]
    else:
        import importlib

        chunks: list[bytes] = []
        sources = []
        size = 0
        for name in DEMO_TEXT_MODULES:
            if size >= n_bytes:
                break
            src = inspect.getsourcefile(importlib.import_module(name))
            if src is None:
                continue
            chunk = Path(src).read_bytes()[: n_bytes - size]
            chunks.append(chunk)
            sources.append(src)
            size += len(chunk)
        data = b"".join(chunks)
    if len(data) < 2:
        raise CLIError(f"need at least 2 bytes of text, got {len(data)} from {sources or 'stdlib'}")
    return data, sources


def byte_tokens(data: bytes, vocab_size: int):
    """UTF-8 bytes as token ids (id = byte value), shape ``[1, len(data)]``.

    Raises:
        CLIError: ``vocab_size < 256`` (a byte would have no embedding row).
    """
    import torch

    if vocab_size < BYTE_VOCAB:
        raise CLIError(f"byte-level tokens need vocab_size >= {BYTE_VOCAB}, the flavor has {vocab_size}")
    return torch.tensor(list(data), dtype=torch.long).unsqueeze(0)


def continuation_text(ids: list[int]) -> tuple[str, int]:
    """Generated token ids as text: runs of byte ids (< 256) decoded as UTF-8 (invalid
    sequences replaced), other ids shown as ``<id>``.

    Returns:
        ``(text, n_non_byte)``: the text and how many ids were not bytes.
    """
    parts: list[str] = []
    run: list[int] = []
    n_non_byte = 0
    for t in ids:
        if t < BYTE_VOCAB:
            run.append(t)
            continue
        parts.append(bytes(run).decode("utf-8", "replace"))
        run = []
        parts.append(f"<{t}>")
        n_non_byte += 1
    parts.append(bytes(run).decode("utf-8", "replace"))
    return "".join(parts), n_non_byte


def timed_greedy(model, input_ids, new_tokens: int) -> tuple[float, float, list[int]]:
    """Time a chunked prefill and ``new_tokens`` greedy decode steps, separately.

    A short warm-up (prefill of a few tokens and one decode step on a throwaway
    state) runs first, so that neither timing includes one-off start-up costs.
    Then ``model.prefill(input_ids, state)`` on a fresh ``state``, then
    ``new_tokens`` decode steps ``model(next_ids, state)``: each feeds the newest
    greedy token into the state and yields the next one (the first comes from the
    prefill's logits; the last step's logits are unused, as in ``generate``).

    Returns:
        ``(prefill_s, decode_s, new_ids)``: seconds for the prefill, seconds for
        all decode steps, and the ``new_tokens`` greedy token ids.
    """
    import torch

    with torch.inference_mode():
        warm = input_ids[:, :min(input_ids.shape[1], 16)]
        warm_state = model.new_state(1)
        model.prefill(warm[:, :-1] if warm.shape[1] > 1 else warm, warm_state)
        model(warm[:, -1:], warm_state)

        state = model.new_state(1)
        t0 = time.perf_counter()
        logits = model.prefill(input_ids, state)
        prefill_s = time.perf_counter() - t0

        new: list[int] = []
        nxt = logits.argmax(dim=-1, keepdim=True)
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            new.append(int(nxt[0, 0]))
            nxt = model(nxt, state)[:, -1].argmax(dim=-1, keepdim=True)
        decode_s = time.perf_counter() - t0
    return prefill_s, decode_s, new


# ------------------------------------------------------------------- command
def _git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=5, cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def config_summary(args: ModelArgs) -> dict[str, Any]:
    """The few hyper-parameters worth a glance, as display strings."""
    short = {SWA: "SWA", CSA: "CSA", HCA: "HCA"}
    types = Counter(short[t] for t in args.layer_types)
    return {
        "layers": f"{args.num_hidden_layers} ({', '.join(f'{v} {k}' for k, v in types.items())})",
        "hidden / vocab": f"{args.hidden_size} / {args.vocab_size}",
        "heads x head_dim (rope dims)": f"{args.num_attention_heads} x {args.head_dim} ({args.qk_rope_head_dim})",
        "window / CSA m / HCA m'": f"{args.sliding_window} / {args.compress_rates.get(CSA)} / "
                                   f"{args.compress_rates.get(HCA)}",
        "indexer heads x dim / top-k": f"{args.index_n_heads} x {args.index_head_dim} / {args.index_topk}",
        "experts routed / shared / per token": f"{args.n_routed_experts} / {args.n_shared_experts} / "
                                               f"{args.num_experts_per_tok}",
        "mHC streams": str(args.hc_mult),
    }


def run(ns: argparse.Namespace) -> int:
    """``tide demo``: loss and greedy generation of a flavor on real text."""
    import torch
    import torch.nn.functional as F
    from rich.console import Console
    from rich.table import Table

    from model import Transformer

    console = Console()
    if ns.flavor in ACCOUNTING_ONLY_FLAVORS:
        raise CLIError(f"flavor {ns.flavor!r} is for accounting only (tide cache-bytes, tide config show): "
                       f"too large to build here; demo runs {', '.join(DEMO_FLAVORS)}")
    if ns.flavor not in DEMO_FLAVORS:
        raise CLIError(f"unknown flavor {ns.flavor!r}; demo runs {', '.join(DEMO_FLAVORS)}")
    if ns.new_tokens < 0:
        raise CLIError(f"--new-tokens must be >= 0, got {ns.new_tokens}")
    args = ModelArgs.flavor(ns.flavor)
    data, sources = load_text(ns.tokens, ns.file)
    input_ids = byte_tokens(data, args.vocab_size)
    seq = input_ids.shape[1]
    if seq + ns.new_tokens > args.max_position_embeddings:
        raise CLIError(f"{seq} prompt + {ns.new_tokens} new tokens exceed max_position_embeddings "
                       f"({args.max_position_embeddings}) of flavor {ns.flavor!r}")

    torch.manual_seed(ns.seed)
    with console.status(f"building {ns.flavor} model"):
        model = Transformer(args).eval()
    params = model.num_params()

    with torch.inference_mode():
        with console.status(f"loss: forward over {seq} tokens"):
            logits = model(input_ids)
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                               input_ids[:, 1:].reshape(-1)).item()
    with console.status(f"timing prefill of {seq} tokens and {ns.new_tokens} greedy decode steps"):
        prefill_s, decode_s, new = timed_greedy(model, input_ids, ns.new_tokens)

    dtype = next(model.parameters()).dtype
    layout = "bf16" if dtype == torch.bfloat16 else "fp32"
    cache = cache_bytes(args, seq + len(new), layout=layout)
    cache_paper = cache_bytes(args, seq + len(new), layout="paper")

    table = Table(title=f"tide demo: flavor {ns.flavor!r}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for k, v in config_summary(args).items():
        table.add_row(k, v)
    table.add_section()
    table.add_row("text", f"{seq} bytes from {', '.join(Path(s).name for s in sources)}")
    table.add_row("params total / active", f"{params['total']:,} / {params['active']:,}")
    table.add_row("loss (nats/byte)", f"{loss:.4f}  (uniform over {args.vocab_size}: {math.log(args.vocab_size):.4f})")
    table.add_row("prefill", f"{prefill_s * 1e3:.1f} ms ({seq} tokens)")
    decode = f"{decode_s * 1e3 / len(new):.2f} ms/token ({len(new)} steps, greedy)" if new else "- (0 steps)"
    table.add_row("decode", decode)
    table.add_row("decode state", f"{_fmt_bytes(cache['total_bytes'])} ({layout}), "
                                  f"{_fmt_bytes(cache_paper['total_bytes'])} (paper FP8/BF16) "
                                  f"at {seq + len(new)} tokens")
    text, n_non_byte = continuation_text(new)
    note = f"  ({n_non_byte} ids >= {BYTE_VOCAB} are not bytes, shown as <id>)" if n_non_byte else ""
    table.add_row("continuation", repr(text) + note)
    table.add_section()
    table.add_row("run", f"torch {torch.__version__}, device cpu, seed {ns.seed}, git {_git_sha()}")
    console.print(table)
    return 0




def add_parser(sub) -> argparse.ArgumentParser:
    """The ``tide demo`` subcommand."""
    demo = sub.add_parser(
        "demo", help="run a model flavor on real text: loss, greedy generation, timings",
        description="Build a randomly initialised DeepSeek-V4 model of FLAVOR, read real text "
                    "(by default the source of a few Python standard-library modules), tokenize it "
                    "as UTF-8 bytes (token id = byte value), report the next-token cross-entropy, "
                    "then greedily generate new tokens and report parameter counts, prefill and "
                    "decode timings and the decode-state (KV cache) size.")
    demo.add_argument("--flavor", default="debug", metavar="{" + ",".join(DEMO_FLAVORS) + "}",
                      help="model flavor, one that runs on a CPU (v4-flash / v4-pro are for accounting "
                           "only: see cache-bytes, config show); default: %(default)s")
    demo.add_argument("--tokens", type=int, default=512, metavar="N",
                      help="bytes of text to read = prompt tokens; default: %(default)s")
    demo.add_argument("--file", metavar="PATH", help="read this file instead of standard-library sources")
    demo.add_argument("--seed", type=int, default=0, help="torch seed for the initial weights; "
                                                           "default: %(default)s")
    demo.add_argument("--new-tokens", type=int, default=32, metavar="N",
                      help="tokens to generate greedily; default: %(default)s")
    demo.set_defaults(func=run)
    return demo
