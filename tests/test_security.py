"""Secure defaults: nothing is ever unpickled, YAML only through a safe loader,
secrets (the Serve API key, the Ray auth token) never appear in logs, output or run files.

Every loader that takes a user path gets a malicious pickle (a ``__reduce__`` that creates a
marker file) in place of a legitimate file: it must refuse with an error naming the file and
what is allowed, and the marker must never appear. ``test_the_payload_is_live`` proves the
payload does run when unpickled, so these tests can fail. Add a loader to ``PICKLE_LOADERS``
(a name and a function ``(env) -> None`` that hands the bad file over).
"""

from __future__ import annotations

import ast
import json
import logging
import os
import pickle
import shlex
import shutil
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from cluster.checkpoint import store as ckpt

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- the payload
class _Evil:
    """Unpickling this runs ``os.system("touch <marker>")``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def write_evil(path: Path, marker: Path, kind: str = "torch") -> Path:
    """A malicious file at ``path``: ``torch.save``'s zip format (``kind="torch"``) or a bare pickle."""
    path.parent.mkdir(parents=True, exist_ok=True)
    obj = {"model.embed.weight": torch.zeros(2), "payload": _Evil(marker)}
    if kind == "torch":
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=4))
    return path


@pytest.mark.parametrize("kind", ["torch", "pickle"])
def test_the_payload_is_live(tmp_path, kind):
    """The malicious file really runs code when unpickled: the refusals below are meaningful."""
    marker = tmp_path / "pwned"
    f = write_evil(tmp_path / "evil.pt", marker, kind)
    if kind == "torch":
        torch.load(f, weights_only=False)  # noqa: S614 - the point of this test
    else:
        pickle.loads(f.read_bytes())  # noqa: S301
    assert marker.exists()
    with pytest.raises(pickle.UnpicklingError):  # and torch's safe mode refuses it too
        torch.load(f, weights_only=True)


