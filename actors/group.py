"""Start the ``StageWorker`` actors of an ``ActorGraph`` on their racks (``StageGroup``), or its one
worker in this process (``LocalGroup``, a 1 x 1 graph without Ray).

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
``resources``/``labels`` per node type); locally, ``cluster.launch.local_racks``
starts one labelled raylet per rack. A graph whose actors name no rack (a
one-process run) is placed on any node.

Actors are named ``<prefix>/stage<s>-shard<e>`` (e.g. ``tide/pipeline/stage1-shard0``:
run ``pipeline``; with data-parallel replicas ``tide/<run>/replica<d>/stage<s>-shard<e>``),
the name the Ray dashboard's actor view shows.

Both groups answer ``call(method, *args)`` (every worker, results in rank order),
``put(obj)`` (an object to pass to every worker: ``ray.put`` or the object itself)
and ``shutdown()``; a worker lost mid-call raises ``ray.exceptions.RayActorError``
(``StageGroup``) or :class:`ActorDied` (``LocalGroup``).
"""

from __future__ import annotations

import os

import ray
from ray.util.placement_group import placement_group as _placement_group
from ray.util.placement_group import remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .stage_worker import ActorDied, StageWorker

__all__ = ["ActorDied", "PlacementError", "StageGroup", "LocalGroup", "actor_name", "bundle_specs",
           "pipeline_generate"]


class PlacementError(RuntimeError):
    """The actor graph could not be placed on racks as the topology asks."""


def actor_name(prefix: str, stage: int, ep_rank: int, dp_rank: int | None = None) -> str:
    """``<prefix>/stage<stage>-shard<ep_rank>`` (with data-parallel replicas
    ``<prefix>/replica<dp_rank>/stage<stage>-shard<ep_rank>``): what a stage actor is called in the
    Ray dashboard."""
    rep = "" if dp_rank is None else f"replica{dp_rank}/"
    return f"{prefix}/{rep}stage{stage}-shard{ep_rank}"


def bundle_specs(graph) -> list[dict]:
    """One placement-group bundle per actor of ``graph`` (CPUs, plus a GPU when the graph asks)."""
    return [{"CPU": graph.cpus_per_actor, **({"GPU": graph.gpus_per_actor} if graph.gpus_per_actor else {})}
            for _ in graph.actors]


class StageGroup:
    """The running actors of one ``ActorGraph``; ``call(method, *args)`` runs a method on all of them.

    Args:
        graph: ``cluster.launch.topology.ActorGraph``.
        model_args: ``ModelArgs.to_dict()``.
        name: actor-name prefix (``actor_name``), e.g. ``"tide/<run>"``; None: unnamed actors.
        worker_kwargs: passed to every ``StageWorker`` (seed, microbatches, waves, ...).
        placement_timeout_s: how long to wait for the racks to have room.
        placement_group: an existing placement group to start the actors in (e.g. a Serve
            replica's own, ``ray.util.get_current_placement_group()``), whose bundles
            ``bundle_offset ...`` are ``bundle_specs(graph)`` with the actors' rack selectors;
            it is not removed at ``shutdown``. Default: the group makes its own.
    Raises:
        PlacementError: no room on the racks in time, or an actor started on the wrong rack.
    """

    def __init__(self, graph, model_args: dict, *, placement_timeout_s: float = 120.0, setup_timeout_s: float = 300.0,
                 placement_group=None, bundle_offset: int = 0, name: str | None = None, **worker_kwargs):
        self.graph = graph
        self.failed = False
        n = len(graph.actors)
        self.own_pg = placement_group is None
        self.pg = placement_group if placement_group is not None else _placement_group(
            bundle_specs(graph), strategy="PACK", bundle_label_selector=[a.label_selector for a in graph.actors])
        ready, _ = ray.wait([self.pg.ready()], timeout=placement_timeout_s)
        if not ready:
            remove_placement_group(self.pg)
            need = graph.cpus_per_rack()
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
                               self.pg, placement_group_bundle_index=i),
                           **({"name": actor_name(name, a.stage, a.ep_rank,
                                                  a.dp_rank if graph.data_parallel > 1 else None)}
                              if name else {}))
            .remote(graph, a.rank, model_args, **worker_kwargs)
            for i, a in enumerate(graph.actors, start=bundle_offset)]
        self.placements = ray.get([w.placement.remote() for w in self.actors])
        wrong = [p for p in self.placements if p["expected_rack"] is not None and p["rack"] != p["expected_rack"]]
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

    def put(self, obj):
        """``ray.put(obj)``: one copy in the object store for every actor to read."""
        return ray.put(obj)

    def crash_last(self) -> None:
        """Kill the last actor's process (tests of the restart path); the next ``call`` raises."""
        self.actors[-1].crash.remote()

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
        if self.own_pg:
            remove_placement_group(self.pg)


