"""ModelArgs: the single source of truth for a DeepSeek-V4-style model.

Field names follow ``transformers.DeepseekV4Config`` so that a checkpoint's
``config.json`` maps onto this dataclass one to one (``ModelArgs.from_hf_config``
/ ``ModelArgs.to_hf_config``). YAML is the serialised form: unknown keys and
wrong types are ``ValueError``s naming the key and what is allowed.

Named flavors (``ModelArgs.flavor(name)``):

- ``debug``: 4 layers (one of each attention type), hidden 128; a forward on a
  few hundred tokens takes well under a second on CPU. Used by tests and the
  demo job.
- ``tiny``: 6 layers, hidden 256.
- ``small``: 8 layers, hidden 512, paper-like ratios (window 128, m=4/128,
  top-k 128); the flavor the benchmark runs.
- ``v4-flash`` / ``v4-pro``: the released shapes (docs/model.md §1), for shape and
  memory accounting on the ``meta`` device only.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LAYER_TYPES = (
    "sliding_attention",
    "compressed_sparse_attention",
    "heavily_compressed_attention",
)
MLP_LAYER_TYPES = ("hash_moe", "moe")
SCORING_FUNCS = ("sqrtsoftplus", "sigmoid", "softmax")
CSA = "compressed_sparse_attention"
HCA = "heavily_compressed_attention"
SWA = "sliding_attention"

# HF config keys that carry no model meaning for us (bookkeeping of PreTrainedConfig).
_HF_IGNORED_KEYS = {
    "transformers_version", "architectures", "output_hidden_states", "return_dict", "dtype",
    "torch_dtype", "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id",
    "problem_type", "output_router_logits", "router_aux_loss_coef", "router_jitter_noise",
    "hidden_act", "use_cache", "attention_bias", "mlp_bias", "attention_dropout", "_name_or_path",
    "qk_rope_head_dim", "model_type", "output_attentions", "quantization_config", "auto_map",
    "tokenizer_class", "expert_dtype", "_attn_implementation_autoset", "use_return_dict",
}


def _default_layer_types(n: int) -> list[str]:
    """HF default schedule: two HCA layers, then HCA/CSA interleaved (V4-Pro)."""
    rest = [CSA if i % 2 else HCA for i in range(max(n - 2, 0))]
    return ([HCA] * min(n, 2) + rest)[:n]


def _default_mlp_layer_types(n: int, n_hash: int = 3) -> list[str]:
    return (["hash_moe"] * min(n, n_hash) + ["moe"] * max(0, n - n_hash))[:n]


@dataclass
class ModelArgs:
    """Hyper-parameters of a DeepSeek-V4 model (HF ``DeepseekV4Config`` names).

    Derived quantities are properties (``qk_rope_head_dim``, ``csa_rate``,
    ``hca_rate``). ``layer_types`` / ``mlp_layer_types`` / ``compress_rates`` /
    ``rope_parameters`` default as in HF when left ``None``.

    Raises:
        ValueError: on any inconsistent or out-of-range value (see ``validate``).
    """

    vocab_size: int = 129280
    hidden_size: int = 4096
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 43
    num_attention_heads: int = 64
    num_key_value_heads: int = 1
    head_dim: int = 512
    q_lora_rank: int = 1024
    num_experts_per_tok: int = 6
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    scoring_func: str = "sqrtsoftplus"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.5
    max_position_embeddings: int = 1048576
    rope_theta: float = 10000.0
    layer_types: list[str] | None = None
    compress_rates: dict[str, int] | None = None
    compress_rope_theta: float = 160000.0
    rope_parameters: dict[str, Any] | None = None
    partial_rotary_factor: float = 64 / 512
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1.0e-6
    mlp_layer_types: list[str] | None = None
    swiglu_limit: float = 10.0
    sliding_window: int = 128
    o_groups: int = 8
    o_lora_rank: int = 1024
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    num_nextn_predict_layers: int = 1
    initializer_range: float = 0.02
    rms_norm_eps: float = 1.0e-6
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(ModelArgs)
        for f in dataclasses.fields(self):
            # YAML/JSON write 2 for 2.0; store floats as floats (HF's strict config rejects ints).
            v = getattr(self, f.name)
            if isinstance(v, int) and not isinstance(v, bool) and _matches(v, hints[f.name]) \
                    and float in _flat_args(hints[f.name]) and int not in _flat_args(hints[f.name]):
                setattr(self, f.name, float(v))
        n = self.num_hidden_layers
        if self.layer_types is None and isinstance(n, int):
            self.layer_types = _default_layer_types(n)
        if self.mlp_layer_types is None and isinstance(n, int):
            self.mlp_layer_types = _default_mlp_layer_types(n)
        if self.compress_rates is None:
            self.compress_rates = {CSA: 4, HCA: 128}
        if self.rope_parameters is None:
            self.rope_parameters = {
                "main": {"rope_type": "default", "rope_theta": self.rope_theta,
                         "partial_rotary_factor": self.partial_rotary_factor},
                "compress": {"rope_type": "default", "rope_theta": self.compress_rope_theta,
                             "partial_rotary_factor": self.partial_rotary_factor},
            }
        elif isinstance(self.rope_parameters, dict):
            # Fill keys HF's rotary embedding reads but a hand-written config may omit.
            thetas = {"main": self.rope_theta, "compress": self.compress_rope_theta}
            rp = {}
            for label, sub in self.rope_parameters.items():
                if isinstance(sub, dict) and label in thetas:
                    sub = {"rope_type": "default", "rope_theta": thetas[label],
                           "partial_rotary_factor": self.partial_rotary_factor, **sub}
                rp[label] = sub
            self.rope_parameters = rp
        self.validate()

    # ------------------------------------------------------------------ derived
    @property
    def qk_rope_head_dim(self) -> int:
        """Number of trailing head channels that carry RoPE (64 of 512 in V4)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def csa_rate(self) -> int:
        return int(self.compress_rates[CSA])

    @property
    def hca_rate(self) -> int:
        return int(self.compress_rates[HCA])

    def compress_rate(self, layer_type: str) -> int:
        """Compression ratio m of a layer type (0 for sliding-only layers)."""
        return 0 if layer_type == SWA else int(self.compress_rates[layer_type])

    # --------------------------------------------------------------- validation
    def validate(self) -> None:
        """Check types and invariants; raise ``ValueError`` naming the offending field."""
        hints = typing.get_type_hints(ModelArgs)
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), hints[f.name])
        positive = ["vocab_size", "hidden_size", "moe_intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "head_dim", "q_lora_rank", "num_experts_per_tok",
                    "n_routed_experts", "max_position_embeddings", "hc_mult", "hc_sinkhorn_iters",
                    "sliding_window", "o_groups", "o_lora_rank", "index_n_heads", "index_head_dim"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_shared_experts < 0:
            raise ValueError(f"n_shared_experts must be >= 0, got {self.n_shared_experts}")
        if self.index_topk < 1:
            raise ValueError(f"index_topk must be >= 1 (number of compressed entries each CSA query "
                             f"keeps), got {self.index_topk}")
        if self.num_key_value_heads != 1:
            raise ValueError("num_key_value_heads must be 1: DeepSeek-V4 uses shared-KV multi-query "
                             f"attention (one KV head, K = V), got {self.num_key_value_heads}")
        rd = self.head_dim * self.partial_rotary_factor
        if not (0 < self.partial_rotary_factor <= 1) or rd != int(rd) or int(rd) % 2:
            raise ValueError(f"head_dim * partial_rotary_factor must be a positive even integer "
                             f"(RoPE pairs channels); got head_dim={self.head_dim}, "
                             f"partial_rotary_factor={self.partial_rotary_factor} -> {rd}")
        if self.index_head_dim < self.qk_rope_head_dim:
            raise ValueError(f"index_head_dim ({self.index_head_dim}) must be >= qk_rope_head_dim "
                             f"({self.qk_rope_head_dim}): the indexer applies RoPE to its trailing channels")
        if self.num_attention_heads % self.o_groups:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                             f"o_groups ({self.o_groups}) for the grouped output projection")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ValueError(f"num_experts_per_tok ({self.num_experts_per_tok}) must be <= "
                             f"n_routed_experts ({self.n_routed_experts})")
        if self.scoring_func not in SCORING_FUNCS:
            raise ValueError(f"scoring_func must be one of {SCORING_FUNCS}, got {self.scoring_func!r}")
        for name, types_, allowed in (("layer_types", self.layer_types, LAYER_TYPES),
                                      ("mlp_layer_types", self.mlp_layer_types, MLP_LAYER_TYPES)):
            if len(types_) != self.num_hidden_layers:
                raise ValueError(f"len({name}) ({len(types_)}) must equal num_hidden_layers "
                                 f"({self.num_hidden_layers})")
            bad = [t for t in types_ if t not in allowed]
            if bad:
                raise ValueError(f"{name} entries must be one of {allowed}; got {bad}")
        unknown = set(self.compress_rates) - {CSA, HCA}
        if unknown:
            raise ValueError(f"compress_rates keys must be among {(CSA, HCA)}; got {sorted(unknown)}")
        for lt in set(self.layer_types) - {SWA}:
            r = self.compress_rates.get(lt)
            if not isinstance(r, int) or isinstance(r, bool) or r < 1:
                raise ValueError(f"compress_rates[{lt!r}] must be an int >= 1, got {r!r}")
        if set(self.rope_parameters) != {"main", "compress"}:
            raise ValueError("rope_parameters must have exactly the keys 'main' and 'compress', got "
                             f"{sorted(self.rope_parameters)}")
        scalars = {"main": ("rope_theta", self.rope_theta), "compress": ("compress_rope_theta",
                                                                         self.compress_rope_theta)}
        for label, rp in self.rope_parameters.items():
            if not isinstance(rp, dict):
                raise ValueError(f"rope_parameters[{label!r}] must be a mapping, got {rp!r}")
            field_name, theta = scalars[label]
            if rp.get("rope_theta") != theta or rp.get("partial_rotary_factor") != self.partial_rotary_factor:
                raise ValueError(
                    f"rope_parameters[{label!r}] (rope_theta={rp.get('rope_theta')}, partial_rotary_factor="
                    f"{rp.get('partial_rotary_factor')}) disagrees with {field_name}={theta}, "
                    f"partial_rotary_factor={self.partial_rotary_factor}; set them consistently "
                    f"(the rotary embedding reads rope_parameters)")
            rt = rp.get("rope_type", "default")
            if rt not in ("default", "yarn"):
                raise ValueError(f"rope_parameters[{label!r}].rope_type must be 'default' or 'yarn', got {rt!r}")
            if rt == "yarn":
                for k in ("factor", "original_max_position_embeddings"):
                    if k not in rp:
                        raise ValueError(f"rope_parameters[{label!r}] is YaRN and needs {k!r}")
        if self.hc_eps <= 0 or self.rms_norm_eps <= 0:
            raise ValueError("hc_eps and rms_norm_eps must be > 0")
        for name in ("swiglu_limit", "routed_scaling_factor"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.initializer_range < 0:
            raise ValueError(f"initializer_range must be >= 0 (std of the initial weights), "
                             f"got {self.initializer_range}")
        if self.num_nextn_predict_layers not in (0, 1):
            raise ValueError(f"num_nextn_predict_layers must be 0 or 1 (the model implements MTP depth 1), "
                             f"got {self.num_nextn_predict_layers}")
        if self.tie_word_embeddings:
            raise ValueError("tie_word_embeddings must be false: the model has a separate LM head "
                             "(tied embeddings are not supported)")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            for tid in value if isinstance(value, list) else [value]:
                if tid is not None and not 0 <= tid < self.vocab_size:
                    raise ValueError(f"{name} must be in [0, vocab_size) = [0, {self.vocab_size}), "
                                     f"got {value}")

    # ------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "config") -> ModelArgs:
        """Build from a plain dict. A ``flavor`` key starts from that flavor.

        Raises:
            ValueError: unknown keys (listing the allowed ones) or bad values.
        """
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a mapping of ModelArgs fields, got {type(d).__name__}")
        d = dict(d)
        base: dict[str, Any] = {}
        if "flavor" in d:
            flavor = d.pop("flavor")
            if not isinstance(flavor, str):
                raise ValueError(f"{source}: flavor must be a string, one of {list(FLAVORS)}; got {flavor!r}")
            base = FLAVORS_FN(flavor).to_dict()
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {unknown}; allowed keys: {sorted(names)} "
                             f"(plus 'flavor')")
        if base and "num_hidden_layers" in d and d["num_hidden_layers"] != base["num_hidden_layers"]:
            # layer schedules of the flavor no longer fit; fall back to HF defaults unless given.
            base.pop("layer_types")
            base.pop("mlp_layer_types")
        return cls(**_merge_overrides(base, d))

    @classmethod
    def from_yaml(cls, path: str | Path) -> ModelArgs:
        """Load from YAML; a top-level ``model:`` section is accepted.

        Read with the project's one YAML reader (``model.safe_io.read_yaml``: PyYAML's safe
        loader, YAML 1.2 floats such as ``1e-6``, an error naming both lines of a duplicate key).

        Raises:
            ValueError: naming the file: missing or not a regular file, not UTF-8 text
                (e.g. a pickle), invalid YAML (with line and column; a tag that would
                build a Python object, ``!!python/...``, included), empty, or bad fields.
        """
        from .safe_io import read_yaml

        p = Path(path)
        data = read_yaml(p, "model config")
        if isinstance(data, dict) and set(data) == {"model"}:
            data = data["model"]
        if data is None or data == {}:
            raise ValueError(f"{p}: empty config; give at least `flavor:` or the fields")
        return cls.from_dict(data, source=str(p))

    def to_yaml(self, path: str | Path | None = None) -> str:
        import yaml

        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_hf_config(cls, config: Any) -> ModelArgs:
        """From a ``transformers.DeepseekV4Config`` or its ``to_dict()`` / config.json dict."""
        d = config if isinstance(config, dict) else config.to_dict()
        d = {k: v for k, v in d.items() if k not in _HF_IGNORED_KEYS}
        if d.get("partial_rotary_factor") is None:
            d.pop("partial_rotary_factor", None)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"HF config has fields this model does not implement: {unknown}")
        for k in ("rope_theta", "compress_rope_theta", "routed_scaling_factor"):
            if k in d and isinstance(d[k], int):
                d[k] = float(d[k])
        return cls(**d)

    def to_hf_config(self):
        """A ``transformers.DeepseekV4Config`` with the same hyper-parameters."""
        from transformers import DeepseekV4Config

        d = self.to_dict()
        return DeepseekV4Config(**d)

    @classmethod
    def flavor(cls, name: str, **overrides: Any) -> ModelArgs:
        """A named flavor (``debug``, ``tiny``, ``small``, ``v4-flash``, ``v4-pro``) with overrides."""
        return FLAVORS_FN(name, **overrides)


