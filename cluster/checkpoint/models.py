"""Trained models out of the checkpoint store: find a run's checkpoint, load its ``Transformer``,
export it as an HF-format directory.

- ``resolve_checkpoint``: a checkpoint directory, or a run directory's newest intact one;
- ``load_trained_model``: the full model of a checkpoint of any layout (one process, or
  stage x expert-shard groups: ``cluster.checkpoint.sharded``), verified against its manifest;
- ``export_hf``: that model written with ``model.save_hf``, the run's tokenizer files beside it
  (``tide export``; ``deploy.loader`` serves checkpoints through the first two).
"""

from __future__ import annotations

from pathlib import Path

from cluster.checkpoint import store as ckpt
from model import Transformer


def resolve_checkpoint(path: str | Path, skipped: list[tuple[Path, str]] | None = None) -> Path:
    """A checkpoint directory, or a run directory's latest committed one.

    Args:
        path: a checkpoint directory or a run directory.
        skipped: when given, the run's damaged newer checkpoints passed over are appended to it as
            ``(path, problem)`` instead of being warned about (see ``ckpt.latest_checkpoint``).

    Raises:
        ValueError: a run directory without a committed checkpoint, or not a directory
            (a pickle-based file, e.g. a ``.pt``, is refused by name).
    """
    from model.safe_io import refuse_pickle

    path = Path(path).expanduser()
    if path.is_file():
        refuse_pickle(path, "allowed: a run directory or a tide checkpoint directory (safetensors + JSON)")
    if (path / "checkpoints").is_dir():
        latest = ckpt.latest_checkpoint(path / "checkpoints", skipped=skipped, hash_files=True)
        if latest is None:
            damaged = ckpt.list_checkpoints(path / "checkpoints")
            problems = ckpt.verify_checkpoint(damaged[-1], hash_files=True) if damaged else []
            if problems:  # say why the newest one is unusable (e.g. a pickle in place of a tensor file)
                raise ValueError(f"{path}: run directory has no intact checkpoint; the newest: {problems[0]}")
            raise ValueError(f"{path}: run directory has no committed checkpoint")
        path = latest
    if not path.is_dir():
        raise ValueError(f"{path}: not a checkpoint directory")
    return path


def load_trained_model(path: str | Path) -> tuple[Transformer, Path]:
    """The ``Transformer`` of a training checkpoint of any layout (or a run's latest) and the checkpoint's path.

    The checkpoint is verified against its manifest. Raises ValueError (named) for a
    missing, damaged or non-tide checkpoint.
    """
    from cluster.checkpoint.sharded import load_pipeline_full
    from model import ModelArgs

    path = resolve_checkpoint(path)
    full, _, meta = load_pipeline_full(path)  # either layout: one process, or stage x expert-shard groups
    if "model_args" not in meta:
        raise ValueError(f"{path}: not a tide training checkpoint (no model_args)")
    model = Transformer(ModelArgs.from_dict(meta["model_args"], source=f"{path}/meta.json"))
    model.load_state_dict(full)
    return model, path


def export_hf(checkpoint: Path, out: Path) -> Path:
    """Export a training checkpoint (or a run directory's latest) with ``model.save_hf``.

    The checkpoint is verified against its manifest first; the run's
    ``tokenizer.json`` is copied beside the weights when present.

    Raises:
        ValueError: no checkpoint found, or a damaged one (named).
    """
    import shutil

    from model import save_hf

    model, path = load_trained_model(checkpoint)
    save_hf(model, out)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the tokenizer and its chat template
        if (path.parent.parent / name).is_file():
            shutil.copy2(path.parent.parent / name, Path(out) / name)
    return Path(out)
