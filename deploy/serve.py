"""Ray Serve deployment of the OpenAI-compatible app.

``serve run deploy.serve:build path=runs/pipeline`` (or ``tide serve runs/pipeline``)
starts one replica that loads the model and answers through ``deploy.app``'s FastAPI
routes (``serve.ingress``: streaming responses stay streamed), generating with the
continuous-batching ``deploy.engine.Engine``.

With a ``topology`` (the ``parallel.topology`` mapping of a training config, or a YAML
file holding one) the replica serves **on stage actors**: the deployment asks Serve for
a placement group whose bundle 0 holds the replica (on the first stage's rack) and
bundles 1.. one per ``StageWorker`` with ``{"rack": ...}`` bundle label selectors, so
the replica and its actors are gang-scheduled and every stage lands on its rack; the
replica starts the actors in its own placement group (``StageGroup(placement_group=
ray.util.get_current_placement_group(), bundle_offset=1)``). ``deploy/serve.yaml`` is
the same application for ``serve deploy``.

The API key, when wanted, comes from a file (``api_key_file``: its first line) or else
from the environment variable named by ``api_key_env`` (default ``TIDE_API_KEY``), both
read by the replica -- on its node, in its environment -- or, from ``tide serve``, as a
salted digest (``api_key_digest``, :class:`KeyDigest`) of the key ``tide serve`` read
where it runs: a replica on a joined cluster does not inherit that shell's environment.
Only the file's path, the variable's name or the digest travel as deployment arguments,
and the key is never logged, printed or put in an error message (:func:`read_api_key`).
Ray's token auth does not cover Serve's HTTP port, so the app checks the key itself.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from ray import serve

from .app import build_app

REPLICA_CPUS = 0.5


class _Current:
    """The replica's engine, looked up per request (the FastAPI app exists before the replica loads it)."""

    engine = None
    api_key: str | None = None

    def __getattr__(self, name):
        if _Current.engine is None:
            raise RuntimeError("the model is still loading")
        return getattr(_Current.engine, name)


_app = build_app(_Current(), api_key=lambda: _Current.api_key)


class KeyDigest:
    """A salted SHA-256 digest of an API key: what ``tide serve`` hands the replica instead of the
    key, so the key never becomes a deployment argument (those show in Serve's config and the
    Ray dashboard). Use high-entropy keys (e.g. ``secrets.token_urlsafe(32)``): a digest of a
    guessable key can be brute-forced by whoever can read the deployment's arguments.

    ``KeyDigest.of(key).text`` is ``"sha256:<salt hex>:<digest hex>"``; ``KeyDigest.parse(text)``
    reads it back; ``matches(presented)`` compares in constant time.

    Raises:
        ValueError: ``parse`` of a malformed text (its shape is named, never its content).
    """

    def __init__(self, salt: bytes, digest: bytes):
        self.salt, self.digest = salt, digest

    @staticmethod
    def _hash(salt: bytes, key: str) -> bytes:
        return hashlib.sha256(salt + key.encode("utf-8")).digest()

    @classmethod
    def of(cls, key: str) -> KeyDigest:
        salt = secrets.token_bytes(16)
        return cls(salt, cls._hash(salt, key))

    @classmethod
    def parse(cls, text: str) -> KeyDigest:
        parts = text.split(":") if isinstance(text, str) else []
        try:
            if len(parts) != 3 or parts[0] != "sha256":
                raise ValueError
            salt, digest = bytes.fromhex(parts[1]), bytes.fromhex(parts[2])
            if len(salt) < 8 or len(digest) != 32:
                raise ValueError
        except ValueError:
            raise ValueError("api_key_digest must be 'sha256:<salt hex>:<64 hex digits>' "
                             "(made by deploy.serve.KeyDigest.of)") from None
        return cls(salt, digest)

    @property
    def text(self) -> str:
        return f"sha256:{self.salt.hex()}:{self.digest.hex()}"

    def matches(self, presented: str) -> bool:
        """Whether ``presented`` is the key (constant-time comparison of digests)."""
        return hmac.compare_digest(self._hash(self.salt, presented), self.digest)

    def __repr__(self) -> str:
        return "KeyDigest(<hidden>)"


