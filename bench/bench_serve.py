#!/usr/bin/env python
"""Serving benchmark: tide's OpenAI-compatible server against ``transformers`` ``generate`` on the same weights.

The serving target, measured on this machine with one checkpoint: output tokens/s,
time to first token (TTFT) and inter-token latency (ITL) p50/p99 at each
``--concurrency`` (default 1, 8, 32), against HF ``generate`` run one request at a
time; target >= 3x HF's throughput at concurrency 8, and ITL flat as the context
grows.

tide side. The FastAPI app (``deploy.app.build_app(deploy.loader.load_engine(path))``)
runs in this process under uvicorn on 127.0.0.1 (a free port, background thread)
-- or, with ``--url``, an already running server (``tide serve``) is used. It is
driven only over HTTP (so a continuous-batching engine behind the same interface
is measured the same way): streaming ``/v1/completions`` (``stream: true``,
temperature 0, ``logit_bias`` banning ``<|endoftext|>`` so that every request
generates exactly ``--max-tokens``), ``--concurrency`` worker coroutines pulling
requests from a queue (``httpx`` / ``httpx2`` ``AsyncClient``). Each SSE chunk is
timestamped on arrival: TTFT = first non-empty text chunk - send time (queueing
included), ITL = gaps between later non-empty chunks. A chunk may carry more than
one token (text is held back for a partial UTF-8 character or a possible stop
string), so ITL is per chunk (``itl_per: "chunk"``; ``chunks_per_token`` says how
close that is to per token). Completion tokens are counted as ``max_tokens`` when
``finish_reason`` is ``length`` (a non-streamed sanity request checks
``usage.completion_tokens``), else by re-tokenizing the text. Throughput = completion
tokens / wall time of the level. A 503 (admission limit) is retried after a short
pause (counted; TTFT still runs from the first attempt).

HF side. The same weights exported to an HF directory (``cluster.checkpoint.models.export_hf``,
in a temporary directory; an HF ``path`` is used as is), loaded with
``AutoModelForCausalLM.from_pretrained(dtype=float32)`` (``DeepseekV4ForCausalLM``),
``generate(max_new_tokens=min_new_tokens=--max-tokens, do_sample=False)`` per
request, one at a time, the same prompts; a ``BaseStreamer`` timestamps each new
token (its first ``put`` is the prompt and is skipped), so HF's ITL is per token and
its TTFT excludes HTTP and detokenization (both favour HF).

Prompts: distinct slices of the Python standard library's sources (the training
corpus), cut to exactly ``--prompt-tokens`` tokens of the run's tokenizer (a slice
is kept only when its text re-encodes to the same ids). Flatness: ITL p50 of the
last quarter of each request's chunks against the first quarter (concurrency 1),
and ITL p50 with ``--long-prompt-tokens`` of prompt against the short prompt, for
both tide and HF.

Threads: torch's default thread count (or ``--threads``) for both sides, in this
one process; the HTTP client and server share it (and the GIL) with the engine.
``other_cores`` records the CPU other processes used during each timed phase: on
a 2-core machine a busy neighbour slows decode many times over.

Output: progress and a one-line summary on stderr; one JSON document on stdout
(and in ``--out``).

    PYTHONPATH=. .venv/bin/python bench/bench_serve.py                     # runs/pipeline, ~3-5 min on 2 cores
    PYTHONPATH=. .venv/bin/python bench/bench_serve.py --concurrency 1,8 --requests 8 --max-tokens 16
    PYTHONPATH=. .venv/bin/python bench/bench_serve.py runs/pipeline --url http://127.0.0.1:8000 --skip-hf
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as _dt
import gc
import itertools
import json
import os
import platform
import random
import resource
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_CONCURRENCY = "1,8,32"
TARGET_SPEEDUP_AT_8 = 3.0
MAX_503_RETRIES = 200
RETRY_PAUSE_S = 0.02
EOS_TOKEN = "<|endoftext|>"
QUIET_CORES = 0.3  # other processes' CPU use (cores) below which the machine counts as quiet


# ============================================================== small helpers
def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _http():
    """The httpx module: ``httpx2`` (what starlette's TestClient uses here) or ``httpx``."""
    try:
        import httpx2 as httpx
    except ImportError:
        try:
            import httpx
        except ImportError:
            raise SystemExit("bench_serve needs httpx2 or httpx (an async HTTP client) in this environment") from None
    return httpx


def cpu_snapshot() -> tuple[float, float, float]:
    """(machine busy CPU-seconds from /proc/stat, this process's CPU-seconds, wall clock)."""
    busy = 0.0
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal ...
        busy = (v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        pass
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return busy, ru.ru_utime + ru.ru_stime, time.perf_counter()


def other_cores(a: tuple[float, float, float], b: tuple[float, float, float]) -> float | None:
    """CPU cores used by *other* processes between two ``cpu_snapshot``s (contention indicator)."""
    wall = b[2] - a[2]
    if wall <= 0 or a[0] == 0:
        return None
    return round(max(0.0, ((b[0] - a[0]) - (b[1] - a[1])) / wall), 2)


def wait_idle(max_wait_s: float, threshold: float = QUIET_CORES) -> float | None:
    """Wait (up to ``max_wait_s``) until other processes use < ``threshold`` cores over 1 s; returns that load.

    On 2 cores a busy neighbour stalls every OpenMP barrier of a 2-thread decode step, so
    each timed phase starts on a quiet machine when it can; ``other_cores`` records the
    load during the phase either way. ``max_wait_s <= 0``: no wait (returns None).
    """
    if max_wait_s <= 0:
        return None
    deadline = time.monotonic() + max_wait_s
    announced = False
    while True:
        a = cpu_snapshot()
        time.sleep(1.0)
        load = other_cores(a, cpu_snapshot())
        if load is None or load < threshold or time.monotonic() >= deadline:
            return load
        if not announced:
            _log(f"machine busy ({load:.1f} other cores); waiting up to {max_wait_s:g} s for it to settle")
            announced = True


def percentile(xs: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) of ``xs``, linear interpolation (numpy's default); None if empty."""
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize_ms(xs_s: list[float]) -> dict:
    """``{"n", "p50", "p99", "mean"}`` of durations given in seconds, reported in milliseconds."""
    def ms(x):
        return None if x is None else round(1000 * x, 3)

    return {"n": len(xs_s), "p50": ms(percentile(xs_s, 50)), "p99": ms(percentile(xs_s, 99)),
            "mean": ms(sum(xs_s) / len(xs_s) if xs_s else None)}


def _ratio(a, b, nd=3):
    return None if a is None or b is None or b == 0 else round(a / b, nd)


def _parse_ints(s: str) -> list[int]:
    try:
        out = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not out or any(x < 1 for x in out):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return out


def itl_by_position(gap_lists: list[list[float]]) -> dict:
    """ITL p50 of the first vs the last quarter of each request's gaps (pooled over requests), and their ratio."""
    first, last = [], []
    for g in gap_lists:
        if not g:
            continue
        k = max(1, len(g) // 4)
        first += g[:k]
        last += g[len(g) - k:]
    f, la = percentile(first, 50), percentile(last, 50)
    return {"first_quarter_p50_ms": None if f is None else round(1000 * f, 3),
            "last_quarter_p50_ms": None if la is None else round(1000 * la, 3),
            "last_over_first": _ratio(la, f), "n": [len(first), len(last)]}


# ============================================================== prompts
def stdlib_prompts(tokenizer, count: int, tokens: int, seed: int, exclude: set[str] | None = None
                   ) -> list[tuple[str, list[int]]]:
    """``count`` distinct ``(text, ids)`` slices of the Python standard library's sources, each exactly ``tokens``
    tokens of ``tokenizer`` (a ``tokenizers.Tokenizer``) whose text re-encodes to the same ids.

    Slices start at a random line of a random ``.py`` file (seeded); ``exclude`` texts are skipped.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if not {"site-packages", "dist-packages", "__pycache__"} & set(p.parts))
    if not files:
        raise SystemExit(f"no Python sources under {root} to make prompts from")
    rng = random.Random(seed)
    seen = set(exclude or ())
    out: list[tuple[str, list[int]]] = []
    for _ in range(count * 200):
        if len(out) == count:
            break
        f = rng.choice(files)
        try:
            lines = f.read_text(encoding="utf-8").splitlines(keepends=True)
        except (OSError, UnicodeDecodeError):
            continue
        if len(lines) < 8:
            continue
        start = rng.randrange(max(1, len(lines) // 2))
        chunk = "".join(lines[start:])[: tokens * 16]
        ids = tokenizer.encode(chunk).ids
        if len(ids) < tokens:
            continue
        ids = ids[:tokens]
        text = tokenizer.decode(ids)
        if not text.strip() or "\ufffd" in text or text in seen or tokenizer.encode(text).ids != ids:
            continue
        seen.add(text)
        out.append((text, ids))
    if len(out) < count:
        raise SystemExit(f"found only {len(out)} of {count} stdlib slices of {tokens} tokens under {root}")
    return out


# ============================================================== the in-process server
class InProcessServer:
    """``app`` under uvicorn on 127.0.0.1 (a free port) in a daemon thread; a context manager giving the base URL."""

    def __init__(self, app, start_timeout_s: float = 60.0):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name="bench-uvicorn")
        self.start_timeout_s = start_timeout_s

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the in-process uvicorn server did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()


# ============================================================== the HTTP client
def completion_body(text: str, max_tokens: int, eos_id: int | None, stream: bool) -> dict:
    """A greedy ``/v1/completions`` body generating exactly ``max_tokens`` (end-of-text banned)."""
    body = {"prompt": text, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    if eos_id is not None:
        body["logit_bias"] = {str(eos_id): -100}
    return body


async def stream_request(client, body: dict) -> dict:
    """One streamed completion: ``{"t0", "chunks" (arrival times of non-empty text), "text", "finish",
    "error", "retries"}``; times are ``time.perf_counter()`` seconds."""
    t0 = time.perf_counter()
    res = {"t0": t0, "chunks": [], "text": "", "finish": None, "error": None, "retries": 0}
    parts: list[str] = []
    while True:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code == 503 and res["retries"] < MAX_503_RETRIES:
                await r.aread()
                res["retries"] += 1
                retry = True
            elif r.status_code != 200:
                raw = await r.aread()
                res["error"] = f"HTTP {r.status_code}: {raw[:300].decode('utf-8', 'replace')}"
                return res
            else:
                retry = False
                async for line in r.aiter_lines():
                    now = time.perf_counter()
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    obj = json.loads(data)
                    if "error" in obj:
                        res["error"] = f"error event: {obj['error'].get('message')}"
                        break
                    ch = obj["choices"][0]
                    if ch.get("text"):
                        res["chunks"].append(now)
                        parts.append(ch["text"])
                    if ch.get("finish_reason"):
                        res["finish"] = ch["finish_reason"]
        if not retry:
            break
        await asyncio.sleep(RETRY_PAUSE_S)
    res["text"] = "".join(parts)
    if res["error"] is None and res["finish"] is None:
        res["error"] = "the stream ended without a finish_reason"
    return res


async def _get_json(base_url: str, path: str, headers: dict) -> dict | None:
    httpx = _http()
    async with httpx.AsyncClient(base_url=base_url, timeout=30, trust_env=False, headers=headers) as c:
        r = await c.get(path)
        return r.json() if r.status_code == 200 else None


async def sanity_request(base_url: str, text: str, max_tokens: int, eos_id: int | None, headers: dict,
                         timeout: float) -> dict:
    """A non-streamed greedy completion (also the warm-up): its text, finish_reason and usage."""
    httpx = _http()
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout, trust_env=False, headers=headers) as c:
        t0 = time.perf_counter()
        r = await c.post("/v1/completions", json=completion_body(text, max_tokens, eos_id, stream=False))
        wall = time.perf_counter() - t0
    if r.status_code != 200:
        raise SystemExit(f"sanity request failed: HTTP {r.status_code}: {r.text[:500]}")
    d = r.json()
    return {"text": d["choices"][0]["text"], "finish_reason": d["choices"][0]["finish_reason"],
            "usage": d.get("usage"), "wall_s": round(wall, 3)}


async def run_level(base_url: str, prompts: list[tuple[str, list[int]]], concurrency: int, max_tokens: int,
                    eos_id: int | None, *, headers: dict, timeout: float, desc: str, progress: bool) -> dict:
    """Send every prompt once, ``concurrency`` at a time, streamed; returns ``{"wall_s", "results"}``."""
    httpx = _http()
    from tqdm import tqdm

    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(prompts)):
        queue.put_nowait(i)
    results: list[dict | None] = [None] * len(prompts)
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
    bar = tqdm(total=len(prompts), desc=desc, unit="req", file=sys.stderr, disable=not progress, leave=True,
               dynamic_ncols=True)
    chunks = [0]

    async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(timeout, connect=30), limits=limits,
                                 trust_env=False, headers=headers) as client:
        async def worker():
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                try:
                    results[i] = await stream_request(client, completion_body(prompts[i][0], max_tokens, eos_id,
                                                                              stream=True))
                except Exception as e:  # a transport error is a failed request, not a crashed benchmark
                    results[i] = {"t0": None, "chunks": [], "text": "", "finish": None, "retries": 0,
                                  "error": f"{type(e).__name__}: {e}"}
                chunks[0] += len(results[i]["chunks"])
                bar.update(1)
                bar.set_postfix(chunks=chunks[0], refresh=False)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    bar.close()
    return {"wall_s": wall, "results": results}


def level_report(run: dict, concurrency: int, max_tokens: int, tokenizer) -> dict:
    """Aggregate one level's request results: throughput, TTFT / ITL / end-to-end percentiles, errors."""
    res = run["results"]
    ok = [r for r in res if r["error"] is None]
    errors = [r["error"] for r in res if r["error"] is not None]
    tokens, approx = 0, 0
    for r in ok:
        if r["finish"] == "length":
            tokens += max_tokens
        else:  # ended early (stop): count the text's tokens
            tokens += len(tokenizer.encode(r["text"]).ids)
            approx += 1
    ttft = [r["chunks"][0] - r["t0"] for r in ok if r["chunks"]]
    gaps = [[b - a for a, b in itertools.pairwise(r["chunks"])] for r in ok]
    itl = [g for gs in gaps for g in gs]
    e2e = [r["chunks"][-1] - r["t0"] for r in ok if r["chunks"]]
    n_chunks = sum(len(r["chunks"]) for r in ok)
    wall = run["wall_s"]
    return {
        "concurrency": concurrency, "requests": len(res), "ok": len(ok), "errors": len(errors),
        "first_error": errors[0] if errors else None, "retries_503": sum(r["retries"] for r in res),
        "finish_reasons": sorted({str(r["finish"]) for r in ok}),
        "completion_tokens": tokens, "tokens_counted_by_retokenizing": approx,
        "wall_s": round(wall, 3), "output_tokens_per_s": round(tokens / wall, 2) if wall > 0 else None,
        "requests_per_s": round(len(ok) / wall, 3) if wall > 0 else None,
        "ttft_ms": summarize_ms(ttft), "itl_ms": summarize_ms(itl), "e2e_ms": summarize_ms(e2e),
        "itl_per": "chunk", "chunks_per_token": _ratio(n_chunks, tokens),
        "itl_by_position": itl_by_position(gaps),
    }


# ============================================================== HF generate
def hf_directory(src, tmp: Path) -> Path:
    """An HF directory holding ``src``'s weights: the directory itself, or a tide checkpoint exported into ``tmp``."""
    if src.kind == "hf":
        return src.path
    from cluster.checkpoint.models import export_hf

    return export_hf(src.path, tmp / "hf")


def load_hf_model(hf_dir: Path):
    """``AutoModelForCausalLM`` from ``hf_dir`` in float32, eval mode."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    # use_safetensors=True: never fall back to a pickle-based pytorch_model.bin (secure defaults)
    return transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32,
                                                             use_safetensors=True).eval()


def _timing_streamer():
    from transformers.generation import BaseStreamer

    class TimingStreamer(BaseStreamer):
        """Timestamps every ``put`` (the first one is the prompt)."""

        def __init__(self):
            self.times: list[float] = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    return TimingStreamer


def run_hf(model, prompts: list[tuple[str, list[int]]], max_tokens: int, eos_id: int | None, *, desc: str,
           progress: bool, wait_idle_s: float = 0.0) -> dict:
    """HF ``generate`` (greedy, exactly ``max_tokens`` new tokens) per prompt, one at a time.

    Returns throughput, TTFT / ITL / end-to-end percentiles (ITL per token), ITL by position,
    the other processes' CPU use and the first prompt's generated ids (for the parity check).
    """
    import torch
    from tqdm import tqdm

    Streamer = _timing_streamer()
    pad = eos_id if eos_id is not None else model.config.eos_token_id

    def generate(ids: list[int], n: int, streamer=None):
        x = torch.tensor([ids])
        with torch.no_grad():
            return model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, streamer=streamer, pad_token_id=pad)

    generate(prompts[0][1], 2)  # warm-up
    wait_idle(wait_idle_s)
    ttft, gaps, e2e, tokens, first_ids = [], [], [], 0, None
    snap = cpu_snapshot()
    t_start = time.perf_counter()
    for i, (_, ids) in enumerate(tqdm(prompts, desc=desc, unit="req", file=sys.stderr, disable=not progress,
                                      dynamic_ncols=True)):
        s = Streamer()
        t0 = time.perf_counter()
        out = generate(ids, max_tokens, s)
        new = out[0, len(ids):].tolist()
        tokens += len(new)
        if i == 0:
            first_ids = new
        times = s.times[1:]  # the first put is the prompt
        if times:
            ttft.append(times[0] - t0)
            e2e.append(times[-1] - t0)
        gaps.append([b - a for a, b in itertools.pairwise(times)])
    wall = time.perf_counter() - t_start
    return {
        "requests": len(prompts), "prompt_tokens": len(prompts[0][1]), "max_tokens": max_tokens,
        "completion_tokens": tokens, "wall_s": round(wall, 3),
        "output_tokens_per_s": round(tokens / wall, 2) if wall > 0 else None,
        "ttft_ms": summarize_ms(ttft), "itl_ms": summarize_ms([g for gs in gaps for g in gs]),
        "e2e_ms": summarize_ms(e2e), "itl_per": "token", "itl_by_position": itl_by_position(gaps),
        "other_cores": other_cores(snap, cpu_snapshot()), "_first_ids": first_ids,
    }


# ============================================================== metadata
def _engine_model(engine):
    """The engine's in-process ``Transformer`` when it exposes one (``engine.model`` or ``engine.backend.model``),
    for metadata only; None otherwise (the benchmark itself uses HTTP only)."""
    for owner in (engine, getattr(engine, "backend", None)):
        m = getattr(owner, "model", None) if owner is not None else None
        if m is not None and hasattr(m, "parameters"):
            return m
    return None


def model_info(engine, src) -> dict:
    """Shape of the served model: from the engine's ``model.args`` when it has one, else the checkpoint's config."""
    args, params, mtp = None, None, None
    m = _engine_model(engine)
    if m is not None and hasattr(m, "args"):
        from dataclasses import asdict

        args = asdict(m.args)
        params = sum(p.numel() for p in m.parameters())
        mtp = sum(p.numel() for n, p in m.named_parameters() if n.startswith("mtp"))
    else:
        try:
            if src.kind == "hf":
                args = json.loads((src.path / "config.json").read_text())
            else:
                args = json.loads((src.path / "meta.json").read_text()).get("model_args")
        except (OSError, ValueError):
            args = None
    if not args:
        return {"params": params, "mtp_params": mtp}
    keys = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
            "n_routed_experts", "num_experts_per_tok", "sliding_window", "layer_types", "compress_rates",
            "index_topk", "max_position_embeddings")
    return {"params": params, "mtp_params": mtp, **{k: args[k] for k in keys if k in args}}


def device_info(engine, threads: int) -> dict:
    """CPU model, cores, torch threads and version, and where the engine's weights live (when visible)."""
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    where = None
    m = _engine_model(engine)
    if m is not None:
        with contextlib.suppress(StopIteration, AttributeError, TypeError):
            where = str(next(m.parameters()).device)
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": threads, "torch": torch.__version__,
            "engine_device": where, "python": platform.python_version()}


def code_info() -> dict:
    """Commit of the checkout and which serving / model sources differ from it (they are being edited)."""
    def git(*a):
        r = subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=30, check=False)
        return r.stdout if r.returncode == 0 else None

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "deploy", "model", "actors")
        return {"commit": commit.strip() if commit else None,
                "dirty": None if dirty is None else [ln[3:] for ln in dirty.splitlines() if ln.strip()]}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def _transformers_version() -> str | None:
    try:
        import transformers

        return transformers.__version__
    except ImportError:
        return None


# ============================================================== CLI
class _HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to options whose default is not None or False."""

    def _get_help_string(self, action):
        h = action.help or ""
        if action.default is not None and action.default is not False and action.default != argparse.SUPPRESS \
                and "%(default)" not in h:
            h += " (default: %(default)s)"
        return h


def build_parser() -> argparse.ArgumentParser:
    """The command-line options (see ``--help``)."""
    p = argparse.ArgumentParser(
        prog="bench_serve.py",
        description="Serving benchmark: tide's OpenAI-compatible server (streaming /v1/completions at several "
                    "concurrencies) against transformers generate (one request at a time) on the same weights. "
                    "Prints one JSON document on stdout; progress and a summary on stderr.",
        epilog="Example: bench_serve.py runs/pipeline --concurrency 1,8 --requests 8 --max-tokens 16",
        formatter_class=_HelpFormatter)
    p.add_argument("path", nargs="?", default="runs/pipeline",
                   help="a tide run directory (its latest checkpoint), a checkpoint directory or an HF model "
                        "directory, with tokenizer.json")
    p.add_argument("--concurrency", type=_parse_ints, default=DEFAULT_CONCURRENCY,
                   help="comma-separated concurrency levels (requests in flight)")
    p.add_argument("--requests", type=int, default=None,
                   help="requests per level (default: max(8, 2 x concurrency))")
    p.add_argument("--prompt-tokens", type=int, default=64, help="prompt length in tokens")
    p.add_argument("--max-tokens", type=int, default=64,
                   help="tokens generated per request (end-of-text is banned, so exactly this many)")
    p.add_argument("--long-prompt-tokens", type=int, default=1024,
                   help="prompt length of the flatness run at concurrency 1 (0: skip it)")
    p.add_argument("--long-requests", type=int, default=3, help="requests of the long-prompt run (tide and HF)")
    p.add_argument("--hf-requests", type=int, default=8, help="requests HF generate runs (one at a time)")
    p.add_argument("--skip-hf", action="store_true", help="measure tide only (no export, no transformers)")
    p.add_argument("--url", default=None,
                   help="benchmark a running server at this base URL (e.g. http://127.0.0.1:8000 from tide serve) "
                        "instead of starting the app in this process; PATH still gives the tokenizer and HF weights")
    p.add_argument("--api-key-env", default="TIDE_API_KEY",
                   help="environment variable holding the API key sent to --url (if set)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for both sides (default: torch's default)")
    p.add_argument("--wait-idle", type=float, default=10.0,
                   help="before each timed phase, wait up to this many seconds for other processes to leave the "
                        "CPUs (0: never wait); the load during each phase is recorded either way")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request HTTP timeout, seconds")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt selection")
    p.add_argument("--eos-token", default=EOS_TOKEN, help="the end-of-text token banned with logit_bias")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    return p


def summary_line(r: dict) -> str:
    """One human line: tide throughput per level and speedup, HF throughput, ITL flatness, the target."""
    parts = []
    for c, lv in r["tide"].items():
        sp = r["speedup_vs_hf"].get(c)
        parts.append(f"c={c} {lv['output_tokens_per_s']} tok/s" + (f" ({sp}x HF)" if sp is not None else "")
                     + f" ITL p50 {lv['itl_ms']['p50']} ms")
    hf = r.get("hf")
    if hf:
        parts.append(f"HF {hf['output_tokens_per_s']} tok/s ITL p50 {hf['itl_ms']['p50']} ms")
    fl = r["itl_flatness"].get("tide", {})
    if fl.get("by_position_c1"):
        parts.append(f"ITL last/first quarter {fl['by_position_c1']['last_over_first']}")
    if fl.get("long_prompt"):
        lp = fl["long_prompt"]
        parts.append(f"ITL {lp['prompt_tokens']}/{r['config']['prompt_tokens']}-token prompt "
                     f"{lp['itl_p50_long_over_short']}")
    t = r["target"]
    parts.append("target >=3x at c=8: " + {True: "met", False: "NOT met", None: "not measured"}[t["met"]])
    noisy = [k for k, v in r["contention"].items() if v is not None and v > 0.3]
    if noisy:
        parts.append(f"busy machine during {', '.join(noisy)}")
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (see the module docstring); 0 on success, 1 when requests failed or a check did not hold."""
    opt = build_parser().parse_args(argv)
    real_stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON only
        result, ok = _run(opt)
    text = json.dumps(result, indent=2)
    print(text, file=real_stdout, flush=True)
    if opt.out:
        opt.out.parent.mkdir(parents=True, exist_ok=True)
        opt.out.write_text(text + "\n")
    _log(summary_line(result))
    return 0 if ok else 1


def _run(opt) -> tuple[dict, bool]:
    import torch
    from tokenizers import Tokenizer

    from deploy.loader import locate

    t_total = time.perf_counter()
    for name in ("prompt_tokens", "max_tokens", "hf_requests", "long_requests"):
        if getattr(opt, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    if opt.threads:
        torch.set_num_threads(opt.threads)
    threads = torch.get_num_threads()
    progress = not opt.no_progress
    levels = list(dict.fromkeys(opt.concurrency))
    per_level = {c: opt.requests or max(8, 2 * c) for c in levels}

    try:
        src = locate(opt.path)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    tokenizer = Tokenizer.from_file(str(src.tokenizer))
    eos_id = tokenizer.token_to_id(opt.eos_token)
    if eos_id is None:
        _log(f"warning: {opt.eos_token!r} is not in the tokenizer; requests may end early (counted by text)")
    _log(f"checkpoint {src.path} ({src.kind}); torch threads {threads}; making prompts from the stdlib ...")
    n_short = max([*per_level.values(), 0 if opt.skip_hf else opt.hf_requests])
    prompts = stdlib_prompts(tokenizer, n_short, opt.prompt_tokens, opt.seed)
    long_prompts = []
    if opt.long_prompt_tokens:
        long_prompts = stdlib_prompts(tokenizer, opt.long_requests, opt.long_prompt_tokens, opt.seed + 1,
                                      exclude={t for t, _ in prompts})

    headers = {}
    if opt.url and os.environ.get(opt.api_key_env):
        headers["Authorization"] = f"Bearer {os.environ[opt.api_key_env]}"

    engine = None
    contention: dict[str, float | None] = {}
    tide: dict[str, dict] = {}
    long_tide = None
    if opt.url:
        server = contextlib.nullcontext(opt.url.rstrip("/"))
    else:
        from deploy.app import build_app
        from deploy.loader import load_engine

        t0 = time.perf_counter()
        engine = load_engine(opt.path)
        _log(f"engine loaded in {time.perf_counter() - t0:.1f} s")
        server = InProcessServer(build_app(engine))
    minfo = model_info(engine, src)
    dinfo = device_info(engine, threads)

    with server as base_url:
        sanity = asyncio.run(sanity_request(base_url, prompts[0][0], opt.max_tokens, eos_id, headers, opt.timeout))
        usage = (sanity.get("usage") or {}).get("completion_tokens")
        sanity["exact_max_tokens"] = usage == opt.max_tokens
        if not sanity["exact_max_tokens"]:
            _log(f"warning: the sanity request generated {usage} tokens, not {opt.max_tokens} "
                 f"(finish_reason {sanity['finish_reason']})")
        for c in levels:
            wait_idle(opt.wait_idle)
            snap = cpu_snapshot()
            run = asyncio.run(run_level(base_url, prompts[: per_level[c]], c, opt.max_tokens, eos_id,
                                        headers=headers, timeout=opt.timeout, desc=f"tide c={c}",
                                        progress=progress))
            lv = level_report(run, c, opt.max_tokens, tokenizer)
            lv["other_cores"] = contention[f"tide_c{c}"] = other_cores(snap, cpu_snapshot())
            lv["server_stats"] = asyncio.run(_get_json(base_url, "/v1/stats", headers))
            tide[str(c)] = lv
            if c == 1:
                first = next((r for r in run["results"] if r["error"] is None), None)
                sanity["stream_equals_non_stream"] = None if first is None else first["text"] == sanity["text"]
        if long_prompts:
            wait_idle(opt.wait_idle)
            snap = cpu_snapshot()
            run = asyncio.run(run_level(base_url, long_prompts, 1, opt.max_tokens, eos_id, headers=headers,
                                        timeout=opt.timeout, desc=f"tide c=1, {opt.long_prompt_tokens}-token prompt",
                                        progress=progress))
            long_tide = level_report(run, 1, opt.max_tokens, tokenizer)
            long_tide["other_cores"] = contention["tide_long"] = other_cores(snap, cpu_snapshot())

    del engine
    gc.collect()

    hf = hf_long = None
    parity = None
    if not opt.skip_hf:
        import transformers  # noqa: F401  (fail early and clearly if missing)

        with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
            t0 = time.perf_counter()
            hf_dir = hf_directory(src, Path(tmp))
            model = load_hf_model(hf_dir)
            _log(f"HF model ({type(model).__name__}) ready in {time.perf_counter() - t0:.1f} s")
            hf = run_hf(model, prompts[: opt.hf_requests], opt.max_tokens, eos_id, desc="HF generate",
                        progress=progress, wait_idle_s=opt.wait_idle)
            hf["model_class"] = type(model).__name__
            hf["transformers"] = _transformers_version()
            hf["params"] = sum(p.numel() for p in model.parameters())  # HF's model has no MTP layer
            contention["hf"] = hf["other_cores"]
            if long_prompts:
                hf_long = run_hf(model, long_prompts, opt.max_tokens, eos_id,
                                 desc=f"HF generate, {opt.long_prompt_tokens}-token prompt", progress=progress,
                                 wait_idle_s=opt.wait_idle)
                contention["hf_long"] = hf_long["other_cores"]
            del model
            gc.collect()
        first_ids = hf.pop("_first_ids")
        if hf_long:
            hf_long.pop("_first_ids")
        hf_text = tokenizer.decode(first_ids) if first_ids is not None else None
        tide_text = sanity["text"]
        common = 0
        if hf_text is not None:
            while common < min(len(hf_text), len(tide_text)) and hf_text[common] == tide_text[common]:
                common += 1
        parity = {"prompt": 0, "greedy_text_equal": hf_text == tide_text, "common_prefix_chars": common,
                  "tide_chars": len(tide_text), "hf_chars": None if hf_text is None else len(hf_text)}

    hf_tps = hf["output_tokens_per_s"] if hf else None
    speedup = {c: _ratio(lv["output_tokens_per_s"], hf_tps, 2) for c, lv in tide.items()}
    flat: dict[str, dict] = {"tide": {}, "hf": {}}
    if "1" in tide:
        flat["tide"]["by_position_c1"] = tide["1"]["itl_by_position"]
    if long_tide:
        short_p50 = tide["1"]["itl_ms"]["p50"] if "1" in tide else None
        flat["tide"]["long_prompt"] = {
            "prompt_tokens": opt.long_prompt_tokens, "requests": long_tide["requests"], "errors": long_tide["errors"],
            "ttft_ms": long_tide["ttft_ms"], "itl_ms": long_tide["itl_ms"],
            "itl_by_position": long_tide["itl_by_position"], "output_tokens_per_s": long_tide["output_tokens_per_s"],
            "other_cores": long_tide["other_cores"],
            "itl_p50_long_over_short": _ratio(long_tide["itl_ms"]["p50"], short_p50)}
    if hf:
        flat["hf"]["by_position"] = hf["itl_by_position"]
    if hf_long:
        flat["hf"]["long_prompt"] = {
            "prompt_tokens": opt.long_prompt_tokens, "requests": hf_long["requests"], "ttft_ms": hf_long["ttft_ms"],
            "itl_ms": hf_long["itl_ms"], "itl_by_position": hf_long["itl_by_position"],
            "output_tokens_per_s": hf_long["output_tokens_per_s"], "other_cores": hf_long["other_cores"],
            "itl_p50_long_over_short": _ratio(hf_long["itl_ms"]["p50"], hf["itl_ms"]["p50"])}

    at8 = speedup.get("8")
    result = {
        "benchmark": "serve",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": dinfo,
        "checkpoint": {"path": str(src.path), "kind": src.kind, "name": src.name, "tokenizer": str(src.tokenizer)},
        "code": code_info(),
        "model": minfo,
        "server": {"url": opt.url, "in_process": opt.url is None, "endpoint": "/v1/completions", "stream": True,
                   "temperature": 0, "eos_banned": eos_id is not None, "client": _http().__name__,
                   "other_cores_includes_server": opt.url is not None},
        "config": {"concurrency": levels, "requests": {str(c): n for c, n in per_level.items()},
                   "prompt_tokens": opt.prompt_tokens, "max_tokens": opt.max_tokens,
                   "long_prompt_tokens": opt.long_prompt_tokens or None,
                   "long_requests": opt.long_requests if long_prompts else None,
                   "hf_requests": None if opt.skip_hf else opt.hf_requests, "seed": opt.seed,
                   "prompts": "distinct Python stdlib slices", "torch_threads": threads,
                   "wait_idle_s": opt.wait_idle},
        "sanity": sanity,
        "hf": hf,
        "tide": tide,
        "speedup_vs_hf": speedup,
        "itl_flatness": flat,
        "parity": parity,
        "contention": contention,
        "target": {"speedup_at_8": TARGET_SPEEDUP_AT_8, "measured": at8,
                   "met": None if at8 is None else at8 >= TARGET_SPEEDUP_AT_8},
        "total_wall_s": round(time.perf_counter() - t_total, 1),
    }
    failed = sum(lv["errors"] for lv in tide.values()) + (long_tide["errors"] if long_tide else 0)
    return result, failed == 0 and sanity["exact_max_tokens"]


if __name__ == "__main__":
    sys.exit(main())
