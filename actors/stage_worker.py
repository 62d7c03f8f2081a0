"""``StageWorker``: the actor that owns one pipeline stage's expert shard in one data-parallel replica.

One actor per (replica, stage, expert shard) of the ``ActorGraph``. It holds its layer
slice (embedding on the first stage, head + MTP on the last), its share of every
MoE layer's experts, its optimizer state (Muon + AdamW over exactly those
parameters; with D > 1 replicas only over the ones this replica owns, ZeRO-1:
``comm.data_parallel``), the routing cached for anticipatory routing and, when serving, the
decode states of its sequences. A one-process run is one such worker holding everything. Logic lives in
``model.stage`` (what the stage computes) and ``comm`` (how stages talk); this
class wires them together and exposes coarse methods the driver calls on all
actors at once (``actors.group.StageGroup``).

The class is plain Python: Ray wraps it (``ray.remote(StageWorker)``) and tests
can also drive it in-process.
"""

from __future__ import annotations

import contextlib
import os
import socket

import torch
import torch.distributed as dist

from comm.data_parallel import DEFAULT_BUCKET_MB, assign_owners, broadcast_from_owners
from comm.link_model import LinkModel
from comm.pipeline import PipelineRunner
from comm.trace import Tracer
from comm.transport import build_mesh
from model import ModelArgs, Transformer
from model import optim as optim_lib
from model.init import INIT_SCHEMES
from model.inputs import check_tokens
from model.losses import LossConfig
from model.optim import CombinedOptimizer, OptimConfig
from model.stage import PipelineStage, is_expert_param
from model.training import set_attention_mode

OPTIM_PREFIX = "optim/"
SHARD_FILE_SUFFIX = ".safetensors"


class ActorDied(RuntimeError):
    """An in-process worker (``actors.group.LocalGroup``) failed the way an actor process dies
    (``crash``): restartable."""