def read_api_key(api_key_env: str | None = "TIDE_API_KEY", api_key_file: str | None = None) -> str | None:
    """The bearer key clients must send, or None (no key): from ``api_key_file`` when
    given (its first line, surrounding whitespace stripped), else from the environment
    variable ``api_key_env`` (surrounding whitespace stripped; unset or blank: no key; None: not looked up).

    Errors name the file or the variable, never the key.

    Raises:
        ValueError: ``api_key_file`` is missing, unreadable, not UTF-8 or empty.
    """
    if api_key_file is not None:
        p = Path(api_key_file).expanduser()
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"API key file {p} is not UTF-8 text") from None
        except OSError as e:
            raise ValueError(f"cannot read API key file {p}: {e.strerror or type(e).__name__}") from None
        key = text.strip().splitlines()[0].strip() if text.strip() else ""
        if not key:
            raise ValueError(f"API key file {p} is empty (put the key on its first line)")
        return key
    return (os.environ.get(api_key_env, "").strip() or None) if api_key_env else None


def describe_api_key(api_key_env: str = "TIDE_API_KEY", api_key_file: str | None = None) -> str:
    """Where the key comes from, for start-up messages (never the key itself)."""
    if api_key_file is not None:
        return f"on (from file {api_key_file})"
    return f"on (from ${api_key_env})" if read_api_key(api_key_env) else f"off (set {api_key_env} or " \
                                                                          f"--api-key-file to require one)"


def load_replica(path: str, model_name: str | None = None, api_key_env: str = "TIDE_API_KEY", topology=None,
                 max_batch: int = 32, torch_threads: int | None = None, api_key_file: str | None = None,
                 placement_group=None, api_key_digest: str | None = None):
    """Load the engine and the API key into the module's app (``_app``): what a replica does at start.
    ``api_key_digest`` (a :class:`KeyDigest` text), when given, is the key check and the file /
    environment are not read.

    Also usable without Serve (tests drive ``_app`` with FastAPI's TestClient).
    """
    from .loader import load_engine

    if torch_threads:  # intra-op threads of this replica (the HTTP side needs a core too)
        import torch

        torch.set_num_threads(torch_threads)
    # before the (slow) load: a bad file fails fast
    _Current.api_key = KeyDigest.parse(api_key_digest) if api_key_digest is not None else \
        read_api_key(api_key_env, api_key_file)
    _Current.engine = load_engine(path, model_name=model_name, topology=topology, placement_group=placement_group,
                                  bundle_offset=1, max_batch=max_batch)
    return _app


@serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": REPLICA_CPUS})
@serve.ingress(_app)
class OpenAIServer:
    """One replica: loads the engine (in process, or on stage actors in its placement group)."""

    def __init__(self, path: str, model_name: str | None = None, api_key_env: str = "TIDE_API_KEY",
                 topology=None, max_batch: int = 32, torch_threads: int | None = None,
                 api_key_file: str | None = None, api_key_digest: str | None = None):
        from ray.util import get_current_placement_group

        placement = get_current_placement_group() if topology is not None else None
        load_replica(path, model_name, api_key_env, topology, max_batch, torch_threads, api_key_file, placement,
                     api_key_digest)

    def check_health(self):
        """Serve's replica health check: a failed engine (e.g. a dead stage actor) makes Serve replace the replica."""
        if _Current.engine is not None and _Current.engine.error is not None:
            raise RuntimeError(f"the engine failed: {_Current.engine.error}")

    def __del__(self):
        if _Current.engine is not None:
            _Current.engine.close()


def placement_options(topology, num_hidden_layers: int, n_routed_experts: int) -> dict:
    """Serve deployment options placing the replica and the stage actors of ``topology``:
    ``placement_group_bundles`` (replica first), ``placement_group_bundle_label_selector``
    (the replica on stage 0's rack, each actor on its stage's rack), strategy ``PACK``.

    Raises:
        ValueError: an invalid topology (named).
    """
    from actors.group import bundle_specs
    from cluster.launch.topology import build_graph, load_topology, one_replica

    graph = one_replica(build_graph(load_topology(topology), num_hidden_layers, n_routed_experts))
    first = next(a for a in graph.actors if a.stage == 0)
    return {"placement_group_bundles": [{"CPU": REPLICA_CPUS}] + bundle_specs(graph),
            "placement_group_bundle_label_selector": [first.label_selector] + [a.label_selector
                                                                               for a in graph.actors],
            "placement_group_strategy": "PACK"}


