"""``tide serve PATH``: the OpenAI-compatible endpoints under Ray Serve (``deploy.serve``) for a run
directory, a training checkpoint or an HF directory; with ``--topology`` on stage actors placed on racks."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from cli.common import CLIError, usage_errors


def _serve_running() -> bool:
    """Whether the connected Ray cluster already has a Serve controller (another ``tide serve`` or app)."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:  # no such actor
        return False
    return True


def _check_racks(graph, need: dict[str | None, float]) -> None:
    """A joined cluster must have the racks (CPUs, and GPUs when asked), or Serve waits forever.

    Raises:
        CLIError: a rack of ``need`` is missing or short (key None: any node).
    """
    import ray

    have: dict[str | None, float] = {}
    gpus: dict[str | None, float] = {}
    for node in ray.nodes():
        if node.get("Alive"):
            r = (node.get("Labels") or {}).get("rack")
            have[r] = have.get(r, 0) + node.get("Resources", {}).get("CPU", 0)
            gpus[r] = gpus.get(r, 0) + node.get("Resources", {}).get("GPU", 0)

    def offered(per_rack: dict, r: str | None) -> float:
        return sum(per_rack.values()) if r is None else per_rack.get(r, 0)  # None: actors on any node

    short = {r: c for r, c in need.items() if offered(have, r) < c}
    if graph.gpus_per_actor:
        short.update({r: "GPUs" for r in need if offered(gpus, r) < sum(1 for a in graph.actors if a.rack == r)})
    if short:
        raise CLIError(f"the Ray cluster cannot place the topology: it needs CPUs per rack {need}"
                       f"{' and a GPU per actor' if graph.gpus_per_actor else ''}; the nodes labelled "
                       f"rack=... offer {({r: c for r, c in have.items() if r})} CPUs (label nodes with "
                       f"`ray start --labels rack=<name>`)")