class LocalGroup:
    """The one ``StageWorker`` of a 1 x 1 graph, in this process: a run without Ray.

    Same interface as ``StageGroup``; the worker joins a one-process gloo group on a
    free local port and runs torch on ``int(cpus_per_actor)`` threads (what Ray gives an
    actor of that size). ``call("crash")`` raises :class:`ActorDied`.

    Raises:
        ValueError: the graph has more than one actor.
    """

    def __init__(self, graph, model_args: dict, *, name: str | None = None, **worker_kwargs):
        import socket

        import torch

        if len(graph.actors) != 1:
            raise ValueError(f"an in-process run is the 1 x 1 actor graph; this topology has {len(graph.actors)} "
                             f"actors (start them on Ray instead)")
        self.graph = graph
        self.failed = False
        torch.set_num_threads(max(1, int(graph.cpus_per_actor)))
        self.worker = StageWorker(graph, 0, model_args, **worker_kwargs)
        self.worker.in_process = True  # crash() raises ActorDied instead of ending this process
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.info = [self.worker.setup("127.0.0.1", port)]
        spec = graph.actors[0]
        self.placements = [{"rank": 0, "stage": spec.stage, "ep_rank": spec.ep_rank, "expected_rack": spec.rack,
                            "rack": spec.rack, "node_id": "in-process", "host": socket.gethostname(),
                            "pid": os.getpid(), "name": name and actor_name(name, spec.stage, spec.ep_rank)}]
        self.actors = [self.worker]

    def put(self, obj):
        return obj

    def crash_last(self) -> None:
        raise ActorDied("the in-process stage worker failed (injected)")

    def call(self, method: str, *args, **kwargs) -> list:
        return [getattr(self.worker, method)(*args, **kwargs)]

    def call_async(self, method: str, *args, **kwargs) -> list:
        return self.call(method, *args, **kwargs)

    def shutdown(self) -> None:
        self.worker.shutdown()


def pipeline_generate(group: StageGroup, input_ids, max_new_tokens: int, chunk_size: int = 2048):
    """Greedy continuation through the stage actors: chunked prefill, then one token per step.

    ``input_ids [B, S]`` int64. Every row is its own sequence (the serving path:
    ``StageWorker.infer_run``). Returns ``[B, S + new]``; token for token what
    ``model.Transformer.generate`` gives on the same weights. The decode states are
    freed at the end.
    """
    import torch

    B = input_ids.shape[0]
    last = next(a.rank for a in group.graph.actors if a.stage == group.graph.num_stages - 1 and a.ep_rank == 0)
    seqs = list(range(B))

    def step(ids, open_new=False):
        return group.call("infer_run", seqs, ids, open_new)[last]["logits"]

    logits = None
    try:
        for c in range(0, input_ids.shape[1], chunk_size):
            logits = step(input_ids[:, c:c + chunk_size], c == 0)
        out = [input_ids]
        for _ in range(max_new_tokens):
            nxt = logits.argmax(-1, keepdim=True)
            out.append(nxt)
            logits = step(nxt)
    finally:
        group.call("infer_free", seqs)
    return torch.cat(out, 1)