def build(args: dict) -> serve.Application:
    """``serve run deploy.serve:build path=RUN_OR_CHECKPOINT [model_name=NAME] [api_key_env=VAR]
    [api_key_file=PATH] [topology=TOPOLOGY.yaml] [max_batch=N] [torch_threads=N]`` (``topology`` may
    also be a mapping, as in serve.yaml). ``api_key_file`` (readable on the replica's node) takes
    precedence over ``api_key_env`` (read in the replica's environment); ``api_key_digest`` (a
    :class:`KeyDigest` text, what ``tide serve`` passes) over both; the key itself is never an argument.

    Raises:
        ValueError: no ``path``, an unknown argument, a bad path / topology, or an
            unreadable / empty ``api_key_file`` (named; the key is never shown).
    """
    allowed = {"path", "model_name", "api_key_env", "api_key_file", "api_key_digest", "topology", "max_batch",
               "torch_threads"}
    unknown = sorted(set(args) - allowed)
    if unknown:
        raise ValueError(f"deploy.serve:build: unknown argument(s) {unknown}; allowed: {sorted(allowed)}")
    if "path" not in args:
        raise ValueError("deploy.serve:build needs path=<run directory, checkpoint or HF model directory>")
    from .loader import model_args_of

    margs = model_args_of(args["path"])  # a bad path fails here, not in the replica
    key_file = args.get("api_key_file")
    if key_file is not None:
        key_file = str(Path(key_file).expanduser().resolve())
        read_api_key(api_key_file=key_file)  # fail fast; the replica reads it again (the key is not an argument)
    digest = args.get("api_key_digest")
    if digest is not None:
        KeyDigest.parse(digest)  # malformed: fail here, not in the replica
    topology = args.get("topology")
    if topology is not None:
        from .loader import read_topology

        topology = read_topology(topology)  # a topology YAML or a training config's parallel.topology
    dep = OpenAIServer
    if topology is not None:
        dep = OpenAIServer.options(**placement_options(topology, margs.num_hidden_layers, margs.n_routed_experts))
    for key in ("max_batch", "torch_threads"):
        v = args.get(key)
        if v is not None and (not str(v).isdigit() or int(v) < 1):
            raise ValueError(f"deploy.serve:build: {key} must be an integer >= 1, got {v!r}")
    threads = args.get("torch_threads")
    return dep.bind(args["path"], args.get("model_name"), args.get("api_key_env", "TIDE_API_KEY"), topology,
                    int(args.get("max_batch", 32)), int(threads) if threads else None, key_file, digest)


def serve_and_ask(path, topology, message: str, *, port: int | None = None, max_tokens: int = 64) -> dict:
    """Serve ``path`` on the connected Ray cluster (on ``topology``'s stage actors when given),
    ask one chat completion with the official OpenAI client, print it, stop serving.

    The end of ``tide train --then-serve``: proves the trained checkpoint answers through
    the same HTTP path users call. Returns ``{"url", "model", "answer", "ttft_s", "seconds"}``
    (time to the first streamed token and to the end of the answer).
    """
    import time

    import openai

    from comm.launch import free_port

    port = port or free_port()
    quiet = {"log_level": "WARNING", "enable_access_log": False}  # the answer, not Serve's INFO lines
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=quiet)
    try:
        t0 = time.monotonic()
        key = read_api_key()  # this process's TIDE_API_KEY; the replica gets its digest (see the module docstring)
        key_args = {"api_key_digest": KeyDigest.of(key).text} if key else {"api_key_env": None}
        serve.run(build({"path": str(path), "model_name": "tide", "topology": topology, **key_args}), name="tide",
                  route_prefix="/", logging_config=quiet)
        where = "on the stage actors" if topology is not None else "in the replica"
        print(f"tide: serving {path} {where} at http://127.0.0.1:{port}/v1 (started in "
              f"{time.monotonic() - t0:.1f} s); asking: {message!r}", flush=True)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key or "-",
                               max_retries=2, timeout=300)
        t0 = time.monotonic()
        stream = client.chat.completions.create(model="tide", messages=[{"role": "user", "content": message}],
                                                max_tokens=max_tokens, temperature=0.7, top_p=0.95, seed=0,
                                                stream=True)  # seeded: the same answer every time
        parts, ttft = [], None
        for chunk in stream:
            text = chunk.choices[0].delta.content if chunk.choices else None
            if text:
                ttft = ttft if ttft is not None else time.monotonic() - t0
                parts.append(text)
        elapsed = time.monotonic() - t0
        answer = "".join(parts)
        print(f"tide: the served model answers ({elapsed:.1f} s, first token after "
              f"{(ttft or elapsed) * 1000:.0f} ms):\n{answer}", flush=True)
        return {"url": f"http://127.0.0.1:{port}/v1", "model": str(path), "answer": answer,
                "ttft_s": round(ttft or elapsed, 3), "seconds": round(elapsed, 3)}
    finally:
        serve.shutdown()
