"""Data pipeline (cluster.data): corpora, tokenizer cache, packing, the resumable loader."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cluster import data
from cluster.data import (
    EOS_TOKEN,
    IGNORE_INDEX,
    STDLIB_SKIP_DIRS,
    Corpus,
    PackedDataset,
    TokenLoader,
    TokenStream,
    load_documents,
    mtp_labels,
    pack_windows,
    prepare_data,
    sequences_per_batch,
    tokenize_corpus,
    train_or_load_tokenizer,
)

BUDGET = 300_000
VOCAB = 512


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data_cache")


@pytest.fixture(scope="module")
def corpus():
    return Corpus("stdlib", max_bytes=BUDGET)


@pytest.fixture(scope="module")
def prepared(corpus, cache_dir):
    return prepare_data(corpus, vocab_size=VOCAB, cache_dir=cache_dir, progress=False)


@pytest.fixture(scope="module")
def tok(prepared):
    return prepared[0]


@pytest.fixture(scope="module")
def stream(prepared):
    return prepared[1]


@pytest.fixture(scope="module")
def small_stream():
    """A synthetic stream with many short documents (lengths 1..40, eos = 1)."""
    rng = np.random.default_rng(0)
    parts = []
    for _ in range(300):
        parts += [rng.integers(3, 500, int(rng.integers(0, 40))), [1]]
    return TokenStream(np.concatenate(parts).astype(np.uint32), eos_id=1)


# -------------------------------------------------------------------- corpora
def test_stdlib_corpus_nonempty_deterministic_and_budgeted(corpus):
    docs = list(corpus.documents())
    assert docs and all(isinstance(d, str) and d for d in docs)
    assert sum(len(d.encode()) for d in docs) == BUDGET
    assert "def " in "".join(docs) and '"""' in "".join(docs)  # code and docstrings
    again = Corpus("stdlib", max_bytes=BUDGET)
    assert list(again.documents()) == docs
    assert again.fingerprint() == corpus.fingerprint()
    assert Corpus("stdlib", max_bytes=BUDGET // 2).fingerprint() != corpus.fingerprint()


def test_stdlib_file_list_sorted_without_tests():
    c = Corpus()
    rel = [p.relative_to(c.root).as_posix() for p in c.files]
    assert len(rel) > 100 and rel == sorted(rel)
    assert all(p.endswith(".py") for p in rel)
    assert not any(set(r.split("/")[:-1]) & STDLIB_SKIP_DIRS for r in rel)
    assert "json/decoder.py" in rel


def test_text_file_and_directory(tmp_path):
    (tmp_path / "a.txt").write_text("alpha text")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "b.md").write_text("# beta")
    (sub / "c.py").write_text("print('gamma')")
    (sub / "skip.csv").write_text("x,y")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "h.txt").write_text("hidden")
    assert list(load_documents(tmp_path / "a.txt")) == ["alpha text"]
    assert list(load_documents(tmp_path)) == ["alpha text", "# beta", "print('gamma')"]
    assert list(load_documents(tmp_path, globs=["*.csv"])) == ["x,y"]  # matched by glob: read as text


def test_jsonl_and_custom_field(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "one", "id": 1}\n\n{"text": "two"}\n{"text": ""}\n')
    assert list(load_documents(p)) == ["one", "two"]
    q = tmp_path / "e.jsonl"
    q.write_text(json.dumps({"content": "héllo ✓"}) + "\n")
    assert list(load_documents(q, text_field="content")) == ["héllo ✓"]


def test_parquet(tmp_path):
    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["first doc", "second doc", "third"], "n": [1, 2, 3]}), p)
    assert list(load_documents(p)) == ["first doc", "second doc", "third"]
    d = tmp_path / "shards"
    d.mkdir()
    pq.write_table(pa.table({"body": ["x"]}), d / "0.parquet")
    assert list(load_documents(d, globs=["*.parquet"], text_field="body")) == ["x"]


