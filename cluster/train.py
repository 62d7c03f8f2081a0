"""Ray Train entry point: ``python -m cluster.train CONFIG`` (what ``tide train`` runs).

Starts an embedded local Ray cluster when none is reachable, else joins the
running one (``ray start --head``; ``ray job submit --working-dir . -- python -m
cluster.train CONFIG`` works the same way), then runs ``cluster.trainer.Trainer``
inside a Ray Train ``TorchTrainer`` worker:

- every step: ``ray.train.report(metrics)``; at each committed checkpoint
  ``ray.train.report(metrics, checkpoint=Checkpoint.from_directory(...))``;
- ``RunConfig(name, storage_path)``: re-running with the same name resumes;
- ``FailureConfig(max_failures)``: a worker that dies is restarted and resumes from
  the last committed checkpoint (verified against its sha256 manifest).

A config with a ``parallel`` section instead runs ``run_pipeline``: this process
drives the stage actors of the topology (``cluster.pipeline_trainer``), placed on
racks by node label; with no cluster to join it simulates the racks locally.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path


def _worker_loop(config: dict) -> None:
    """Runs inside the Ray Train worker process."""
    import logging

    import ray.train

    # Ray Train logs a ~1 KB line per report; its logger is named after the module file.
    import ray.train.v2._internal.execution.context as _ctx

    from cluster.train_config import load_train_config

    for name in ("ray.train", _ctx.__name__, _ctx.__file__):
        logging.getLogger(name).setLevel(logging.WARNING)
    from cluster.trainer import Trainer

    cfg = load_train_config(config["train_config"])
    resume = None
    from cluster import checkpoint as ckpt

    if ckpt.latest_checkpoint(cfg.run_dir() / "checkpoints") is None:
        ray_ckpt = ray.train.get_checkpoint()
        if ray_ckpt is not None:  # storage survived, the run directory did not: use Ray's copy
            resume = Path(ray_ckpt.to_directory())

    def report(metrics: dict, committed: Path | None) -> None:
        flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float, bool))}
        if committed is not None:
            ray.train.report(flat, checkpoint=ray.train.Checkpoint.from_directory(str(committed)))
        else:
            ray.train.report(flat)

    summary = Trainer(cfg, report=report, resume_from=resume, progress="lines").run()
    print("TIDE_SUMMARY " + json.dumps(summary), flush=True)


def init_ray(address: str | None = None) -> str:
    """Join a running Ray cluster (``address``, ``RAY_ADDRESS`` or a local head) or start
    an embedded one. Returns ``"joined"`` or ``"embedded"``."""
    import ray

    from cluster.local_racks import reachable_ray_address

    if ray.is_initialized():
        return "joined"
    explicit = address or os.environ.get("RAY_ADDRESS")
    target = explicit or reachable_ray_address()  # a stale address file would make "auto" wait for a dead GCS
    if target is not None:
        try:
            ray.init(address=target, log_to_driver=True)
            return "joined"
        except ConnectionError:
            if explicit:
                raise
    ray.init(address="local", log_to_driver=True)
    return "embedded"


def run(config_path: str, *, name: str | None = None, storage_path: str | None = None,
        address: str | None = None, after=None) -> dict:
    """Validate the config, start/join Ray, run the TorchTrainer; returns the run summary.

    ``after(summary, cfg)``: called when training is done while the Ray cluster is still up
    (e.g. ``deploy.serve.serve_and_ask``); its result is stored as ``summary["after"]``.

    Raises:
        ValueError: invalid config (before anything starts).
        RuntimeError: the training run failed after exhausting ``max_failures``.
    """
    from cluster.train_config import load_train_config

    cfg = load_train_config(config_path, name=name, storage_path=storage_path)
    if not Path(cfg.storage_path).expanduser().is_absolute() and "runtime_resources" in os.getcwd():
        raise ValueError(f"storage_path {cfg.storage_path!r} is relative and this job runs in Ray's temporary copy "
                         f"of its working_dir ({os.getcwd()}): the run would be lost with it. Pass an absolute "
                         f"path on storage every node shares, e.g. --storage-path /shared/runs")
    cfg.storage_path = str(Path(cfg.storage_path).expanduser().resolve())  # workers run elsewhere
    if cfg.data.source != "stdlib":  # workers run elsewhere: absolute paths; fail fast before Ray starts
        from cluster.data import Corpus

        cfg.data.source = str(Path(cfg.data.source).expanduser().resolve())
        corpus = Corpus(cfg.data.source, max_bytes=cfg.data.max_bytes, text_field=cfg.data.text_field)
        next(iter(corpus.documents()), None)  # reads the first record: bad field / encoding show up now
    if cfg.data.tokenizer:
        cfg.data.tokenizer = str(Path(cfg.data.tokenizer).expanduser().resolve())
        if not Path(cfg.data.tokenizer).is_file():
            raise ValueError(f"data.tokenizer {cfg.data.tokenizer} does not exist")
    if cfg.parallel is not None:
        return run_pipeline(cfg, address, after=after)
    data = cfg.to_dict()
    mode = init_ray(address)
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    print(f"tide: {mode} Ray cluster; run '{cfg.name}' in {cfg.run_dir()} "
          f"({len(cfg.curriculum)} stages, {cfg.total_steps} steps)", flush=True)
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"train_config": data},
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=False,
                                     resources_per_worker={"CPU": cfg.ray.cpus_per_worker}),
        run_config=RunConfig(name=cfg.name, storage_path=cfg.storage_path,
                             failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep)),
    )
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"training run '{cfg.name}' failed: {result.error}")
    from cluster import checkpoint as ckpt

    metrics = result.metrics or {}
    run_dir = cfg.run_dir()
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    last = rows[-5:]
    latest = ckpt.latest_checkpoint(run_dir / "checkpoints")
    summary = {"run_dir": str(run_dir), "steps": len(rows), "first_loss": rows[0]["ce"] if rows else None,
               "final_loss": sum(r["ce"] for r in last) / len(last) if last else None,
               "final_metrics": metrics, "checkpoint": str(latest) if latest else None,
               "ray_checkpoint": result.checkpoint.path if result.checkpoint else None,
               "loss_png": str(run_dir / "loss.png"), "metrics_jsonl": str(run_dir / "metrics.jsonl")}
    if after is not None:
        summary["after"] = after(summary, cfg)
    return summary


def run_pipeline(cfg, address: str | None = None, *, progress: str = "bar", after=None) -> dict:
    """A run with a ``parallel`` section: this process drives the stage actors (``PipelineTrainer``).

    Joins a running cluster whose nodes carry ``rack`` labels, or -- with none to
    join and ``parallel.local_racks`` -- starts one local labelled raylet per rack.
    A stage actor that dies (node loss, OOM) restarts the whole actor graph from the
    last committed checkpoint, up to ``ray.max_failures`` times.
    """
    import ray
    from ray.exceptions import RayActorError

    from cluster import checkpoint as ckpt
    from cluster.pipeline_trainer import PipelineTrainer
    from cluster.topology import build_graph, cpus_per_rack, load_topology
    from cluster.train_config import model_args_for

    latest = ckpt.latest_checkpoint(cfg.run_dir() / "checkpoints") if (cfg.run_dir() / "checkpoints").is_dir() \
        else None
    if latest is not None and ckpt.checkpoint_step(latest) >= cfg.total_steps:
        rows = [json.loads(x) for x in (cfg.run_dir() / "metrics.jsonl").read_text().splitlines() if x.strip()] \
            if (cfg.run_dir() / "metrics.jsonl").is_file() else []
        last = rows[-5:]
        print(f"tide: run '{cfg.name}' already finished ({latest.name}); nothing to train", flush=True)
        finished = {"run_dir": str(cfg.run_dir()), "steps": ckpt.checkpoint_step(latest),
                    "first_loss": rows[0]["ce"] if rows else None,
                    "final_loss": sum(r["ce"] for r in last) / len(last) if last else None,
                    "latest_checkpoint": str(latest)}
        if after is None:
            finished.update(checkpoint=str(latest), loss_png=str(cfg.run_dir() / "loss.png"),
                            metrics_jsonl=str(cfg.run_dir() / "metrics.jsonl"))
            return finished
    else:
        finished = None
    args = model_args_for(cfg, cfg.data.vocab_size)
    graph = build_graph(load_topology(cfg.parallel.topology), args.num_hidden_layers, args.n_routed_experts)
    extra = {}
    if after is not None:  # room for the Serve replica that joins stage 0's rack afterwards
        from deploy.serve import REPLICA_CPUS

        extra = {next(a.rack for a in graph.actors if a.stage == 0): REPLICA_CPUS}
    need = cpus_per_rack(graph, extra)
    explicit = address or os.environ.get("RAY_ADDRESS")
    local = None
    mode = "joined"
    if not ray.is_initialized():
        from cluster.local_racks import reachable_ray_address

        target = explicit or reachable_ray_address()
        try:
            if target is None:  # nothing (alive) to join; a stale address file would make "auto" hang
                raise ConnectionError("no running Ray cluster on this machine")
            ray.init(address=target, log_to_driver=True)
        except ConnectionError:
            if explicit or not cfg.parallel.local_racks:
                raise ValueError(f"no Ray cluster to join at {explicit or 'this machine'}; start one whose nodes "
                                 f"carry the racks' labels (`ray start --labels rack=<name>`)"
                                 + ("" if explicit else " or set parallel.local_racks: true to simulate the racks "
                                    "locally")) from None
        else:
            racks = {(n.get("Labels") or {}).get("rack") for n in ray.nodes() if n.get("Alive")}
            missing = sorted(set(need) - racks)
            if missing and not explicit and cfg.parallel.local_racks:
                # a cluster found by "auto" (e.g. someone else's) without our racks: do not borrow it
                print(f"tide: the Ray cluster on this machine has no node labelled rack={missing}; "
                      f"not using it", flush=True)
                ray.shutdown()
            elif missing:
                print(f"tide: warning: no node of the cluster carries rack label(s) {missing} yet; waiting for the "
                      f"autoscaler to add them (placement times out otherwise)", flush=True)
        if not ray.is_initialized():
            from cluster.local_racks import start_local_racks

            cores = os.cpu_count() or 1
            if sum(need.values()) > cores:
                print(f"tide: note: the simulated racks declare {sum(need.values()):g} CPUs on a {cores}-core "
                      f"machine; actors will time-slice the cores", flush=True)
            local = start_local_racks({r: math.ceil(c) for r, c in need.items()})  # raylets take whole CPUs
            mode = (f"embedded ({len(need)} simulated rack(s): "
                    + ", ".join(f"{r}={c:g} CPU" for r, c in need.items()) + ")")
    print(f"tide: {mode} Ray cluster; pipeline run '{cfg.name}' in {cfg.run_dir()} "
          f"({len(cfg.curriculum)} stages, {cfg.total_steps} steps)", flush=True)
    try:
        for attempt in range(0 if finished else cfg.ray.max_failures + 1):
            trainer = PipelineTrainer(cfg, progress=progress)
            try:
                summary = trainer.run()
                break
            except RayActorError as e:
                if attempt == cfg.ray.max_failures:
                    raise RuntimeError(f"pipeline run '{cfg.name}' failed after {attempt + 1} attempts: {e}") from e
                print(f"tide: a stage actor died ({type(e).__name__}); restarting the actor graph from the last "
                      f"checkpoint (attempt {attempt + 2} of {cfg.ray.max_failures + 1})", flush=True)
            finally:
                trainer.shutdown()
        summary = finished or summary
        run_dir = cfg.run_dir()
        summary.update(checkpoint=summary.get("latest_checkpoint"), loss_png=str(run_dir / "loss.png"),
                       metrics_jsonl=str(run_dir / "metrics.jsonl"))
        if after is not None:  # while the (simulated) racks are still up
            summary["after"] = after(summary, cfg)
    finally:
        if local is not None:
            local.shutdown()
    return summary


DESCRIPTION = ("Train a DeepSeek-V4-style model with the curriculum in CONFIG under Ray Train. Joins a running Ray "
               "cluster (RAY_ADDRESS or a local `ray start --head`), else starts an embedded one. With a `parallel` "
               "section (see configs/pipeline.yaml) the model is split into pipeline stages x expert shards, one "
               "stage actor each, placed on racks by the nodes' `rack` label (`ray start --labels rack=r0`); "
               "without a cluster to join, one labelled local raylet per rack is started. Re-running with "
               "the same --name resumes from the last committed checkpoint (of any layout). Writes "
               "<storage_path>/<name>/{metrics.jsonl, loss.png, checkpoints/, run_info.json} and, for pipeline "
               "runs with trace_steps, trace.json + timeline.png.")


DEFAULT_CHAT = "Write a Python function that reverses a list."


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``tide train`` / ``python -m cluster.train`` (one definition for both)."""
    p.add_argument("config", help="training YAML, e.g. configs/debug.yaml")
    p.add_argument("--name", help="run name (overrides the config's `name`)")
    p.add_argument("--storage-path", help="directory holding runs (overrides `storage_path`)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, a local head, or embedded)")
    p.add_argument("--then-serve", action="store_true",
                   help="after training, serve the last checkpoint with Ray Serve on the same cluster (on the "
                        "run's actor graph for pipeline runs), ask it one chat completion through the OpenAI "
                        "client, print the answer and stop serving")
    p.add_argument("--chat", default=None,
                   help=f"the user message --then-serve asks (default: {DEFAULT_CHAT!r})")
    return p


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(prog="tide train", description=DESCRIPTION))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from actors.group import PlacementError

    try:
        after = None
        if args.chat is not None and not args.then_serve:
            raise ValueError("--chat is the question --then-serve asks: add --then-serve")
        if args.then_serve:
            args.chat = DEFAULT_CHAT if args.chat is None else args.chat
            if not args.chat.strip():
                raise ValueError("--chat must not be empty")
            try:
                args.chat.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("--chat is not valid UTF-8 text") from None
            from deploy.serve import serve_and_ask

            def after(summary, cfg):
                return serve_and_ask(summary["run_dir"], cfg.parallel.topology if cfg.parallel else None,
                                     args.chat)
        summary = run(args.config, name=args.name, storage_path=args.storage_path, address=args.address,
                      after=after)
    except (ValueError, PlacementError, ConnectionError) as e:
        print(f"tide: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tide: interrupted; run the same command again to resume from the last committed checkpoint",
              file=sys.stderr)
        return 130
    print(json.dumps({k: summary[k] for k in ("run_dir", "steps", "first_loss", "final_loss", "checkpoint",
                                               "loss_png", "metrics_jsonl", "after") if k in summary},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
