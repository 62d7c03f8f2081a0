"""The ``tide`` command-line interface.

Subcommands (``tide --help`` and ``tide <command> --help`` explain each):

- ``tide demo``: run a DeepSeek-V4 flavor on real text (byte-level tokens): loss,
  greedy generation, timings, parameter counts and decode-state size.
- ``tide cache-bytes``: the decode-state (KV cache) accounting of a flavor as JSON.
- ``tide config show FLAVOR`` / ``tide config check PATH``: print a flavor as YAML /
  validate a model YAML.
- ``tide dashboards [--push URL]``: write the Grafana dashboards (and upload them).

Run as ``tide ...`` once installed, or ``python -m cluster.cli ...`` from the
repository root. User errors print one ``tide: error: ...`` line and exit with 2.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from model.cache_bytes import LAYOUTS, cache_bytes
from model.config import ACCOUNTING_ONLY_FLAVORS, CSA, FLAVORS, HCA, SWA, ModelArgs

EXIT_USAGE = 2
BYTE_VOCAB = 256
# Standard-library modules whose source is the demo's default text: real, always
# present, and readable without network or data downloads.
DEMO_TEXT_MODULES = ("json.decoder", "json.encoder", "textwrap", "string", "heapq", "bisect", "shlex")
# Flavors small enough to build and run on a CPU (the others are for accounting only).
DEMO_FLAVORS = tuple(f for f in FLAVORS if f not in ACCOUNTING_ONLY_FLAVORS)


class CLIError(ValueError):
    """A user error the CLI reports as one line and exit status 2."""


# ------------------------------------------------------------------------ text
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


# ------------------------------------------------------------------- commands
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


def cmd_demo(ns: argparse.Namespace) -> int:
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


def cmd_train(ns: argparse.Namespace) -> int:
    from cluster import train

    given = (("--name", ns.name), ("--storage-path", ns.storage_path), ("--address", ns.address), ("--chat", ns.chat))
    argv = [ns.config] + [a for k, v in given if v is not None for a in (k, v)]
    return train.main(argv + (["--then-serve"] if ns.then_serve else []))


def cmd_export(ns: argparse.Namespace) -> int:
    """``tide export RUN|CHECKPOINT OUT``: the checkpoint (a run's newest intact one) as an HF directory.
    Names the exported step; a newer damaged checkpoint passed over is named with its problem, on one line."""
    from cluster import checkpoint as ckpt
    from cluster.trainer import export_hf, resolve_checkpoint

    skipped: list[tuple[Path, str]] = []
    try:
        src = resolve_checkpoint(ns.checkpoint, skipped=skipped)
        out = export_hf(src, Path(ns.out))
    except ValueError as e:
        raise CLIError(str(e)) from None
    try:
        step = f"step {ckpt.checkpoint_step(src)}"
    except ValueError:  # a checkpoint directory under another name
        step = "checkpoint"
    for path, problem in skipped:
        why = problem.removeprefix(f"checkpoint {path}: ").removeprefix(f"{path}{os.sep}")  # the path is named
        print(f"tide: warning: skipped the newer step {ckpt.checkpoint_step(path)} ({path}), it is damaged: {why}; "
              f"exported {step} instead", file=sys.stderr)
    print(f"exported {step} ({src}) -> {out}")
    return 0


def cmd_plan(ns: argparse.Namespace) -> int:
    """``tide plan CONFIG``: the actor graph and pipeline schedule of a training config, without starting anything."""
    from comm.pipeline import SCHEDULES
    from comm.schedule import format_schedule, simulate

    from .data import sequences_per_batch
    from .topology import build_graph, load_topology
    from .train_config import load_train_config, model_args_for

    try:
        cfg = load_train_config(ns.config)
    except ValueError as e:
        raise CLIError(str(e)) from None
    if cfg.parallel is None:
        raise CLIError(f"{ns.config} has no `parallel` section: it trains in one process (see configs/pipeline.yaml)")
    par = cfg.parallel
    args = model_args_for(cfg, cfg.data.vocab_size)
    topo = load_topology(par.topology)
    graph = build_graph(topo, args.num_hidden_layers, args.n_routed_experts)
    P, E = graph.num_stages, len(graph.expert_groups[0])
    per = args.n_routed_experts // E
    print(f"{len(graph.actors)} stage actors = {P} pipeline stages x {E} expert shards "
          f"({graph.cpus_per_actor:g} CPU each)")
    for a in graph.actors:
        lo, hi = graph.layer_slices[a.stage]
        ends = (["embedding"] if a.stage == 0 else []) + (["head"] + (["MTP"] if args.num_nextn_predict_layers else [])
                                                            if a.stage == P - 1 else [])
        print(f"  rank {a.rank}: stage {a.stage} shard {a.ep_rank} on rack {a.rack}: layers {lo}..{hi - 1}"
              f"{' + ' + ', '.join(ends) if ends else ''}, experts {a.ep_rank * per}..{(a.ep_rank + 1) * per - 1}")
    pipe = [lk for lk in graph.links if lk.kind == "pipeline"]
    by_class = {c: sum(lk.link_class == c for lk in pipe) for c in ("intra-rack", "inter-rack")}
    print(f"pipeline links (activations forward, gradients back): {len(pipe)} "
          f"({by_class['inter-rack']} inter-rack, {by_class['intra-rack']} intra-rack); expert all-to-all: "
          f"{P} group(s) of {E} shard(s), intra-rack")
    if par.link_model is None:
        print("link model: off (parallel.link_model: null): transfers are not delayed")
    else:
        from comm.link_model import LinkModel

        # validated by load_train_config; "default" is the built-in classes
        link = LinkModel() if par.link_model == "default" else LinkModel.from_file(par.link_model)
        print(f"link model ({par.link_model}): every transfer held for latency + bytes / bandwidth")
        for c, lc in link.classes.items():
            print(f"  {c}: latency {lc.latency_s * 1e6:g} us, bandwidth {lc.bandwidth_Bps * 8 / 1e9:g} Gbit/s "
                  f"(source: {link.source_of(c)})")
    unused = sorted(set(topo.racks) - {a.rack for a in graph.actors})
    if unused:
        print(f"note: rack(s) {unused} host no stage")
    sched = SCHEDULES[par.schedule](P, par.microbatches)
    sim = simulate(sched, f_cost=1.0, b_cost=2.0)
    xw = min(par.expert_waves or par.waves, per)
    print(f"schedule {par.schedule}, {par.microbatches} microbatch(es) per shard, {par.waves} wave(s) each, "
          f"{xw} expert wave(s) per MoE layer (backward = 2 x forward):")
    print(format_schedule(sched))
    print(f"simulated bubble {sim.bubble:.3f}; peak live microbatches per stage {sim.peak_live}")
    for i, st in enumerate(cfg.curriculum):
        B = sequences_per_batch(st.batch_tokens, st.seq_len)
        mb = B // E // par.microbatches
        waves = "+".join(str(mb * (w + 1) // par.waves - mb * w // par.waves) for w in range(par.waves))
        print(f"curriculum[{i}] {st.name}: {B} sequences/step -> {B // E} per shard -> {mb} per microbatch -> "
              f"waves of {waves}")
    return 0


def cmd_calibrate(ns: argparse.Namespace) -> int:
    """``tide calibrate``: measure the links (nccl-tests or a gloo probe) and write the link-model file."""
    from comm.nccl_tests import NcclTestsError

    from . import calibrate

    try:
        calibrate.main(ns)
    except NcclTestsError as e:  # a failed benchmark run: exit 1 with its error, not a usage error
        print(f"tide: error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        raise CLIError(str(e)) from None
    return 0


def _serve_running() -> bool:
    """Whether the connected Ray cluster already has a Serve controller (another ``tide serve`` or app)."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:  # no such actor
        return False
    return True


def cmd_serve(ns: argparse.Namespace) -> int:
    """``tide serve PATH``: the OpenAI-compatible endpoints under Ray Serve (blocks until Ctrl-C)."""
    import socket

    from deploy.loader import model_args_of, read_topology

    topology = None
    if ns.max_batch < 1:
        raise CLIError(f"--max-batch must be >= 1, got {ns.max_batch}")
    if ns.threads is not None and ns.threads < 1:
        raise CLIError(f"--threads must be >= 1, got {ns.threads}")
    if not 0 < ns.port < 65536:
        raise CLIError(f"--port must be in 1..65535, got {ns.port}")
    if ns.model_name is not None and not ns.model_name.strip():
        raise CLIError("--model-name must not be empty")
    from deploy.serve import KeyDigest, describe_api_key, read_api_key

    key_file = str(Path(ns.api_key_file).expanduser().resolve()) if ns.api_key_file else None
    try:
        # read HERE (this shell's environment, this machine's file): a replica on a joined cluster sees
        # neither; it gets a salted digest, never the key (an unreadable / empty file fails here, named)
        api_key = read_api_key(ns.api_key_env, key_file)
    except ValueError as e:
        raise CLIError(str(e)) from None
    key_digest = KeyDigest.of(api_key).text if api_key is not None else None
    del api_key
    try:
        with socket.socket() as sock:  # the HTTP proxy binds here: fail now, not inside Serve
            sock.bind((ns.host, ns.port))
    except OSError as e:
        raise CLIError(f"cannot listen on {ns.host}:{ns.port}: {e.strerror or e} (pick another --port / --host)") \
            from None
    graph = None
    try:
        args = model_args_of(ns.path)  # fail fast on a bad path, before Ray starts (the replica loads the weights)
        from cluster.trainer import resolve_checkpoint

        if not (Path(ns.path) / "config.json").is_file():
            from cluster import checkpoint as ckpt

            problems = ckpt.verify_checkpoint(resolve_checkpoint(ns.path))  # a damaged checkpoint is named here
            if problems:
                raise ValueError("; ".join(problems))
        if ns.topology:
            from cluster.topology import build_graph, load_topology

            topology = read_topology(ns.topology)
            graph = build_graph(load_topology(topology), args.num_hidden_layers, args.n_routed_experts)
            if graph.gpus_per_actor and not (ns.address or os.environ.get("RAY_ADDRESS")):
                import torch

                if not torch.cuda.is_available():
                    raise ValueError("the topology asks gpus_per_actor: 1 but this machine has no CUDA device "
                                     "(simulated racks use local devices); use gpus_per_actor: 0 or --address")
    except ValueError as e:
        raise CLIError(str(e)) from None
    import ray
    from ray import serve

    from cluster.topology import cpus_per_rack
    from cluster.train import init_ray
    from deploy.serve import REPLICA_CPUS, build

    local = None
    started = False
    need = cpus_per_rack(graph, {next(a.rack for a in graph.actors if a.stage == 0): REPLICA_CPUS}) if graph else {}
    try:
        if topology is not None and not (ns.address or os.environ.get("RAY_ADDRESS")):
            # no cluster named: simulate the topology's racks on this machine, as `tide train` does
            from cluster.local_racks import start_local_racks

            local = start_local_racks({r: math.ceil(c) for r, c in need.items()})
            mode = f"embedded ({len(need)} simulated rack(s))"
        else:
            mode = init_ray(ns.address)
    except ConnectionError as e:
        raise CLIError(f"cannot connect to the Ray cluster: {e} (a token-auth cluster needs RAY_AUTH_MODE=token "
                       f"and its token)") from None
    try:
        if topology is not None and local is None:  # a joined cluster must have the racks, or Serve waits forever
            have: dict[str, float] = {}
            gpus: dict[str, float] = {}
            for node in ray.nodes():
                if node.get("Alive"):
                    r = (node.get("Labels") or {}).get("rack")
                    have[r] = have.get(r, 0) + node.get("Resources", {}).get("CPU", 0)
                    gpus[r] = gpus.get(r, 0) + node.get("Resources", {}).get("GPU", 0)
            short = {r: c for r, c in need.items() if have.get(r, 0) < c}
            if graph.gpus_per_actor:
                short.update({r: "GPUs" for r in need if gpus.get(r, 0) < sum(1 for a in graph.actors if a.rack == r)})
            if short:
                raise CLIError(f"the Ray cluster cannot place the topology: it needs CPUs per rack {need}"
                               f"{' and a GPU per actor' if graph.gpus_per_actor else ''}; the nodes labelled "
                               f"rack=... offer {({r: c for r, c in have.items() if r})} CPUs (label nodes with "
                               f"`ray start --labels rack=<name>`)")
        if _serve_running():
            raise CLIError("Ray Serve already runs on this cluster: tide serve would replace its applications and "
                           "HTTP options. Use another cluster, or add tide to that Serve with `serve deploy` / "
                           "`serve run deploy/serve.yaml`")
        started = True  # from here on this process owns the cluster's Serve and shuts it down on the way out
        serve.start(http_options={"host": ns.host, "port": ns.port})
        try:
            key_args = {"api_key_digest": key_digest} if key_digest is not None else \
                {"api_key_env": None}  # no key: the replica does not look in its own environment either
            serve.run(build({"path": str(Path(ns.path).resolve()), "model_name": ns.model_name, **key_args,
                             "topology": topology, "max_batch": ns.max_batch, "torch_threads": ns.threads}),
                      name="tide", route_prefix="/")
        except RuntimeError as e:
            last = [ln for ln in str(e).splitlines() if ln.strip()][-1:]
            raise CLIError(f"the Serve replica failed to start: {last[0] if last else e} (the replica's log is in "
                           f"the Ray dashboard / /tmp/ray/session_latest/logs/serve)") from None
        key = describe_api_key(ns.api_key_env, key_file)  # where the key comes from, never the key
        where = "in the replica" if topology is None else "on stage actors"
        print(f"tide: serving {ns.path} {where} on http://{ns.host}:{ns.port}/v1 ({mode} Ray cluster; API key "
              f"{key}); Ctrl-C stops", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        if started:  # never shut down a Serve this process did not start (another tide serve's)
            try:
                serve.shutdown()
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
        ray.shutdown()
        if local is not None:
            local.shutdown()
    return 0


def cmd_verify(ns: argparse.Namespace) -> int:
    """``tide verify``: prove every Triton kernel's index arithmetic with Z3 and print a table."""
    try:
        import z3  # noqa: F401

        from kernels.verify import models, verify
    except ImportError as e:
        raise CLIError(f"tide verify needs z3-solver and triton (pip install z3-solver triton): {e}") from None
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    console = Console()
    todo = models(quick=ns.quick)
    t0 = time.perf_counter()
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("proving", total=len(todo))

        def step(m):
            bar.update(task, advance=1, description=m.name)
        results = verify(quick=ns.quick, progress=step)
    table = Table(title="kernel index arithmetic (Z3)")
    for col in ("kernel launch", "declared range", "accesses", "obligations", "result", "seconds"):
        table.add_column(col)
    failed = []
    for m, rs in results:
        bad = [r for r in rs if not r.ok]
        failed += bad
        accesses = len({r.access for r in rs if not r.access.endswith("intermediate(s)")})
        table.add_row(m.name, m.declared, str(accesses), str(len(rs)),
                      "[green]proved[/green]" if not bad else f"[red]{len(bad)} failed[/red]",
                      f"{sum(r.seconds for r in rs):.2f}")
    console.print(table)
    for r in failed:
        console.print(f"[red]FAILED[/red] {r}")
    n = sum(len(rs) for _, rs in results)
    console.print(f"{len(results)} launch configurations, {n - len(failed)}/{n} obligations proved in "
                  f"{time.perf_counter() - t0:.1f} s")
    return 1 if failed else 0


def cmd_cache_bytes(ns: argparse.Namespace) -> int:
    """``tide cache-bytes``: print :func:`model.cache_bytes.cache_bytes` as JSON."""
    args = ModelArgs.flavor(ns.flavor)
    if ns.context > args.max_position_embeddings:
        raise CLIError(f"--context {ns.context} exceeds max_position_embeddings "
                       f"({args.max_position_embeddings}) of flavor {ns.flavor!r}")
    try:
        result = cache_bytes(args, ns.context, batch=ns.batch, layout=ns.layout)
    except ValueError as e:
        raise CLIError(str(e)) from None
    print(json.dumps({"flavor": ns.flavor, **result}, indent=2))
    return 0


def cmd_config_show(ns: argparse.Namespace) -> int:
    """``tide config show``: a flavor's resolved ModelArgs as YAML."""
    sys.stdout.write(ModelArgs.flavor(ns.flavor).to_yaml())
    return 0


def cmd_config_check(ns: argparse.Namespace) -> int:
    """``tide config check``: validate a model YAML (``ModelArgs.from_yaml``)."""
    try:
        args = ModelArgs.from_yaml(ns.path)
    except ValueError as e:
        raise CLIError(str(e)) from None
    print(f"OK: {ns.path} ({args.num_hidden_layers} layers, hidden {args.hidden_size}, "
          f"vocab {args.vocab_size})")
    return 0


# ----------------------------------------------------------------- dashboards
def cmd_dashboards(ns: argparse.Namespace) -> int:
    """``tide dashboards``: write the Grafana dashboards (``deploy.dashboards``) as JSON files, also into the
    dashboard folder of the latest Ray session's Grafana provisioning, and with ``--push URL`` upload them and
    a Prometheus datasource to a Grafana server (token from the environment, never printed)."""
    try:
        from deploy import dashboards as dash
    except ImportError as e:
        raise CLIError(f"tide dashboards needs grafana-foundation-sdk and grafana-client (Python >= 3.11; "
                       f"pip install -e .): {e}") from None
    token = None
    if ns.push:
        token = os.environ.get(ns.token_env, "").strip()  # `$(cat token-file)` may keep a line break
        if not token:
            raise CLIError(f"--push needs a Grafana service-account token in the environment variable "
                           f"{ns.token_env} (Grafana: Administration > Users and access > Service accounts, add a "
                           "token; role Admin to create the datasource); it is read from there only, never from "
                           "arguments")
        try:
            dash.check_token(token)
        except ValueError as e:
            raise CLIError(f"${ns.token_env}: {e}") from None
        try:  # before writing anything; the messages never show user info, and the token is masked anyway
            dash.check_url(ns.push, "--push URL")
            dash.check_url(ns.prometheus_url, "--prometheus-url")
        except ValueError as e:
            raise CLIError(dash.redact(str(e), token)) from None
    for path in dash.write_dashboards(ns.out):
        print(f"wrote {path}")
    if not ns.no_ray:
        target = dash.ray_dashboards_dir(ns.ray_temp_dir)
        if target is None:
            root = ns.ray_temp_dir or dash.ray_temp_dir()
            print(f"no Ray session with Grafana provisioning under {root} (start one with `ray start --head`): "
                  "skipped")
        else:
            for path in dash.write_dashboards(target):
                print(f"wrote {path} (Ray's Grafana provisioning, folder 'Ray')")
    if ns.push:
        try:
            result = dash.push(ns.push, token, ns.prometheus_url, datasource_name=ns.datasource_name,
                               timeout=ns.timeout)
        except (ValueError, dash.PushError) as e:
            raise CLIError(dash.redact(str(e), token)) from None
        ds = result["datasource"]
        print(f"datasource {ds['name']!r} (uid {ds['uid']}) {ds['action']}: {dash._safe_url(ns.prometheus_url)}")
        for d in result["dashboards"]:
            print(f"dashboard {d['uid']} saved (version {d['version']}): {d['url']}")
    return 0


def add_dashboards_parser(sub) -> None:
    """The ``tide dashboards`` subcommand."""
    db = sub.add_parser(
        "dashboards", help="write the training and serving Grafana dashboards; --push uploads them",
        description="Build the Grafana dashboards of training (uid tide-training) and serving (uid tide-serving) "
                    "with grafana-foundation-sdk and write them as JSON into --out and into the dashboard folder of "
                    "the latest Ray session's Grafana provisioning (<ray temp dir>/session_latest/metrics/grafana; "
                    "a Grafana started with that session's grafana.ini shows them in its folder 'Ray'). With --push "
                    "URL, upload both (overwriting) and a Prometheus datasource to that Grafana server with "
                    "grafana-client, authenticated by the service-account token in $GRAFANA_TOKEN (--token-env).")
    db.add_argument("--out", default="runs/dashboards", help="folder for the JSON files; default: %(default)s")
    db.add_argument("--ray-temp-dir", metavar="DIR",
                    help="Ray's temporary root (default: $RAY_TMPDIR, else $TMPDIR, else /tmp, plus /ray)")
    db.add_argument("--no-ray", action="store_true", help="do not write into Ray's Grafana provisioning folder")
    db.add_argument("--push", metavar="URL", help="Grafana server to upload to, e.g. http://127.0.0.1:3000")
    db.add_argument("--prometheus-url", default="http://127.0.0.1:9090",
                    help="URL of the Prometheus datasource Grafana queries (from the Grafana server's side); "
                         "default: %(default)s")
    db.add_argument("--datasource-name", default="tide-prometheus",
                    help="name of the datasource to create or update (uid tide-prometheus); default: %(default)s")
    db.add_argument("--token-env", default="GRAFANA_TOKEN", metavar="NAME",
                    help="environment variable holding the Grafana token; default: %(default)s")
    db.add_argument("--timeout", type=float, default=10.0, help="seconds per HTTP request; default: %(default)s")
    db.set_defaults(func=cmd_dashboards)


# --------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    """The ``tide`` argument parser (one subparser per command)."""
    parser = argparse.ArgumentParser(
        prog="tide",
        description="tide: train and serve DeepSeek-V4-style models on Ray.",
        epilog="Run 'tide COMMAND --help' for the options of a command.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

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
    demo.set_defaults(func=cmd_demo)

    from cluster import train as _train

    tr = _train.add_arguments(sub.add_parser(
        "train", help="train with a curriculum YAML under Ray Train (embedded local cluster unless one runs)",
        description=_train.DESCRIPTION))
    ex = sub.add_parser(
        "export", help="export a training checkpoint as an HF-format directory (model.save_hf)",
        description="Verify a training checkpoint (sha256 manifest) and write its model as a directory that "
        "transformers.DeepseekV4ForCausalLM.from_pretrained and model.load_hf read.")
    ex.add_argument("checkpoint", help="a checkpoint directory (<run>/checkpoints/step-NNNNNNNN) or a run directory "
                    "(its latest checkpoint)")
    ex.add_argument("out", help="output directory (created; an existing checkpoint there is replaced atomically)")
    cb = sub.add_parser(
        "cache-bytes", help="decode-state (KV cache) bytes of a flavor, as JSON",
        description="Print the per-sequence decode state of FLAVOR at a context length as JSON: "
                    "sliding-window buffers, compressed CSA/HCA entries, uncompressed tails, CSA "
                    "overlap slices and indexer keys, per layer type, with the ratio to "
                    "DeepSeek-V3.2's MLA cache (see model/cache_bytes.py).")
    cb.add_argument("--flavor", default="v4-flash", choices=FLAVORS, help="default: %(default)s")
    cb.add_argument("--context", type=int, default=1 << 20, metavar="TOKENS",
                    help="context length per sequence, at most the flavor's max_position_embeddings; "
                         "default: %(default)s")
    cb.add_argument("--batch", type=int, default=1, help="sequences; default: %(default)s")
    cb.add_argument("--layout", default="paper", choices=LAYOUTS,
                    help="storage: fp32/bf16 everywhere, or paper (FP8 non-RoPE dims, BF16 RoPE dims); "
                         "default: %(default)s")
    cb.set_defaults(func=cmd_cache_bytes)
    sv = sub.add_parser(
        "serve", help="serve a run / checkpoint / HF directory behind OpenAI-compatible endpoints (Ray Serve)",
        description="Start Ray Serve (joining a running cluster, else an embedded one) with /v1/completions, "
                    "/v1/chat/completions (stream: true for server-sent events), /v1/models and /health for the "
                    "model in PATH: a run directory (its latest checkpoint), a training checkpoint or an HF-format "
                    "directory, each with its tokenizer.json (and tokenizer_config.json's chat template). Requests "
                    "are batched continuously. With --topology the model runs on stage actors placed on racks "
                    "(the replica's placement group, bundle label selectors): on the cluster given by --address or "
                    "RAY_ADDRESS (nodes labelled rack=...), else on racks simulated by local labelled raylets.")
    sv.add_argument("path", help="runs/<name>, runs/<name>/checkpoints/step-N, or an HF model directory")
    sv.add_argument("--host", default="127.0.0.1", help="bind address; default: %(default)s (local only)")
    sv.add_argument("--port", type=int, default=8000, help="default: %(default)s")
    sv.add_argument("--model-name", help="the model id clients send (default: derived from PATH)")
    sv.add_argument("--api-key-env", default="TIDE_API_KEY",
                    help="environment variable holding the bearer key clients must send; unset = no key "
                         "(default: %(default)s)")
    sv.add_argument("--api-key-file", metavar="PATH",
                    help="file whose first line is the bearer key clients must send (takes precedence over "
                         "--api-key-env; keep it mode 600). The key is never printed or logged")
    sv.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, a local head, or embedded)")
    sv.add_argument("--topology", metavar="YAML",
                    help="serve on stage actors: a topology YAML (racks, pipeline_stages, expert_parallel, "
                         "cpus_per_actor) or a training config whose parallel.topology to use, e.g. "
                         "configs/pipeline.yaml (default: the model runs in the Serve replica)")
    sv.add_argument("--max-batch", type=int, default=32,
                    help="sequences decoded together at most; more requests wait (default: %(default)s)")
    sv.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads of the serving replica (default: torch's; on small machines "
                         "leave a core for the HTTP side: on 2 cores 1 thread decodes ~1.6x faster than 2)")
    sv.set_defaults(func=cmd_serve)
    vf = sub.add_parser(
        "verify", help="prove with Z3 that every Triton kernel's loads/stores stay in bounds and write once",
        description="For every kernel launch configuration and every shape in its declared range (not just test "
                    "shapes): each unmasked load and store is in bounds, its flat offset is the row-major offset of "
                    "its index and fits its integer width, every int32 intermediate fits int32, and every output "
                    "element is written exactly once. Uses the kernels' own index helpers (kernels/verify/). "
                    "Exit status 1 when an obligation fails (its counterexample is printed).")
    vf.add_argument("--quick", action="store_true", help="one configuration per kernel")
    vf.set_defaults(func=cmd_verify)
    pl = sub.add_parser(
        "plan", help="print a pipeline config's actor graph and schedule (starts nothing)",
        description="Validate CONFIG (a training YAML with a `parallel` section) and print its actor graph: "
                    "every stage actor with its rack, layers and experts, the links by class, the per-stage "
                    "pipeline schedule with its simulated bubble, and how each curriculum stage's batch splits "
                    "into shards, microbatches and waves.")
    pl.add_argument("config", help="training YAML with a `parallel` section, e.g. configs/pipeline.yaml")
    pl.set_defaults(func=cmd_plan)
    from . import calibrate as _calibrate

    _calibrate.add_arguments(sub.add_parser(
        "calibrate", help="measure inter-/intra-rack links (nccl-tests, else a gloo probe); write the link model",
        description=_calibrate.DESCRIPTION)).set_defaults(func=cmd_calibrate)
    tr.set_defaults(func=cmd_train)
    ex.set_defaults(func=cmd_export)

    cfg = sub.add_parser("config", help="show a flavor or check a model YAML",
                         description="Model configuration (ModelArgs) utilities.")
    cfg_sub = cfg.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = cfg_sub.add_parser("show", help="print a flavor's resolved config as YAML",
                              description="Print the resolved ModelArgs of FLAVOR as YAML "
                                          "(a valid input for 'tide config check').")
    show.add_argument("flavor", metavar="FLAVOR", choices=FLAVORS, help=f"one of {', '.join(FLAVORS)}")
    show.set_defaults(func=cmd_config_show)
    check = cfg_sub.add_parser("check", help="validate a model YAML; exit 2 with the reason if invalid",
                               description="Load PATH with ModelArgs.from_yaml. Prints OK and exits "
                                           "0, or prints the error (unknown or duplicate key, wrong "
                                           "type, inconsistent value, empty file, invalid YAML) and "
                                           "exits 2.")
    check.add_argument("path", metavar="PATH", help="model YAML (fields of ModelArgs, optional 'flavor')")
    check.set_defaults(func=cmd_config_check)
    add_dashboards_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tide`` console script; returns the exit status."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        return ns.func(ns)
    except CLIError as e:  # user input; anything else is a bug and keeps its traceback
        print(f"tide: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `tide plan ... | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
