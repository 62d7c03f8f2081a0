"""The training loop on the 1 x 1 actor graph in this process (no Ray): exact resume after a kill,
spike rollback with anticipatory routing, export."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cluster.checkpoint import store as ckpt
from cluster.checkpoint.models import export_hf, load_trained_model
from cluster.training.config import load_train_config
from cluster.training.trainer import Trainer, read_metrics, run_summary, train

ROOT = Path(__file__).resolve().parents[2]


def tiny_config(tmp: Path, name: str, **over) -> dict:
    cfg = {
        "name": name, "storage_path": str(tmp), "seed": 3,
        "model": {"flavor": "debug", "hidden_size": 64, "moe_intermediate_size": 64, "q_lora_rank": 32,
                  "o_lora_rank": 32, "index_n_heads": 4, "index_head_dim": 16, "num_attention_heads": 2,
                  "o_groups": 1, "head_dim": 32, "partial_rotary_factor": 0.5,
                  "rope_parameters": {"main": {"rope_type": "default", "rope_theta": 10000.0,
                                               "partial_rotary_factor": 0.5},
                                      "compress": {"rope_type": "default", "rope_theta": 160000.0,
                                                   "partial_rotary_factor": 0.5}}},
        "data": {"source": "stdlib", "vocab_size": 300, "max_bytes": 150_000},
        "optim": {"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 2},
        "checkpoint": {"every_steps": 3, "keep": 2},
        "curriculum": [
            {"name": "a", "seq_len": 64, "batch_tokens": 256, "steps": 5, "attention": "dense"},
            {"name": "w", "seq_len": 64, "batch_tokens": 256, "steps": 2, "attention": "indexer_warmup",
             "mtp_weight": 0.0},
            {"name": "b", "seq_len": 128, "batch_tokens": 256, "steps": 4, "attention": "sparse"},
        ],
    }
    cfg.update(over)
    return cfg


def _losses(run_dir: Path) -> list[tuple[int, float, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["step"], r["ce"], r["loss"]) for r in rows]


RUNNER = """
import json, sys
sys.path.insert(0, {root!r})
from cluster.training.config import load_train_config
from cluster.training.trainer import train
train(load_train_config(json.load(open(sys.argv[1]))), in_process=True, progress="none")
"""


def _spawn(cfg: dict, tmp: Path) -> subprocess.Popen:
    f = tmp / f"{cfg['name']}.json"
    f.write_text(json.dumps(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", RUNNER.format(root=str(ROOT)), str(f)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_killed_and_resumed_run_reproduces_losses_bit_for_bit(tmp_path):
    full = _spawn(tiny_config(tmp_path, "full"), tmp_path)
    assert full.wait(timeout=600) == 0, full.stderr.read()
    # the same run, SIGKILLed after step 7 (mid stage 'w'), then started again
    killed = _spawn(tiny_config(tmp_path, "killed"), tmp_path)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 8:
            break
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert len(_losses(tmp_path / "killed")) < 11
    resumed = _spawn(tiny_config(tmp_path, "killed"), tmp_path)
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "killed")
    assert [s for s, _, _ in a] == list(range(11))
    assert a == b  # every step's loss, bit for bit
    assert ckpt.latest_checkpoint(tmp_path / "killed" / "checkpoints").name == "step-00000011"
    assert (tmp_path / "killed" / "loss.png").stat().st_size > 1000


def test_loss_spike_rolls_back_and_switches_on_anticipatory_routing(tmp_path):
    cfg = tiny_config(tmp_path, "spike", inject_spike_at_step=24,
                      spike={"factor": 1.5, "min_steps": 5, "anticipatory_steps": 3, "ema_beta": 0.8},
                      checkpoint={"every_steps": 4, "keep": 2},
                      curriculum=[{"name": "a", "seq_len": 64, "batch_tokens": 256, "steps": 32,
                                   "attention": "sparse"}])
    c = load_train_config(cfg)
    summary = train(c, in_process=True, progress="none")
    rows = read_metrics(c.run_dir())
    spike = rows[24]
    assert spike.get("spike") and spike["rolled_back_to"].endswith("step-00000024")
    assert summary["spikes"] == [24] and summary["rollbacks"] == 1
    # step 25 only routes ahead (there are no parameters one update older than the restored ones);
    # steps 26..28 use routing one update old, then it is off again
    assert [r["step"] for r in rows if r["routing_pass"]] == [25, 26, 27]
    assert [r["step"] for r in rows if r["anticipatory_routing"]] == [26, 27, 28]
    assert all(r["routing_lag"] == 1 for r in rows if r["anticipatory_routing"])
    assert all(not r.get("spike") for r in rows[25:])  # recovered: no further spikes
    assert max(r["ce"] for r in rows[25:]) < spike["ce"] / 1.5
    assert summary["anticipatory_overhead"] is not None  # the extra routing pass is measured
    print("anticipatory routing overhead:", summary["anticipatory_overhead"])
    # no checkpoint is taken while anticipatory routing is on (steps 25..28); 32 is the next one
    steps = [ckpt.checkpoint_step(p) for p in ckpt.list_checkpoints(tmp_path / "spike" / "checkpoints")]
    assert 28 not in steps and 32 in steps


def test_export_and_damaged_checkpoints(tmp_path):
    from model import load_hf

    cfg = tiny_config(tmp_path, "exp", curriculum=[{"name": "a", "seq_len": 64, "batch_tokens": 256, "steps": 3,
                                                    "attention": "sparse"}])
    c = load_train_config(cfg)
    train(c, in_process=True, progress="none")
    out = export_hf(tmp_path / "exp", tmp_path / "hf")
    m = load_hf(out, strict_mtp=True).eval()
    trained, path = load_trained_model(tmp_path / "exp")
    assert path.name == "step-00000003" and sorted(p.name for p in path.glob("*.safetensors")) == \
        ["stage0-ep0.safetensors"]  # one process is the 1 x 1 graph: one shard group
    ids = torch.randint(0, 300, (1, 40))
    with torch.no_grad():
        assert torch.equal(m(ids), trained.eval()(ids))
    assert (out / "tokenizer.json").is_file()
    from cluster.data import CHAT_TEMPLATE, read_chat_template

    assert read_chat_template(tmp_path / "exp") == read_chat_template(out) == CHAT_TEMPLATE  # stored, exported
    last = ckpt.latest_checkpoint(tmp_path / "exp" / "checkpoints")
    f = last / "stage0-ep0.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="stage0-ep0.safetensors"):
        export_hf(last, tmp_path / "hf2")
    # given the run directory, export passes over the damaged newest checkpoint (sha256, not only sizes)
    with pytest.warns(UserWarning, match="corrupt"):
        out3 = export_hf(tmp_path / "exp", tmp_path / "hf3")
    assert (out3 / "config.json").is_file()
    assert ckpt.main(["latest", str(tmp_path / "exp" / "checkpoints")]) == 0
    assert ckpt.main(["verify", str(tmp_path / "exp" / "checkpoints")]) == 1  # a root: every checkpoint in it


def test_summary_of_a_finished_run_reads_the_run_directory(tmp_path):
    cfg = load_train_config(tiny_config(tmp_path, "fin", curriculum=[
        {"name": "a", "seq_len": 64, "batch_tokens": 256, "steps": 2, "attention": "dense"}]))
    first = train(cfg, in_process=True, progress="none")
    again = train(cfg, in_process=True, progress="none")  # already finished: nothing trains
    assert again == first == run_summary(cfg)
    assert first["steps"] == 2 and first["checkpoint"].endswith("step-00000002")


def test_in_process_refuses_a_graph_of_several_actors(tmp_path):
    cfg = tiny_config(tmp_path, "multi", parallel={"topology": {"racks": ["r0"], "pipeline_stages": 2}})
    with pytest.raises(ValueError, match="1 x 1"):
        train(load_train_config(cfg), in_process=True, progress="none")


def test_trainer_validates_each_batch_once(tmp_path):
    """A batch with a token outside the vocabulary is refused by the stage worker (once per step, on the
    host), with the range in the message -- not an index error from inside the forward."""
    tr = Trainer(load_train_config(tiny_config(tmp_path, "bad")), in_process=True, progress="none")
    tr.setup()
    try:
        tr._apply_stage()
        batch = tr.loader.next_batch()
        batch["input_ids"][0, 0] = 300
        with pytest.raises(ValueError, match=r"token ids must be in \[0, 300\)"):
            tr.group.call("forward_backward", batch, {"mode": "dense"}, 1.0, None)
    finally:
        tr.shutdown()


def test_activation_checkpointing_switch_keeps_every_loss(tmp_path):
    """`activation_checkpointing: true` recomputes every block in backward: the same run, bit for bit."""
    rows = {}
    for on in (False, True):
        cfg = tiny_config(tmp_path, f"remat-{on}", activation_checkpointing=on, curriculum=[
            {"name": "a", "seq_len": 64, "batch_tokens": 256, "steps": 2, "attention": "dense"},
            {"name": "w", "seq_len": 64, "batch_tokens": 256, "steps": 1, "attention": "indexer_warmup",
             "mtp_weight": 0.0},
            {"name": "b", "seq_len": 128, "batch_tokens": 256, "steps": 2, "attention": "sparse"}])
        train(load_train_config(cfg), in_process=True, progress="none")
        rows[on] = [{k: r[k] for k in ("ce", "loss", "grad_norm") if k in r}
                    for r in read_metrics(tmp_path / cfg["name"])]
    assert rows[True] == rows[False] and len(rows[True]) == 5


def test_a_second_run_of_the_same_name_is_refused_while_the_first_trains(tmp_path):
    """Two `tide train --name x` at once would interleave steps and checkpoints in one run directory."""
    cfg = tiny_config(tmp_path, "twice", curriculum=[{"name": "a", "seq_len": 64, "batch_tokens": 256, "steps": 40,
                                                      "attention": "dense"}])
    first = _spawn(cfg, tmp_path)
    metrics = tmp_path / "twice" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().strip()):
        time.sleep(0.1)
    try:
        with pytest.raises(ValueError, match=rf"run 'twice' .* is being trained by pid {first.pid} "):
            train(load_train_config(cfg), in_process=True, progress="none")
    finally:
        first.kill()
        first.wait()
    # the kernel drops the lock with the killed process: the same command resumes
    summary = train(load_train_config(cfg), in_process=True, progress="none")
    assert summary["steps"] == 40 and [r["step"] for r in read_metrics(tmp_path / "twice")] == list(range(40))


def test_an_actor_killed_while_writing_a_checkpoint_commits_nothing_partial(tmp_path):
    """The last actor dies halfway through writing its shard of checkpoint 6: that checkpoint is
    never committed, the graph restarts from checkpoint 3 and the run ends as an uninterrupted one."""
    ref = train(load_train_config(tiny_config(tmp_path, "ref")), in_process=True, progress="none")
    c = load_train_config(tiny_config(tmp_path, "torn", fail_at_checkpoint=6))
    root = c.run_dir() / "checkpoints"
    seen: list[list[str]] = []
    orig = Trainer.restore

    def spy(self, path, **kw):  # what the restarted graph resumes from, and what was committed then
        seen.append([path.name, *sorted(p.name for p in root.iterdir())])
        return orig(self, path, **kw)

    Trainer.restore = spy
    try:
        summary = train(c, in_process=True, progress="none")
    finally:
        Trainer.restore = orig
    assert seen and seen[0][0] == "step-00000003"
    assert "step-00000006" not in seen[0] and not any(n.startswith(".tmp-") for n in seen[0])  # nothing torn kept
    assert (c.run_dir() / ".injected_checkpoint_failure_done").exists()
    assert _losses(c.run_dir()) == _losses(Path(ref["run_dir"]))  # nothing committed was lost
    for p in ckpt.list_checkpoints(root):
        assert ckpt.verify_checkpoint(p) == [], p
    assert summary["checkpoint"].endswith("step-00000011")


def test_a_damaged_newest_checkpoint_is_named_set_aside_and_an_older_one_resumes(tmp_path, capsys):
    cfg = tiny_config(tmp_path, "flip")
    c = load_train_config(cfg)
    train(c, in_process=True, progress="none")
    root = c.run_dir() / "checkpoints"
    newest = ckpt.latest_checkpoint(root)
    assert newest.name == "step-00000011"
    f = newest / "stage0-ep0.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x10  # same size: only the sha256 sees it
    f.write_bytes(bytes(data))
    more = {**cfg, "curriculum": [*cfg["curriculum"], {"name": "c", "seq_len": 64, "batch_tokens": 256, "steps": 2,
                                                       "attention": "sparse"}]}
    summary = train(load_train_config(more), progress="lines", in_process=True)
    out = capsys.readouterr().out
    assert "checkpoint step-00000011 is damaged" in out and "stage0-ep0.safetensors is corrupt" in out
    assert "resuming from step-00000009" in out
    aside = list((root / "damaged").iterdir())
    assert len(aside) == 1 and aside[0].name.startswith("step-00000011-")  # kept, not deleted
    assert summary["checkpoint"].endswith("step-00000013")
    assert [r["step"] for r in read_metrics(c.run_dir())] == list(range(13))
    # a finished run whose last checkpoint is damaged is not "finished": it is set aside and redone
    f = ckpt.latest_checkpoint(root) / "stage0-ep0.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 3] ^= 0x01
    f.write_bytes(bytes(data))
    summary = train(load_train_config(more), progress="lines", in_process=True)
    out = capsys.readouterr().out
    assert "already finished" not in out and "checkpoint step-00000013 is damaged" in out
    assert "resuming from step-00000012" in out and ckpt.verify_checkpoint(root / "step-00000013") == []
    assert len(list((root / "damaged").iterdir())) == 2
