"""The crash-safe checkpoint store: round trips, corruption, crashes, retention, modes."""

import json
import math
import os
import random
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from cluster.checkpoint import store as ckpt
from cluster.checkpoint.store import (checkpoint_dir_name, cleanup_debris, flatten_state, latest_checkpoint,
                                list_checkpoints, load_checkpoint, mark_good, rng_state, save_checkpoint,
                                set_rng_state, unflatten_state, verify_checkpoint)
from model.optim import CombinedOptimizer, OptimConfig

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- helpers
def assert_same(a, b, path="root"):
    """Exact structural equality: same types (tuple vs list, int vs float), same tensors."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), path
        for (ka, va), kb in zip(a.items(), b.keys()):
            assert type(ka) is type(kb), f"{path}: key {ka!r}"
            assert_same(va, b[kb], f"{path}/{ka}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}/{i}")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), path
    elif isinstance(a, float):
        assert a == b and math.copysign(1, a) == math.copysign(1, b), path
    else:
        assert a == b, path


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.proj = nn.Linear(6, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.embed.weight  # tied: two state_dict entries share storage
        self.register_buffer("router_bias", torch.zeros(4))

    def forward(self, idx):
        return self.head(self.norm(torch.relu(self.proj(self.embed(idx)))))


def train(model, opt, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, 11, (3, 5), generator=g)
        loss = nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()


def small_ckpt(root, step, keep=3, **meta):
    return save_checkpoint(root, step, {"model": {"w": torch.full((3,), float(step))}}, {"note": "x", **meta},
                           keep=keep)


def steps_in(root):
    return [ckpt.checkpoint_step(p) for p in list_checkpoints(root)]


def flip_byte(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------- round trips
def test_round_trip_tensors_and_meta(tmp_path):
    torch.manual_seed(0)
    model = Tiny()
    base = torch.arange(24.0).reshape(4, 6)
    extra = {
        "transposed": base.t(),                    # non-contiguous
        "slice": base[1:3],                        # view of a larger storage
        "alias": base,                             # shares storage with the two above
        "scalar": torch.tensor(7.5),
        "bf16": torch.randn(5, dtype=torch.bfloat16),
        "mask": torch.tensor([True, False, True]),
        "ids": torch.arange(5, dtype=torch.int64),
        "empty": torch.empty(0, 3),
    }
    meta = {"loader": {"shard": 3, "offset": 12345}, "curriculum": {"stage": "long-ctx", "index": 2},
            "config": {"dim": 6, "flavor": "tiny", "betas": [0.9, 0.95]}, "loss": 2.5}
    path = save_checkpoint(tmp_path, 123, {"model": model.state_dict(), "extra": extra}, meta)
    assert path == tmp_path / "step-00000123"
    groups, meta2 = load_checkpoint(path)
    assert set(groups) == {"model", "extra"}
    assert meta2 == {**meta, "step": 123}
    sd = model.state_dict()
    assert set(groups["model"]) == set(sd)
    for k, v in sd.items():
        assert_same(v.contiguous(), groups["model"][k], k)
    for k, v in extra.items():
        assert_same(v.contiguous(), groups["extra"][k], k)
    fresh = Tiny()
    fresh.load_state_dict(groups["model"])
    idx = torch.randint(0, 11, (2, 4))
    assert torch.equal(fresh(idx), model(idx))
    assert verify_checkpoint(path) == []


def test_flatten_state_round_trips_exotic_state():
    shared = torch.randn(3)
    obj = {
        "state": {0: {"step": torch.tensor(4.0), "buf": shared, "count": 7}, 1: {"buf_alias": shared}},
        "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "nested": ((1, 2.0), [3, (4,)]), "params": [0, 1],
                          "foreach": None, "fused": False, "name": "decay", "eps": 1e-20}],
        "floats": [float("nan"), float("inf"), float("-inf"), -0.0, 0.1, 1.0, 2**70],
        (1, "a"): "tuple key",
        2.5: "float key",
        None: "none key",
        True: "bool key",
        "0": "string zero next to int key 0",
        0: {"int": 0},
        "empty": {"d": {}, "l": [], "t": ()},
    }
    tensors, skeleton = flatten_state(obj)
    text = json.dumps(skeleton, allow_nan=False)  # strict JSON
    back = unflatten_state(tensors, json.loads(text))
    assert_same(obj, back)
    assert back["state"][0]["buf"] is back["state"][1]["buf_alias"]  # stored once, shared again
    assert len(tensors) == 2 and "state/0/step" in tensors


@pytest.mark.parametrize("bad", [{"x": torch.Size([2])}, {"x": {1, 2}}, {"x": object()}, {torch.tensor(1): 1},
                                 {"x": [1, {"y": b"bytes"}]}])
def test_flatten_state_rejects_unsupported_types(bad):
    with pytest.raises(TypeError, match="flatten_state: unsupported"):
        flatten_state(bad)


def test_unflatten_state_errors():
    tensors, skeleton = flatten_state({"a": torch.ones(1)})
    with pytest.raises(ValueError, match="missing"):
        unflatten_state({}, skeleton)
    with pytest.raises(ValueError, match="skeleton"):
        unflatten_state(tensors, {"root": 1})


class Custom(torch.optim.Optimizer):
    """A momentum optimizer whose state has ints, floats, lists of tuples, bools and None.

    (No strings in per-parameter state: torch's ``Optimizer.load_state_dict`` mangles
    them; strings in param groups are fine and covered.)
    """

    def __init__(self, params, lr=0.1, schedule=((0, 1.0), (10, 0.5))):
        super().__init__(params, dict(lr=lr, schedule=tuple(schedule), tag="custom", clip=None))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st.update(k=0, mom=torch.zeros_like(p), history=[], last=None, ok=True)
                st["k"] += 1
                st["mom"].mul_(0.9).add_(p.grad)
                st["history"].append((st["k"], float(p.grad.norm())))
                st["last"] = float(p.grad.abs().max())
                p.add_(st["mom"], alpha=-g["lr"])


def _opt_round_trip(tmp_path, make_opt):
    torch.manual_seed(1)
    model = Tiny()
    opt = make_opt(model)
    train(model, opt, 3)
    opt_tensors, skeleton = flatten_state(opt.state_dict())
    path = save_checkpoint(tmp_path, 3, {"model": model.state_dict(), "optimizer": opt_tensors},
                           {"optimizer_skeleton": skeleton})
    groups, meta = load_checkpoint(path)
    model2 = Tiny()
    model2.load_state_dict(groups["model"])
    opt2 = make_opt(model2)
    restored = unflatten_state(groups["optimizer"], meta["optimizer_skeleton"])
    assert_same(opt.state_dict(), restored)
    opt2.load_state_dict(restored)
    assert_same(opt.state_dict(), opt2.state_dict())
    # training continues identically
    train(model, opt, 2, seed=5)
    train(model2, opt2, 2, seed=5)
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k


def test_adamw_state_round_trip(tmp_path):
    _opt_round_trip(tmp_path, lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, betas=(0.8, 0.95)))


def test_custom_optimizer_state_round_trip(tmp_path):
    _opt_round_trip(tmp_path, lambda m: Custom(m.parameters()))


def test_project_combined_optimizer_round_trip(tmp_path):
    # Muon (nested-tuple ns_steps in its param groups) + AdamW, as used by the trainer
    _opt_round_trip(tmp_path, lambda m: CombinedOptimizer(m, OptimConfig(lr=1e-2, warmup_steps=1)))


def test_rng_state_round_trip_through_checkpoint(tmp_path):
    np = pytest.importorskip("numpy")
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gauss_next
    np.random.standard_normal()  # leaves a cached gaussian
    torch.randn(3)
    state = rng_state()
    json.dumps(state, allow_nan=False)
    expected = (random.random(), random.gauss(0, 1), np.random.rand(4).tolist(), np.random.standard_normal(),
                torch.rand(5), torch.randn(2))
    path = save_checkpoint(tmp_path, 1, {}, {"rng": state})
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    _, meta = load_checkpoint(path)
    set_rng_state(meta["rng"])
    got = (random.random(), random.gauss(0, 1), np.random.rand(4).tolist(), np.random.standard_normal(),
           torch.rand(5), torch.randn(2))
    assert got[:4] == expected[:4]
    assert torch.equal(got[4], expected[4]) and torch.equal(got[5], expected[5])


def test_set_rng_state_validates():
    with pytest.raises(ValueError, match="rng_state"):
        set_rng_state({"python": {}})
    with pytest.raises(ValueError, match="malformed"):
        set_rng_state({"format": "tide-rng/1", "torch": ""})
    state = rng_state()
    bogus_cuda = {**state, "cuda": ["AAAA"] * (torch.cuda.device_count() + 1)}
    before = torch.get_rng_state()
    torch.rand(1)
    with pytest.raises(ValueError, match="CUDA"):
        set_rng_state(bogus_cuda)
    with pytest.warns(UserWarning, match="CUDA"):
        set_rng_state(bogus_cuda, strict=False)
    assert torch.equal(torch.get_rng_state(), before)  # the rest was restored


# ---------------------------------------------------------------- corruption
@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "meta.json"])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_flipped_byte_is_a_clear_error(tmp_path, name, where):
    path = save_checkpoint(tmp_path, 5, {"model": {"w": torch.randn(8, 8)}, "optimizer": {"m": torch.randn(8)}},
                           {"loader": 1})
    f = path / name
    offset = {"first": 0, "middle": f.stat().st_size // 2, "last": -1}[where]
    flip_byte(f, offset)
    with pytest.raises(ValueError, match=rf"{path}.*{name}.*corrupt.*sha256"):
        load_checkpoint(path)
    problems = verify_checkpoint(path)
    assert len(problems) == 1 and name in problems[0]


def test_truncated_missing_and_manifest_corruption(tmp_path):
    path = small_ckpt(tmp_path, 1)
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-3])
    with pytest.raises(ValueError, match=r"model\.safetensors has size"):
        load_checkpoint(path)
    f.unlink()
    with pytest.raises(ValueError, match=r"model\.safetensors is missing"):
        load_checkpoint(path)
    path = small_ckpt(tmp_path, 2)
    (path / "MANIFEST.json").write_text("{not json")
    with pytest.raises(ValueError, match="MANIFEST.json is unreadable"):
        load_checkpoint(path)


def test_missing_manifest_is_a_clear_error(tmp_path):
    path = small_ckpt(tmp_path, 4)
    (path / "MANIFEST.json").unlink()
    with pytest.raises(ValueError) as e:
        load_checkpoint(path)
    assert str(e.value) == f"checkpoint {path} has no MANIFEST.json (incomplete write?)"
    assert verify_checkpoint(path) == [str(e.value)]
    assert latest_checkpoint(tmp_path) is None
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "step-00000999")


def test_extra_files_are_ignored(tmp_path):
    path = small_ckpt(tmp_path, 4)
    (path / "notes.txt").write_text("hello")
    mark_good(path)
    groups, meta = load_checkpoint(path)
    assert torch.equal(groups["model"]["w"], torch.full((3,), 4.0)) and meta["step"] == 4


def test_cli_verify(tmp_path, capsys):
    good = small_ckpt(tmp_path, 1)
    bad = small_ckpt(tmp_path, 2)
    flip_byte(bad / "meta.json", 3)
    assert ckpt.main(["verify", str(good)]) == 0
    assert ckpt.main(["verify", str(good), str(bad)]) == 1
    out = capsys.readouterr().out
    assert "OK" in out and "meta.json is corrupt" in out
    assert ckpt.main(["latest", str(tmp_path)]) == 0


# ---------------------------------------------------------------- crashes
def test_exception_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    prev = small_ckpt(tmp_path, 10)

    def boom(*a, **k):
        raise OSError("disk full while writing the manifest")

    monkeypatch.setattr(ckpt, "_write_manifest", boom)
    with pytest.raises(OSError, match="disk full"):
        small_ckpt(tmp_path, 20)
    assert latest_checkpoint(tmp_path) == prev
    assert sorted(p.name for p in tmp_path.iterdir()) == [prev.name]  # the temp dir was removed
    assert load_checkpoint(prev)[1]["step"] == 10


def test_hard_crash_mid_save_leaves_only_debris(tmp_path):
    prev = small_ckpt(tmp_path, 10)
    # a process that dies (no cleanup, no finally) after the tensors are written, before the manifest
    script = textwrap.dedent(f"""
        import os, torch
        from cluster.checkpoint import store as ckpt
        def die(*a, **k):
            os._exit(17)
        ckpt._write_manifest = die
        ckpt.save_checkpoint({str(tmp_path)!r}, 20, {{"model": {{"w": torch.ones(1000)}}}}, {{}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 17, proc.stderr
    debris = [p for p in tmp_path.iterdir() if p.name != prev.name]
    assert len(debris) == 1 and debris[0].name.startswith(".tmp-step-00000020")
    assert (debris[0] / "model.safetensors").is_file() and not (debris[0] / "MANIFEST.json").exists()
    assert latest_checkpoint(tmp_path) == prev
    assert verify_checkpoint(prev) == []
    assert cleanup_debris(tmp_path) == debris
    assert [p.name for p in tmp_path.iterdir()] == [prev.name]
    assert cleanup_debris(tmp_path) == []
    assert small_ckpt(tmp_path, 20) == latest_checkpoint(tmp_path)


def test_latest_ignores_debris_and_uncommitted(tmp_path):
    assert latest_checkpoint(tmp_path / "nope") is None
    assert cleanup_debris(tmp_path / "nope") == []
    a = small_ckpt(tmp_path, 1)
    (tmp_path / ".tmp-step-00000009-abc").mkdir()
    (tmp_path / "step-00000007").mkdir()  # no manifest: never committed by us
    (tmp_path / "unrelated").mkdir()
    assert latest_checkpoint(tmp_path) == a
    assert list_checkpoints(tmp_path) == [a]
    # a committed-looking but damaged newest one is skipped (with a warning)
    b = small_ckpt(tmp_path, 2)
    (b / "meta.json").write_text("{}")
    with pytest.warns(UserWarning, match="damaged"):
        assert latest_checkpoint(tmp_path) == a


# ---------------------------------------------------------------- retention, names
def test_retention_keeps_newest_and_newest_good(tmp_path):
    for s in range(1, 4):
        small_ckpt(tmp_path, s)
    mark_good(tmp_path / checkpoint_dir_name(2))
    for s in range(4, 7):
        small_ckpt(tmp_path, s)
    assert steps_in(tmp_path) == [2, 4, 5, 6]  # 3 newest + newest GOOD (older than them)
    assert latest_checkpoint(tmp_path, good_only=True) == tmp_path / "step-00000002"
    mark_good(tmp_path / checkpoint_dir_name(5))
    small_ckpt(tmp_path, 7)
    assert steps_in(tmp_path) == [5, 6, 7]  # 2 is no longer the newest GOOD
    assert latest_checkpoint(tmp_path, good_only=True) == tmp_path / "step-00000005"
    small_ckpt(tmp_path, 8, keep=1)
    assert steps_in(tmp_path) == [5, 8]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_retention_never_deletes_the_checkpoint_just_written(tmp_path):
    for s in (10, 11, 12):
        small_ckpt(tmp_path, s)
    small_ckpt(tmp_path, 5, keep=2)  # e.g. replayed after a rollback: older than the rest
    assert steps_in(tmp_path) == [5, 11, 12]


def test_mark_good_requires_a_committed_checkpoint(tmp_path):
    (tmp_path / "step-00000001").mkdir()
    with pytest.raises(ValueError, match="no MANIFEST.json"):
        mark_good(tmp_path / "step-00000001")
    p = small_ckpt(tmp_path, 2)
    assert mark_good(p) == mark_good(p) == p / "GOOD"  # idempotent
    assert verify_checkpoint(p) == []


def test_directory_names_sort_by_step(tmp_path):
    assert checkpoint_dir_name(123) == "step-00000123"
    steps = [9, 10, 100, 1234, 99_999_999]
    for s in reversed(steps):
        small_ckpt(tmp_path, s, keep=10)
    names = sorted(p.name for p in tmp_path.iterdir())  # plain name order is step order below 10**8
    assert [ckpt.checkpoint_step(n) for n in names] == steps
    small_ckpt(tmp_path, 123_456_789, keep=10)  # 9 digits: ordering uses the parsed step
    assert steps_in(tmp_path) == [*steps, 123_456_789]
    assert latest_checkpoint(tmp_path) == tmp_path / "step-123456789"


def test_permissions_do_not_depend_on_umask(tmp_path):
    old = os.umask(0o077)
    try:
        path = small_ckpt(tmp_path / "new-root", 1)
        mark_good(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o755
    files = list(path.iterdir())
    assert {f.name for f in files} == {"model.safetensors", "meta.json", "MANIFEST.json", "GOOD"}
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f.name


def test_manifest_lists_every_other_file(tmp_path):
    path = save_checkpoint(tmp_path, 1, {"model": {"w": torch.ones(2)}, "router_bias": {"b": torch.zeros(3)}}, {})
    manifest = json.loads((path / "MANIFEST.json").read_text())
    assert set(manifest["files"]) == {"model.safetensors", "router_bias.safetensors", "meta.json"}
    assert manifest["step"] == 1 and manifest["groups"] == ["model", "router_bias"]
    for name, entry in manifest["files"].items():
        assert entry["size"] == (path / name).stat().st_size and len(entry["sha256"]) == 64


# ---------------------------------------------------------------- input validation
@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(step=-1), ValueError, "step"),
    (dict(step=True), ValueError, "step"),
    (dict(keep=0), ValueError, "keep"),
    (dict(tensors={"../evil": {}}), ValueError, "group name"),
    (dict(tensors={".hidden": {}}), ValueError, "group name"),
    (dict(tensors={"model": {"w": [1, 2]}}), TypeError, "not a Tensor"),
    (dict(meta={"x": object()}), TypeError, "JSON"),
    (dict(meta={"step": 2}), ValueError, "differs"),
])
def test_invalid_arguments_write_nothing(tmp_path, kwargs, exc, match):
    args = dict(root=tmp_path, step=1, tensors={"model": {"w": torch.ones(1)}}, meta={}) | kwargs
    with pytest.raises(exc, match=match):
        save_checkpoint(**args)
    assert list(tmp_path.iterdir()) == []


def test_existing_step_needs_overwrite(tmp_path):
    first = small_ckpt(tmp_path, 3)
    mark_good(first)
    with pytest.raises(FileExistsError):
        small_ckpt(tmp_path, 3)
    assert verify_checkpoint(first) == []
    new = save_checkpoint(tmp_path, 3, {"model": {"w": torch.zeros(2)}}, {"replayed": True}, overwrite=True)
    assert new == first
    groups, meta = load_checkpoint(new)
    assert meta["replayed"] is True and torch.equal(groups["model"]["w"], torch.zeros(2))
    assert not (new / "GOOD").exists()
    assert [p.name for p in tmp_path.iterdir()] == [new.name]