def test_byte_budget_cuts_at_a_character_boundary(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("ab✓cd")  # ✓ is 3 bytes
    assert list(load_documents(p, max_bytes=3)) == ["ab"]  # a cut character is dropped
    assert list(load_documents(p, max_bytes=5)) == ["ab✓"]


def _bad(match, source, **kw):
    with pytest.raises(ValueError, match=match):
        list(load_documents(source, **kw))


def test_bad_inputs(tmp_path):
    _bad(r"corpus path not found: .*nope", tmp_path / "nope")
    (tmp_path / "x.csv").write_text("a")
    _bad(r"x\.csv: unknown extension '\.csv'.*allowed", tmp_path / "x.csv")
    (tmp_path / "empty.txt").write_text("")
    _bad(r"empty corpus: .*empty\.txt", tmp_path / "empty.txt")
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    _bad(r"latin\.txt: not valid UTF-8", tmp_path / "latin.txt")
    (tmp_path / "m.jsonl").write_text('{"text": "ok"}\n{"body": "no"}\n')
    _bad(r"m\.jsonl:2: missing field 'text'", tmp_path / "m.jsonl")
    (tmp_path / "j.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    _bad(r"j\.jsonl:2: invalid JSON", tmp_path / "j.jsonl")
    (tmp_path / "n.jsonl").write_text('{"text": 3}\n')
    _bad(r"n\.jsonl:1: field 'text' must be a string", tmp_path / "n.jsonl")
    (tmp_path / "l.jsonl").write_text('["text"]\n')
    _bad(r"l\.jsonl:1: expected a JSON object", tmp_path / "l.jsonl")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "c.parquet")
    _bad(r"c\.parquet: no column 'text' \(columns: \['body'\]\)", tmp_path / "c.parquet")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "i.parquet")
    _bad(r"i\.parquet: column 'text' must hold strings", tmp_path / "i.parquet")
    pq.write_table(pa.table({"text": ["a", None]}), tmp_path / "null.parquet")
    _bad(r"null\.parquet: row 1: column 'text' is null", tmp_path / "null.parquet")
    (tmp_path / "g.parquet").write_bytes(b"not parquet at all")
    _bad(r"g\.parquet: not a readable Parquet file", tmp_path / "g.parquet")
    empty_dir = tmp_path / "emptydir"
    empty_dir.mkdir()
    _bad(r"emptydir has no file matching", empty_dir)
    _bad(r"max_bytes must be a positive int", "stdlib", max_bytes=0)
    _bad(r"unknown format 'csv'", "stdlib", format="csv")


# ------------------------------------------------------------------ tokenizer
def test_tokenizer_special_tokens_and_round_trip(tok, corpus):
    assert tok.get_vocab_size() == VOCAB
    assert [tok.id_to_token(i) for i in range(3)] == ["<|bos|>", EOS_TOKEN, "<|pad|>"]
    samples = list(corpus.documents())[:4] + ["héllo wörld ✓ 😀\r\n\ttabs  and   spaces\x00\u200b"]
    for text in samples:
        ids = tok.encode(text).ids
        assert tok.decode(ids) == text
    assert len(tok.encode(samples[0]).ids) < 0.75 * len(samples[0].encode())  # BPE merges do compress


def test_tokenizer_cache_loads_without_retraining(corpus, cache_dir, tok, monkeypatch):
    (path,) = cache_dir.glob("tokenizer-*/tokenizer.json")
    mtime = path.stat().st_mtime_ns
    assert json.loads((path.parent / "meta.json").read_text())["vocab_size"] == VOCAB

    def boom(*a, **k):
        raise AssertionError("retrained instead of loading the cache")

    monkeypatch.setattr(data.tokenizer, "_train_bpe", boom)  # patched where train_or_load_tokenizer reads it
    again = train_or_load_tokenizer(Corpus("stdlib", max_bytes=BUDGET), VOCAB, cache_dir)
    assert again.to_str() == tok.to_str() and path.stat().st_mtime_ns == mtime
    with pytest.raises(AssertionError, match="retrained"):  # another vocab size is another key
        train_or_load_tokenizer(corpus, VOCAB + 1, cache_dir)


