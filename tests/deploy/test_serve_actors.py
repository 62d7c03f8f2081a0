"""Serving on the stage actors: a Serve replica owns a placement group (bundle 0: the replica;
then one bundle per stage actor, pinned to its rack by a bundle label selector) and its
continuous-batching engine runs prefill and decode through the actors. Served greedy output
equals the model's own greedy generation, with 1 and with 2 pipeline stages."""

import concurrent.futures as cf

import pytest
import ray
import requests
import torch
from ray import serve

from comm.launch import free_port
from deploy.serve import build
from tests.deploy.util import write_tiny_hf


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    model, tok = write_tiny_hf(d, tmp_path_factory.mktemp("tok"))
    return d, model, tok


def _placements():
    """Rack label of the node every live actor of a StageWorker or the replica runs on."""
    from ray.util.state import list_actors

    nodes = {n["NodeID"]: (n.get("Labels") or {}).get("rack") for n in ray.nodes() if n.get("Alive")}
    return sorted((a.class_name, nodes.get(a.node_id)) for a in list_actors(filters=[("state", "=", "ALIVE")])
                  if "StageWorker" in a.class_name or "OpenAIServer" in a.class_name)


@pytest.mark.parametrize("stages,shards", [(1, 1), (2, 2)])
def test_served_greedy_equals_model_greedy_on_stage_actors(two_racks, hf_dir, stages, shards):
    d, model, tok = hf_dir
    racks = ["r0"] if stages == 1 else ["r0", "r1"]
    topology = {"racks": racks, "pipeline_stages": stages, "expert_parallel": shards, "cpus_per_actor": 0.5}
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build({"path": str(d), "model_name": "m", "topology": topology}), name="tide", route_prefix="/")
        where = _placements()
        n_actors = stages * shards
        assert [c for c, _ in where].count("ServeReplica:tide:OpenAIServer") == 1
        assert sorted(r for c, r in where if "StageWorker" in c) == sorted(
            racks[s * len(racks) // stages] for s in range(stages) for _ in range(shards))
        assert len(where) == n_actors + 1
        url = f"http://127.0.0.1:{port}/v1"
        prompts = ["def add(a, b):", "import os\nprint(", "for i in range(10):\n    pass\nclass A:"]
        eos = tok.token_to_id("<|endoftext|>")

        def complete(p):
            r = requests.post(f"{url}/completions", json={"prompt": p, "max_tokens": 7, "temperature": 0,
                                                         "logit_bias": {str(eos): -100}}, timeout=120)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]

        with cf.ThreadPoolExecutor(3) as ex:  # concurrently: decoded as one ragged batch through the stages
            got = list(ex.map(complete, prompts))
        for p, text in zip(prompts, got, strict=True):
            ids = tok.encode(p).ids
            with torch.no_grad():
                st = model.new_state(1)
                logits = model.prefill(torch.tensor([ids]), st)
                want = []
                for _ in range(7):
                    logits[..., eos] = float("-inf")
                    nxt = int(logits.argmax(-1))
                    want.append(nxt)
                    logits = model(torch.tensor([[nxt]]), st)[:, -1]
            assert text == tok.decode(want), p
        stats = requests.get(f"{url}/stats", timeout=30).json()
        assert stats["live_sequences"] == 0 and stats["decode_state_bytes"] == 0
        assert stats["completed"] == 3
    finally:
        serve.shutdown()


def test_stage_actors_load_a_training_checkpoint_themselves(two_racks, tmp_path):
    """Serving a tide run on 2 x 2 stage actors (of a D = 2 training topology: one replica serves):
    every actor reads its own tensors from the run's sharded checkpoint (verified first) and the
    pipeline's logits equal the whole model's; a damaged checkpoint is refused by name."""
    from cluster.checkpoint.models import load_trained_model
    from cluster.training.config import load_train_config
    from cluster.training.trainer import train
    from deploy.loader import actor_backend, locate, model_args_of
    from tests.cluster.test_trainer import tiny_config

    cfg = tiny_config(tmp_path, "served", curriculum=[{"name": "a", "seq_len": 64, "batch_tokens": 256, "steps": 2,
                                                       "attention": "dense"}])
    run = train(load_train_config(cfg), in_process=True, progress="none")["run_dir"]
    topology = {"racks": ["r0", "r1"], "data_parallel": 2, "pipeline_stages": 2, "expert_parallel": 2,
                "cpus_per_actor": 0.25}
    src = locate(run)
    model, _ = load_trained_model(run)
    backend = actor_backend(src, model_args_of(run), topology)
    try:
        assert len(backend.group.actors) == 4  # one replica of the 2 x 2 x 2 graph
        ids = [5, 9, 11, 40, 2, 7]
        got = backend.prefill(0, ids, True)
        with torch.no_grad():
            want = model.prefill(torch.tensor([ids]), model.new_state(1))[0]
        assert (got - want).abs().max() <= 1e-5
        backend.free([0])
    finally:
        backend.close()
    f = src.path / "stage0-ep0.safetensors"  # the run was 1 x 1: one shard file
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.chmod(0o644)
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="stage0-ep0"):
        actor_backend(src, model_args_of(run), topology)