# ------------------------------------------------------------ tiny artefacts
def tiny_train_config(tmp: Path, name: str) -> dict:
    """A 2-step single-process run on 40 KB of stdlib source (checkpoint at the end)."""
    return {
        "name": name, "storage_path": str(tmp), "seed": 0,
        "model": {"flavor": "debug", "hidden_size": 32, "moe_intermediate_size": 32, "q_lora_rank": 16,
                  "o_lora_rank": 16, "index_n_heads": 2, "index_head_dim": 16, "num_attention_heads": 2,
                  "o_groups": 1, "head_dim": 32, "num_hidden_layers": 2, "partial_rotary_factor": 0.5,
                  "rope_parameters": {"main": {"rope_type": "default", "rope_theta": 10000.0,
                                               "partial_rotary_factor": 0.5},
                                      "compress": {"rope_type": "default", "rope_theta": 160000.0,
                                                   "partial_rotary_factor": 0.5}}},
        "data": {"source": "stdlib", "vocab_size": 300, "max_bytes": 40_000},
        "optim": {"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 1},
        "checkpoint": {"every_steps": 2, "keep": 2},
        "curriculum": [{"name": "a", "seq_len": 32, "batch_tokens": 64, "steps": 2, "attention": "dense"}],
    }


RAY_TOKEN = "raytok-9f3c1d7e2b5a4680secret"
API_KEY = "tidekey-5e1b7c9d0a2f4e63secret"


@dataclass
class Run:
    """A finished tiny training run (made with secrets planted in the environment) and its logs."""

    dir: Path
    cfg: dict
    output: str  # stdout + stderr + log records of the run


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    """One tiny training run, with ``RAY_AUTH_TOKEN`` and ``TIDE_API_KEY`` set, everything it printed
    or logged captured."""
    import contextlib
    import io

    from cluster.training.config import load_train_config
    from cluster.training.trainer import train

    tmp = tmp_path_factory.mktemp("runs")
    cfg = tiny_train_config(tmp, "tiny")
    records: list[str] = []

    class _Keep(logging.Handler):
        def emit(self, record):
            records.append(self.format(record))

    handler = _Keep(level=logging.DEBUG)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_TOKEN", RAY_TOKEN)
        mp.setenv("TIDE_API_KEY", API_KEY)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                train(load_train_config(cfg), in_process=True, progress="none")
        finally:
            root.removeHandler(handler)
            root.setLevel(old_level)
    return Run(tmp / "tiny", cfg, out.getvalue() + "\n".join(records))


@pytest.fixture(scope="module")
def hf_dir(run, tmp_path_factory) -> Path:
    """The run's checkpoint exported as an HF directory (with its tokenizer files)."""
    from cluster.checkpoint.models import export_hf

    out = tmp_path_factory.mktemp("hf") / "model"
    export_hf(run.dir, out)
    return out


def _rewrite_manifest(ck: Path) -> None:
    """Make MANIFEST.json match the files as they are now (an attacker who controls the directory can)."""
    m = json.loads((ck / ckpt.MANIFEST).read_text())
    for name in list(m["files"]):
        data = (ck / name).read_bytes()
        import hashlib

        m["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ck / ckpt.MANIFEST).write_text(json.dumps(m))


@dataclass
class Env:
    """What a loader case gets: a scratch dir, the marker path, the payload kind and the legit artefacts."""

    tmp: Path
    marker: Path
    kind: str
    run: Run
    hf: Path

    def evil(self, path: Path) -> Path:
        return write_evil(path, self.marker, self.kind)

    def bad_run(self, group: str = "stage0-ep0", fix_manifest: bool = True) -> Path:
        """A copy of the run whose latest checkpoint's ``<group>.safetensors`` is the malicious file."""
        dst = self.tmp / "badrun"
        shutil.copytree(self.run.dir, dst)
        ck = ckpt.list_checkpoints(dst / "checkpoints")[-1]
        for old in ckpt.list_checkpoints(dst / "checkpoints")[:-1]:  # no fallback to an older good one
            shutil.rmtree(old)
        self.evil(ck / f"{group}.safetensors")
        if fix_manifest:
            _rewrite_manifest(ck)
        return dst

    def bad_ckpt(self, group: str = "stage0-ep0", fix_manifest: bool = True) -> Path:
        return ckpt.list_checkpoints(self.bad_run(group, fix_manifest) / "checkpoints")[-1]

    def bad_hf(self, what: str) -> Path:
        """A copy of the HF directory with a malicious weights or tokenizer file."""
        dst = self.tmp / "badhf"
        shutil.copytree(self.hf, dst)
        if what == "bin_only":  # HF's legacy pickle format instead of safetensors
            (dst / "model.safetensors").unlink()
            self.evil(dst / "pytorch_model.bin")
        elif what == "safetensors_name":  # a pickle saved under the safetensors name
            self.evil(dst / "model.safetensors")
        elif what == "index_bin_shard":  # an index that points at a pickle shard
            (dst / "model.safetensors").unlink()
            self.evil(dst / "model-00001-of-00001.bin")
            (dst / "model.safetensors.index.json").write_text(
                json.dumps({"weight_map": {"lm_head.weight": "model-00001-of-00001.bin"}}))
        elif what == "tokenizer":
            self.evil(dst / "tokenizer.json")
        else:
            raise AssertionError(what)
        return dst


# ------------------------------------------------------------- every loader
def _load_checkpoint(env):
    ckpt.load_checkpoint(env.bad_ckpt())


def _load_legacy_checkpoint_optimizer(env):
    """A one-process checkpoint of the earlier format (model + optimizer groups), its optimizer a pickle."""
    from cluster.checkpoint.sharded import load_pipeline_full

    ck = env.tmp / "legacy" / "step-00000004"
    shutil.copytree(Path(__file__).parent / "fixtures" / "legacy" / "single" / "checkpoints" / ck.name, ck)
    env.evil(ck / "optimizer.safetensors")
    _rewrite_manifest(ck)
    load_pipeline_full(ck)


def _load_checkpoint_manifest_not_rewritten(env):
    ckpt.load_checkpoint(env.bad_ckpt(fix_manifest=False))


def _verify_checkpoint(env):  # `python -m cluster.checkpoint verify` and tide serve's pre-flight
    problems = ckpt.verify_checkpoint(env.bad_ckpt())
    raise ValueError("; ".join(problems) or "no problem found")


def _pipeline_checkpoint(env):  # the trainer's resume and every layout conversion go through this
    from cluster.checkpoint.sharded import load_pipeline_full

    load_pipeline_full(env.bad_ckpt())


def _trainer_resume(env):  # the trainer resuming a run whose newest checkpoint holds a pickle
    from cluster.training.config import load_train_config
    from cluster.training.trainer import Trainer

    bad = env.bad_run()
    cfg = {**env.run.cfg, "name": bad.name, "storage_path": str(bad.parent)}
    tr = Trainer(load_train_config(cfg), in_process=True, progress="none", log=lambda m: None)
    try:
        tr.setup()
    finally:
        tr.shutdown()


def _load_trained_model(env):
    from cluster.checkpoint.models import load_trained_model

    load_trained_model(env.bad_run())


def _tide_export(env):
    _cli(["export", str(env.bad_run()), str(env.tmp / "out")])


def _tide_export_pt_file(env):
    _cli(["export", str(env.evil(env.tmp / "model.pt")), str(env.tmp / "out")])


def _tide_serve_preflight(env):
    from comm.launch import free_port

    _cli(["serve", str(env.bad_run()), "--port", str(free_port())])


def _tide_serve_pt_file(env):
    from comm.launch import free_port

    _cli(["serve", str(env.evil(env.tmp / "model.pt")), "--port", str(free_port())])


def _serve_loader_run(env):  # what the Serve replica runs (deploy.serve:build -> load_engine)
    from deploy.loader import load_engine

    load_engine(env.bad_run())


def _serve_build_pt_file(env):  # serve run deploy.serve:build path=...
    from deploy.serve import build

    build({"path": str(env.evil(env.tmp / "model.pt"))})


def _load_hf_bin_only(env):
    from model import load_hf

    load_hf(env.bad_hf("bin_only"))


def _load_hf_pickle_named_safetensors(env):
    from model import load_hf

    load_hf(env.bad_hf("safetensors_name"))


def _load_hf_index_bin_shard(env):
    from model import load_hf

    load_hf(env.bad_hf("index_bin_shard"))


def _serve_hf_tokenizer(env):
    from deploy.loader import load_engine

    load_engine(env.bad_hf("tokenizer"))


def _training_tokenizer(env):  # data.tokenizer in a training config
    from cluster.data import train_or_load_tokenizer

    train_or_load_tokenizer(None, 300, env.tmp / "cache", tokenizer_path=env.evil(env.tmp / "tokenizer.json"))


def _token_cache(env):  # the token stream cache (.npy) of cluster/data.py holding a pickled object array
    from cluster.data import tokenize_corpus, train_or_load_tokenizer

    tok = train_or_load_tokenizer(["def f(x):\n    return x\n"] * 50, 300, env.tmp / "tok", progress=False)
    cache = env.tmp / "cache"
    tokenize_corpus(["abc"], tok, cache, progress=False)
    (npy,) = cache.glob("tokens-*.npy")
    np.save(npy, np.array([_Evil(env.marker)], dtype=object), allow_pickle=True)
    tokenize_corpus(["abc"], tok, cache, progress=False)


def _training_config(env):
    from cluster.training.config import load_train_config

    load_train_config(env.evil(env.tmp / "train.yaml"))


def _model_yaml(env):
    from model import ModelArgs

    ModelArgs.from_yaml(env.evil(env.tmp / "model.yaml"))


def _topology_yaml(env):
    from cluster.launch.topology import load_topology

    load_topology(env.evil(env.tmp / "topology.yaml"))


def _link_model(env):
    from cluster.launch.link_model import load_link_model

    load_link_model(env.evil(env.tmp / "links.yaml"))


def _cli(argv):
    """Run the tide CLI in process; a refusal (exit 2) becomes a ValueError with its stderr."""
    import contextlib
    import io

    from cli.main import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(argv)
    if rc != 0:
        raise ValueError(err.getvalue())
    raise AssertionError(f"tide {argv[0]} accepted the malicious file")


PICKLE_LOADERS = {
    "checkpoint.load_checkpoint (stage0-ep0.safetensors)": _load_checkpoint,
    "legacy one-process checkpoint (optimizer.safetensors)": _load_legacy_checkpoint_optimizer,
    "checkpoint.load_checkpoint (manifest not updated)": _load_checkpoint_manifest_not_rewritten,
    "checkpoint.verify_checkpoint": _verify_checkpoint,
    "pipeline_checkpoint.load_pipeline_full": _pipeline_checkpoint,
    "Trainer resume": _trainer_resume,
    "trainer.load_trained_model": _load_trained_model,
    "tide export RUN": _tide_export,
    "tide export FILE.pt": _tide_export_pt_file,
    "tide serve RUN (pre-flight)": _tide_serve_preflight,
    "tide serve FILE.pt": _tide_serve_pt_file,
    "deploy.loader.load_engine RUN": _serve_loader_run,
    "deploy.serve:build path=FILE.pt": _serve_build_pt_file,
    "model.load_hf pytorch_model.bin": _load_hf_bin_only,
    "model.load_hf pickle as model.safetensors": _load_hf_pickle_named_safetensors,
    "model.load_hf index -> .bin shard": _load_hf_index_bin_shard,
    "deploy.loader.load_engine HF tokenizer.json": _serve_hf_tokenizer,
    "data.tokenizer file": _training_tokenizer,
    "data token cache .npy": _token_cache,
    "training config": _training_config,
    "model YAML": _model_yaml,
    "topology YAML": _topology_yaml,
    "link model file": _link_model,
}



@pytest.mark.parametrize("kind", ["torch", "pickle"])
@pytest.mark.parametrize("loader", list(PICKLE_LOADERS))
def test_malicious_pickle_is_refused_and_runs_nothing(loader, kind, run, hf_dir, tmp_path):
    marker = tmp_path / "pwned"
    env = Env(tmp_path / "scratch", marker, kind, run, hf_dir)
    env.tmp.mkdir()
    with pytest.raises(ValueError) as info:
        PICKLE_LOADERS[loader](env)
    msg = str(info.value)
    assert not marker.exists(), f"{loader}: the pickle's payload ran"
    assert str(env.tmp) in msg, f"{loader}: the error does not name the file: {msg}"
    assert "refused" in msg and "allowed: " in msg, f"{loader}: the error does not say what is allowed: {msg}"


def test_tampered_latest_checkpoint_is_skipped_on_resume(run, tmp_path):
    """`tide train` with the same name resumes from the newest intact checkpoint: a pickle is named and skipped."""
    marker = tmp_path / "pwned"
    dst = tmp_path / "resume"
    shutil.copytree(run.dir, dst)
    cks = ckpt.list_checkpoints(dst / "checkpoints")
    assert len(cks) >= 2
    write_evil(cks[-1] / "stage0-ep0.safetensors", marker)
    _rewrite_manifest(cks[-1])
    with pytest.warns(UserWarning, match=r"stage0-ep0\.safetensors: refused: it is a zip archive"):
        assert ckpt.latest_checkpoint(dst / "checkpoints") == cks[-2]
    assert not marker.exists()


def test_tide_export_names_the_step_and_the_skipped_tampered_one(run, tmp_path, capsys):
    """`tide export RUN OUT` with a tampered newest checkpoint exports the previous one and says so on one
    line (the skipped step, its path and why; no Python warning); the final line names the exported step."""
    import warnings

    from cli.main import main

    marker = tmp_path / "pwned"
    dst = tmp_path / "export"
    shutil.copytree(run.dir, dst)
    cks = ckpt.list_checkpoints(dst / "checkpoints")
    assert len(cks) >= 2
    new, old = ckpt.checkpoint_step(cks[-1]), ckpt.checkpoint_step(cks[-2])
    assert main(["export", str(dst), str(tmp_path / "ok")]) == 0  # intact: the newest, by step
    assert capsys.readouterr().out.splitlines()[-1] == f"exported step {new} ({cks[-1]}) -> {tmp_path / 'ok'}"
    write_evil(cks[-1] / "stage0-ep0.safetensors", marker)
    _rewrite_manifest(cks[-1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a Python warning dump would fail here
        assert main(["export", str(dst), str(tmp_path / "hf")]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[-1] == f"exported step {old} ({cks[-2]}) -> {tmp_path / 'hf'}"
    (line,) = err.splitlines()
    assert line.startswith(f"tide: warning: skipped the newer step {new} ({cks[-1]}), it is damaged: "
                           "stage0-ep0.safetensors: refused: it is a zip archive"), line
    assert line.endswith(f"; exported step {old} instead") and "UserWarning" not in err
    assert not marker.exists()


def test_legitimate_files_still_load(run, hf_dir):
    """The refusals do not catch the files tide writes."""
    from cluster.checkpoint.models import load_trained_model
    from cluster.checkpoint.sharded import load_pipeline_full
    from model import load_hf

    path = ckpt.latest_checkpoint(run.dir / "checkpoints")
    groups, meta = ckpt.load_checkpoint(path)
    assert set(groups) == {"stage0-ep0"} and meta["step"] == 2  # a one-process run: the 1 x 1 layout
    model_t = {k: v for k, v in groups["stage0-ep0"].items() if not k.startswith("optim/")}
    assert load_pipeline_full(path)[0].keys() == model_t.keys()
    legacy = Path(__file__).parent / "fixtures" / "legacy" / "single" / "checkpoints" / "step-00000004"
    assert set(ckpt.load_checkpoint(legacy)[0]) == {"model", "optimizer"}  # what earlier versions wrote
    assert load_pipeline_full(legacy)[2]["optimizer_converted"]
    assert load_trained_model(run.dir)[1] == path
    assert load_hf(hf_dir).args.num_hidden_layers == 2


# ------------------------------------------------------------------- YAML
PYTHON_TAGS = [
    "!!python/object/apply:os.system [\"touch {m}\"]",
    "!!python/object/apply:subprocess.check_call [[\"touch\", \"{m}\"]]",
    "!!python/object/new:subprocess.Popen [[\"touch\", \"{m}\"]]",
]


def _yaml_doc(kind: str, tag: str) -> str:
    """A config of ``kind`` with ``tag`` as one value (at top level and nested)."""
    if kind == "training config":
        return f"name: x\nseed: {tag}\ncurriculum: []\n"
    if kind == "model YAML":
        return f"flavor: debug\nhidden_size: {tag}\n"
    if kind == "topology YAML":
        return f"racks: [r0]\npipeline_stages: {tag}\n"
    if kind == "link model file":
        return f"intra-rack: {{latency_us: {tag}, bandwidth_gbps: 10}}\n"
    if kind == "whole document":
        return f"{tag}\n"
    raise AssertionError(kind)


def _yaml_loaders():
    from cluster.launch.link_model import load_link_model
    from cluster.launch.topology import load_topology
    from cluster.training.config import load_train_config
    from deploy.loader import read_topology
    from model import ModelArgs

    return {
        "training config": load_train_config,
        "model YAML": ModelArgs.from_yaml,
        "topology YAML": load_topology,
        "serve --topology": read_topology,
        "link model file": load_link_model,
    }


@pytest.mark.parametrize("tag", PYTHON_TAGS, ids=["os.system", "check_call", "Popen"])
@pytest.mark.parametrize("doc", ["nested", "whole document"])
@pytest.mark.parametrize("loader", ["training config", "model YAML", "topology YAML", "serve --topology",
                                    "link model file"])
def test_yaml_python_tags_are_refused_and_run_nothing(loader, doc, tag, tmp_path):
    marker = tmp_path / "pwned"
    kind = {"serve --topology": "topology YAML"}.get(loader, loader) if doc == "nested" else doc
    f = tmp_path / "c.yaml"
    f.write_text(_yaml_doc(kind, tag.format(m=marker)))
    with pytest.raises(ValueError) as info:
        _yaml_loaders()[loader](f)
    assert not marker.exists()
    msg = str(info.value)
    assert str(f) in msg and "python/object" in msg
    assert "tags that build Python objects" in msg and "refused" in msg


@pytest.mark.parametrize("argv", [["config", "check"], ["plan"]])
def test_cli_refuses_yaml_python_tags(argv, tmp_path, capsys):
    from cli.main import main

    marker = tmp_path / "pwned"
    f = tmp_path / "c.yaml"
    f.write_text(_yaml_doc("whole document", PYTHON_TAGS[0].format(m=marker)))
    assert main(argv + [str(f)]) == 2
    assert not marker.exists()
    err = capsys.readouterr().err
    assert str(f) in err and "refused" in err


def test_model_yaml_loader_is_a_safe_loader():
    import yaml

    from model.safe_io import yaml_loader

    assert issubclass(yaml_loader(), yaml.SafeLoader)


# -------------------------------------------------------- static checker
#
# Scans the packages' sources with ``ast`` (not grep: comments, strings and formatting cannot
# fool it) for calls that unpickle or build arbitrary objects.

SCANNED = ("model", "cluster", "cli", "deploy", "comm", "actors", "kernels", "bench")
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}
# factories returning a yaml.SafeLoader subclass (checked by test_model_yaml_loader_is_a_safe_loader)
SAFE_YAML_LOADER_FACTORIES = {"yaml_loader"}
UNPICKLERS = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "joblib", "marshal", "shelve", "jsonpickle"}
UNPICKLE_FUNCS = {"load", "loads", "Unpickler", "open"}
UNSAFE_YAML = {"unsafe_load", "unsafe_load_all", "full_load", "full_load_all", "Loader", "UnsafeLoader",
               "FullLoader", "CLoader", "CUnsafeLoader", "CFullLoader"}


def _dotted(node) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    parts.append(node.id if isinstance(node, ast.Name) else "<expr>")  # f().eval() is not the builtin eval
    return ".".join(reversed(parts))


def _kw(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_const(node, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def unsafe_calls(source: str, filename: str = "<snippet>") -> list[str]:
    """``"file:line: what"`` for every unsafe deserialisation or code execution in ``source``."""
    found = []
    tree = ast.parse(source, filename)
    aliases = {}  # import torch as T -> {"T": "torch"}; from pickle import loads as l -> {"l": "pickle.loads"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases.update({a.asname: a.name for a in node.names if a.asname})
        elif isinstance(node, ast.ImportFrom) and node.module:
            aliases.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names})

    def dotted(n) -> str:
        head, _, rest = _dotted(n).partition(".")
        head = aliases.get(head, head)
        return f"{head}.{rest}" if rest else head

    for node in ast.walk(tree):
        line = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[-1] in UNPICKLERS:
            bad = [a.name for a in node.names if a.name in UNPICKLE_FUNCS]
            if bad:
                found.append(f"{line}: from {node.module} import {', '.join(bad)}")
        if isinstance(node, ast.ImportFrom) and node.module == "yaml":
            bad = [a.name for a in node.names if a.name in UNSAFE_YAML | {"load", "load_all"}]
            if bad:
                found.append(f"{line}: from yaml import {', '.join(bad)}")
        if isinstance(node, ast.Attribute) and dotted(node.value).split(".")[-1] == "yaml" \
                and node.attr in UNSAFE_YAML:
            found.append(f"{line}: yaml.{node.attr}")
        if not isinstance(node, ast.Call):
            continue
        name = dotted(node.func)
        mod, _, fn = name.rpartition(".")
        base = mod.split(".")[-1]
        if fn == "load" and base == "torch" and not _is_const(_kw(node, "weights_only"), True):
            found.append(f"{line}: torch.load without weights_only=True")
        elif base in UNPICKLERS and fn in UNPICKLE_FUNCS:
            found.append(f"{line}: {name}")
        elif fn in ("load", "load_all") and base == "yaml":
            loader = _kw(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            ok = loader is not None and (
                dotted(loader).split(".")[-1] in SAFE_YAML_LOADERS
                or (isinstance(loader, ast.Call) and dotted(loader.func).split(".")[-1] in SAFE_YAML_LOADER_FACTORIES))
            if not ok:
                found.append(f"{line}: {name} without a safe Loader")
        elif fn == "load" and base in ("np", "numpy") and not _is_const(_kw(node, "allow_pickle"), False) \
                and _kw(node, "allow_pickle") is not None:
            found.append(f"{line}: {name} with allow_pickle not False")
        elif name in ("eval", "exec", "builtins.eval", "builtins.exec", "os.system", "os.popen"):
            found.append(f"{line}: {name}")
        elif base == "subprocess" and not _is_const(_kw(node, "shell"), False) and _kw(node, "shell") is not None:
            found.append(f"{line}: {name} with shell=")
        elif name in ("torch.serialization.load", "torch.jit.load") or fn == "load_state_dict_from_url":
            found.append(f"{line}: {name}")
    return found


def scan(root: Path) -> tuple[int, list[str]]:
    """``(files scanned, unsafe_calls hits)`` over the ``SCANNED`` packages under ``root``."""
    files = [f for pkg in SCANNED for f in sorted((root / pkg).rglob("*.py"))]
    return len(files), [hit for f in files for hit in unsafe_calls(f.read_text(), str(f.relative_to(root)))]


def test_no_unsafe_deserialisation_in_the_source_tree():
    n, found = scan(ROOT)
    assert n > 30, "the scan found too few files: is ROOT right?"
    assert not found, "unsafe deserialisation / code execution:\n" + "\n".join(found)


PLANTED_UNSAFE = [
    "import torch\nsd = torch.load('x.pt')",
    "import torch\nsd = torch.load('x.pt', map_location='cpu', weights_only=False)",
    "import torch as T\nsd = T.load(f)",
    "import pickle\nobj = pickle.load(open('x.pkl', 'rb'))",
    "import pickle\nobj = pickle.loads(data)",
    "from pickle import loads\nobj = loads(data)",
    "import pickle\nu = pickle.Unpickler(f)",
    "import ray\nobj = ray.cloudpickle.loads(data)",
    "import yaml\ncfg = yaml.load(text)",
    "import yaml\ncfg = yaml.load(text, Loader=yaml.Loader)",
    "import yaml\ncfg = yaml.load(text, yaml.FullLoader)",
    "import yaml\ncfg = yaml.unsafe_load(text)",
    "import yaml\ncfg = yaml.full_load(text)",
    "from yaml import load\ncfg = load(text)",
    "import numpy as np\na = np.load('a.npy', allow_pickle=True)",
    "import numpy\na = numpy.load(p, mmap_mode='r', allow_pickle=flag)",
    "x = eval(user_text)",
    "exec(code)",
    "import os\nos.system(cmd)",
    "import subprocess\nsubprocess.run(cmd, shell=True)",
    "import joblib\nm = joblib.load('m.joblib')",
    "import marshal\nc = marshal.loads(b)",
]
PLANTED_SAFE = [
    "import torch\nsd = torch.load('x.pt', weights_only=True)",
    "import yaml\ncfg = yaml.safe_load(text)",
    "import yaml\ncfg = yaml.load(text, Loader=yaml.SafeLoader)",
    "import yaml\ncfg = yaml.load(text, Loader=yaml_loader())",
    "import numpy as np\na = np.load('a.npy', mmap_mode='r', allow_pickle=False)\nb = np.load('b.npy')",
    "import pickle\nb = pickle.dumps(obj)",
    "import subprocess\nsubprocess.run(['git', 'status'], capture_output=True)",
    "x = m.eval(v)\nmodel.eval()\nTransformer(args).eval()\nf()[0].exec()",
    "s = 'torch.load(x) and pickle.loads(y) in a string'  # yaml.load(z) in a comment",
]


@pytest.mark.parametrize("snippet", PLANTED_UNSAFE)
def test_static_checker_finds_planted_unsafe_code(snippet):
    assert unsafe_calls(textwrap.dedent(snippet)), f"not flagged: {snippet!r}"


@pytest.mark.parametrize("snippet", PLANTED_SAFE)
def test_static_checker_passes_safe_code(snippet):
    assert unsafe_calls(textwrap.dedent(snippet)) == []


def test_static_checker_finds_a_file_planted_in_the_tree(tmp_path):
    """The tree scan itself fails when a package file gains an unsafe call."""
    fake = tmp_path / "model" / "sub"
    fake.mkdir(parents=True)
    (fake / "ok.py").write_text("import yaml\nyaml.safe_load('a: 1')\n")
    (fake / "bad.py").write_text("import torch\n\ndef f(p):\n    return torch.load(p)\n")
    assert scan(tmp_path) == (2, ["model/sub/bad.py:4: torch.load without weights_only=True"])


# ----------------------------------------------------------------- secrets
def _leaks(secrets, *texts) -> list[str]:
    """The secrets found in any of ``texts``."""
    return [s for s in secrets if any(s in t for t in texts)]


def test_leak_check_sees_a_deliberately_logged_canary(caplog, capsys):
    """The capture used below does see what is logged and printed: the leak tests can fail."""
    canary_log, canary_print = "canary-log-8c1f", "canary-print-2d7e"
    caplog.set_level(logging.DEBUG)
    logging.getLogger("deploy.app").debug("key %s", canary_log)
    print(canary_print)
    out = capsys.readouterr()
    assert _leaks([canary_log, canary_print], caplog.text, out.out + out.err) == [canary_log, canary_print]


@pytest.fixture
def served(hf_dir, monkeypatch):
    """``deploy.serve``'s app with the replica loaded in process (no Ray): the key and a Ray token in the env."""
    import deploy.serve as ds

    monkeypatch.setenv("TIDE_API_KEY", API_KEY)
    monkeypatch.setenv("RAY_AUTH_TOKEN", RAY_TOKEN)
    yield ds, hf_dir
    if ds._Current.engine is not None:
        ds._Current.engine.close()
    ds._Current.engine = None
    ds._Current.api_key = None


def _exercise(app, key: str) -> list[str]:
    """Good and bad requests against ``app``; returns every response's headers and body as text."""
    from fastapi.testclient import TestClient

    seen = []
    c = TestClient(app)
    body = {"prompt": "def add(a, b):", "max_tokens": 4, "temperature": 0}
    good = {"Authorization": f"Bearer {key}"}
    for headers, want in [(good, 200), ({}, 401), ({"Authorization": "Bearer wrong-key"}, 401),
                          ({"Authorization": f"Basic {key}"}, 401), ({"Authorization": f"Bearer {key}x"}, 401)]:
        r = c.post("/v1/completions", json=body, headers=headers)
        assert r.status_code == want, r.text
        seen.append(f"{dict(r.headers)} {r.text}")
    r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                                             "stream": True}, headers=good)
    assert r.status_code == 200
    seen.append(r.text)
    for bad_body, want in [(b"{not json", 400), (b'{"prompt": "x", "max_tokens": -1}', 400)]:
        r = c.post("/v1/completions", content=bad_body, headers={**good, "content-type": "application/json"})
        assert r.status_code == want
        seen.append(f"{dict(r.headers)} {r.text}")
    assert c.get("/v1/models").status_code == 401
    assert c.get("/v1/models", headers=good).status_code == 200
    return seen


def test_serve_app_key_from_env_never_logged(served, caplog, capsys):
    ds, hf = served
    caplog.set_level(logging.DEBUG)
    app = ds.load_replica(str(hf))
    seen = _exercise(app, API_KEY)
    out = capsys.readouterr()
    assert _leaks([API_KEY, RAY_TOKEN], caplog.text, out.out, out.err, *seen) == []
    assert ds.describe_api_key() == "on (from $TIDE_API_KEY)"


def test_serve_app_key_from_file_never_logged(served, tmp_path, caplog, capsys):
    ds, hf = served
    file_key = "filekey-0b9e4d2c7a1f5e38secret"
    f = tmp_path / "api_key"
    f.write_text(file_key + "\n")
    f.chmod(0o600)
    caplog.set_level(logging.DEBUG)
    app = ds.load_replica(str(hf), api_key_file=str(f))  # the file wins over $TIDE_API_KEY
    seen = _exercise(app, file_key)
    from fastapi.testclient import TestClient

    assert TestClient(app).get("/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 401
    assert str(f) in ds.describe_api_key(api_key_file=str(f))
    ds.build({"path": str(hf), "api_key_file": str(f)})  # the build arg: checked, the key not an argument
    out = capsys.readouterr()
    assert _leaks([file_key, API_KEY, RAY_TOKEN], caplog.text, out.out, out.err, *seen,
                  ds.describe_api_key(api_key_file=str(f))) == []


def test_serve_build_passes_the_key_file_not_the_key(hf_dir, tmp_path):
    import deploy.serve as ds

    f = tmp_path / "k"
    f.write_text("k-3c5e7a9b1d2f\n")
    app = ds.build({"path": str(hf_dir), "api_key_file": str(f)})
    args = app._bound_deployment.init_args
    assert str(f.resolve()) in args and not any("k-3c5e7a9b1d2f" in str(a) for a in args)


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_empty_or_missing_key_file_is_refused(tmp_path, content):
    from deploy.serve import read_api_key

    f = tmp_path / "key"
    f.write_text(content)
    with pytest.raises(ValueError, match="is empty"):
        read_api_key(api_key_file=str(f))
    with pytest.raises(ValueError, match=f"cannot read API key file {tmp_path / 'nope'}"):
        read_api_key(api_key_file=str(tmp_path / "nope"))


def test_tide_serve_bad_key_file_is_named_not_shown(tmp_path, capsys):
    from cli.main import main

    assert main(["serve", str(tmp_path), "--api-key-file", str(tmp_path / "missing")]) == 2
    assert f"cannot read API key file {tmp_path / 'missing'}" in capsys.readouterr().err


def test_training_run_files_and_output_hold_no_secret(run):
    """run_info.json (and every other file of the run) and what the run printed or logged."""
    info = json.loads((run.dir / "run_info.json").read_text())
    assert {"config", "git_sha", "versions", "device"} <= set(info)
    hits = [str(p) for p in run.dir.rglob("*") if p.is_file() and _leaks([RAY_TOKEN, API_KEY], p.read_bytes()
                                                                          .decode("latin-1"))]
    assert hits == []
    assert run.output and _leaks([RAY_TOKEN, API_KEY], run.output) == []


def test_run_file_scan_sees_a_planted_token(run, tmp_path):
    """The scan above can fail: a copy of run_info.json with the token planted is found."""
    f = tmp_path / "run_info.json"
    info = json.loads((run.dir / "run_info.json").read_text())
    info["env"] = {"RAY_AUTH_TOKEN": RAY_TOKEN}
    f.write_text(json.dumps(info))
    assert _leaks([RAY_TOKEN, API_KEY], f.read_bytes().decode("latin-1")) == [RAY_TOKEN]


def test_key_digest_checks_the_key_without_holding_it():
    """What `tide serve` hands the replica: a salted digest that checks keys, shows nothing of the key."""
    from fastapi.testclient import TestClient

    from deploy.app import build_app
    from deploy.serve import KeyDigest

    key = "tk-digest-canary-0123456789"
    d = KeyDigest.of(key)
    assert key not in d.text and key not in repr(d) and d.text.startswith("sha256:")
    assert KeyDigest.of(key).text != d.text  # salted: the same key never gives the same text
    back = KeyDigest.parse(d.text)
    assert back.matches(key) and not back.matches(key + "x") and not back.matches("")
    for bad in ("", "sha256:zz:00", "md5:00:" + "0" * 64, "sha256:0011223344556677:abcd", d.text + ":1"):
        with pytest.raises(ValueError, match="api_key_digest must be"):
            KeyDigest.parse(bad)

    class Engine:  # the app only reads these attributes before the key check refuses
        model_name, vocab_size, context, error, metrics = "m", 10, 16, None, None

    client = TestClient(build_app(Engine(), api_key=back))
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200


def test_api_key_from_the_environment_is_stripped_and_blank_means_off(monkeypatch):
    from deploy.serve import describe_api_key, read_api_key

    monkeypatch.setenv("TIDE_API_KEY", "tk-key-0123456789\n")
    assert read_api_key() == "tk-key-0123456789" and describe_api_key().startswith("on")
    monkeypatch.setenv("TIDE_API_KEY", "   ")
    assert read_api_key() is None and describe_api_key().startswith("off")


def test_the_app_serves_no_unauthenticated_docs():
    """FastAPI's /docs, /redoc and /openapi.json would answer without the API key: they are off."""
    from fastapi.testclient import TestClient

    from deploy.app import build_app

    class Engine:
        model_name, vocab_size, context, error, metrics = "m", 10, 16, None, None

    client = TestClient(build_app(Engine(), api_key="tk-docs-0123456789"))
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert client.get(path).status_code == 404, path
    assert client.get("/v1/models").status_code == 401
