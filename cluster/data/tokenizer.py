"""Byte-level BPE tokenizer: trained once per corpus, then loaded from the cache.

``train_or_load_tokenizer`` trains ``tokenizers``' BPE over a ``ByteLevel``
pre-tokenizer (every string round-trips exactly) and caches it as
``cache_dir/tokenizer-<key>/tokenizer.json``; a user ``tokenizer.json`` can be loaded
instead.

Special tokens of a trained tokenizer: ``<|bos|>`` = 0, ``<|endoftext|>`` = 1 (eos,
the document separator), ``<|pad|>`` = 2, matching ``ModelArgs`` defaults
(``bos_token_id=0``, ``eos_token_id=1``). ``<|bos|>`` is not inserted by packing.

``save_tokenizer_files`` / ``read_chat_template`` write and read the files served
with a run's tokenizer (``tokenizer.json``, ``tokenizer_config.json`` with
``CHAT_TEMPLATE``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from .corpus import Corpus, _docs_and_fingerprint, _sha256

log = logging.getLogger(__name__)

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)  # ids 0, 1, 2 in a trained tokenizer

# Bump when the meaning of a cached file changes (invalidates old caches).
_TOKENIZER_CACHE_VERSION = 1


def train_or_load_tokenizer(documents: Corpus | Iterable[str] | None, vocab_size: int,
                            cache_dir: str | os.PathLike, *, tokenizer_path: str | os.PathLike | None = None,
                            min_frequency: int = 2, progress: bool | None = None):
    """A byte-level BPE tokenizer for ``documents``: trained once, then loaded from cache.

    The tokenizer is ``tokenizers``' BPE over a ``ByteLevel`` pre-tokenizer (GPT-2
    regex split, no prefix space) with a ``ByteLevel`` decoder, trained by
    ``BpeTrainer`` with the full 256-byte initial alphabet, so every string
    round-trips exactly: ``decode(encode(text).ids) == text``. Special tokens:
    ``<|bos|>`` = 0, ``<|endoftext|>`` = 1 (eos), ``<|pad|>`` = 2.

    Cached as ``cache_dir/tokenizer-<key>/tokenizer.json`` (with ``meta.json``) where
    ``key`` hashes the corpus fingerprint, ``vocab_size``, ``min_frequency`` and the
    special tokens; a second call with the same inputs loads it without reading the
    corpus (for a ``Corpus``) or retraining. Writes are atomic (safe if several
    ranks race: they produce the same file).

    Args:
        documents: a ``Corpus`` (fingerprinted by file metadata) or an iterable of
            ``str`` (materialised and hashed). Ignored when ``tokenizer_path`` is set.
        vocab_size: the largest vocabulary wanted (the model's ``vocab_size``); a
            small corpus may yield fewer tokens (``get_vocab_size()``), never more.
            Must be >= 259 (256 bytes + 3 special tokens).
        cache_dir: directory for the cache (created if needed).
        tokenizer_path: a user-supplied ``tokenizer.json`` to load instead of
            training; it must contain ``<|endoftext|>`` and at most ``vocab_size`` tokens.
        min_frequency: BPE merges need at least this many occurrences.
        progress: show the trainer's progress bar (``None``: when stderr is a tty).

    Returns:
        ``tokenizers.Tokenizer``.

    Raises:
        ValueError: bad ``vocab_size``, an unreadable/invalid ``tokenizer_path`` or one
            without the eos token or with too many tokens, an empty corpus, bad
            corpus content (see ``Corpus``).
    """
    from tokenizers import Tokenizer

    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be an int >= {256 + len(SPECIAL_TOKENS)} "
                         f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens), got {vocab_size!r}")
    if tokenizer_path is not None:
        path = Path(tokenizer_path).expanduser()
        if not path.is_file():
            raise ValueError(f"tokenizer file not found: {path}")
        from model.safe_io import refuse_pickle

        refuse_pickle(path, "allowed: a tokenizers JSON file (tokenizer.json)")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on a bad file
            raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from None
        tokenizer_eos_id(tok)
        if tok.get_vocab_size() > vocab_size:
            raise ValueError(f"{path}: tokenizer has {tok.get_vocab_size()} tokens, more than "
                             f"vocab_size={vocab_size} (the model's embedding rows)")
        log.info("loaded tokenizer %s (%d tokens)", path, tok.get_vocab_size())
        return tok
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 1:
        raise ValueError(f"min_frequency must be an int >= 1, got {min_frequency!r}")

    make_docs, corpus_fp, desc = _docs_and_fingerprint(documents)
    key = _sha256({"v": _TOKENIZER_CACHE_VERSION, "corpus": corpus_fp, "vocab_size": vocab_size,
                   "min_frequency": min_frequency, "special": list(SPECIAL_TOKENS)})[:16]
    out_dir = Path(cache_dir).expanduser() / f"tokenizer-{key}"
    path = out_dir / "tokenizer.json"
    if path.is_file():
        from model.safe_io import refuse_pickle

        refuse_pickle(path, "allowed: a tokenizers JSON file (tokenizer.json)")
        log.info("loaded cached tokenizer %s", path)
        return Tokenizer.from_file(str(path))

    log.info("training byte-level BPE tokenizer (vocab_size=%d) on %s", vocab_size, desc)
    t0 = time.perf_counter()
    tok = _train_bpe(make_docs(), vocab_size, min_frequency, progress)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".tokenizer.json.{os.getpid()}.tmp"
    tok.save(str(tmp))
    os.replace(tmp, path)
    meta = {"corpus": desc, "corpus_fingerprint": corpus_fp, "vocab_size_requested": vocab_size,
            "vocab_size": tok.get_vocab_size(), "min_frequency": min_frequency,
            "special_tokens": {t: i for i, t in enumerate(SPECIAL_TOKENS)}}
    _atomic_write_text(out_dir / "meta.json", json.dumps(meta, indent=2) + "\n")
    log.info("trained tokenizer: %d tokens in %.1fs -> %s", tok.get_vocab_size(), time.perf_counter() - t0, path)
    return tok


def _train_bpe(documents: Iterator[str], vocab_size: int, min_frequency: int, progress: bool | None):
    """Train a fresh byte-level BPE on ``documents`` (the uncached path)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=sys.stderr.isatty() if progress is None else progress)
    tok.train_from_iterator(documents, trainer=trainer)
    return tok