def test_user_tokenizer_file(tok, tmp_path):
    p = tmp_path / "tokenizer.json"
    tok.save(str(p))
    assert train_or_load_tokenizer(None, VOCAB, tmp_path / "c", tokenizer_path=p).to_str() == tok.to_str()
    with pytest.raises(ValueError, match="more than vocab_size=300"):
        train_or_load_tokenizer(None, 300, tmp_path, tokenizer_path=p)
    with pytest.raises(ValueError, match="tokenizer file not found"):
        train_or_load_tokenizer(None, VOCAB, tmp_path, tokenizer_path=tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="bad.json: not a valid tokenizer.json"):
        train_or_load_tokenizer(None, VOCAB, tmp_path, tokenizer_path=tmp_path / "bad.json")
    with pytest.raises(ValueError, match="vocab_size must be an int >= 259"):
        train_or_load_tokenizer(["x"], 100, tmp_path)


def test_token_stream_cache_and_contents(stream, tok, corpus, cache_dir):
    assert stream.tokens.dtype == np.uint32 and stream.eos_id == 1
    docs = list(corpus.documents())
    assert stream.num_documents == len(docs)
    ds = stream.doc_starts
    second = stream.tokens[ds[1]: ds[2] - 1]
    assert tok.decode(second.tolist()) == docs[1]
    (npy,) = cache_dir.glob("tokens-*.npy")
    mtime = npy.stat().st_mtime_ns
    again = tokenize_corpus(Corpus("stdlib", max_bytes=BUDGET), tok, cache_dir)
    assert isinstance(again.tokens, np.memmap) and np.array_equal(again.tokens, stream.tokens)
    assert again.fingerprint == stream.fingerprint and npy.stat().st_mtime_ns == mtime


def test_literal_eos_text_is_not_a_separator(tok, tmp_path):
    s = tokenize_corpus([f"a {EOS_TOKEN} b", "c"], tok, tmp_path)
    assert s.num_documents == 2
    assert tok.decode(s.tokens[: s.doc_starts[1] - 1].tolist()) == f"a {EOS_TOKEN} b"


# -------------------------------------------------------------------- packing
def _check_packed(batch, eos_id):
    inp, lab, doc = batch["input_ids"], batch["labels"], batch["doc_ids"]
    assert inp.dtype == lab.dtype == doc.dtype == torch.int64 and inp.shape == lab.shape == doc.shape
    is_eos = inp == eos_id
    assert (lab[is_eos] == IGNORE_INDEX).all()
    assert torch.equal(lab[:, :-1][~is_eos[:, :-1]], inp[:, 1:][~is_eos[:, :-1]])  # shifted inputs
    assert (lab[~is_eos] != IGNORE_INDEX).all()
    assert (doc[:, 0] == 0).all() and (doc.diff(dim=1) >= 0).all()
    assert torch.equal(doc.diff(dim=1), is_eos[:, :-1].long())  # a new id right after each eos


def test_pack_windows_by_hand():
    w = np.array([[5, 6, 1, 7, 1, 1, 8]])
    b = pack_windows(w, eos_id=1)
    assert b["input_ids"].tolist() == [[5, 6, 1, 7, 1, 1]]
    assert b["labels"].tolist() == [[6, 1, -100, 1, -100, -100]]
    assert b["doc_ids"].tolist() == [[0, 0, 0, 1, 1, 2]]


