"""ModelArgs validation, YAML and Hugging Face round trips (docs/design.md §7: unknown keys and wrong types are errors)."""

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


@pytest.mark.parametrize("value", [-0.01, -1])
def test_initializer_range_non_negative(value):
    _raises(r"initializer_range must be >= 0", initializer_range=value)
    assert ModelArgs.flavor("debug", initializer_range=0.0).initializer_range == 0.0


@pytest.mark.parametrize("value", [2, -1])
def test_mtp_depth_is_0_or_1(value):
    _raises(r"num_nextn_predict_layers must be 0 or 1", num_nextn_predict_layers=value)
    assert ModelArgs.flavor("debug", num_nextn_predict_layers=0).num_nextn_predict_layers == 0


def test_tied_embeddings_unsupported():
    _raises(r"tie_word_embeddings must be false.*separate LM head", tie_word_embeddings=True)


@pytest.mark.parametrize("name", ["swiglu_limit", "routed_scaling_factor"])
@pytest.mark.parametrize("value", [0.0, -1.5])
def test_positive_floats(name, value):
    _raises(rf"{name} must be > 0", **{name: value})


@pytest.mark.parametrize("name, value", [
    ("bos_token_id", 512), ("bos_token_id", -1), ("pad_token_id", 600), ("eos_token_id", 512),
    ("eos_token_id", [1, 512]), ("eos_token_id", [-2]),
])
def test_special_token_ids_in_vocab(name, value):
    _raises(rf"{name} must be in \[0, vocab_size\) = \[0, 512\)", **{name: value})


def test_special_token_ids_valid():
    args = ModelArgs.flavor("debug", bos_token_id=None, eos_token_id=[1, 511], pad_token_id=511)
    assert args.eos_token_id == [1, 511]


def test_hf_default_config_is_accepted():
    from transformers import DeepseekV4Config

    args = ModelArgs.from_hf_config(DeepseekV4Config())
    assert (args.tie_word_embeddings, args.bos_token_id, args.eos_token_id) == (False, 0, 1)


def test_missing_yaml_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        ModelArgs.from_yaml(tmp_path / "nope.yaml")


@pytest.mark.parametrize("path", ["dir", "/dev/null"])
def test_yaml_path_not_a_regular_file(path, tmp_path):
    p = tmp_path if path == "dir" else path
    with pytest.raises(ValueError, match=f"{p} is not a regular file"):
        ModelArgs.from_yaml(p)


@pytest.mark.parametrize("text", ["", "# only a comment\n", "model:\n", "{}\n"])
def test_empty_yaml(text, tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=r"empty\.yaml: empty config; give at least `flavor:` or the fields"):
        ModelArgs.from_yaml(path)


def test_binary_yaml(tmp_path):
    path = tmp_path / "garbage.yaml"
    path.write_bytes(bytes(range(256)))
    with pytest.raises(ValueError, match=r"garbage\.yaml: not a UTF-8 text file"):
        ModelArgs.from_yaml(path)
    path.write_bytes(b"flavor: debug\n\x00\x01")  # valid UTF-8, but not YAML text
    with pytest.raises(ValueError, match=r"garbage\.yaml: not valid YAML: .*special characters"):
        ModelArgs.from_yaml(path)


def test_invalid_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("flavor: debug\nlayer_types: [sliding_attention\n")
    with pytest.raises(ValueError, match=r"broken\.yaml: not valid YAML: line 3, column 1: ") as e:
        ModelArgs.from_yaml(path)
    assert "\n" not in str(e.value)


def test_duplicate_yaml_keys(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("flavor: debug\nhidden_size: 128\nhidden_size: 256\n")
    with pytest.raises(ValueError, match=r"dup\.yaml: not valid YAML: line 3, column 1: duplicate key 'hidden_size'"):
        ModelArgs.from_yaml(path)
    path.write_text("model:\n  flavor: debug\n  flavor: tiny\n")  # nested mappings too
    with pytest.raises(ValueError, match="duplicate key 'flavor'"):
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
