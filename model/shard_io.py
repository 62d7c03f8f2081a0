"""Read one pipeline stage's tensors out of a sharded checkpoint of any layout, touching only
the bytes it needs.

A sharded checkpoint holds one safetensors file per (stage, expert shard) of the layout that
wrote it (``cluster.checkpoint.sharded``); tensors carry the full model's names, routed-expert
tensors (``model.stage.is_expert_param``) are sliced on dim 0 to their shard's experts
``[expert_lo, expert_hi)``, and optimizer state sits under ``<prefix><param>::<key>``.
A stage of another layout needs, for each of its tensors, the file(s) that hold it: a
replicated tensor from the first file that has it, an expert tensor from every file whose
expert range overlaps the stage's, each read with ``safe_open(...).get_slice(name)[a:b]``
(memory-mapped: only those rows are read).

Bitwise equality of the replicated copies in different files is not re-checked here (the
checkpoint's sha256 manifest, verified before loading, is what guards the bytes).
"""

from __future__ import annotations

import os
from contextlib import ExitStack

import torch

from .safe_io import open_safetensors


def read_stage_tensors(sources: list[tuple[str | os.PathLike, int, int]], model_shapes: dict[str, tuple],
                       param_names: set[str], expert_lo: int, expert_hi: int, *, is_expert,
                       optim_prefix: str = "optim/") -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(model tensors, optimizer state by "<param>::<key>")`` of one stage from shard files.

    Args:
        sources: ``(file, expert_lo, expert_hi)`` of every shard file of the checkpoint (the
            expert range that file's expert tensors cover).
        model_shapes: the stage's ``state_dict`` names -> shapes (what must be found).
        param_names: the stage's parameter names (whose optimizer state is wanted).
        expert_lo, expert_hi: the stage's expert range.
        is_expert: ``name -> bool``, a routed-expert tensor (sliced on dim 0).
        optim_prefix: the optimizer-state key prefix in the files.

    Raises:
        ValueError: a tensor of the stage that no file holds, an expert range the files do not
            cover, or a shape that differs from the stage's (each named).
    """
    model: dict[str, torch.Tensor] = {}
    optim: dict[str, torch.Tensor] = {}
    with ExitStack() as stack:
        files = [(stack.enter_context(open_safetensors(path)), lo, hi, str(path)) for path, lo, hi in sources]
        index: dict[str, list[tuple]] = {}
        for entry in files:
            for key in entry[0].keys():
                index.setdefault(key, []).append(entry)

        def read(key: str, expert: bool) -> torch.Tensor:
            holders = index.get(key)
            if not holders:
                raise KeyError(key)
            if not expert:
                return holders[0][0].get_tensor(key)
            pieces, at = [], expert_lo
            for sf, lo, hi, _ in sorted(holders, key=lambda h: h[1]):
                a, b = max(lo, at), min(hi, expert_hi)
                if a >= b:
                    continue
                if a != at:
                    break
                sl = sf.get_slice(key)
                if len(sl.get_shape()) == 0:  # a 0-d state of an expert parameter (AdamW step)
                    return sf.get_tensor(key)
                pieces.append(sl[a - lo:b - lo])
                at = b
            if at != expert_hi:
                raise ValueError(f"{key}: the checkpoint's shards cover experts up to {at}, this stage needs "
                                 f"[{expert_lo}, {expert_hi})")
            return torch.cat(pieces) if len(pieces) > 1 else pieces[0]

        missing = []
        for name, shape in model_shapes.items():
            try:
                t = read(name, is_expert(name))
            except KeyError:
                missing.append(name)
                continue
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"checkpoint tensor {name} has shape {tuple(t.shape)}, this stage needs "
                                 f"{tuple(shape)}")
            model[name] = t
        if missing:
            raise ValueError(f"the checkpoint lacks {len(missing)} tensor(s) of this stage, e.g. {missing[:3]}")
        for key in index:
            if not key.startswith(optim_prefix):
                continue
            k = key[len(optim_prefix):]
            if k.split("::", 1)[0] in param_names:
                optim[k] = read(key, is_expert(k))
    return model, optim
