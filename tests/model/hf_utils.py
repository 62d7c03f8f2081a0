"""Shared helpers for the transformers-parity tests: tiny configs and weight randomisation."""

from __future__ import annotations

import torch

from model import ModelArgs, Transformer
from model.config import CSA, HCA, SWA

YARN = {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 256,
        "beta_fast": 32, "beta_slow": 1, "attention_factor": 1.0}


def _rope(prf: float, yarn: bool) -> dict:
    comp = {"rope_type": "default", "rope_theta": 160000.0, "partial_rotary_factor": prf}
    if yarn:
        comp = {**YARN, "rope_theta": 160000.0, "partial_rotary_factor": prf}
    return {"main": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": prf},
            "compress": comp}


# Three tiny configs that differ in head counts, compress rates, windows, layer mixes and routing.
CONFIGS = {
    "c4_16_w32": dict(
        vocab_size=300, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
        head_dim=32, q_lora_rank=32, num_experts_per_tok=2, n_routed_experts=4, layer_types=[SWA, CSA, HCA, CSA],
        compress_rates={CSA: 4, HCA: 16}, partial_rotary_factor=0.25, mlp_layer_types=["hash_moe", "moe", "moe", "moe"],
        sliding_window=32, o_groups=2, o_lora_rank=16, index_n_heads=16, index_head_dim=16, index_topk=8,
        rope_parameters=_rope(0.25, False),
    ),
    "c8_32_w16": dict(
        vocab_size=256, hidden_size=48, moe_intermediate_size=24, num_hidden_layers=3, num_attention_heads=8,
        head_dim=16, q_lora_rank=24, num_experts_per_tok=3, n_routed_experts=6, layer_types=[CSA, HCA, SWA],
        compress_rates={CSA: 8, HCA: 32}, partial_rotary_factor=0.5, mlp_layer_types=["hash_moe", "hash_moe", "moe"],
        sliding_window=16, o_groups=4, o_lora_rank=8, index_n_heads=16, index_head_dim=8, index_topk=4,
        rope_parameters=_rope(0.5, True), routed_scaling_factor=2.5,
    ),
    "c4_8_w8_hc2": dict(
        vocab_size=200, hidden_size=32, moe_intermediate_size=16, num_hidden_layers=5, num_attention_heads=2,
        head_dim=32, q_lora_rank=16, num_experts_per_tok=2, n_routed_experts=8, layer_types=[HCA, HCA, CSA, SWA, CSA],
        compress_rates={CSA: 4, HCA: 8}, partial_rotary_factor=0.25, mlp_layer_types=["moe"] * 5,
        sliding_window=8, o_groups=1, o_lora_rank=16, index_n_heads=16, index_head_dim=16, index_topk=16,
        rope_parameters=_rope(0.25, True), hc_mult=2,
    ),
}
for _c in CONFIGS.values():
    _c.setdefault("max_position_embeddings", 4096)


def make_args(name: str) -> ModelArgs:
    return ModelArgs(**CONFIGS[name])


@torch.no_grad()
def randomize(module: torch.nn.Module, seed: int, n_experts: int) -> None:
    """Give every parameter and routing buffer non-trivial random values (HF names)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        r = torch.randn(p.shape, generator=g)
        if name.endswith("norm.weight") or "layernorm" in name:
            p.copy_(1.0 + 0.2 * r)
        elif name.endswith((".base", "hc_base", ".scale", "hc_scale", "sinks", "position_bias")):
            p.copy_(0.5 * r)
        else:
            p.copy_(0.5 * r * p.shape[-1] ** -0.5)
    for name, b in module.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.1 * torch.randn(b.shape, generator=g))
        elif name.endswith("tid2eid"):
            b.copy_(torch.stack([torch.randperm(n_experts, generator=g)[: b.shape[1]] for _ in range(b.shape[0])]))


def hf_pair(name: str, seed: int = 0):
    """(hf_model, our_model) with identical random weights, float32, eval mode."""
    from transformers import DeepseekV4ForCausalLM

    args = make_args(name)
    torch.manual_seed(seed)
    hf = DeepseekV4ForCausalLM(args.to_hf_config()).float().eval()
    randomize(hf, seed, args.n_routed_experts)
    ours = Transformer(args).eval()
    sd = {k[len("model."):] if k.startswith("model.") else k: v for k, v in hf.state_dict().items()}
    missing, unexpected = ours.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert all(m.startswith("mtp.") for m in missing), missing
    return hf, ours
