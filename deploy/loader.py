"""Load a servable model + tokenizer from a training run, a training checkpoint or an HF directory (issue 5).

``load_engine(path)`` accepts:

- a run directory (``runs/<name>``): its latest committed checkpoint and ``tokenizer.json``;
- a checkpoint directory (``runs/<name>/checkpoints/step-N``, one process or
  stage x shard layout): the run's ``tokenizer.json`` two levels up;
- an HF-format directory (``tide export`` output, ``save_pretrained``): ``model.load_hf``
  and its ``tokenizer.json``.

Raises ValueError naming what is missing.
"""

from __future__ import annotations

from pathlib import Path


def load_engine(path: str | Path, *, model_name: str | None = None, context: int | None = None):
    """A ``deploy.engine.LocalEngine`` for ``path`` (see module docstring)."""
    from tokenizers import Tokenizer

    from cluster import checkpoint as ckpt
    from cluster.pipeline_checkpoint import load_pipeline_full
    from model import ModelArgs, Transformer, load_hf

    from .engine import LocalEngine

    p = Path(path).expanduser()
    if not p.is_dir():
        raise ValueError(f"{p}: not a directory (give a run directory, a checkpoint or an HF model directory)")
    if (p / "config.json").is_file():
        model, tok_file, name = load_hf(p), p / "tokenizer.json", p.name
    else:
        if (p / "checkpoints").is_dir():
            latest = ckpt.latest_checkpoint(p / "checkpoints")
            if latest is None:
                raise ValueError(f"{p}: run directory has no committed checkpoint")
            run_dir, c = p, latest
        elif (p / "MANIFEST.json").is_file():
            run_dir, c = p.parent.parent, p
        else:
            raise ValueError(f"{p}: neither a run directory, a checkpoint (MANIFEST.json) nor an HF directory "
                             f"(config.json)")
        full, _, meta = load_pipeline_full(c)
        if "model_args" not in meta:
            raise ValueError(f"{c}: not a tide training checkpoint (no model_args)")
        model = Transformer(ModelArgs.from_dict(meta["model_args"], source=f"{c}/meta.json"))
        model.load_state_dict(full)
        tok_file, name = run_dir / "tokenizer.json", f"{run_dir.name}-{c.name}"
    if not tok_file.is_file():
        raise ValueError(f"no tokenizer.json at {tok_file}: tide serves text, it needs the run's tokenizer")
    return LocalEngine(model, Tokenizer.from_file(str(tok_file)), model_name or name, context=context)