def test_packed_dataset(stream):
    S = 256
    ds = PackedDataset(stream, S)
    assert len(ds) == (len(stream) - 1) // S
    item = ds[3]
    assert item["input_ids"].shape == (S,)
    assert torch.equal(item["input_ids"], torch.from_numpy(stream.tokens[3 * S: 4 * S].astype(np.int64)))
    assert item["labels"][-1] == int(stream.tokens[4 * S]) or item["input_ids"][-1] == stream.eos_id
    batch = torch.utils.data.default_collate([ds[i] for i in range(len(ds))])
    assert batch["input_ids"].shape == (len(ds), S)
    _check_packed(batch, stream.eos_id)
    assert batch["doc_ids"].max() >= 1  # some sequences do contain a document boundary
    with pytest.raises(IndexError):
        ds[len(ds)]
    with pytest.raises(ValueError, match="too short for one sequence"):
        PackedDataset(stream, len(stream))


# --------------------------------------------------------------------- loader
def _take(loader, n):
    return [loader.next_batch() for _ in range(n)]


def _same(a, b):
    return all(torch.equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)


def test_sequences_per_batch():
    assert sequences_per_batch(4096, 512) == 8
    assert sequences_per_batch(100, 512) == 1
    assert sequences_per_batch(8192, 512, world_size=4) == 4
    with pytest.raises(ValueError, match="batch_tokens must be an int >= 1"):
        sequences_per_batch(0, 512)


def test_loader_batches_packed_and_deterministic(small_stream):
    a = _take(TokenLoader(small_stream, 16, 4, seed=3), 20)
    b = _take(TokenLoader(small_stream, 16, 4, seed=3), 20)
    c = _take(TokenLoader(small_stream, 16, 4, seed=4), 20)
    assert _same(a, b) and not _same(a, c)
    for batch in a:
        assert batch["input_ids"].shape == (4, 16)
        _check_packed(batch, small_stream.eos_id)


def test_epoch_order_is_a_document_permutation(small_stream):
    L = TokenLoader(small_stream, 16, 4, seed=0)
    v0, v1 = L.virtual_stream(0), L.virtual_stream(1)
    assert not np.array_equal(v0, v1) and not np.array_equal(v0, small_stream.tokens)

    def docs(t):
        return sorted(tuple(d) for d in np.split(t, np.flatnonzero(t == 1)[:-1] + 1))

    assert docs(v0) == docs(v1) == docs(small_stream.tokens)
    assert np.array_equal(TokenLoader(small_stream, 16, 4, shuffle=False).virtual_stream(5), small_stream.tokens)


def test_loader_reads_the_virtual_stream_contiguously_across_set_shape(small_stream):
    L = TokenLoader(small_stream, 16, 4, seed=1)
    v = L.virtual_stream(0)
    seen = [b["input_ids"].flatten() for b in _take(L, 5)]
    L.set_shape(40, 2)
    seen += [b["input_ids"].flatten() for b in _take(L, 3)]
    L.set_shape(7, 3)
    seen += [b["input_ids"].flatten() for b in _take(L, 3)]
    flat = torch.cat(seen).numpy()
    assert L.epoch == 0 and L.position == flat.size == 5 * 64 + 3 * 80 + 3 * 21
    assert np.array_equal(flat, v[: flat.size])  # no token skipped or repeated
    assert L.state_dict()["seq_len"] == 7 and L.state_dict()["batch_size"] == 3


