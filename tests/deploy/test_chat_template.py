"""The chat template is stored with the tokenizer (tokenizer_config.json) and renders the same in
tide's engine and in transformers' tokenizer loaded from an exported directory."""

import json

import pytest

from cluster.data import CHAT_TEMPLATE, read_chat_template
from deploy.loader import load_engine
from tests.deploy.util import write_tiny_hf

MESSAGES = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Reverse a list."}]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    write_tiny_hf(d, tmp_path_factory.mktemp("tok"))
    return d


def test_engine_and_transformers_render_the_stored_template_alike(hf_dir):
    from transformers import AutoTokenizer

    engine = load_engine(hf_dir)
    assert engine.chat_template == CHAT_TEMPLATE
    hf = AutoTokenizer.from_pretrained(str(hf_dir))
    want = hf.apply_chat_template(MESSAGES, tokenize=False)
    assert engine.chat_prompt(MESSAGES) == want
    assert engine.encode(want) == hf(want, add_special_tokens=False)["input_ids"]
    engine.close()


def test_a_custom_stored_template_is_used(hf_dir, tmp_path):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(hf_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}>>> "
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    engine = load_engine(d)
    assert engine.chat_prompt(MESSAGES) == "[system] You write Python.\n[user] Reverse a list.\n>>> "
    engine.close()


def test_bad_tokenizer_config_is_named(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        read_chat_template(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [{"name": "x"}]}))
    with pytest.raises(ValueError, match="must be a string"):
        read_chat_template(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    assert read_chat_template(tmp_path) is None
