"""``python -m cluster.train CONFIG``: one training run, as ``ray job submit`` runs it.

``ray job submit --working-dir . -- python -m cluster.train configs/pipeline.yaml`` (or
``tide train``, which adds serving afterwards) validates the config, makes its paths
absolute for the actors on other machines, joins the cluster (or simulates its racks,
``cluster.launch.connect``) and runs ``cluster.training.trainer.train``: the one training
loop over the run's actor graph, with restarts from the last checkpoint when an actor dies.
Re-running with the same ``--name`` resumes from the last committed checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

DESCRIPTION = ("Train a DeepSeek-V4-style model with the curriculum in CONFIG on an actor graph of stage actors. "
               "Joins a running Ray cluster (RAY_ADDRESS or a local `ray start --head`), else starts an embedded "
               "one. With a `parallel` section (see configs/pipeline.yaml) the model is split into pipeline stages "
               "x expert shards, one stage actor each, placed on racks by the nodes' `rack` label (`ray start "
               "--labels rack=r0`); without a cluster to join, one labelled local raylet per rack is started. "
               "Without it the run is one actor holding the whole model (or this process, with --in-process). "
               "Re-running with the same --name resumes from the last committed checkpoint (of any layout). Writes "
               "<storage_path>/<name>/{metrics.jsonl, loss.png, checkpoints/, run_info.json} and, with "
               "parallel.trace_steps, trace.json + timeline.png.")


def load_for_run(config: str | Path | dict, *, name: str | None = None, storage_path: str | None = None):
    """The validated ``TrainConfig`` with absolute paths (the actors may run on other machines).

    Raises:
        ValueError: an invalid config; a relative ``storage_path`` inside a Ray job's temporary
            working-dir copy (the run would be deleted with it); an unreadable corpus or a missing
            tokenizer file -- all before anything starts.
    """
    from cluster.training.config import load_train_config

    cfg = load_train_config(config, name=name, storage_path=storage_path)
    if not Path(cfg.storage_path).expanduser().is_absolute() and "runtime_resources" in os.getcwd():
        raise ValueError(f"storage_path {cfg.storage_path!r} is relative and this job runs in Ray's temporary copy "
                         f"of its working_dir ({os.getcwd()}): the run would be lost with it. Pass an absolute "
                         f"path on storage every node shares, e.g. --storage-path /shared/runs")
    cfg.storage_path = str(Path(cfg.storage_path).expanduser().resolve())
    if cfg.data.source != "stdlib":
        from cluster.data import Corpus

        cfg.data.source = str(Path(cfg.data.source).expanduser().resolve())
        corpus = Corpus(cfg.data.source, max_bytes=cfg.data.max_bytes, text_field=cfg.data.text_field)
        next(iter(corpus.documents()), None)  # reads the first record: bad field / encoding show up now
    if cfg.data.tokenizer:
        cfg.data.tokenizer = str(Path(cfg.data.tokenizer).expanduser().resolve())
        if not Path(cfg.data.tokenizer).is_file():
            raise ValueError(f"data.tokenizer {cfg.data.tokenizer} does not exist")
    return cfg


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``python -m cluster.train`` (``tide train`` adds its serving options)."""
    p.add_argument("config", help="training YAML, e.g. configs/debug.yaml")
    p.add_argument("--name", help="run name (overrides the config's `name`)")
    p.add_argument("--storage-path", help="directory holding runs (overrides `storage_path`)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, a local head, or embedded)")
    p.add_argument("--in-process", action="store_true",
                   help="run a config without a `parallel` section (the 1 x 1 graph) in this process, without "
                        "Ray: same stage code, losses and checkpoints (debugging, tests)")
    return p


SUMMARY_KEYS = ("run_dir", "steps", "first_loss", "final_loss", "checkpoint", "loss_png", "metrics_jsonl", "after")


def run(ns: argparse.Namespace, *, after=None, extra_cpus: dict | None = None) -> int:
    """Run the parsed arguments; print the summary as JSON. Returns the exit status (2: a usage error)."""
    from actors.group import PlacementError
    from cluster.training.trainer import train

    try:
        cfg = load_for_run(ns.config, name=ns.name, storage_path=ns.storage_path)
        progress = "bar" if sys.stdout.isatty() else "lines"
        summary = train(cfg, address=ns.address, in_process=ns.in_process, progress=progress, after=after,
                        extra_cpus=extra_cpus)
    except (ValueError, PlacementError, ConnectionError) as e:
        print(f"tide: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tide: interrupted; run the same command again to resume from the last committed checkpoint",
              file=sys.stderr)
        return 130
    print(json.dumps({k: summary[k] for k in SUMMARY_KEYS if k in summary}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    ns = add_arguments(argparse.ArgumentParser(prog="python -m cluster.train", description=DESCRIPTION)).parse_args(
        argv)
    return run(ns)


if __name__ == "__main__":
    sys.exit(main())
