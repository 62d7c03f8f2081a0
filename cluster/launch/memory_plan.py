"""Per-actor memory plan of a training run: what every stage actor of an ``ActorGraph`` holds at the
peak of a training step, in bytes, without building the model (``tide plan CONFIG``; ``docs/memory.md``).

For every actor (rank, replica ``dp_rank``, ``stage``, expert shard ``ep_rank``):

- **params** (+ **buffers**): exact. The full model is built on the ``meta`` device (no memory;
  ``model.transformer.meta_device``) and sliced with ``PipelineStage.from_model``, the constructor
  every ``StageWorker`` goes through (``PipelineStage.build`` = this meta build + ``materialize``);
  the sum of ``numel x element_size`` of the stage's parameters and buffers.
- **grads**: exact. The parameters that get a gradient, in the curriculum stage where those weigh
  most: every trainable one that runs (``dense`` stages do not run the Lightning Indexer,
  ``indexer_warmup`` trains only the indexers, a stage with ``mtp_weight: 0`` skips MTP).
- **optimizer**: exact. ``model.optim.state_bytes`` of every parameter this actor's replica owns
  under ZeRO-1 (``comm.data_parallel.assign_owners`` over the D replicas, as
  ``StageWorker.setup`` assigns them).
- **activations**: analytic. The bytes autograd keeps for backward per microbatch
  (:func:`saved_bytes`, a per-layer model of what every op of this code saves: sliding-window,
  CSA with the Lightning Indexer and its top-k gather, HCA, mHC, MoE, MTP, the LM head's
  float32 log-probabilities), times the microbatches the schedule keeps in flight on the stage
  (``comm.schedule.simulate``'s ``peak_live``: 1F1B at most P - stage, GPipe all M), plus the
  pipeline's receive buffers, the stage output held for backward and the step's batch; with
  activation checkpointing a block keeps only its input ``[b, S, hc_mult, hidden]`` and one
  block's full set exists at a time, during its recompute. The maximum over the curriculum.
  Validated against ``torch.autograd.graph.saved_tensors_hooks`` on real forwards of the
  ``debug`` and ``small`` flavors (``bench/bench_memory_plan.py``).
- **transient**: analytic. The largest temporaries beyond the activations at the step's worst
  moment: backward's working set (the loss's ``[b, S, vocab]`` gradients, an MoE layer's
  expert-weight gradient accumulation, an attention chunk's score gradients), or, after backward,
  the gradient all-reduce buckets, the gradient-norm temporaries, the optimizer step (a batch of
  Muon's Newton-Schulz, AdamW's temporaries) and ZeRO-1's parameter broadcast.
- **overhead**: a per-process constant (:data:`CPU_ACTOR_OVERHEAD`, :data:`CPU_PROCESS_OVERHEAD`,
  :data:`CUDA_ACTOR_OVERHEAD`; how each was obtained is documented on the constant).

``total`` is their sum: the peak one actor needs. Everything is float32: ``ModelArgs`` has no
dtype field and ``StageWorker`` keeps the parameters in the dtype they are built in.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import torch

from model.attention import QUERY_CHUNK  # the attention core's query rows per chunk
from model.config import CSA, HCA, SWA, ModelArgs

F32, I64, BOOL = 4, 8, 1  # bytes per element: float32 (the only parameter dtype), int64, bool
MiB, GiB = 1 << 20, 1 << 30

# Per-process runtime overhead: the resident memory a stage actor holds besides its tensors -- the
# Python interpreter, torch and tide imported, the gloo group, the code pages of every kernel a
# training step runs, the meta-build machinery (torch's meta registrations), autograd's and the
# allocator's own state. Measured with `bench/bench_memory_plan.py --overhead` on the 2-core CPU
# machine this project is developed on (torch 2.13.0+cpu, Python 3.11, one intra-op thread): a
# process that imported a stage actor's modules and joined gloo holds 225 MiB (VmRSS); after it set
# up a 1 x 1 `debug`-flavor StageWorker and trained one step of 64 tokens it holds 416-426 MiB
# (three runs) besides that worker's tensors. CPU_PROCESS_OVERHEAD is that working figure (a
# spawn_local process, what the benchmark runs).
CPU_PROCESS_OVERHEAD = 425 * MiB
# CPU_ACTOR_OVERHEAD: the same inside a Ray actor (the Ray core worker, its threads and the ray
# package on top): 276 MiB idle, 467-476 MiB working (three runs), rounded up. `tide plan`'s default
# for CPU actors.
CPU_ACTOR_OVERHEAD = 480 * MiB
CUDA_ACTOR_OVERHEAD = 2 * GiB

_UNITS = {"mb": 10**6, "gb": 10**9, "mib": MiB, "gib": GiB}


# ----------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class ActorMemory:
    """The planned peak memory of one stage actor, bytes.

    ``curriculum_stage``: the curriculum stage whose step sets the peak (the name);
    ``peak_phase``: where in that step it falls: ``"backward"`` (activations + backward's
    working set), ``"grad reduce"`` (the all-reduce buckets or the gradient-norm temporaries),
    ``"optimizer step"`` or ``"param broadcast"`` (ZeRO-1); ``parts``: the activations and
    transient broken down; ``phases``: each phase's peak above the persistent state (params,
    buffers, grads, optimizer, overhead) in that curriculum stage.
    """

    rank: int
    dp_rank: int
    stage: int
    ep_rank: int
    params: int
    buffers: int
    grads: int
    optimizer: int
    activations: int
    transient: int
    overhead: int
    curriculum_stage: str = ""
    peak_phase: str = "backward"
    parts: dict[str, int] = field(default_factory=dict)
    phases: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """Bytes this actor needs at its peak: every column summed."""
        return (self.params + self.buffers + self.grads + self.optimizer + self.activations + self.transient
                + self.overhead)

    def fits(self, device_bytes: int) -> bool:
        """Whether :attr:`total` fits in ``device_bytes``."""
        return self.total <= device_bytes


@dataclass(frozen=True)
class StepMemory:
    """What one curriculum stage's step needs on one stage actor beyond its persistent state (bytes).

    ``activations``: peak saved-for-backward bytes in flight (with the receive buffers, the held
    output and the batch); ``backward``: backward's largest working set on top of them;
    ``reduce`` / ``step`` / ``broadcast``: the phase peaks after backward (buckets and the
    gradient-norm temporaries, the optimizer step, ZeRO-1's broadcast), which do not coexist with
    the activations; all above the persistent state, gradients included.
    """

    activations: int
    backward: int
    reduce: int
    step: int
    broadcast: int
    parts: dict[str, int]

    def phases(self) -> dict[str, int]:
        """Each phase's peak above the persistent state (bytes)."""
        return {"backward": self.activations + self.backward, "grad reduce": self.reduce,
                "optimizer step": self.step, "param broadcast": self.broadcast}

    def peak(self) -> tuple[int, int, str]:
        """``(activations, transient, phase)``: activations + transient = this step's peak above the
        persistent state, at ``phase``."""
        phases = self.phases()
        phase = max(phases, key=lambda k: phases[k])
        return self.activations, phases[phase] - self.activations, phase


# ------------------------------------------------------------------------------ units, defaults
def parse_bytes(text: str, what: str = "size") -> int:
    """``"141GB"`` / ``"141 GB"`` / ``"80GiB"`` / ``"512MiB"`` / ``"1.5 GB"`` -> bytes.

    Units (case-insensitive): ``MB``, ``GB`` (powers of 10), ``MiB``, ``GiB`` (powers of 2).
    ``what`` names the value in error messages (e.g. ``"--device-memory"``).

    Raises:
        ValueError: no number, no unit, an unknown unit, or a size below one byte.
    """
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m:
        raise ValueError(f"{what} {text!r}: expected a number and a unit, e.g. 141GB, 80GiB or 512MiB")
    number, unit = m.groups()
    if not unit:
        raise ValueError(f"{what} {text!r} has no unit: write e.g. {number}GB or {number}GiB")
    if unit.lower() not in _UNITS:
        raise ValueError(f"{what} {text!r}: unknown unit {unit!r}; use MB, GB (10^6, 10^9 bytes), "
                         f"MiB or GiB (2^20, 2^30 bytes)")
    value = float(number) * _UNITS[unit.lower()]
    if value < 1:
        raise ValueError(f"{what} {text!r} must be > 0")
    return int(value)


def human(n: int) -> str:
    """Bytes in GiB (>= 1 GiB) or MiB, one decimal: ``"12.3 GiB"``, ``"456.0 MiB"``."""
    return f"{n / GiB:.1f} GiB" if abs(n) >= GiB else f"{n / MiB:.1f} MiB"


def host_memory_bytes() -> int:
    """This machine's physical memory (``sysconf`` pages x page size)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_device_memory(graph) -> tuple[int | None, str]:
    """The memory an actor of ``graph`` gets when ``--device-memory`` is not given, and where that
    figure comes from: ``(bytes or None, explanation)``.

    GPU actors: the memory of this machine's CUDA device 0, or None (unknown) without one.
    CPU actors: a topology names no memory resource, so this machine's RAM divided by the actors
    (all of them on this machine, as a local run places them).
    """
    if graph.gpus_per_actor:
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return props.total_memory, f"this machine's GPU ({props.name}: {human(props.total_memory)})"
        return None, ("the topology gives each actor a GPU but names no GPU model and this machine has none: "
                      "pass --device-memory (e.g. 141GB for an H200) for a verdict")
    ram = host_memory_bytes()
    n = len(graph.actors)
    return ram // n, (f"the topology names no memory resource: this machine's RAM ({human(ram)}) divided by its "
                      f"{n} CPU actor(s) = {human(ram // n)} each; on a cluster pass --device-memory")


def default_overhead(graph) -> int:
    """The per-process overhead of an actor of ``graph`` (Ray actors): :data:`CUDA_ACTOR_OVERHEAD`
    when the graph gives actors a GPU, else :data:`CPU_ACTOR_OVERHEAD`."""
    return CUDA_ACTOR_OVERHEAD if graph.gpus_per_actor else CPU_ACTOR_OVERHEAD


# ---------------------------------------------------------------------- exact parts: meta build
def meta_stages(args: ModelArgs, graph) -> dict[int, torch.nn.Module]:
    """Every pipeline stage of ``graph`` as a ``model.stage.PipelineStage`` on the ``meta`` device
    (expert shard 0; the shards of a stage have identical shapes), ``stage -> module``.

    One meta ``Transformer`` is built (no memory is allocated: every tensor is ``meta``) and sliced
    stage by stage with ``PipelineStage.from_model``; the slices are disjoint, so each stage takes
    over layers no other stage touched.

    Raises:
        ValueError: as ``PipelineStage.from_model`` (indivisible experts, a bad slice).
        RuntimeError: a tensor that is not on ``meta`` (the build would have allocated memory).
    """
    from model import Transformer
    from model.stage import PipelineStage
    from model.transformer import meta_device

    with meta_device():
        full = Transformer(args)
    E, L = graph.expert_parallel, args.num_hidden_layers
    out = {}
    for s, (lo, hi) in enumerate(graph.layer_slices):
        st = PipelineStage.from_model(full, lo, hi, lo == 0, hi == L, 0, E)
        real = [n for n, t in [*st.named_parameters(), *st.named_buffers()] if not t.is_meta]
        if real:
            raise RuntimeError(f"stage {s}: tensors not on the meta device: {real[:3]}")
        out[s] = st
    return out


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _grad_names(stage, mode: str, mtp_runs: bool, tied_copy: bool) -> set[str]:
    """Names of ``stage``'s parameters that hold a gradient after a step in attention ``mode``.

    Mirrors ``model.training.set_attention_mode`` (``indexer_warmup`` trains the indexers only)
    and what runs: ``dense`` does not run the indexers; without ``mtp_runs`` the MTP block is
    skipped and the last stage's embedding copy gets a gradient only through the tied-embedding
    reduction (``tied_copy``: the first and last stages differ), which writes zeros into it.
    """
    indexer = {n for n, _ in stage.named_parameters() if ".compressor.indexer." in n}
    names = set()
    for n, _ in stage.named_parameters():
        if mode == "indexer_warmup":
            if n in indexer:
                names.add(n)
            continue
        if mode == "dense" and n in indexer:
            continue
        if n.startswith("mtp.") and not mtp_runs:
            continue
        if n.startswith("embed_tokens.") and not stage.first and not mtp_runs and not tied_copy:
            continue
        names.add(n)
    return names


# ------------------------------------------------------------------------- activation model
@dataclass(frozen=True)
class _Dims:
    """The shapes the activation model needs, from ``ModelArgs`` (HF field names)."""

    E: int  # hidden_size
    N: int  # hc_mult
    iters: int  # hc_sinkhorn_iters
    L: int  # q_lora_rank
    H: int  # num_attention_heads
    D: int  # head_dim
    R: int  # qk_rope_head_dim
    G: int  # o_groups
    Ro: int  # o_lora_rank
    W: int  # sliding_window
    I: int  # noqa: E741  moe_intermediate_size
    Is: int  # moe_intermediate_size * n_shared_experts
    K: int  # num_experts_per_tok
    X: int  # n_routed_experts
    V: int  # vocab_size
    Ix: int  # index_n_heads
    Dx: int  # index_head_dim
    topk: int  # index_topk

    @classmethod
    def of(cls, a: ModelArgs) -> _Dims:
        return cls(a.hidden_size, a.hc_mult, a.hc_sinkhorn_iters, a.q_lora_rank, a.num_attention_heads, a.head_dim,
                   a.qk_rope_head_dim, a.o_groups, a.o_lora_rank, a.sliding_window, a.moe_intermediate_size,
                   a.moe_intermediate_size * a.n_shared_experts, a.num_experts_per_tok, a.n_routed_experts,
                   a.vocab_size, a.index_n_heads, a.index_head_dim, a.index_topk)


def _chunks(S: int, W: int) -> list[tuple[int, int, int]]:
    """``(queries, window keys, chunk end)`` of every query chunk of ``model.attention.Attention._core``
    (stateless): keys ``[max(0, c0 - W + 1), c1)``."""
    return [(min(S, c0 + QUERY_CHUNK) - c0, min(S, c0 + QUERY_CHUNK) - max(0, c0 - W + 1), min(S, c0 + QUERY_CHUNK))
            for c0 in range(0, S, QUERY_CHUNK)]


def _rms(rows: int, d: int, input_counted: bool = False) -> int:
    """``model.layers.RMSNorm`` over ``rows`` rows of ``d``: its input (unless already counted), the
    reciprocal RMS and the normalised rows (float32)."""
    return F32 * rows * ((0 if input_counted else d) + 1 + d)


def _hc(d: _Dims, T: int, kernels: bool) -> int:
    """One mHC mapping (``HyperConnection.forward``, arXiv 2512.24880) on ``T`` tokens, without its
    input streams (counted as the block's input). Reference: the RMS-normed flattened streams
    ``[T, N*E]``, the mixes ``[T, (2+N)N]``, the three gates and, per Sinkhorn-Knopp normalisation,
    its numerator ``[N, N]`` and denominator ``[N]`` (2 * iters - 1 of them, plus the softmax);
    the fused kernel keeps only the mixes and the reciprocal RMS."""
    N = d.N
    if kernels:
        return F32 * T * ((2 + N) * N + 1)
    return F32 * T * (1 + N * d.E + (2 + N) * N + 3 * N + N * N + (2 * d.iters - 1) * (N * N + N))


def _merge(d: _Dims, T: int) -> int:
    """``HyperConnection.merge``: the sub-layer output ``[T, E]``, ``post`` and the final ``comb``."""
    return F32 * T * (d.E + d.N + d.N * d.N)


def _rope_tables(S: int, d: _Dims, calls: int) -> int:
    """cos/sin tables ``[S, R/2]`` float32 of ``calls`` rotary calls (kept by the rotations' products)."""
    return F32 * calls * S * d.R


def _compressor(d: _Dims, b: int, S: int, dim: int, rate: int, overlap: bool, kernels: bool) -> int:
    """``Compressor.pool`` + ``_finish`` (DeepSeek-V4 report eqs. 9-12 / 20-23) on ``b`` sequences of
    ``S``: the reference keeps the (overlap: concatenated two-series) kv slots and their gate
    softmax; the fused kernel the kv / gate projections; both then the entries' RMSNorm."""
    n = S // rate
    if n == 0:
        return 0
    if kernels:
        pooled = F32 * b * S * 2 * (2 * dim if overlap else dim)
    elif overlap:
        pooled = F32 * b * n * rate * 2 * dim * 2 + BOOL * b * n  # [b,n,2m,dim] slots + softmax, doc mask
    else:
        pooled = F32 * b * (S * dim + n * rate * dim)  # the kv projection (viewed) + softmax
    return pooled + _rms(b * n, dim) + _rope_tables(n, d, 1)


def _indexer(d: _Dims, b: int, S: int, rate: int, mode: str, kernels: bool) -> int:
    """Saved bytes of the Lightning Indexer of one CSA layer (DeepSeek-V3.2 section 2.1; report eqs.
    13-17) in ``indexer_warmup`` / ``sparse`` mode, without the layer input and ``cq`` it reads:
    its own overlapping compressor, its queries and head weights, the scores (``Indexer.scores``:
    the keys broadcast to every query row ``[b*Q, Dx, n]`` -- a plain matrix product, keys kept
    once, when ``b == 1`` -- and ``ReLU(q.K)`` ``[b, Q, Ix, n]``), the top-k selection (sparse) and
    the KL towards the main attention (over every visible entry in the warm-up, the top-k in sparse
    training)."""
    T, n = b * S, S // rate
    if n == 0:
        return 0
    k = min(d.topk, n)
    out = _compressor(d, b, S, d.Dx, rate, True, kernels) + _rope_tables(S, d, 2)
    out += F32 * T * (d.Ix * d.Dx + d.Ix)  # queries, head weights
    out += F32 * (T * n * d.Dx if b > 1 else b * n * d.Dx) + F32 * T * n * d.Ix  # keys (broadcast), ReLU scores
    for Q, _, c1 in _chunks(S, d.W):
        rows = b * Q
        if mode == "indexer_warmup":
            out += rows * min(n, c1 // rate) * (2 * BOOL + 2 * F32)
        else:  # eligibility mask, top-k and final indices, the scores kept by the KL's gather, KL over the top-k
            out += BOOL * rows * n + 2 * I64 * rows * k + F32 * rows * n + rows * k * (2 * BOOL + 2 * F32)
    return out


def _attention(d: _Dims, lt: str, rate: int, b: int, S: int, mode: str, kernels: bool) -> int:
    """Saved bytes of one ``model.attention.Attention`` forward (training, doc_ids given) on ``b``
    sequences of ``S`` tokens, its normed input included (see ``saved_bytes``). In
    ``indexer_warmup`` the main model is frozen: only a CSA layer's indexer (and the input and
    ``cq`` it reads) keep anything."""
    T = b * S
    E, H, D, L = d.E, d.H, d.D, d.L
    n = S // rate if rate else 0
    csa, hca = lt == CSA, lt == HCA
    if mode == "indexer_warmup":
        return F32 * T * (E + L) + _indexer(d, b, S, rate, mode, kernels) if csa else 0
    dense = mode == "dense"
    k = min(d.topk, n)
    out = F32 * T * E  # the normed input (q_a_proj, kv_proj, compressor and indexer projections)
    out += _rms(T, L) + F32 * T * L  # q_a_norm; cq (q_b_proj's input)
    out += F32 * T * (2 * H * D + H)  # q (rms_norm_noweight's input), its rsqrt, q after RoPE
    out += _rms(T, D) + F32 * T * D  # kv_norm; kv after RoPE (the window keys)
    out += _rope_tables(S, d, 3)  # q/kv, and the inverse rotation of the output
    out += F32 * T * (H * D + d.G * d.Ro)  # grouped output projection: permuted copy, o_b_proj input
    if csa or hca:
        out += _compressor(d, b, S, D, rate, csa, kernels)
        if dense or hca or kernels:
            out += F32 * b * n * D  # the compressed entries (dense bmm / fused kernel)
        if kernels and n:
            out += I64 * b * n  # entry documents
    if csa and not dense:
        out += _indexer(d, b, S, rate, mode, kernels)
    for Q, Kw, c1 in _chunks(S, d.W):
        rows = b * Q
        vis = min(n, c1 // rate) if rate else 0
        sparse = csa and not dense and n > 0
        if kernels:
            out += F32 * rows * H * (D + 1)  # the fused kernel's output and log-sum-exp per chunk
        else:
            cols = k if sparse else vis
            out += F32 * rows * H * (Kw + cols + 1) + BOOL * rows * Kw  # joint softmax; window mask
            if (csa or hca) and not sparse:
                out += BOOL * rows * vis  # visible-entry mask
        if sparse:  # top-k gather of the picked entries
            out += BOOL * rows * k + I64 * rows * k  # valid mask, indices (+ row offsets)
            if not kernels:
                out += F32 * rows * k * D + (F32 * rows * H * D if b > 1 else 0)  # gathered values, q copy
    return out


def _moe(d: _Dims, T: int, ep: bool) -> int:
    """Saved bytes of one ``model.moe.MoE`` on ``T`` tokens: the router (input, scores, selection,
    weights), the sort-by-expert dispatch (``T*K`` rows: gathered inputs, SwiGLU intermediates,
    outputs, weighted outputs, index vectors) and the shared expert. Expert parallel
    (``comm.expert_parallel``): the received rows and the wave outputs instead of the local gather,
    assuming balanced routing (each shard computes about ``T*K`` rows)."""
    E, K = d.E, d.K
    out = F32 * T * (E + 2 * d.X + K + 1) + I64 * T * K  # router
    rows = T * K
    out += rows * (2 * I64 + F32)  # sort order, token index, sorted weights
    out += F32 * rows * (3 * E + 6 * d.I)  # (received) inputs, gate_up out + clamps + SiLU + product, out, weighted
    if ep:
        out += F32 * rows * E + 2 * I64 * rows  # the wave outputs held for backward, per-wave permutations
    if d.Is:
        out += F32 * T * 6 * d.Is
    return out


def block_saved(args: ModelArgs, layer: int | str, b: int, S: int, mode: str, *, kernels: bool = False,
                ep: bool = False) -> int:
    """Bytes one decoder block keeps for backward (``model.transformer.Block``) on ``b`` sequences of
    ``S`` tokens, its input streams ``[b, S, hc_mult, hidden]`` included.

    ``layer``: a layer index, or ``"mtp"`` (the MTP block: sliding window + learned MoE);
    ``mode``: ``dense`` / ``indexer_warmup`` / ``sparse``; ``kernels``: the fused Triton kernels'
    path (CUDA); ``ep``: expert parallel (more than one expert shard).
    """
    d = _Dims.of(args)
    lt = SWA if layer == "mtp" else args.layer_types[layer]
    T = b * S
    if mode == "indexer_warmup":  # the main model is frozen: only a CSA layer's indexer saves anything
        return _attention(d, lt, args.compress_rate(lt), b, S, mode, kernels)
    out = F32 * T * d.N * d.E * 2  # the block's input streams and the streams after attention
    out += 2 * _hc(d, T, kernels) + 2 * _merge(d, T) + 2 * _rms(T, d.E)
    out += _attention(d, lt, args.compress_rate(lt), b, S, mode, kernels)
    out += _moe(d, T, ep)
    return out


def _head(d: _Dims, T: int) -> int:
    """``HyperHead`` (its input streams included) + the final RMSNorm."""
    return F32 * T * (2 * d.N * d.E + 1 + 3 * d.N) + _rms(T, d.E)


def _ce(d: _Dims, T: int) -> int:
    """LM head input ``[T, E]`` and the cross-entropy's float32 log-probabilities ``[T, vocab]``
    (``model.losses.token_ce_sum``) plus its targets."""
    return F32 * T * (d.E + d.V) + I64 * T


def saved_bytes(args: ModelArgs, layers: range | list[int], *, first: bool, last: bool, b: int, S: int,
                mode: str, mtp: bool, remat: bool = False, kernels: bool = False, ep: bool = False,
                balance: bool = True, mtp_balance: bool = True) -> dict[str, int]:
    """What one (micro)batch of ``b`` sequences of ``S`` tokens keeps for backward on one pipeline
    stage holding decoder ``layers`` (bytes, float32), by part.

    A per-layer model of the tensors autograd saves in this code (the reference torch ops on the CPU;
    ``kernels``: the fused Triton kernels CUDA runs for mHC, the compressors and sparse attention).
    Not counted: parameters, buffers and the batch's own tensors (``input_ids``, ``labels``,
    ``doc_ids``: see :func:`batch_bytes`; the first stage's embedding keeps nothing else, so ``first``
    changes nothing here). Assumes packed documents (``doc_ids``) and balanced expert loads. Keys:

    - ``"layers.<i>"``: block i (:func:`block_saved`); with ``remat`` only its input streams
      ``[b, S, hc_mult, hidden]`` (``torch.utils.checkpoint`` keeps a block's inputs) plus the
      router scores the balance loss keeps;
    - ``"head"``: the hyper-head and final norm (last stage);
    - ``"loss"``: LM-head inputs, log-probabilities and targets of the next-token and MTP losses,
      the balance loss's normalisers (last stage);
    - ``"mtp"``: the MTP module (embedding norm, projection, its block -- only the input with
      ``remat`` -- hyper-head and norm);
    - ``"recompute"`` (``remat``): the largest block's full set, which exists during its recompute
      in backward (one block at a time).

    Raises:
        ValueError: unknown ``mode``, ``b`` or ``S`` < 1.
    """
    if mode not in ("dense", "indexer_warmup", "sparse"):
        raise ValueError(f"mode must be dense, indexer_warmup or sparse, got {mode!r}")
    if b < 1 or S < 1:
        raise ValueError(f"need b >= 1 sequences of S >= 1 tokens, got b={b}, S={S}")
    d = _Dims.of(args)
    T = b * S
    out: dict[str, int] = {}
    stream = F32 * T * d.N * d.E
    learned_moes = 0
    full_max = 0
    if mode == "indexer_warmup":  # the main model is frozen: the indexers' KL alone trains
        for i in layers:
            full = block_saved(args, i, b, S, mode, kernels=kernels, ep=ep)
            out[f"layers.{i}"] = stream if remat else full
            full_max = max(full_max, full)
        if remat and full_max:
            out["recompute"] = full_max
        return out
    for i in layers:
        full = block_saved(args, i, b, S, mode, kernels=kernels, ep=ep)
        learned = args.mlp_layer_types[i] == "moe"
        learned_moes += learned
        full_max = max(full_max, full)
        out[f"layers.{i}"] = stream + (F32 * T * d.X if learned and balance else 0) if remat else full
    if last:
        out["head"] = _head(d, T)
        loss = _ce(d, T)
        runs_mtp = mtp and S > 2
        if runs_mtp:
            Tm = b * (S - 1)
            mfull = block_saved(args, "mtp", b, S - 1, mode, kernels=kernels, ep=ep)
            mblock = F32 * Tm * d.N * d.E + (F32 * Tm * d.X if mtp_balance and balance else 0) if remat else mfull
            full_max = max(full_max, mfull)
            out["mtp"] = _rms(Tm, d.E) + _rms(Tm, d.E, input_counted=True) + F32 * Tm * 2 * d.E + mblock + _head(d, Tm)
            loss += _ce(d, Tm)
            learned_moes += bool(mtp_balance)
        out["loss"] = loss + (F32 * T * 2 * learned_moes if balance else 0)
    elif learned_moes and balance:
        out["loss"] = F32 * T * 2 * learned_moes  # the balance loss's normalisers
    if remat and full_max:
        out["recompute"] = full_max
    return out


def batch_bytes(B: int, S: int) -> int:
    """The step's global batch every actor holds: ``input_ids``, ``labels``, ``doc_ids`` ``[B, S]`` int64."""
    return 3 * I64 * B * S


def backward_working_set(args: ModelArgs, layers, *, last: bool, b: int, S: int, mode: str, mtp: bool,
                         expert_bytes: int, ep: bool, accumulating: bool, kernels: bool = False,
                         expert_waves: int = 1) -> dict[str, int]:
    """The largest temporaries backward allocates on top of the saved activations, per candidate
    (bytes; the working set is their maximum):

    - ``"loss"`` (last stage): the cross-entropy's gradient w.r.t. the log-probabilities and the
      logits, ``2 x [b, S, vocab]`` float32;
    - ``"experts"``: an MoE layer's expert-weight gradient (``expert_bytes``: its largest expert
      tensor, ``gate_up_proj``). ``gate_up[e]`` of each expert's GEMM is a selection whose backward
      is a zero tensor of the whole ``gate_up_proj``, summed in autograd's input buffer: buffer + the
      next one (the buffer becomes ``.grad`` in a step's first backward, ``accumulating`` afterwards).
      Expert parallel (``ep``, ``comm.expert_parallel``): the backward's own ``g_gu`` / ``g_dn``
      accumulators (1.5x), ``autograd.grad``'s full-size results for both tensors (1.5x) and, with one
      expert wave, the input buffers of the whole shard (1x more);
    - ``"block"``: a block's activation gradients: the streams' gradient and its two partial sums
      ``3 x [b, S, hc_mult, hidden]``, plus the largest of the MoE's row gradients and an attention
      chunk's (joint-softmax probabilities; the indexer's broadcast keys and ReLU scores) two
      gradient copies.
    """
    d = _Dims.of(args)
    T = b * S
    out = {}
    if mode == "indexer_warmup":  # only the indexers train: their score gradients, chunk by chunk
        ix = 0
        for i in layers:
            n = S // args.csa_rate
            if args.layer_types[i] == CSA and n:
                ix = max(2 * F32 * b * min(S, QUERY_CHUNK) * n * (d.Dx + d.Ix), ix)
        return {"block": ix}
    if last:
        out["loss"] = 2 * F32 * T * d.V
    copies = (3 + (1 if expert_waves <= 1 else 0)) if ep else (2 if accumulating else 1)
    out["experts"] = int(copies * expert_bytes)
    stream = F32 * T * d.N * d.E
    moe = F32 * T * d.K * (2 * d.E + 3 * d.I)
    attn = 0
    for i in layers:
        lt = args.layer_types[i]
        rate = args.compress_rate(lt)
        n = S // rate if rate else 0
        dense = mode in ("dense", "indexer_warmup")
        for Q, Kw, c1 in _chunks(S, d.W):
            cols = (min(d.topk, n) if (lt == CSA and not dense) else min(n, c1 // rate)) if rate else 0
            a = 0 if kernels else 2 * F32 * b * Q * d.H * (Kw + cols + 1)
            if lt == CSA and mode in ("indexer_warmup", "sparse") and n:
                a = max(a, 2 * F32 * b * Q * n * (d.Dx + d.Ix))
            attn = max(attn, a)
    out["block"] = 3 * stream + max(moe, attn)
    return out


# ------------------------------------------------------------------------------- optimizer step
def _muon_step_peak(shapes: dict[tuple[int, int], int]) -> int:
    """``model.optim.Muon.step`` temporaries: the matrices of one shape are orthogonalised in batches
    of at most ``MUON_BATCH_BYTES`` (at least one matrix); a batch ``[k, n, m]`` holds its Nesterov
    updates concatenated, two Newton-Schulz iterates (then the iterate and the scaled result) and
    ``A``, ``B`` ``[k, min(n,m), min(n,m)]``. ``shapes``: ``(n, m) -> matrices of that shape``."""
    from model.optim import MUON_BATCH_BYTES

    worst = 0
    for (n, m), k in shapes.items():
        per = min(k, max(1, MUON_BATCH_BYTES // (n * m * F32)))
        worst = max(worst, F32 * per * (3 * n * m + 2 * min(n, m) ** 2))
    return worst


def _step_peak(params: dict[str, torch.Tensor], ocfg, gpu: bool) -> int:
    """Temporaries of ``CombinedOptimizer.step`` over ``params`` (name -> tensor: what one replica
    steps): Muon's (``_muon_step_peak``), then AdamW's -- on CUDA the foreach implementation
    (``torch.optim.AdamW``'s default there) makes one temporary per parameter at once, on the CPU the
    per-tensor loop one at a time."""
    from model.optim import is_muon_param

    muon = {n: p for n, p in params.items() if ocfg.use_muon and is_muon_param(n, p)}
    shapes: dict[tuple[int, int], int] = {}
    for p in muon.values():
        key = tuple(p.shape[-2:])
        shapes[key] = shapes.get(key, 0) + p.numel() // (p.shape[-2] * p.shape[-1])
    adam = [_nbytes(p) for n, p in params.items() if n not in muon]
    adam_peak = sum(adam) if gpu else max(adam, default=0)
    return max(_muon_step_peak(shapes), adam_peak)


# ------------------------------------------------------------------------------------ the plan
def _microbatch_layout(cfg) -> tuple[int, int, str]:
    par = cfg.parallel
    if par is None:
        return 1, 1, "1f1b"
    return par.microbatches, par.waves, par.schedule


def plan_memory(cfg, graph, args: ModelArgs, *, kernels: bool | None = None, overhead: int | None = None,
                lazy_buffers: bool | None = None) -> list[ActorMemory]:
    """The memory plan of every actor of ``graph`` for training config ``cfg`` (see the module docstring).

    Args:
        cfg: a validated ``cluster.training.config.TrainConfig`` (curriculum, parallel section,
            ``activation_checkpointing``, optimizer, balance).
        graph: its ``cluster.launch.topology.ActorGraph``.
        args: the run's ``ModelArgs`` (``model_args_for``).
        kernels: plan the fused Triton kernels' activations (default: when the graph gives actors a
            GPU, as ``kernels.use_kernels`` decides on CUDA).
        overhead: per-process bytes (default :func:`default_overhead`).
        lazy_buffers: the pipeline's receive buffers (``torch.empty``, posted for every microbatch
            when the step starts) take memory only once data arrives (CPU pages are touched on
            write); default: true on CPU actors. CUDA allocates them at once.

    Returns:
        one :class:`ActorMemory` per actor, in rank order; each part is the maximum over the
        curriculum stages of that stage's step (``curriculum_stage`` names the one that sets the total).

    Raises:
        ValueError: a curriculum stage whose batch does not split into the graph's shards and microbatches.
    """
    from cluster.data import sequences_per_batch
    from cluster.training.trainer import optim_config
    from comm.data_parallel import assign_owners
    from comm.pipeline import SCHEDULES
    from comm.schedule import simulate
    from model.optim import state_bytes
    from model.stage import is_expert_param

    gpu = bool(graph.gpus_per_actor)
    kernels = gpu if kernels is None else kernels
    lazy = (not gpu) if lazy_buffers is None else lazy_buffers
    overhead = default_overhead(graph) if overhead is None else overhead
    P, E, D = graph.num_stages, graph.expert_parallel, graph.data_parallel
    M, W, schedule = _microbatch_layout(cfg)
    xw = min((cfg.parallel.expert_waves or W) if cfg.parallel else 1, args.n_routed_experts // E)
    live = simulate(SCHEDULES[schedule](P, M), f_cost=1.0, b_cost=2.0).peak_live
    ocfg = optim_config(cfg)
    stages = meta_stages(args, graph)
    remat = cfg.activation_checkpointing
    mtp_layers = args.num_nextn_predict_layers > 0
    d = _Dims.of(args)

    per_stage: dict[int, dict] = {}
    for s, st in stages.items():
        named = dict(st.named_parameters())
        sizes = {n: state_bytes(n, p, ocfg) for n, p in named.items()}
        owners = assign_owners(sizes, D)
        expert_bytes = max((_nbytes(p) for n, p in named.items() if is_expert_param(n)), default=0)
        lo, hi = graph.layer_slices[s]
        steps = []
        for st_cfg in cfg.curriculum:
            B = sequences_per_batch(st_cfg.batch_tokens, st_cfg.seq_len)
            if B % (D * E * M):
                raise ValueError(f"curriculum stage {st_cfg.name}: {B} sequences do not split into "
                                 f"{D} x {E} x {M} microbatches")
            b = B // (D * E * M)
            bw = -(-b // W)  # the largest wave
            S, mode = st_cfg.seq_len, st_cfg.attention
            mtp_runs = st.last and mtp_layers and st_cfg.mtp_weight > 0 and mode != "indexer_warmup" and S > 2
            grads = _grad_names(st, mode, mtp_runs, tied_copy=P > 1 and mtp_layers)
            grad_bytes = sum(_nbytes(named[n]) for n in grads)
            wave = saved_bytes(args, range(lo, hi), first=st.first, last=st.last, b=bw, S=S, mode=mode,
                               mtp=mtp_runs, remat=remat, kernels=kernels, ep=E > 1,
                               balance=cfg.balance.sequence_weight > 0, mtp_balance=cfg.balance.mtp)
            recompute = wave.pop("recompute", 0)
            per_mb = W * sum(wave.values())
            stream_mb = F32 * b * S * d.N * d.E
            parts = {"saved per microbatch": per_mb, "microbatches in flight": live[s]}
            act = live[s] * per_mb + recompute
            parts["recompute (one block)"] = recompute
            held = live[s] * stream_mb if not st.last else 0  # the stage output, kept for its backward
            if not st.first:  # receive buffers for every microbatch, posted when the step starts
                recv = (0 if lazy else (M - live[s]) * stream_mb)
                held += recv
            if not st.last:
                held += (1 if lazy else M) * stream_mb
            parts["pipeline buffers"] = held
            parts["batch"] = batch_bytes(B, S)
            act += held + parts["batch"]
            bwd = backward_working_set(args, range(lo, hi), last=st.last, b=bw, S=S, mode=mode, mtp=mtp_runs,
                                       expert_bytes=expert_bytes, ep=E > 1, accumulating=M * W > 1, kernels=kernels,
                                       expert_waves=xw)
            parts.update({f"backward: {k}": v for k, v in bwd.items()})
            # after backward: the all-reduce buckets (replicated tensors over D*E ranks, experts over D)
            # (not the indexers' and the tied embedding's: reduced after backward, in place)
            late = {n for n in grads if ".compressor.indexer." in n}
            late |= {"embed_tokens.weight"} if P > 1 and mtp_layers else set()
            # the gradients move into their buckets (``.grad`` becomes a view of the bucket:
            # comm.data_parallel), so what exists twice is at most the bucket being filled per
            # process group (replicated tensors; experts with E > 1), allocated at its first tensor
            bucketed = sum(_nbytes(named[n]) for n in grads - late
                           if (D > 1 if is_expert_param(n) else D * E > 1))
            cap = (cfg.parallel.bucket_mb if cfg.parallel is not None else 25.0) * 2**20
            bucket = int(min(bucketed, cap * (2 if D > 1 and E > 1 else 1)))
            # the global gradient norm of a distributed step: p.grad.double().pow(2) of each tensor
            clip = 4 * max((_nbytes(named[n]) for n in grads), default=0) if len(graph.actors) > 1 else 0
            # the optimizer step of each replica (the parameters it owns that hold a gradient)
            step = [_step_peak({n: named[n] for n in grads if owners[n] == r}, ocfg, gpu) for r in range(D)]
            # ZeRO-1's broadcast, after the gradients were dropped: replica by replica, its owned tensors
            # flattened (received elsewhere); two such flat copies exist while the next one is made
            by = [sum(_nbytes(named[n]) for n in named if owners[n] == r) for r in range(D)]
            bcast = max(by[r] + by[r + 1] for r in range(D - 1)) if D > 1 else 0
            bcast = max(0, bcast - grad_bytes)
            parts.update({"grad buckets": bucket, "grad-norm temporaries": clip, "param broadcast": bcast})
            steps.append((st_cfg.name, grad_bytes, [
                StepMemory(act, max(bwd.values()), max(bucket, clip), step[r], bcast,
                           {**parts, "optimizer step": step[r]}) for r in range(D)]))
        per_stage[s] = dict(stage=st, named=named, owners=owners, steps=steps, sizes=sizes)

    out = []
    for a in graph.actors:
        info = per_stage[a.stage]
        st, named, owners = info["stage"], info["named"], info["owners"]
        params = sum(_nbytes(p) for p in named.values())
        buffers = sum(_nbytes(t) for t in st.buffers())
        optim = sum(info["sizes"][n] for n in named if owners[n] == a.dp_rank)
        grads = max(g for _, g, _ in info["steps"])
        mine = [(name, by_replica[a.dp_rank]) for name, _, by_replica in info["steps"]]
        best = None
        for name, sm in mine:
            act, trans, phase = sm.peak()
            if best is None or act + trans > best[0]:
                best = (act + trans, name, act, trans, phase, sm)
        _, name, act, trans, phase, sm = best
        out.append(ActorMemory(rank=a.rank, dp_rank=a.dp_rank, stage=a.stage, ep_rank=a.ep_rank, params=params,
                               buffers=buffers, grads=grads, optimizer=optim, activations=act, transient=trans,
                               overhead=overhead, curriculum_stage=name, peak_phase=phase, parts=dict(sm.parts),
                               phases=sm.phases()))
    return out


__all__ = ["ActorMemory", "StepMemory", "CPU_ACTOR_OVERHEAD", "CPU_PROCESS_OVERHEAD", "CUDA_ACTOR_OVERHEAD",
           "parse_bytes", "human", "default_device_memory", "default_overhead", "host_memory_bytes", "meta_stages",
           "block_saved", "saved_bytes", "batch_bytes", "backward_working_set", "plan_memory"]

