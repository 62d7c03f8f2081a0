"""``StageGroup``: start the ``StageWorker`` actors of an ``ActorGraph`` on their racks (issue 4).

Placement: one placement group with one bundle per actor (``{"CPU":
cpus_per_actor}``, plus GPUs when asked) and ``bundle_label_selector`` =
``{"rack": <the actor's rack>}`` per bundle, so that the whole graph is
gang-scheduled (all actors or none -- a pipeline cannot run with a stage
missing) and every stage lands on its rack. Stage identity comes from the graph
(the actor is created for a given (stage, shard) in a bundle pinned to that
stage's rack); after start-up each actor reports its node's ``rack`` label and a
mismatch is an error. Then rank 0 opens the TCP store, every actor joins the
torch.distributed group and builds its stage.

Nodes get their label with ``ray start --labels rack=r0`` (cluster YAML:
``resources``/``labels`` per node type); locally, ``cluster.local_racks``
starts one labelled raylet per rack.
"""

from __future__ import annotations

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .stage_worker import StageWorker


class PlacementError(RuntimeError):
    """The actor graph could not be placed on racks as the topology asks."""


class StageGroup:
    """The running actors of one ``ActorGraph``; ``call(method, *args)`` runs a method on all of them.

    Args:
        graph: ``cluster.topology.ActorGraph``.
        model_args: ``ModelArgs.to_dict()``.
        worker_kwargs: passed to every ``StageWorker`` (seed, microbatches, waves, ...).
        placement_timeout_s: how long to wait for the racks to have room.
    Raises:
        PlacementError: no room on the racks in time, or an actor started on the wrong rack.
    """

    def __init__(self, graph, model_args: dict, *, placement_timeout_s: float = 120.0, setup_timeout_s: float = 300.0,
                 **worker_kwargs):
        self.graph = graph
        self.failed = False
        n = len(graph.actors)
        bundles = [{"CPU": graph.cpus_per_actor, **({"GPU": graph.gpus_per_actor} if graph.gpus_per_actor else {})}
                   for _ in range(n)]
        self.pg = placement_group(bundles, strategy="PACK", bundle_label_selector=[a.label_selector
                                                                                   for a in graph.actors])
        ready, _ = ray.wait([self.pg.ready()], timeout=placement_timeout_s)
        if not ready:
            remove_placement_group(self.pg)
            need: dict[str, float] = {}
            for a in graph.actors:
                need[a.rack] = need.get(a.rack, 0) + graph.cpus_per_actor
            have = {}
            for node in ray.nodes():
                if node.get("Alive"):
                    r = (node.get("Labels") or {}).get("rack", "<no rack label>")
                    have[r] = have.get(r, 0) + node.get("Resources", {}).get("CPU", 0)
            raise PlacementError(f"could not place {n} stage actors within {placement_timeout_s:.0f} s: the topology "
                                 f"needs CPUs per rack {need}; the cluster's nodes offer {have} (node label 'rack', "
                                 f"set with `ray start --labels rack=<name>`)")
        Remote = ray.remote(StageWorker)
        self.actors = [
            Remote.options(num_cpus=graph.cpus_per_actor, num_gpus=graph.gpus_per_actor,
                           scheduling_strategy=PlacementGroupSchedulingStrategy(
                               self.pg, placement_group_bundle_index=i))
            .remote(graph, a.rank, model_args, **worker_kwargs)
            for i, a in enumerate(graph.actors)]
        self.placements = ray.get([w.placement.remote() for w in self.actors])
        wrong = [p for p in self.placements if p["rack"] != p["expected_rack"]]
        if wrong:
            self.shutdown()
            raise PlacementError(f"stage actors started on the wrong rack: {wrong}")
        addr, port = ray.get(self.actors[0].master_address.remote())
        self.info = ray.get([w.setup.remote(addr, port, timeout_s=setup_timeout_s) for w in self.actors])

    def call(self, method: str, *args, **kwargs) -> list:
        """Run ``method`` on every actor (same arguments; Ray object refs are resolved); results in rank order.

        The first failure is raised as soon as it happens (a dead actor raises
        ``ray.exceptions.RayActorError``) instead of after the survivors, which would
        wait in a collective for the dead peer until the process-group timeout.
        """
        refs = [getattr(w, method).remote(*args, **kwargs) for w in self.actors]
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                ray.get(done)  # raises the actor's error (or RayActorError) right away
        except Exception:
            self.failed = True  # survivors may be stuck in a collective: shutdown() kills without asking
            raise
        return ray.get(refs)

    def call_async(self, method: str, *args, **kwargs) -> list:
        return [getattr(w, method).remote(*args, **kwargs) for w in self.actors]

    def shutdown(self) -> None:
        """Close the process groups and kill the actors and the placement group."""
        if not self.failed:
            try:
                ray.get([w.shutdown.remote() for w in self.actors], timeout=30)
            except Exception:  # noqa: BLE001 - best effort: the actors are killed next anyway
                pass
        for w in self.actors:
            ray.kill(w)
        remove_placement_group(self.pg)


def pipeline_generate(group: StageGroup, input_ids, max_new_tokens: int, chunk_size: int = 2048):
    """Greedy continuation through the stage actors: chunked prefill, then one token per step.

    ``input_ids [B, S]`` int64 (B divisible by the expert shards). Returns ``[B, S + new]``;
    token for token what ``model.Transformer.generate`` gives on the same weights.
    """
    import torch

    B = input_ids.shape[0]
    group.call("infer_reset", B)
    last = group.graph.num_stages - 1
    ranks = [a.rank for a in sorted(group.graph.actors, key=lambda a: a.ep_rank) if a.stage == last]

    def step(ids):
        out = group.call("infer_step", ids)
        return torch.cat([out[r] for r in ranks])  # the last stage's shards, in batch order

    logits = None
    for c in range(0, input_ids.shape[1], chunk_size):
        logits = step(input_ids[:, c:c + chunk_size])
    out = [input_ids]
    for _ in range(max_new_tokens):
        nxt = logits.argmax(-1, keepdim=True)
        out.append(nxt)
        logits = step(nxt)
    return torch.cat(out, 1)
