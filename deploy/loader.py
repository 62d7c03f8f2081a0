"""Load a servable model + tokenizer from a training run, a training checkpoint or an HF directory.

``locate(path)`` (cheap: no weights read) and ``load_engine(path)`` accept:

- a run directory (``runs/<name>``): its latest committed checkpoint and ``tokenizer.json``;
- a checkpoint directory (``runs/<name>/checkpoints/step-N``, one process or
  stage x shard layout): the run's ``tokenizer.json`` two levels up;
- an HF-format directory (``tide export`` output, ``save_pretrained``): ``model.load_hf``
  and its ``tokenizer.json``.

The chat template comes from ``tokenizer_config.json`` beside the tokenizer (written by
training and copied by ``tide export``; ``deploy.engine.DEFAULT_CHAT_TEMPLATE`` without one).
Raises ValueError naming what is missing. Nothing is unpickled: weights are read from
safetensors only, configs and tokenizers from JSON; a pickle-based file (a ``.pt`` given as
PATH, a pickle saved as ``tokenizer.json`` or as a weights file) is refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

TOKENIZER_ALLOWED = "allowed: a tokenizers JSON file (tokenizer.json)"


@dataclass
class Source:
    """What ``path`` holds: ``hf`` (an HF directory) or a tide ``checkpoint``; its tokenizer file and a model id."""

    kind: str
    path: Path
    tokenizer: Path
    name: str


def locate(path: str | Path) -> Source:
    """Find the model and tokenizer ``path`` refers to without reading weights (see module docstring)."""
    from cluster.checkpoint.models import resolve_checkpoint
    from model.safe_io import refuse_pickle

    p = Path(path).expanduser()
    if p.is_file():
        refuse_pickle(p, "allowed: a run directory, a tide checkpoint directory or an HF directory with "
                         "safetensors weights")
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
    refuse_pickle(src.tokenizer, TOKENIZER_ALLOWED)
    return src


def model_args_of(path: str | Path):
    """The ``ModelArgs`` of what ``path`` holds, read from its config (no weights loaded).

    Raises:
        ValueError: ``path`` is not servable, or its config is unreadable (named).
    """
    import json

    from model import ModelArgs

    src = locate(path)
    cfg = src.path / ("config.json" if src.kind == "hf" else "meta.json")
    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{cfg}: unreadable ({e})") from None
    if src.kind == "hf":
        return ModelArgs.from_hf_config(data)
    if not isinstance(data, dict) or "model_args" not in data:
        raise ValueError(f"{cfg}: no model_args (not a tide training checkpoint)")
    return ModelArgs.from_dict(data["model_args"], source=str(cfg))


def load_engine(path: str | Path, *, model_name: str | None = None, context: int | None = None,
                topology=None, placement_group=None, bundle_offset: int = 0, **engine_kwargs):
    """A continuous-batching ``deploy.engine.Engine`` for ``path`` (see module docstring).

    Without ``topology`` the model runs in this process (``LocalBackend``). With a
    topology (``cluster.launch.topology.load_topology`` input: dict or YAML path) it runs on
    stage actors placed on the topology's racks (``ActorBackend``): in
    ``placement_group`` from bundle ``bundle_offset`` on when given (a Serve replica's
    own group), else in a group of their own. ``engine_kwargs`` go to ``Engine``.
    """
    from tokenizers import Tokenizer

    from cluster.checkpoint.models import load_trained_model
    from cluster.data import read_chat_template
    from model import load_hf

    from .engine import Engine, LocalBackend

    src = locate(path)
    try:
        tok = Tokenizer.from_file(str(src.tokenizer))
    except Exception as e:  # tokenizers raises a bare Exception on a bad file
        raise ValueError(f"{src.tokenizer}: not a valid tokenizer.json ({e}); {TOKENIZER_ALLOWED}") from None
    template = read_chat_template(src.tokenizer.parent)
    if topology is None:
        model = load_hf(src.path) if src.kind == "hf" else load_trained_model(src.path)[0]
        backend = LocalBackend(model)
    else:  # each stage actor reads its own share of the weights: nothing passes through here
        backend = actor_backend(src, model_args_of(path), topology, placement_group=placement_group,
                                bundle_offset=bundle_offset)
    return Engine(backend, tok, model_name or src.name, context=context, chat_template=template, **engine_kwargs)


def read_topology(source) -> dict:
    """A topology mapping from ``source``: a mapping, a topology YAML, or a training config YAML whose
    ``parallel.topology`` to use.

    Raises:
        ValueError: unreadable file, or a training config without a ``parallel`` section (named).
    """
    from model.safe_io import read_yaml_mapping

    data, where = read_yaml_mapping(source, "topology")
    if "curriculum" in data or "model" in data or "parallel" in data:  # a training config
        par = data.get("parallel")
        if par is None:
            raise ValueError(f"{where} is a training config without a `parallel` section (one actor holds the whole model): "
                             f"give a topology YAML or a config with parallel.topology, e.g. configs/pipeline.yaml")
        if not isinstance(par, dict) or not isinstance(par.get("topology"), dict):
            raise ValueError(f"{where}: parallel.topology must be a mapping (racks, pipeline_stages, ...)")
        return par["topology"]
    return data


def serving_graph(topology, args):
    """The ``ActorGraph`` serving ``args`` on ``topology`` (dict or YAML path): one replica of it
    (``data_parallel`` is the training graph's; a Serve deployment scales with its own replicas).
    Raises ValueError if invalid."""
    from cluster.launch.topology import build_graph, load_topology, one_replica

    return one_replica(build_graph(load_topology(read_topology(topology)), args.num_hidden_layers,
                                   args.n_routed_experts))


def actor_backend(src: Source, args, topology, *, placement_group=None, bundle_offset: int = 0):
    """Start the stage actors of ``topology`` for the model ``src`` holds (``locate``) and have each
    load its own tensors from it: an HF directory (``StageWorker.load_hf``) or a sharded training
    checkpoint, verified against its manifest first (``StageWorker.load_shards``, model tensors
    only); a one-process checkpoint of an earlier version goes through this process. The weights
    must be on storage the actors see at the same path. Returns an ``ActorBackend`` over them.

    Raises:
        ValueError: a damaged checkpoint, or tensors that do not fit the stages (named).
    """
    import uuid

    import ray

    from actors.group import StageGroup
    from cluster.checkpoint import sharded

    from .actor_backend import ActorBackend

    graph = serving_graph(topology, args)
    owner = ray.get_runtime_context().get_actor_id()  # the Serve replica: names its actors apart from others'
    name = f"tide-serve/{owner[:12] if owner else uuid.uuid4().hex[:12]}"
    group = StageGroup(graph, args.to_dict(), placement_group=placement_group, bundle_offset=bundle_offset,
                       name=name)
    try:
        backend = ActorBackend(group, args)
        if src.kind == "hf":
            group.call("load_hf", str(src.path.resolve()))
        else:
            meta = sharded.read_meta(src.path)
            if meta.get("layout") is not None:
                group.call("load_shards", sharded.shard_sources(src.path, meta), False)
            else:
                from cluster.checkpoint.models import load_trained_model

                backend.load_weights(load_trained_model(src.path)[0].state_dict())
    except BaseException:
        group.shutdown()
        raise
    return backend