def tokenizer_eos_id(tokenizer, eos_token: str = EOS_TOKEN) -> int:
    """The id of ``eos_token`` in ``tokenizer``.

    Raises:
        ValueError: the tokenizer has no such token.
    """
    eos = tokenizer.token_to_id(eos_token)
    if eos is None:
        raise ValueError(f"tokenizer has no {eos_token!r} token (the document separator); "
                         f"add it as a special token or pass eos_token=")
    return eos


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# The chat template served with a run's tokenizer (``tokenizer_config.json``, the field
# transformers' tokenizers read, so an exported model renders chats the same way there).
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}\n{% endfor %}<|assistant|>\n"


def save_tokenizer_files(tokenizer, out_dir: str | Path, chat_template: str = CHAT_TEMPLATE) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` (chat template, end-of-text token) to ``out_dir``."""
    out = Path(out_dir)
    tokenizer.save(str(out / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": chat_template, "eos_token": EOS_TOKEN,
           "model_max_length": 1 << 30}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def read_chat_template(tokenizer_dir: str | Path) -> str | None:
    """The ``chat_template`` of ``tokenizer_dir/tokenizer_config.json``; None when there is none.

    Raises:
        ValueError: the file exists but is not JSON, or its chat_template is not a string.
    """
    p = Path(tokenizer_dir) / "tokenizer_config.json"
    if not p.is_file():
        return None
    try:
        tpl = json.loads(p.read_text()).get("chat_template")
    except (ValueError, AttributeError) as e:
        raise ValueError(f"{p}: not a JSON object ({e})") from None
    if tpl is not None and not isinstance(tpl, str):
        raise ValueError(f"{p}: chat_template must be a string (named templates are not supported), "
                         f"got {type(tpl).__name__}")
    return tpl
