"""The training loop on actor graphs under Ray: 2 stages x 2 expert shards on two simulated racks.

The same config with a `parallel` section must train the same model: per-step losses equal the
1 x 1 graph's (in process); checkpoints are stage x shard groups; a 1 x 1 checkpoint resumes into
the 2 x 2 layout (re-layout) and continues like the single process; a Chrome trace + timeline PNG
are written; a dead actor restarts the graph; the actors carry names; anticipatory routing after a
spike uses, at step t, exactly the routing the parameters of step t - delta give for that batch.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from cluster.checkpoint import store as ckpt
from cluster.checkpoint.models import export_hf
from cluster.checkpoint.sharded import load_pipeline_full
from cluster.training.config import load_train_config
from cluster.training.trainer import Trainer, train
from tests.cluster.test_trainer import tiny_config

PARALLEL = {"topology": {"racks": ["r0", "r1"], "pipeline_stages": 2, "expert_parallel": 2,
                         "cpus_per_actor": 0.5},
            "microbatches": 2, "waves": 2, "trace_steps": 1}


def _config(tmp: Path, name: str, parallel: bool, steps=(3, 1, 3)) -> dict:
    cfg = tiny_config(tmp, name)
    for st, n in zip(cfg["curriculum"], steps, strict=True):
        st["batch_tokens"] = 1024  # 16 x 64 and 8 x 128 tokens: 2 shards x 2 microbatches x 2 waves
        st["steps"] = n
    cfg["checkpoint"] = {"every_steps": 2, "keep": 3}
    if parallel:
        cfg["parallel"] = PARALLEL
    return cfg


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


def test_pipeline_run_matches_single_process_and_relayouts(tmp_path, two_racks):
    single = train(load_train_config(_config(tmp_path, "single", False)), in_process=True, progress="none")
    ref = _rows(Path(single["run_dir"]))

    summary = train(load_train_config(_config(tmp_path, "pipe", True)), progress="none")
    run_dir = Path(summary["run_dir"])
    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == [r["step"] for r in ref] == list(range(7))
    for a, b in zip(rows, ref, strict=True):
        assert abs(a["ce"] - b["ce"]) <= 1e-5 * b["ce"], (a["step"], a["ce"], b["ce"])
        assert a["attention"] == b["attention"]
    # checkpoints: one group per (stage, expert shard), verified by the store
    latest = ckpt.latest_checkpoint(run_dir / "checkpoints")
    assert ckpt.verify_checkpoint(latest) == []
    names = sorted(p.name for p in latest.glob("*.safetensors"))
    assert names == ["stage0-ep0.safetensors", "stage0-ep1.safetensors", "stage1-ep0.safetensors",
                     "stage1-ep1.safetensors"]
    # the timeline of step 1
    trace = json.loads((run_dir / "trace.json").read_text())
    cats = {e.get("cat") for e in trace["traceEvents"] if e.get("ph") == "X"}
    assert {"compute", "send", "dispatch", "combine"} <= cats
    assert (run_dir / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # export of a pipeline checkpoint gives one HF model directory
    out = export_hf(latest, tmp_path / "hf")
    assert (out / "config.json").is_file()
    # the actors' placement is recorded with the run
    info = json.loads((run_dir / "run_info.json").read_text())
    assert sorted((a["stage"], a["ep_rank"], a["rack"]) for a in info["actors"]) == \
        [(0, 0, "r0"), (0, 1, "r0"), (1, 0, "r1"), (1, 1, "r1")]

    # re-layout: the 1 x 1 run's checkpoint (step 4) continues as 2 stages x 2 shards
    relay = _config(tmp_path, "single", True)
    single_ckpt = ckpt.list_checkpoints(tmp_path / "single" / "checkpoints")
    step4 = [p for p in single_ckpt if ckpt.checkpoint_step(p) == 4][0]
    cfg = load_train_config(relay, name="relayout")
    (tmp_path / "relayout" / "checkpoints").mkdir(parents=True)
    shutil.copytree(step4, tmp_path / "relayout" / "checkpoints" / step4.name)
    shutil.copy2(tmp_path / "single" / "metrics.jsonl", tmp_path / "relayout" / "metrics.jsonl")
    train(cfg, progress="none")
    cont = _rows(tmp_path / "relayout")
    assert [r["step"] for r in cont] == list(range(7))
    for a, b in zip(cont[4:], ref[4:], strict=True):
        assert abs(a["ce"] - b["ce"]) <= 1e-5 * b["ce"], (a["step"], a["ce"], b["ce"])


def test_a_dead_stage_actor_restarts_the_graph_from_the_last_checkpoint(tmp_path, two_racks, capsys):
    cfg = _config(tmp_path, "crash", True, steps=(3, 1, 2))
    clean = train(load_train_config(_config(tmp_path, "clean", True, steps=(3, 1, 2))), progress="none")
    train(load_train_config({**cfg, "fail_at_step": 3}), progress="none")
    assert (tmp_path / "crash" / ".injected_failure_done").exists()
    got, want = _rows(tmp_path / "crash"), _rows(Path(clean["run_dir"]))
    assert [r["step"] for r in got] == list(range(6))  # steps 2.. replayed from the step-2 checkpoint, once each
    for a, b in zip(got, want, strict=True):
        assert a["ce"] == pytest.approx(b["ce"], abs=1e-6), a["step"]
    # an actor process that dies halfway through writing its shard of checkpoint 4: nothing of
    # checkpoint 4 is committed, the graph restarts from checkpoint 2 and ends as the clean run
    capsys.readouterr()
    torn = train(load_train_config({**_config(tmp_path, "torn", True, steps=(3, 1, 2)), "fail_at_checkpoint": 4}),
                 progress="none")
    assert "a stage actor died (" in capsys.readouterr().out  # the restart path ran
    assert (tmp_path / "torn" / ".injected_checkpoint_failure_done").exists()
    got = _rows(tmp_path / "torn")
    assert [r["step"] for r in got] == list(range(6))
    for a, b in zip(got, want, strict=True):
        assert a["ce"] == pytest.approx(b["ce"], abs=1e-6), a["step"]
    root = tmp_path / "torn" / "checkpoints"
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]
    assert all(ckpt.verify_checkpoint(p) == [] for p in ckpt.list_checkpoints(root))
    assert torn["checkpoint"].endswith("step-00000006")


def test_one_process_run_is_one_named_actor_and_pipeline_actors_are_named(tmp_path, two_racks):
    """What the Ray dashboard's actor view lists: tide/<run>/stage<s>-shard<e>, alive while training."""
    import ray

    seen: dict[str, set] = {}

    def names(row, committed):
        if row["step"] == 0:
            seen[row["attention"]] = set(ray.util.list_named_actors())

    cfg = tiny_config(tmp_path, "solo", curriculum=[{"name": "a", "seq_len": 64, "batch_tokens": 256, "steps": 1,
                                                     "attention": "dense"}])
    summary = train(load_train_config(cfg), progress="none", report=names)
    assert "tide/solo/stage0-shard0" in seen["dense"]
    assert summary["steps"] == 1
    pipe = _config(tmp_path, "duo", True, steps=(1, 1, 1))
    pipe["curriculum"][0]["attention"] = "sparse"
    seen.clear()
    train(load_train_config(pipe), progress="none", report=names)
    assert {"tide/duo/stage0-shard0", "tide/duo/stage0-shard1", "tide/duo/stage1-shard0",
            "tide/duo/stage1-shard1"} <= seen["sparse"]


