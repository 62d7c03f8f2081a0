"""ModelArgs validation, YAML and Hugging Face round trips (DESIGN convention 1 and 6)."""

from __future__ import annotations

import pytest

from model.config import CSA, FLAVORS, HCA, SWA, ModelArgs


def _raises(match: str, **overrides):
    with pytest.raises(ValueError, match=match):
        ModelArgs.flavor("debug", **overrides)


# ------------------------------------------------------------------ bad input
def test_unknown_key_from_dict():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['hiden_size'\].*allowed keys"):
        ModelArgs.from_dict({"flavor": "debug", "hiden_size": 128})


def test_unknown_key_from_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("flavor: debug\nnum_layers: 4\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: unknown key\(s\) \['num_layers'\]"):
        ModelArgs.from_yaml(path)


def test_unknown_flavor():
    with pytest.raises(ValueError, match=r"unknown flavor 'huge'.*available"):
        ModelArgs.flavor("huge")
    with pytest.raises(ValueError, match="flavor must be a string"):
        ModelArgs.from_dict({"flavor": ["debug"]})


@pytest.mark.parametrize("value, got", [("4", "str"), (4.0, "float"), (True, "bool")])
def test_wrong_type_for_int(value, got):
    _raises(rf"num_hidden_layers has wrong type: expected int, got {got}", num_hidden_layers=value)


def test_wrong_type_in_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("flavor: debug\nhidden_size: '128'\n")
    with pytest.raises(ValueError, match="hidden_size has wrong type: expected int, got str"):
        ModelArgs.from_yaml(path)


def test_wrong_type_for_float_and_list():
    _raises("hc_eps has wrong type: expected float", hc_eps="small")
    _raises("layer_types has wrong type", layer_types=SWA)


def test_ints_in_float_fields_become_floats():
    args = ModelArgs.flavor("debug", routed_scaling_factor=2, rope_theta=5000)
    assert type(args.routed_scaling_factor) is float and type(args.rope_theta) is float
    args.to_hf_config()  # HF's strict config rejects an int here


def test_yaml_reads_exponent_floats(tmp_path):
    path = tmp_path / "eps.yaml"
    path.write_text("flavor: debug\nrms_norm_eps: 1e-5\n")  # PyYAML alone reads '1e-5' as a string
    assert ModelArgs.from_yaml(path).rms_norm_eps == 1e-5


@pytest.mark.parametrize("prf", [0.3, 0.0, 1.5, 3 / 64])
def test_rotary_dims_must_be_even_integer(prf):
    _raises("head_dim \\* partial_rotary_factor must be a positive even integer", partial_rotary_factor=prf)


def test_heads_divisible_by_o_groups():
    _raises(r"num_attention_heads \(4\) must be divisible by o_groups \(3\)", o_groups=3)


def test_index_topk_positive():
    _raises("index_topk must be >= 1", index_topk=0)


def test_layer_types_length():
    _raises(r"len\(layer_types\) \(3\) must equal num_hidden_layers \(4\)", layer_types=[SWA, CSA, HCA])


def test_unknown_layer_type():
    _raises("layer_types entries must be one of", layer_types=[SWA, CSA, HCA, "full_attention"])
    _raises("mlp_layer_types entries must be one of", mlp_layer_types=["moe", "moe", "moe", "dense"])


def test_single_kv_head():
    _raises("num_key_value_heads must be 1", num_key_value_heads=2)


def test_experts_per_tok_at_most_routed():
    _raises(r"num_experts_per_tok \(9\) must be <= n_routed_experts \(8\)", num_experts_per_tok=9)


def test_rope_parameters_consistent_with_scalars():
    _raises("disagrees with rope_theta", rope_parameters={"main": {"rope_theta": 1.0}, "compress": {}})
    # overriding a scalar carries into the flavor's rope_parameters instead of leaving a stale copy
    args = ModelArgs.flavor("tiny", compress_rope_theta=1e5, partial_rotary_factor=0.5)
    assert args.rope_parameters["compress"]["rope_theta"] == 1e5
    assert args.rope_parameters["compress"]["rope_type"] == "yarn"
    assert args.rope_parameters["main"]["partial_rotary_factor"] == 0.5


def test_missing_yaml_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        ModelArgs.from_yaml(tmp_path / "nope.yaml")


def test_invalid_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("flavor: debug\nlayer_types: [sliding_attention\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        ModelArgs.from_yaml(path)


def test_yaml_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- debug\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        ModelArgs.from_yaml(path)


# ----------------------------------------------------------------- round trips
@pytest.mark.parametrize("flavor", FLAVORS)
def test_yaml_round_trip(flavor, tmp_path):
    args = ModelArgs.flavor(flavor)
    path = tmp_path / f"{flavor}.yaml"
    text = args.to_yaml(path)
    assert path.read_text() == text
    assert ModelArgs.from_yaml(path) == args


def test_yaml_model_section_and_flavor_overrides(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("model:\n  flavor: debug\n  num_hidden_layers: 6\n")
    args = ModelArgs.from_yaml(path)
    assert args.num_hidden_layers == 6 and len(args.layer_types) == 6 and args.hidden_size == 128


@pytest.mark.parametrize("flavor", FLAVORS)
def test_hf_round_trip(flavor):
    args = ModelArgs.flavor(flavor)
    hf = args.to_hf_config()
    assert ModelArgs.from_hf_config(hf) == args
    assert ModelArgs.from_hf_config(hf.to_dict()) == args


@pytest.mark.parametrize("flavor", FLAVORS)
def test_hf_config_fields(flavor):
    from transformers import DeepseekV4Config

    args = ModelArgs.flavor(flavor)
    hf = DeepseekV4Config(**args.to_hf_config().to_dict())
    assert hf.hidden_size == args.hidden_size
    assert hf.num_hidden_layers == args.num_hidden_layers
    assert hf.layer_types == args.layer_types
    assert hf.mlp_layer_types == args.mlp_layer_types
    assert hf.compress_rates == args.compress_rates
    assert hf.qk_rope_head_dim == args.qk_rope_head_dim
    assert hf.rope_parameters["main"]["rope_theta"] == args.rope_theta
    assert hf.rope_parameters["compress"]["rope_theta"] == args.compress_rope_theta
    assert hf.rope_parameters["compress"]["rope_type"] == args.rope_parameters["compress"]["rope_type"]
    for name in ("vocab_size", "num_attention_heads", "head_dim", "q_lora_rank", "o_groups", "o_lora_rank",
                 "index_n_heads", "index_head_dim", "index_topk", "n_routed_experts", "num_experts_per_tok",
                 "sliding_window", "hc_mult", "routed_scaling_factor"):
        assert getattr(hf, name) == getattr(args, name), name


def test_hf_config_with_unimplemented_field():
    d = ModelArgs.flavor("debug").to_hf_config().to_dict()
    d["some_future_field"] = 1
    with pytest.raises(ValueError, match="does not implement.*some_future_field"):
        ModelArgs.from_hf_config(d)
