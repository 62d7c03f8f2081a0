"""Serving on the stage actors: the engine's backend over a ``StageGroup``.

The same ``actors.StageWorker`` actors that train run prefill and decode: every call
goes to all actors of the graph at once (``StageWorker.infer_run``); the first stage
embeds, activations stream stage to stage over the pipeline links, each stage's expert
shards add their routed experts with one all-reduce (``comm.expert_parallel.
ReplicatedExperts``), and the last stage returns the logits. Decode states live in the
actors, keyed by the engine's sequence ids, and are freed with ``infer_free``.
"""

from __future__ import annotations

import ray
import torch


class ActorBackend:
    """``deploy.engine.Engine`` backend over a started ``actors.group.StageGroup`` whose
    actors hold the weights to serve (``load_weights``).

    Args:
        group: the stage actors.
        args: the model's ``ModelArgs``.
    """

    def __init__(self, group, args):
        self.group, self.args = group, args
        g = group.graph
        self._last = next(i for i, a in enumerate(g.actors) if a.stage == g.num_stages - 1 and a.ep_rank == 0)
        self._bytes = 0

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Give every actor its slice of a full-model ``state_dict`` (one object-store copy)."""
        self.group.call("load_state", ray.put(state_dict), {})

    def _run(self, seqs: list[int], ids: torch.Tensor, open_new: bool = False) -> torch.Tensor:
        res = self.group.call("infer_run", seqs, ids, open_new)
        self._bytes = sum(r["state_bytes"] for r in res)
        return res[self._last]["logits"]

    def prefill(self, seq: int, ids: list[int], open_new: bool) -> torch.Tensor:
        """Prompt chunk of sequence ``seq`` through the pipeline; last position's logits ``[V]`` float32."""
        return self._run([seq], torch.tensor([ids]), open_new)[0]

    def decode(self, seqs: list[int], toks: list[int]) -> torch.Tensor:
        """One token for each of ``seqs`` (one ragged batch through every stage); logits ``[B, V]``."""
        return self._run(seqs, torch.tensor(toks).view(-1, 1))

    def free(self, seqs: list[int]) -> None:
        res = self.group.call("infer_free", seqs)
        self._bytes = sum(r["state_bytes"] for r in res)

    def state_bytes(self) -> int:
        """Decode-state bytes over all actors (a stage's shards each hold a copy), as of the last call."""
        return self._bytes

    def close(self) -> None:
        self.group.shutdown()