def _flat_args(hint: Any) -> tuple:
    """The members of a union hint (``float | None`` -> ``(float, NoneType)``), else ``(hint,)``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _check_type(name: str, value: Any, hint: Any) -> None:
    """Raise ValueError if ``value`` does not match the (simple) type ``hint``."""
    if not _matches(value, hint):
        raise ValueError(f"{name} has wrong type: expected {_hint_name(hint)}, got "
                         f"{type(value).__name__} ({value!r})")


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is Any:
        return True
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin is dict:
        k, v = typing.get_args(hint)
        return isinstance(value, dict) and all(_matches(a, k) and _matches(b, v) for a, b in value.items())
    return isinstance(value, hint)


def _hint_name(hint: Any) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "")


# --------------------------------------------------------------------- flavors
def _alternate(n: int, lead: list[str], first: str) -> list[str]:
    other = HCA if first == CSA else CSA
    return (lead + [first if i % 2 == 0 else other for i in range(n - len(lead))])[:n]


_YARN = {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 65536,
         "beta_fast": 32, "beta_slow": 1, "attention_factor": 1.0}


def _rope(args_theta: float, compress_theta: float, prf: float, yarn: bool) -> dict:
    main = {"rope_type": "default", "rope_theta": args_theta, "partial_rotary_factor": prf}
    comp = {"rope_type": "default", "rope_theta": compress_theta, "partial_rotary_factor": prf}
    if yarn:
        comp = {**_YARN, "rope_theta": compress_theta, "partial_rotary_factor": prf}
    return {"main": main, "compress": comp}


def _flavor_dicts() -> dict[str, dict[str, Any]]:
    return {
        "debug": dict(
            vocab_size=512, hidden_size=128, moe_intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, head_dim=64, q_lora_rank=64, num_experts_per_tok=2,
            n_routed_experts=8, routed_scaling_factor=1.5, max_position_embeddings=65536,
            layer_types=[SWA, CSA, HCA, CSA], compress_rates={CSA: 4, HCA: 16},
            partial_rotary_factor=0.25, mlp_layer_types=["hash_moe", "moe", "moe", "moe"],
            sliding_window=32, o_groups=2, o_lora_rank=64, index_n_heads=4, index_head_dim=32,
            index_topk=8, rope_parameters=_rope(10000.0, 160000.0, 0.25, yarn=False),
        ),
        "tiny": dict(
            vocab_size=4096, hidden_size=256, moe_intermediate_size=256, num_hidden_layers=6,
            num_attention_heads=4, head_dim=128, q_lora_rank=128, num_experts_per_tok=2,
            n_routed_experts=8, max_position_embeddings=131072,
            layer_types=_alternate(6, [SWA], CSA), compress_rates={CSA: 4, HCA: 32},
            partial_rotary_factor=0.25, mlp_layer_types=_default_mlp_layer_types(6, 1),
            sliding_window=64, o_groups=2, o_lora_rank=128, index_n_heads=4, index_head_dim=64,
            index_topk=32, rope_parameters=_rope(10000.0, 160000.0, 0.25, yarn=True),
        ),
        "small": dict(
            vocab_size=32000, hidden_size=512, moe_intermediate_size=512, num_hidden_layers=8,
            num_attention_heads=8, head_dim=128, q_lora_rank=256, num_experts_per_tok=4,
            n_routed_experts=16, max_position_embeddings=1048576,
            layer_types=_alternate(8, [SWA, SWA], CSA), compress_rates={CSA: 4, HCA: 128},
            partial_rotary_factor=0.25, mlp_layer_types=_default_mlp_layer_types(8, 2),
            sliding_window=128, o_groups=4, o_lora_rank=256, index_n_heads=8, index_head_dim=64,
            index_topk=128, rope_parameters=_rope(10000.0, 160000.0, 0.25, yarn=True),
        ),
        # ~0.69B parameters (0.63B with an 8K vocabulary; 0.5B of them routed experts, 4 of 64
        # active per token): the scale-out flavor. 8 actors that each built the whole model would
        # need ~20 GB for the parameters alone before training; sharded, its float32 training state
        # (parameters + gradients + Muon/AdamW, ~8 GB) spreads over the actors.
        "medium": dict(
            vocab_size=32000, hidden_size=1024, moe_intermediate_size=320, num_hidden_layers=8,
            num_attention_heads=8, head_dim=128, q_lora_rank=512, num_experts_per_tok=4,
            n_routed_experts=64, max_position_embeddings=1048576,
            layer_types=_alternate(8, [SWA, SWA], CSA), compress_rates={CSA: 4, HCA: 128},
            partial_rotary_factor=0.25, mlp_layer_types=_default_mlp_layer_types(8, 2),
            sliding_window=128, o_groups=4, o_lora_rank=512, index_n_heads=8, index_head_dim=64,
            index_topk=128, rope_parameters=_rope(10000.0, 160000.0, 0.25, yarn=True),
        ),
        "v4-flash": dict(
            layer_types=_alternate(43, [SWA, SWA], CSA),
            rope_parameters=_rope(10000.0, 160000.0, 0.125, yarn=True),
        ),
        "v4-pro": dict(
            hidden_size=7168, moe_intermediate_size=3072, num_hidden_layers=61, num_attention_heads=128,
            q_lora_rank=1536, n_routed_experts=384, routed_scaling_factor=2.5, o_groups=16,
            index_topk=1024, layer_types=_default_layer_types(61),
            mlp_layer_types=_default_mlp_layer_types(61),
            rope_parameters=_rope(10000.0, 160000.0, 0.125, yarn=True),
        ),
    }


FLAVORS = tuple(_flavor_dicts())
# Released shapes: far too large to build on one machine; for accounting (cache bytes,
# parameter counts on the meta device) and config output only.
ACCOUNTING_ONLY_FLAVORS = ("v4-flash", "v4-pro")


def FLAVORS_FN(name: str, **overrides: Any) -> ModelArgs:
    table = _flavor_dicts()
    if name not in table:
        raise ValueError(f"unknown flavor {name!r}; available: {list(table)}")
    names = {f.name for f in dataclasses.fields(ModelArgs)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown ModelArgs field(s) {unknown}; allowed: {sorted(names)}")
    return ModelArgs(**_merge_overrides(table[name], overrides))


def _merge_overrides(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``{**base, **overrides}``, carrying overridden scalar RoPE fields into ``rope_parameters``.

    A flavor's ``rope_parameters`` repeats ``rope_theta`` / ``compress_rope_theta`` /
    ``partial_rotary_factor``; overriding only the scalar must not leave a stale copy.
    """
    d = {**base, **overrides}
    rp = base.get("rope_parameters")
    if "rope_parameters" in overrides or not isinstance(rp, dict):
        return d
    rp = {k: dict(v) if isinstance(v, dict) else v for k, v in rp.items()}
    for label, key, field_name in (("main", "rope_theta", "rope_theta"),
                                   ("compress", "rope_theta", "compress_rope_theta"),
                                   ("main", "partial_rotary_factor", "partial_rotary_factor"),
                                   ("compress", "partial_rotary_factor", "partial_rotary_factor")):
        if field_name in overrides and isinstance(rp.get(label), dict):
            v = overrides[field_name]
            rp[label][key] = float(v) if isinstance(v, int) and not isinstance(v, bool) else v
    d["rope_parameters"] = rp
    return d


__all__ = ["ModelArgs", "FLAVORS", "ACCOUNTING_ONLY_FLAVORS", "LAYER_TYPES", "MLP_LAYER_TYPES", "CSA", "HCA", "SWA"]
