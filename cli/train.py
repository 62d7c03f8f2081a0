"""``tide train CONFIG``: one training run (``cluster.train``: validate, connect, train on the run's
actor graph) and, with ``--then-serve``, serve its last checkpoint on the same cluster, ask it one chat
completion through the OpenAI client, print the answer and stop serving (``deploy.serve.serve_and_ask``)."""

from __future__ import annotations

import argparse

from cli.common import CLIError, usage_errors

DEFAULT_CHAT = "Write a Python function that reverses a list."


def _chat_of(ns: argparse.Namespace) -> str | None:
    """The message ``--then-serve`` asks (``DEFAULT_CHAT`` unless ``--chat``), None without ``--then-serve``.

    Raises:
        CLIError: ``--chat`` without ``--then-serve``, an empty or non-UTF-8 ``--chat``.
    """
    if ns.chat is not None and not ns.then_serve:
        raise CLIError("--chat is the question --then-serve asks: add --then-serve")
    if not ns.then_serve:
        return None
    chat = DEFAULT_CHAT if ns.chat is None else ns.chat
    if not chat.strip():
        raise CLIError("--chat must not be empty")
    try:
        chat.encode("utf-8")
    except UnicodeEncodeError:
        raise CLIError("--chat is not valid UTF-8 text") from None
    return chat


def replica_cpus(ns: argparse.Namespace) -> dict[str | None, float]:
    """Room for the Serve replica ``--then-serve`` starts: ``REPLICA_CPUS`` on the rack of the stage-0
    actor of the run's graph (key None: a 1 x 1 graph without racks, any node), reserved before connecting.

    Raises:
        CLIError: an invalid config or topology (the same check the run makes).
    """
    from cluster.train import load_for_run
    from cluster.training.config import model_args_for
    from cluster.training.trainer import graph_of
    from deploy.serve import REPLICA_CPUS

    with usage_errors():
        cfg = load_for_run(ns.config, name=ns.name, storage_path=ns.storage_path)
        args = model_args_for(cfg, cfg.data.vocab_size)
        graph = graph_of(cfg, args.num_hidden_layers, args.n_routed_experts)
    return {next(a.rack for a in graph.actors if a.stage == 0): REPLICA_CPUS}


def run(ns: argparse.Namespace) -> int:
    """``tide train``: ``cluster.train.run`` (it prints the summary as JSON), serving afterwards with
    ``--then-serve``. Returns its exit status (2: a usage error, 130: interrupted)."""
    from cluster import train

    chat = _chat_of(ns)
    after = extra = None
    if chat is not None:
        from deploy.serve import serve_and_ask

        extra = replica_cpus(ns)

        def after(summary, cfg):
            return serve_and_ask(summary["run_dir"], cfg.parallel.topology if cfg.parallel else None, chat)
    return train.run(ns, after=after, extra_cpus=extra)


def add_parser(sub) -> argparse.ArgumentParser:
    """The ``tide train`` subcommand: ``cluster.train``'s options plus ``--then-serve`` and ``--chat``."""
    from cluster import train

    tr = train.add_arguments(sub.add_parser(
        "train", help="train with a curriculum YAML on its actor graph (embedded local cluster unless one runs)",
        description=train.DESCRIPTION))
    tr.add_argument("--then-serve", action="store_true",
                    help="after training, serve the last checkpoint with Ray Serve on the same cluster (on the "
                         "run's actor graph for pipeline runs), ask it one chat completion through the OpenAI "
                         "client, print the answer and stop serving")
    tr.add_argument("--chat", default=None,
                    help=f"the user message --then-serve asks (default: {DEFAULT_CHAT!r})")
    tr.set_defaults(func=run)
    return tr
