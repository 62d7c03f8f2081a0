"""Load a servable model + tokenizer from a training run, a training checkpoint or an HF directory (issue 5).

``locate(path)`` (cheap: no weights read) and ``load_engine(path)`` accept:

- a run directory (``runs/<name>``): its latest committed checkpoint and ``tokenizer.json``;
- a checkpoint directory (``runs/<name>/checkpoints/step-N``, one process or
  stage x shard layout): the run's ``tokenizer.json`` two levels up;
- an HF-format directory (``tide export`` output, ``save_pretrained``): ``model.load_hf``
  and its ``tokenizer.json``.

Raises ValueError naming what is missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class Source:
    """What ``path`` holds: ``hf`` (an HF directory) or a tide ``checkpoint``; its tokenizer file and a model id."""

    kind: str
    path: Path
    tokenizer: Path
    name: str


def locate(path: str | Path) -> Source:
    """Find the model and tokenizer ``path`` refers to without reading weights (see module docstring)."""
    from cluster.trainer import resolve_checkpoint

    p = Path(path).expanduser()
    if not p.is_dir():
        raise ValueError(f"{p}: not a directory (give a run directory, a checkpoint or an HF model directory)")
    if (p / "config.json").is_file():
        src = Source("hf", p, p / "tokenizer.json", p.name)
    elif (p / "checkpoints").is_dir() or (p / "MANIFEST.json").is_file():
        c = resolve_checkpoint(p)
        src = Source("checkpoint", c, c.parent.parent / "tokenizer.json", f"{c.parent.parent.name}-{c.name}")
    else:
        raise ValueError(f"{p}: neither a run directory, a checkpoint (MANIFEST.json) nor an HF directory "
                         f"(config.json)")
    if not src.tokenizer.is_file():
        raise ValueError(f"no tokenizer.json at {src.tokenizer}: tide serves text, it needs the run's tokenizer")
    return src


def load_engine(path: str | Path, *, model_name: str | None = None, context: int | None = None):
    """A ``deploy.engine.LocalEngine`` for ``path`` (see module docstring)."""
    from tokenizers import Tokenizer

    from cluster.trainer import load_trained_model
    from model import load_hf

    from .engine import LocalEngine

    src = locate(path)
    model = load_hf(src.path) if src.kind == "hf" else load_trained_model(src.path)[0]
    return LocalEngine(model, Tokenizer.from_file(str(src.tokenizer)), model_name or src.name, context=context)