def test_anticipatory_routing_on_stage_actors_uses_the_routing_of_step_t_minus_delta(tmp_path, two_racks):
    """2 x 2 actors, a spike injected at step 14, delta 2: after the rollback, steps 15-16 only route ahead,
    steps 17-18 use routing computed by the actors at steps 15-16 -- before those steps' updates -- for the
    batches of 17-18 (decoder layers and the MTP block). Recomputed afterwards on a fresh 2 x 2 graph
    loaded with the parameters of step t - delta, the routing is the same, bit for bit; with the
    parameters of step t it is not (so the lag is real). Then it is off."""
    delta, n_forced = 2, 2
    cfg = _config(tmp_path, "ar", True, steps=(20, 1, 1))
    cfg.update(inject_spike_at_step=14, spike={"factor": 1.2, "min_steps": 5, "ema_beta": 0.8,
                                               "anticipatory_steps": n_forced, "delta": delta})
    cfg["parallel"] = {**PARALLEL, "trace_steps": 0}
    cfg["checkpoint"] = {"every_steps": 2, "keep": 10}
    c = load_train_config(cfg)
    params: dict[int, tuple] = {}  # step -> the (model, optimizer) tensors its forward used
    used: dict[int, tuple] = {}  # step -> (batch, forced routing of shard (stage, ep) ...) it used
    trainer = Trainer(c, progress="none")

    def snapshot_before(step):
        states = trainer.group.call("state")
        infos = trainer.group.call("shard_info")
        params[step] = (states, infos)

    def hook(row, committed):
        t = row["step"]
        if row["anticipatory_routing"]:
            used[t] = trainer.group.call("used_routing")
        snapshot_before(t + 1)  # the parameters step t + 1 starts from (after a rollback: the restored ones)

    trainer.report = hook
    trainer.setup()
    snapshot_before(0)
    trainer.setup = lambda: None  # run() would set up again
    try:
        summary = trainer.run()
    finally:
        trainer.shutdown()
    rows = _rows(Path(summary["run_dir"]))
    assert [r["step"] for r in rows if r.get("spike")] == [14]
    assert [r["step"] for r in rows if r["routing_pass"]] == [15, 16]
    assert [r["step"] for r in rows if r["anticipatory_routing"]] == [17, 18] == sorted(used)

    from actors.group import StageGroup

    graph = trainer.graph
    ref = StageGroup(graph, trainer.args.to_dict(), seed=c.seed, microbatches=2, waves=2)
    differs = 0
    try:
        for t, per_actor in used.items():
            batch = per_actor[0]["batch"]
            for lag in (delta, 0):
                states, infos = params[t - lag]
                full_model, full_optim, _ = _merge(states, infos, trainer, tmp_path / f"p{t}-{lag}")
                ref.call("load_state", ref.put(full_model), ref.put(full_optim))
                ref.call("set_attention_mode", "dense")
                loss_cfg = trainer.loss_config(t).__dict__
                ref.call("route_ahead", ref.put(batch), loss_cfg, -1)
                got = ref.call("take_routing", -1)
                for mine, theirs in zip(per_actor, got, strict=True):
                    assert set(mine["routing"]) == set(theirs)
                    assert "mtp.0" in theirs or not mine["last_stage"]
                    same = all(torch.equal(mine["routing"][k], theirs[k]) for k in theirs)
                    if lag == delta:
                        assert same, (t, "the forced routing is not what the parameters of t - delta give")
                    else:
                        differs += not same
    finally:
        ref.shutdown()
    assert differs > 0  # the parameters of step t route differently: the test could tell a lag of 0
    assert summary["anticipatory_overhead"] is not None


