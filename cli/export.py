"""``tide export RUN|CHECKPOINT OUT``: a training checkpoint (a run's newest intact one) as an
HF-format directory (``model.save_hf``)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cli.common import usage_errors


def run(ns: argparse.Namespace) -> int:
    """``tide export RUN|CHECKPOINT OUT``: the checkpoint (a run's newest intact one) as an HF directory.
    Names the exported step; a newer damaged checkpoint passed over is named with its problem, on one line."""
    from cluster.checkpoint import store as ckpt
    from cluster.checkpoint.models import export_hf, resolve_checkpoint

    skipped: list[tuple[Path, str]] = []
    with usage_errors():
        src = resolve_checkpoint(ns.checkpoint, skipped=skipped)
        out = export_hf(src, Path(ns.out))
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


def add_parser(sub) -> argparse.ArgumentParser:
    """The ``tide export`` subcommand."""
    ex = sub.add_parser(
        "export", help="export a training checkpoint as an HF-format directory (model.save_hf)",
        description="Verify a training checkpoint (sha256 manifest) and write its model as a directory that "
        "transformers.DeepseekV4ForCausalLM.from_pretrained and model.load_hf read.")
    ex.add_argument("checkpoint", help="a checkpoint directory (<run>/checkpoints/step-NNNNNNNN) or a run directory "
                    "(its latest checkpoint)")
    ex.add_argument("out", help="output directory (created; an existing checkpoint there is replaced atomically)")
    ex.set_defaults(func=run)
    return ex
