"""FSDP2 (torch's `fully_shard`) on 2 CPU processes (gloo), sharded as `examples/accelerate_configs/fsdp.yaml` shards
(one unit per `TitansDecoderLayer`, then the root): training a global batch split over the ranks ends with the
parameters of one process training the whole batch. Accelerate itself runs CPU processes as DDP whatever the config
(README, "Several processes"), so this calls torch directly."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

WORKER = textwrap.dedent(
    """
    import json, sys
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from tiny import tiny_model

    def train(model, rank, world):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        generator = torch.Generator().manual_seed(5)
        for _ in range(3):
            batch = torch.randint(1, 64, (4, 24), generator=generator).chunk(world)[rank]  # no padding: equal means
            loss = model(batch, labels=batch, use_cache=False).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return model

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    variant = sys.argv[1]
    model = tiny_model(variant, dtype=torch.float32).train()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    assert all(type(p).__name__ == "DTensor" for p in model.parameters())
    state = get_model_state_dict(train(model, rank, world), options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        single = train(tiny_model(variant, dtype=torch.float32).train(), 0, 1).state_dict()
        initial = tiny_model(variant, dtype=torch.float32).state_dict()
        report = {
            "keys": sorted(state) == sorted(single),
            "max_diff": max((state[k] - single[k]).abs().max().item() for k in single),
            "max_step": max((single[k] - initial[k]).abs().max().item() for k in single),
        }
        print("REPORT" + json.dumps(report))
    dist.destroy_process_group()
    """
)


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="torch built without gloo")
@pytest.mark.parametrize("variant", ["mac", "mag"])
def test_fsdp2_on_two_cpu_processes_equals_one_process(variant, tmp_path):
    script = tmp_path / "fsdp2_worker.py"
    script.write_text(WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parent))
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
         str(script), variant],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    report = json.loads(out.stdout.split("REPORT", 1)[1].splitlines()[0])
    assert report["keys"]
    assert report["max_step"] > 1e-2  # the parameters moved ...
    assert report["max_diff"] < 1e-4, report  # ... identically, up to the order of float additions