def _merge(states, infos, trainer, where: Path):
    """Full model and optimizer tensors of a 2 x 2 snapshot (through a checkpoint, as a rollback loads it)."""
    from cluster.checkpoint import sharded as pckpt

    shards = {(i["stage"], i["ep_rank"]): st for i, st in zip(infos, states, strict=True)}
    path = pckpt.save_pipeline_checkpoint(where, 0, shards, trainer._layout(infos),
                                          {"model_args": trainer.args.to_dict()}, keep=1)
    return load_pipeline_full(path)


DATA_PARALLEL = {"topology": {"racks": ["r0", "r1"], "data_parallel": 2, "pipeline_stages": 2,
                              "expert_parallel": 1, "cpus_per_actor": 0.5},
                 "microbatches": 2, "waves": 2, "trace_steps": 1, "bucket_mb": 0.05}


def test_data_parallel_run_matches_single_process_and_relayouts_both_ways(tmp_path, two_racks):
    """D = 2 replicas x 2 stages x 1 shard (replica d on rack r<d>) trains the single process's
    losses over a whole curriculum; its checkpoints hold ZeRO-1 optimizer parts per replica; a
    1 x 1 checkpoint continues on D = 2, and a D = 2 checkpoint continues on 1 x 1."""
    single = train(load_train_config(_config(tmp_path, "single", False)), in_process=True, progress="none")
    ref = _rows(Path(single["run_dir"]))
    cfg = {**_config(tmp_path, "dp", False), "parallel": DATA_PARALLEL}
    summary = train(load_train_config(cfg), progress="none")
    run_dir = Path(summary["run_dir"])
    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == list(range(7))
    for a, b in zip(rows, ref, strict=True):
        assert abs(a["ce"] - b["ce"]) <= 1e-5 * b["ce"], (a["step"], a["ce"], b["ce"])
    info = json.loads((run_dir / "run_info.json").read_text())
    assert sorted((a["dp_rank"], a["stage"], a["rack"]) for a in info["actors"]) == \
        [(0, 0, "r0"), (0, 1, "r0"), (1, 0, "r1"), (1, 1, "r1")]
    latest = ckpt.latest_checkpoint(run_dir / "checkpoints")
    assert sorted(p.name for p in latest.glob("*.safetensors")) == [
        "stage0-ep0-dp1.safetensors", "stage0-ep0.safetensors", "stage1-ep0-dp1.safetensors",
        "stage1-ep0.safetensors"]
    full_model, full_optim, meta = load_pipeline_full(latest)  # the replicas' optimizer parts merge
    assert meta["layout"]["data_parallel"] == 2
    one_model, one_optim, _ = load_pipeline_full(ckpt.latest_checkpoint(tmp_path / "single" / "checkpoints"))
    assert set(full_model) == set(one_model) and set(full_optim) == set(one_optim)  # every state, once
    # the trace shows gradient buckets on their own thread, starting before the last backward ends
    trace = json.loads((run_dir / "trace.json").read_text())["traceEvents"]
    spans = [e for e in trace if e.get("ph") == "X"]
    for pid in {e["pid"] for e in spans}:
        mine = [e for e in spans if e["pid"] == pid]
        end_b = max(e["ts"] + e["dur"] for e in mine if e["name"].startswith("B"))
        assert any(e["name"].startswith("allreduce b") and e["ts"] < end_b for e in mine), pid

    # 1 x 1 (step 4) -> D = 2, and D = 2 (step 4) -> 1 x 1: both continue like the single process
    for src, name, parallel in (("single", "to-dp", DATA_PARALLEL), ("dp", "from-dp", None)):
        step4 = [p for p in ckpt.list_checkpoints(tmp_path / src / "checkpoints") if ckpt.checkpoint_step(p) == 4][0]
        c = _config(tmp_path, src, False)
        if parallel:
            c["parallel"] = parallel
        (tmp_path / name / "checkpoints").mkdir(parents=True)
        shutil.copytree(step4, tmp_path / name / "checkpoints" / step4.name)
        shutil.copy2(tmp_path / src / "metrics.jsonl", tmp_path / name / "metrics.jsonl")
        train(load_train_config(c, name=name), in_process=parallel is None, progress="none")
        cont = _rows(tmp_path / name)
        assert [r["step"] for r in cont] == list(range(7)), name
        for a, b in zip(cont[4:], ref[4:], strict=True):
            assert abs(a["ce"] - b["ce"]) <= 1e-5 * b["ce"], (name, a["step"], a["ce"], b["ce"])
