"""Activation checkpointing ("rematerialisation"), applied by the caller, not built into the model.

A forward that takes ``call=checkpointed`` (``model.transformer.run_blocks``,
``Transformer.run``, ``PipelineStage.forward``) runs every decoder block under
``torch.utils.checkpoint``: the block keeps only its inputs for backward and is
recomputed there, trading one extra block forward for the activations inside it
(attention scores, MoE intermediates, the mHC mixes). Chen et al. 2016, "Training
Deep Nets with Sublinear Memory Cost".

This is only correct because the forward is pure: a block returns its routing and
its indexer KL as values and keeps nothing on its modules, so the recomputation in
backward routes the same tokens to the same experts (forced routing is an argument
and is passed again) and adds nothing twice. The non-reentrant implementation is
used (``use_reentrant=False``): it supports non-tensor outputs, keyword-free
``None`` arguments and inputs that do not require grad.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def checkpointed(block: torch.nn.Module, *args):
    """``block(*args)`` with its activations recomputed in backward (see the module docstring)."""
    return checkpoint(block, *args, use_reentrant=False)


__all__ = ["checkpointed"]