def test_resume_is_exact_across_epoch_boundary_and_shape_change(small_stream):
    ref = TokenLoader(small_stream, 32, 8, seed=7)
    states, batches = [], []
    shape_changed = None
    while ref.epoch < 2 or states[-4]["epoch"] < 2:  # into epoch 2, and 4 batches beyond its start
        if ref.epoch == 1 and shape_changed is None and ref.position > 0:
            ref.set_shape(24, 5)
            shape_changed = len(batches)
        states.append(json.loads(json.dumps(ref.state_dict())))  # JSON-serialisable
        batches.append(ref.next_batch())
    # batch i is the first of a new epoch when the state after it has a larger epoch
    firsts = [i for i in range(len(states) - 1) if states[i + 1]["epoch"] > states[i]["epoch"]]
    assert len(firsts) == 2
    for i in (0, shape_changed - 1, shape_changed, *firsts, *(f - 1 for f in firsts), *(f + 1 for f in firsts)):
        fresh = TokenLoader(small_stream, 100, 1, seed=0)  # shape, seed and position come from the state
        fresh.load_state_dict(states[i])
        n = min(4, len(batches) - i, shape_changed - i if i < shape_changed else 4)
        got = _take(fresh, n)
        if i < shape_changed:  # replay the stage change too
            fresh.set_shape(24, 5)
            got += _take(fresh, 4 - n)
        assert _same(got, batches[i: i + len(got)]), i
    assert ref.state_dict()["consumed_tokens"] > len(small_stream)


def test_rank_sharding_is_disjoint_and_matches_single_process(small_stream):
    W, B, S = 3, 2, 16
    single = TokenLoader(small_stream, S, W * B, seed=5)
    ranks = [TokenLoader(small_stream, S, B, seed=5, rank=r, world_size=W) for r in range(W)]
    n_epoch = (len(small_stream) - 1) // (S * W * B)
    for _ in range(n_epoch + 3):  # across an epoch boundary
        whole = single.next_batch()
        parts = [r.next_batch() for r in ranks]
        for k in whole:
            assert torch.equal(torch.cat([p[k] for p in parts]), whole[k])
    expected = single.state_dict() | {"world_size": W, "batch_size": B}
    assert all(r.state_dict() == expected for r in ranks)  # the state is global: save it from any rank
    # disjoint: within one step the ranks' windows start at different stream positions
    L = [TokenLoader(small_stream, S, B, seed=5, rank=r, world_size=W, shuffle=False) for r in range(W)]
    firsts = [b["input_ids"] for b in (x.next_batch() for x in L)]
    rows = {tuple(row.tolist()) for f in firsts for row in f}
    assert len(rows) == W * B


def test_loader_bad_arguments(small_stream, stream):
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size\)"):
        TokenLoader(small_stream, 16, 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="one step needs"):
        TokenLoader(small_stream, len(small_stream), 1)
    L = TokenLoader(small_stream, 16, 2)
    with pytest.raises(ValueError, match="seq_len must be an int >= 1"):
        L.set_shape(0, 2)
    with pytest.raises(ValueError, match="saved over another token stream"):
        TokenLoader(stream, 16, 2).load_state_dict(L.state_dict())
    with pytest.raises(ValueError, match="missing"):
        L.load_state_dict({"epoch": 0})
    with pytest.raises(ValueError, match="must end with the eos id"):
        TokenStream(np.array([5, 6], dtype=np.uint32), eos_id=1)


def test_mtp_labels_by_hand():
    b = pack_windows(np.array([[5, 6, 1, 7, 8, 1, 9]]), eos_id=1)
    assert b["labels"].tolist() == [[6, 1, -100, 8, 1, -100]]
    assert mtp_labels(b["labels"]).tolist() == [[1, -100, -100, 1, -100]]


def test_real_batch_feeds_the_debug_model(stream):
    from model import ModelArgs, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelArgs.flavor("debug"))
    assert model.args.vocab_size >= VOCAB
    batch = TokenLoader(stream, 64, 2, seed=0).next_batch()
    with torch.no_grad():  # forward only: a backward costs seconds on a loaded 2-core machine
        hidden = model.forward_hidden(batch["input_ids"], doc_ids=batch["doc_ids"])
        logits = model.lm_head(model.norm(hidden))
        mtp = model.mtp_logits(hidden, batch["input_ids"], batch["doc_ids"])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
    mtp_loss = torch.nn.functional.cross_entropy(mtp.flatten(0, 1), mtp_labels(batch["labels"]).flatten())
    assert torch.isfinite(loss) and torch.isfinite(mtp_loss)