def run(ns: argparse.Namespace) -> int:
    """``tide serve PATH``: the OpenAI-compatible endpoints under Ray Serve (blocks until Ctrl-C)."""
    import socket

    from deploy.loader import model_args_of, read_topology

    topology = None
    if ns.max_batch < 1:
        raise CLIError(f"--max-batch must be >= 1, got {ns.max_batch}")
    if ns.threads is not None and ns.threads < 1:
        raise CLIError(f"--threads must be >= 1, got {ns.threads}")
    if not 0 < ns.port < 65536:
        raise CLIError(f"--port must be in 1..65535, got {ns.port}")
    if ns.model_name is not None and not ns.model_name.strip():
        raise CLIError("--model-name must not be empty")
    from deploy.serve import KeyDigest, describe_api_key, read_api_key

    key_file = str(Path(ns.api_key_file).expanduser().resolve()) if ns.api_key_file else None
    with usage_errors():
        # read HERE (this shell's environment, this machine's file): a replica on a joined cluster sees
        # neither; it gets a salted digest, never the key (an unreadable / empty file fails here, named)
        api_key = read_api_key(ns.api_key_env, key_file)
    key_digest = KeyDigest.of(api_key).text if api_key is not None else None
    del api_key
    try:
        with socket.socket() as sock:  # the HTTP proxy binds here: fail now, not inside Serve
            sock.bind((ns.host, ns.port))
    except OSError as e:
        raise CLIError(f"cannot listen on {ns.host}:{ns.port}: {e.strerror or e} (pick another --port / --host)") \
            from None
    graph = None
    with usage_errors():
        args = model_args_of(ns.path)  # fail fast on a bad path, before Ray starts (the replica loads the weights)
        from cluster.checkpoint.models import resolve_checkpoint

        if not (Path(ns.path) / "config.json").is_file():
            from cluster.checkpoint import store as ckpt

            problems = ckpt.verify_checkpoint(resolve_checkpoint(ns.path))  # a damaged checkpoint is named here
            if problems:
                raise ValueError("; ".join(problems))
        if ns.topology:
            from cluster.launch.topology import build_graph, load_topology, one_replica

            topology = read_topology(ns.topology)
            graph = one_replica(build_graph(load_topology(topology), args.num_hidden_layers, args.n_routed_experts))
            if graph.gpus_per_actor and not (ns.address or os.environ.get("RAY_ADDRESS")):
                import torch

                if not torch.cuda.is_available():
                    raise ValueError("the topology asks gpus_per_actor: 1 but this machine has no CUDA device "
                                     "(simulated racks use local devices); use gpus_per_actor: 0 or --address")
    import ray
    from ray import serve

    from cluster.launch.connect import connect_ray
    from deploy.serve import REPLICA_CPUS, build

    started = False
    # the replica joins stage 0's rack; without a topology it (and the model in it) may go on any node
    need = graph.cpus_per_rack({next(a.rack for a in graph.actors if a.stage == 0): REPLICA_CPUS}) if graph \
        else {None: REPLICA_CPUS}
    try:
        # joins --address / RAY_ADDRESS / a local head with the racks; else simulates the topology's racks on
        # this machine (as `tide train` does), or starts a plain local instance without a topology
        with usage_errors():
            conn = connect_ray(need, address=ns.address, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    except ConnectionError as e:
        raise CLIError(f"cannot connect to the Ray cluster: {e} (a token-auth cluster needs RAY_AUTH_MODE=token "
                       f"and its token)") from None
    try:
        if graph is not None and conn.local is None:  # a joined cluster must have the racks, or Serve waits forever
            _check_racks(graph, need)
        if _serve_running():
            raise CLIError("Ray Serve already runs on this cluster: tide serve would replace its applications and "
                           "HTTP options. Use another cluster, or add tide to that Serve with `serve deploy` / "
                           "`serve run deploy/serve.yaml`")
        started = True  # from here on this process owns the cluster's Serve and shuts it down on the way out
        serve.start(http_options={"host": ns.host, "port": ns.port})
        try:
            key_args = {"api_key_digest": key_digest} if key_digest is not None else \
                {"api_key_env": None}  # no key: the replica does not look in its own environment either
            serve.run(build({"path": str(Path(ns.path).resolve()), "model_name": ns.model_name, **key_args,
                             "topology": topology, "max_batch": ns.max_batch, "torch_threads": ns.threads}),
                      name="tide", route_prefix="/")
        except RuntimeError as e:
            last = [ln for ln in str(e).splitlines() if ln.strip()][-1:]
            raise CLIError(f"the Serve replica failed to start: {last[0] if last else e} (the replica's log is in "
                           f"the Ray dashboard / /tmp/ray/session_latest/logs/serve)") from None
        key = describe_api_key(ns.api_key_env, key_file)  # where the key comes from, never the key
        where = "in the replica" if topology is None else "on stage actors"
        print(f"tide: serving {ns.path} {where} on http://{ns.host}:{ns.port}/v1 ({conn.mode}; API key "
              f"{key}); Ctrl-C stops", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        if started:  # never shut down a Serve this process did not start (another tide serve's)
            try:
                serve.shutdown()
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
        conn.shutdown()  # the simulated racks / the local instance this process started
        if ray.is_initialized():  # a joined cluster: disconnect this driver, the cluster stays up
            ray.shutdown()
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    """The ``tide serve`` subcommand."""
    sv = sub.add_parser(
        "serve", help="serve a run / checkpoint / HF directory behind OpenAI-compatible endpoints (Ray Serve)",
        description="Start Ray Serve (joining a running cluster, else an embedded one) with /v1/completions, "
                    "/v1/chat/completions (stream: true for server-sent events), /v1/models and /health for the "
                    "model in PATH: a run directory (its latest checkpoint), a training checkpoint or an HF-format "
                    "directory, each with its tokenizer.json (and tokenizer_config.json's chat template). Requests "
                    "are batched continuously. With --topology the model runs on stage actors placed on racks "
                    "(the replica's placement group, bundle label selectors): on the cluster given by --address or "
                    "RAY_ADDRESS (nodes labelled rack=...), else on racks simulated by local labelled raylets.")
    sv.add_argument("path", help="runs/<name>, runs/<name>/checkpoints/step-N, or an HF model directory")
    sv.add_argument("--host", default="127.0.0.1", help="bind address; default: %(default)s (local only)")
    sv.add_argument("--port", type=int, default=8000, help="default: %(default)s")
    sv.add_argument("--model-name", help="the model id clients send (default: derived from PATH)")
    sv.add_argument("--api-key-env", default="TIDE_API_KEY",
                    help="environment variable holding the bearer key clients must send; unset = no key "
                         "(default: %(default)s)")
    sv.add_argument("--api-key-file", metavar="PATH",
                    help="file whose first line is the bearer key clients must send (takes precedence over "
                         "--api-key-env; keep it mode 600). The key is never printed or logged")
    sv.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, a local head, or embedded)")
    sv.add_argument("--topology", metavar="YAML",
                    help="serve on stage actors: a topology YAML (racks, pipeline_stages, expert_parallel, "
                         "cpus_per_actor) or a training config whose parallel.topology to use, e.g. "
                         "configs/pipeline.yaml (default: the model runs in the Serve replica)")
    sv.add_argument("--max-batch", type=int, default=32,
                    help="sequences decoded together at most; more requests wait (default: %(default)s)")
    sv.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads of the serving replica (default: torch's; on small machines "
                         "leave a core for the HTTP side: on 2 cores 1 thread decodes ~1.6x faster than 2)")
    sv.set_defaults(func=run)
    return sv
