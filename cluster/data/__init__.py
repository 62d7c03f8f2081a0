"""Training data: real-text corpora, a byte-level BPE tokenizer, packed token streams
and a deterministic, checkpointable, rank-sharded loader.

Modules:

- ``corpus``: ``Corpus`` / ``load_documents``, the stdlib, text, JSONL and Parquet
  readers, directory walking and corpus fingerprints.
- ``tokenizer``: byte-level BPE training / loading (``train_or_load_tokenizer``), the
  special tokens, ``CHAT_TEMPLATE`` and the served tokenizer files.
- ``tokens``: the token cache: ``TokenStream``, ``tokenize_corpus``, ``prepare_data``,
  ``default_cache_dir``.
- ``loader``: packing (``pack_windows``, ``mtp_labels``, ``PackedDataset``) and the
  resumable ``TokenLoader`` (``sequences_per_batch``); its docstring holds the
  packing conventions.

Data flow, corpus -> tokenizer -> token stream -> packed batches (every step cached
under one ``cache_dir``, nothing downloaded)::

    Corpus("stdlib" | path)          documents (str), deterministic order
      -> train_or_load_tokenizer     byte-level BPE, cache_dir/tokenizer-<key>/tokenizer.json
      -> tokenize_corpus             TokenStream: every document + <|endoftext|>, uint32,
                                     cache_dir/tokens-<key>.npy (memory-mapped on reload)
      -> TokenLoader                 {"input_ids", "labels", "doc_ids"} batches, [B, S] int64
         (or PackedDataset, a map-style view for torch's DataLoader / evaluation)

``prepare_data`` runs the first three steps in one call. Everything public is
re-exported here: ``from cluster.data import X`` works for every name below.
"""

from __future__ import annotations

from .corpus import (
    DEFAULT_GLOBS,
    FORMATS,
    JSONL_EXTENSIONS,
    PARQUET_EXTENSIONS,
    STDLIB,
    STDLIB_SKIP_DIRS,
    TEXT_EXTENSIONS,
    Corpus,
    load_documents,
)
from .loader import IGNORE_INDEX, PackedDataset, TokenLoader, mtp_labels, pack_windows, sequences_per_batch
from .tokenizer import (
    BOS_TOKEN,
    CHAT_TEMPLATE,
    EOS_TOKEN,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    read_chat_template,
    save_tokenizer_files,
    tokenizer_eos_id,
    train_or_load_tokenizer,
)
from .tokens import TokenStream, default_cache_dir, prepare_data, tokenize_corpus

__all__ = [
    # corpus
    "DEFAULT_GLOBS", "FORMATS", "JSONL_EXTENSIONS", "PARQUET_EXTENSIONS", "STDLIB", "STDLIB_SKIP_DIRS",
    "TEXT_EXTENSIONS", "Corpus", "load_documents",
    # tokenizer
    "BOS_TOKEN", "CHAT_TEMPLATE", "EOS_TOKEN", "PAD_TOKEN", "SPECIAL_TOKENS", "read_chat_template",
    "save_tokenizer_files", "tokenizer_eos_id", "train_or_load_tokenizer",
    # tokens
    "TokenStream", "default_cache_dir", "prepare_data", "tokenize_corpus",
    # loader
    "IGNORE_INDEX", "PackedDataset", "TokenLoader", "mtp_labels", "pack_windows", "sequences_per_batch",
]
