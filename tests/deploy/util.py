"""Shared by the serving tests: a tiny random model saved as an HF directory with its tokenizer files."""

from pathlib import Path

import torch

from cluster.data import save_tokenizer_files, train_or_load_tokenizer
from model import ModelArgs, Transformer, save_hf

TEXTS = ["def add(a, b):\n    return a + b\n", "import os\nprint(os.getcwd())\n",
         "for i in range(10):\n    pass\n"] * 20


def write_tiny_hf(out: Path, tok_cache: Path):
    """Save a seed-0 debug-flavor model (300-token BPE vocabulary, context 512) to ``out``
    with ``tokenizer.json`` + ``tokenizer_config.json``. Returns ``(model in eval mode, tokenizer)``."""
    tok = train_or_load_tokenizer(TEXTS, 300, tok_cache, progress=False)
    torch.manual_seed(0)
    model = Transformer(ModelArgs.flavor("debug", vocab_size=tok.get_vocab_size(), max_position_embeddings=512))
    save_hf(model, out)
    save_tokenizer_files(tok, out)
    return model.eval(), tok