class StageWorker:
    """One (stage, expert shard) of the actor graph.

    Args:
        graph: the ``cluster.launch.topology.ActorGraph``.
        rank: this actor's rank in it (``ActorSpec.rank``).
        model_args: ``ModelArgs.to_dict()`` of the model.
        seed: initial weights are ``Transformer.build(args, seed)``'s (checkpoints replace them).
        init: ``"per_parameter"`` (default): this actor materialises only its own tensors, each
            drawn from ``(seed, its full name)`` (``model.init``), so every layout starts from the
            same parameters; ``"sequential"``: ``torch.manual_seed(seed)`` then the whole model built
            in order and sliced (tide's earlier rule: needs the whole model in every actor's
            memory; reproduces runs made before).
        microbatches, waves, expert_waves, schedule: see ``comm.pipeline.PipelineRunner``.
        link: link-model dict (``LinkModel.to_dict()`` form) to shape transfers, or None (off).
        trace: record a timeline (``trace_events``).
        optim: ``OptimConfig`` fields.
        activation_checkpointing: recompute every block in backward (``model.remat``).
        deterministic: ``torch.use_deterministic_algorithms(True)`` in this process.
        bucket_mb: gradient all-reduce bucket size, MiB (``comm.data_parallel.GradBuckets``).
    """

    def __init__(self, graph, rank: int, model_args: dict, *, seed: int = 0, microbatches: int = 1,
                 waves: int = 1, expert_waves: int | None = None, schedule: str = "1f1b",
                 link: dict | None = None, trace: bool = False, optim: dict | None = None,
                 activation_checkpointing: bool = False, deterministic: bool = False, init: str = "per_parameter",
                 bucket_mb: float = DEFAULT_BUCKET_MB):
        self.graph, self.rank = graph, rank
        self.spec = next(a for a in graph.actors if a.rank == rank)
        self.args = ModelArgs.from_dict(model_args, source="model_args")
        self.seed = seed
        if init not in INIT_SCHEMES:
            raise ValueError(f"init must be one of {list(INIT_SCHEMES)}, got {init!r}")
        self.init = init
        self.run_opts = dict(microbatches=microbatches, waves=waves, expert_waves=expert_waves, schedule=schedule,
                             bucket_mb=bucket_mb)
        self.link = LinkModel.from_dict(link, enabled=True) if link else LinkModel()
        rep = f"replica {self.spec.dp_rank} / " if getattr(graph, "data_parallel", 1) > 1 else ""
        self.tracer = Tracer(rank, f"{rep}stage {self.spec.stage} / shard {self.spec.ep_rank} ({self.spec.rack})",
                             enabled=trace)
        self.optim_cfg = OptimConfig(**(optim or {}))
        self.activation_checkpointing = activation_checkpointing
        self.deterministic = deterministic
        self.stage: PipelineStage | None = None
        self.replicated = None  # serving's MoE (ReplicatedExperts), made on first use
        self.routing_cache: dict[int, dict[str, torch.Tensor]] = {}  # anticipatory routing, by step
        self.last_forced: dict[str, torch.Tensor] | None = None
        self.last_batch: dict | None = None
        self.in_process = False  # LocalGroup sets it: crash() raises instead of exiting

    # ------------------------------------------------------------ placement
    def placement(self) -> dict:
        """Where this actor runs: node id, node labels (``rack``), host, pid."""
        import ray

        ctx = ray.get_runtime_context()
        labels = dict(ctx.get_node_labels() or {})
        return {"rank": self.rank, "stage": self.spec.stage, "ep_rank": self.spec.ep_rank,
                "dp_rank": self.spec.dp_rank, "expected_rack": self.spec.rack, "rack": labels.get("rack"),
                "node_id": ctx.get_node_id(),
                "host": socket.gethostname(), "pid": os.getpid()}

    def master_address(self) -> tuple[str, int]:
        """An address for the TCP store (called on rank 0): this node's IP and a free port."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    # ---------------------------------------------------------------- setup
    def setup(self, master_addr: str, master_port: int, backend: str | None = None, timeout_s: float = 300.0) -> dict:
        """Join the process group, create the mesh's groups, build the stage, runner and optimizer.

        ``backend``: default nccl when the graph gives each actor a GPU, else gloo (CPU). A process
        that has joined a group already (rank and size as the graph wants) keeps it.
        """
        import datetime

        use_gpu = bool(getattr(self.graph, "gpus_per_actor", 0))
        if use_gpu:
            if not torch.cuda.is_available():
                raise RuntimeError("gpus_per_actor is 1 but this actor sees no CUDA device")
            torch.cuda.set_device(0)  # Ray sets CUDA_VISIBLE_DEVICES to the actor's GPU
        backend = backend or ("nccl" if use_gpu else "gloo")
        if self.deterministic:
            torch.use_deterministic_algorithms(True)
        self.device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
        if dist.is_initialized():  # joined already (a launcher's group, e.g. comm.launch.spawn_local)
            if (dist.get_rank(), dist.get_world_size()) != (self.rank, len(self.graph.actors)):
                raise RuntimeError(f"this process is rank {dist.get_rank()} of {dist.get_world_size()}, the actor "
                                   f"graph wants rank {self.rank} of {len(self.graph.actors)}")
        else:
            dist.init_process_group(backend, init_method=f"tcp://{master_addr}:{master_port}", rank=self.rank,
                                    world_size=len(self.graph.actors), timeout=datetime.timedelta(seconds=timeout_s))
        self.mesh = build_mesh(self.graph, self.rank, tied_embedding=self.args.num_nextn_predict_layers > 0)
        lo, hi = self.graph.layer_slices[self.spec.stage]
        if self.init == "sequential":
            torch.manual_seed(self.seed)
            full = Transformer(self.args)
            self.stage = PipelineStage.from_model(full, lo, hi, lo == 0, hi == self.args.num_hidden_layers,
                                                  self.spec.ep_rank, self.mesh.ep_size)
            del full
            self.stage.to(self.device)
        else:
            self.stage = PipelineStage.build(self.args, lo, hi, self.spec.ep_rank, self.mesh.ep_size,
                                             seed=self.seed, device=self.device)
        self.stage.train()
        from model.remat import checkpointed

        self.runner = PipelineRunner(self.stage, self.mesh, link=self.link, tracer=self.tracer,
                                     block_call=checkpointed if self.activation_checkpointing else None,
                                     **self.run_opts)
        # ZeRO-1: each parameter's optimizer state lives on one replica of this (stage, shard), whole
        sizes = {n: optim_lib.state_bytes(n, p, self.optim_cfg) for n, p in self.stage.named_parameters()}
        self.owners = assign_owners(sizes, self.mesh.dp_size)
        self.owned = {n for n, d in self.owners.items() if d == self.mesh.dp_rank}
        self.optimizer = CombinedOptimizer(self.stage, self.optim_cfg, only=self.owned)
        return {"rank": self.rank, "layers": [lo, hi], "experts": [self.stage.expert_lo, self.stage.expert_hi],
                "params": sum(p.numel() for p in self.stage.parameters()), "threads": torch.get_num_threads(),
                "dp_rank": self.mesh.dp_rank, "owned_params": len(self.owned)}

    def set_attention_mode(self, mode: str) -> None:
        set_attention_mode(self.stage, mode)

    # ----------------------------------------------------------------- train
    def forward_backward(self, batch: dict, loss_cfg: dict, max_grad_norm: float | None,
                         routing_key: int | None = None) -> dict:
        """Zero grads, run the step's pipeline forward/backward, clip. Returns global metrics + ``grad_norm``.

        ``routing_key``: use (and drop) the routing cached by ``route_ahead`` under this key
        (anticipatory routing); None: every MoE selects its experts. The batch's token ids are
        validated here, once per step, on the host.

        Raises:
            KeyError: no routing cached under ``routing_key``.
            ValueError: token ids out of the vocabulary, or a batch that does not split.
        """
        check_tokens(batch["input_ids"], self.args.vocab_size, batch.get("doc_ids"))
        forced = None
        if routing_key is not None:
            forced = self.routing_cache.pop(routing_key)
        self.last_forced, self.last_batch = forced, batch  # what this step used (inspection: tests)
        self.optimizer.zero_grad()
        metrics = self.runner.forward_backward(batch, LossConfig(**loss_cfg), forced)
        metrics["grad_norm"] = self.runner.clip_grad_norm(max_grad_norm)
        return metrics

    def route_ahead(self, batch: dict, loss_cfg: dict, key: int) -> None:
        """Anticipatory routing: compute, with the current parameters, the routing every MoE of
        this stage picks for this shard's sequences of ``batch`` (a later step's, fetched early)
        and cache it under ``key`` until ``forward_backward(routing_key=key)`` uses it."""
        check_tokens(batch["input_ids"], self.args.vocab_size, batch.get("doc_ids"))
        self.routing_cache[key] = self.runner.route(batch, LossConfig(**loss_cfg))

    def drop_routing(self) -> None:
        """Forget every cached routing (a rollback made it stale)."""
        self.routing_cache.clear()

    def take_routing(self, key: int) -> dict[str, torch.Tensor]:
        """Remove and return the routing cached under ``key`` (``key -> [b_local, S', K]``)."""
        return self.routing_cache.pop(key)

    def used_routing(self) -> dict:
        """What the last ``forward_backward`` was given: ``{"routing": forced routing of this shard
        (``key -> [b_local, S', K]``) or None, "batch": the step's batch, "last_stage": bool}``."""
        return {"routing": self.last_forced, "batch": self.last_batch, "last_stage": self.mesh.last}

    def apply(self, lr: float, bias_speed: float | None) -> dict:
        """Optimizer step at ``lr``, then the router-bias update (``bias_speed`` None: skip). Returns load CVs."""
        self.optimizer.set_lr(lr)
        self.optimizer.step()  # the parameters this replica owns
        self.optimizer.zero_grad()
        broadcast_from_owners([(n, p) for n, p in self.stage.named_parameters()], self.owners, self.mesh.dp_rank,
                              self.mesh.replica_ranks, self.mesh.replica, self.tracer)
        if bias_speed is None:
            return {}
        cv = self.runner.update_router_biases(bias_speed)
        out: list = [None] * self.mesh.world  # every stage's CVs, so any actor reports the whole model's
        dist.all_gather_object(out, cv)
        return {k: v for d in out for k, v in d.items()}

    def discard(self) -> None:
        """Drop the step's gradients (a detected loss spike)."""
        self.optimizer.zero_grad()

    # ------------------------------------------------------------- inference
    # Serving (deploy.actor_backend): every actor of a stage runs every row of a batch
    # (``comm.expert_parallel.ReplicatedExperts``), so a sequence's decode state lives on
    # all shards of each stage, keyed by a sequence id the engine assigns.

    @contextlib.contextmanager
    def _serving(self):
        """Eval mode with the replicated-experts MoE for the duration of an inference call."""
        from comm.expert_parallel import ReplicatedExperts

        if self.replicated is None:
            self.replicated = ReplicatedExperts(self.mesh.expert, self.mesh.ep_rank, self.mesh.ep_size,
                                                self.args.n_routed_experts)
            self.seqs: dict[int, object] = {}
            self.infer_tag = 0
        moes = list(self.stage.moes())
        saved = [m.expert_parallel for m in moes]
        was_training = self.stage.training
        self.stage.eval()
        for m in moes:
            m.expert_parallel = self.replicated
        try:
            with torch.no_grad():
                yield
        finally:
            for m, ep in zip(moes, saved, strict=True):
                m.expert_parallel = ep
            self.stage.train(was_training)

    def infer_run(self, seq_ids: list[int], input_ids: torch.Tensor, open_new: bool = False) -> dict:
        """Feed ``input_ids [B, S]`` through this stage for sequences ``seq_ids`` (one per row).

        Row ``i`` continues sequence ``seq_ids[i]`` from its own position (a ragged batch:
        a prefill chunk of one sequence, or one decode token for each of many).
        ``open_new``: the sequences are new (fresh decode states; an id in use is an error).
        Activations stream to the next stage over the pipeline links. Returns
        ``{"logits": [B, V] float32 CPU of each row's last position (last stage, expert
        shard 0; else None), "state_bytes": this actor's decode-state bytes, "live": sequences}``.

        Raises:
            KeyError: an unknown sequence id (not opened, or freed).
            ValueError: an id opened twice, or rows that do not match ``seq_ids``.
        """
        mesh = self.mesh
        with self._serving():
            if len(seq_ids) != input_ids.shape[0]:
                raise ValueError(f"{len(seq_ids)} sequence ids for {input_ids.shape[0]} rows")
            if open_new:
                dup = [s for s in seq_ids if s in self.seqs]
                if dup:
                    raise ValueError(f"sequence ids already open: {dup}")
                for s in seq_ids:
                    self.seqs[s] = self.stage.new_state(1, device=self.device)
            missing = [s for s in seq_ids if s not in self.seqs]
            if missing:
                raise KeyError(f"unknown sequence ids {missing} (never opened or already freed)")
            states = [self.seqs[s] for s in seq_ids]
            ids = input_ids.to(self.device)
            B, S = ids.shape
            tag = self.infer_tag
            self.infer_tag += 1
            x = None
            if not mesh.first:
                x = self.runner.links.recv_act((B, S, self.args.hc_mult, self.args.hidden_size),
                                               next(self.stage.parameters()).dtype, self.device, tag).result()
            out, _ = self.stage(x, ids, state=states[0] if B == 1 else states)
            logits = None
            if not mesh.last:
                self.runner.links.send_act(out, tag).result()
            elif mesh.ep_rank == 0:
                logits = self.stage.logits(out[:, -1:])[:, -1].float().cpu()
        return {"logits": logits, **self.infer_stats()}

    def infer_free(self, seq_ids: list[int]) -> dict:
        """Drop the decode states of ``seq_ids`` (unknown ids are ignored: freeing is idempotent)."""
        for s in seq_ids:
            getattr(self, "seqs", {}).pop(s, None)
        return self.infer_stats()

    def infer_stats(self) -> dict:
        """``{"state_bytes": decode-state bytes held here, "live": open sequences}``."""
        seqs = getattr(self, "seqs", {})
        return {"state_bytes": sum(st.nbytes() for st in seqs.values()), "live": len(seqs)}

    # ----------------------------------------------------------- inspection
    def grads(self) -> dict[str, torch.Tensor]:
        """Current gradients by parameter name (tests compare them with the single-process model)."""
        return {n: p.grad.detach().cpu().clone() for n, p in self.stage.named_parameters() if p.grad is not None}

    def shard_info(self) -> dict:
        return {"stage": self.spec.stage, "ep_rank": self.spec.ep_rank, "dp_rank": self.spec.dp_rank,
                "expert_lo": self.stage.expert_lo, "expert_hi": self.stage.expert_hi,
                "layers": list(self.graph.layer_slices[self.spec.stage])}

    def memory(self) -> dict:
        """What this actor holds, in bytes: ``params`` (parameters), ``buffers``, ``grads`` (the
        gradients held now), ``optimizer`` (optimizer state), and ``peak_rss`` (the process's
        high-water resident set, ``VmHWM``; CUDA: the device's peak allocated) -- for the memory plan."""
        st = self.stage
        nb = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
        opt = sum(v.numel() * v.element_size() for o in self.optimizer.optimizers for s in o.state.values()
                  for v in s.values() if isinstance(v, torch.Tensor))
        peak = None
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            with contextlib.suppress(OSError):
                for line in open("/proc/self/status"):
                    if line.startswith("VmHWM:"):
                        peak = int(line.split()[1]) * 1024
        return {"rank": self.rank, "params": nb(st.parameters()), "buffers": nb(st.buffers()),
                "grads": nb(p.grad for p in st.parameters() if p.grad is not None), "optimizer": opt,
                "peak_rss": peak}

    # ----------------------------------------------------------- checkpoint
    def state(self) -> dict[str, torch.Tensor]:
        """Model tensors by name plus optimizer state under ``optim/<param>::<key>`` (with D > 1
        replicas, the state of the parameters this replica owns)."""
        out = {n: t.detach().cpu().clone() for n, t in self.stage.state_dict().items()}
        out.update({OPTIM_PREFIX + k: v.cpu() for k, v in optim_lib.optimizer_state_by_name(self.optimizer).items()})
        return out

    def write_shard(self, directory: str, group_format: str, crash_rank: int | None = None,
                    replica_format: str | None = None) -> dict:
        """Write this actor's shard (model tensors + optimizer state, as :meth:`state`) straight into
        the uncommitted checkpoint ``directory`` as ``<group>.safetensors``, fsynced.

        ``group_format``: the group name, formatted with ``stage`` and ``ep_rank``
        (``cluster.checkpoint.sharded.SHARD_GROUP_FORMAT``). Replica 0 writes the model tensors and
        the optimizer state it owns there; replica d > 0 only the optimizer state it owns (ZeRO-1),
        under ``replica_format`` (formatted with ``stage``, ``ep_rank``, ``dp_rank``:
        ``cluster.checkpoint.sharded.REPLICA_GROUP_FORMAT``). ``crash_rank``: testing hook -- the
        actor of that rank dies halfway through writing its file.
        Returns ``{"group", "file", "size", "sha256"}`` plus :meth:`shard_info` for the manifest.

        Raises:
            OSError: the write failed (the partial file is removed); FileExistsError: written already.
        """
        from pathlib import Path

        from model.safe_io import write_safetensors

        d = self.spec.dp_rank
        if d and replica_format is None:
            raise ValueError("write_shard: a data-parallel replica > 0 needs replica_format")
        fmt = replica_format if d else group_format
        group = fmt.format(stage=self.spec.stage, ep_rank=self.spec.ep_rank, dp_rank=d)
        path = Path(directory) / f"{group}{SHARD_FILE_SUFFIX}"
        tensors = {} if d else dict(self.stage.state_dict())  # the replicas' model tensors are identical
        tensors.update({OPTIM_PREFIX + k: v for k, v in optim_lib.optimizer_state_by_name(self.optimizer).items()})
        if crash_rank == self.rank:
            with open(path, "wb") as f:  # a torn write: the first bytes of a safetensors header
                f.write(b"\x00" * 4096)
            self.crash()
        size, digest = write_safetensors(path, tensors)
        return {"group": group, "file": path.name, "size": size, "sha256": digest, **self.shard_info()}

    def load_shards(self, sources: list[tuple[str, int, int]], optimizer: bool = True) -> dict:
        """Load this actor's tensors and optimizer state straight from a sharded checkpoint of any
        layout (``model.shard_io.read_stage_tensors``: only the tensors, and expert rows, it owns).

        ``sources``: ``(file, expert_lo, expert_hi)`` of every shard file of the checkpoint (on
        storage this actor sees). ``optimizer`` False: the model tensors only (serving).
        Returns ``{"rank", "bytes": bytes read into this actor}``.

        Raises:
            ValueError: a tensor of this stage missing from the checkpoint, or of another shape.
        """
        from model.shard_io import read_stage_tensors

        shapes = {n: tuple(t.shape) for n, t in self.stage.state_dict().items()}
        model_t, optim_t = read_stage_tensors(sources, shapes, self.owned if optimizer else set(),
                                              self.stage.expert_lo, self.stage.expert_hi,
                                              is_expert=is_expert_param, optim_prefix=OPTIM_PREFIX)
        self.stage.load_state_dict(model_t)
        if optimizer:
            optim_lib.load_optimizer_state_by_name(self.optimizer, optim_t)
        n = sum(t.numel() * t.element_size() for t in (*model_t.values(), *optim_t.values()))
        return {"rank": self.rank, "bytes": n}

    def load_hf(self, path: str) -> dict:
        """Load this actor's tensors straight from an HF-format directory (``tide export`` output,
        ``save_pretrained``, DeepSeek's released layout), reading only its layers and expert rows
        (``model.hf_io.read_hf_stage_tensors``); MTP tensors the directory lacks keep their
        initialisation. ``path`` must be on storage this actor sees. Returns ``{"rank", "bytes"}``.

        Raises:
            ValueError: a tensor of this stage missing or of another shape (named), pickled weights.
        """
        from model.hf_io import read_hf_stage_tensors

        sd = self.stage.state_dict()
        got = read_hf_stage_tensors(path, {n: tuple(t.shape) for n, t in sd.items()}, self.stage.expert_lo,
                                    self.stage.expert_hi, is_expert=is_expert_param,
                                    dtype=next(self.stage.parameters()).dtype)
        self.stage.load_state_dict({**sd, **got})
        return {"rank": self.rank, "bytes": sum(t.numel() * t.element_size() for t in got.values())}

    def sees(self, path: str) -> bool:
        """Whether ``path`` exists where this actor runs (the driver's shared-storage probe)."""
        return os.path.exists(path)

    def load_state(self, full_model: dict[str, torch.Tensor], full_optim: dict[str, torch.Tensor]) -> None:
        """Load this shard's part of full-model tensors and optimizer state (any source layout)."""
        self.stage.load_state_dict(self.stage.shard_state_dict(full_model))
        names = self.owned
        mine = {}
        for key, t in full_optim.items():
            name = key.split("::", 1)[0]
            if name in names:
                mine[key] = t[self.stage.expert_lo:self.stage.expert_hi] if is_expert_param(name) and t.dim() else t
        optim_lib.load_optimizer_state_by_name(self.optimizer, mine)

    # ---------------------------------------------------------------- trace
    def trace_events(self, clear: bool = True) -> list[dict]:
        ev = self.tracer.events()
        if clear:
            self.tracer.clear()
        return ev

    def set_trace(self, enabled: bool) -> None:
        self.tracer.enabled = enabled

    def crash(self) -> None:
        """Kill this actor's process (tests of the restart path: ``fail_at_step``); in process
        (``LocalGroup``), raise :class:`ActorDied` instead."""
        if self.in_process:
            raise ActorDied("the in-process stage worker failed (injected)")
        os._exit(1)

    def shutdown(self) -> None:
        if self.stage is not None:
            self.runner.close()
        if dist.is_initialized():
            dist.destroy_process_group()

