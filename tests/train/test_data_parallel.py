"""The controller under DistributedDataParallel: two gloo processes open and close at the same steps
and end with bit-identical parameters."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

STEPS = 24


def _worker(rank: int, world: int, folder: str) -> None:
    import tunnelgraph as tg  # noqa: F401  (imported in the child process)
    from tunnelgraph.datasets import teacher_task
    from tunnelgraph.models import residual_net
    from tunnelgraph.train import PlateauDetector, TunnelController

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # the same initial model on every rank (DDP also broadcasts rank 0's)
        model = residual_net(blocks=2, width=6, in_channels=1, classes=10)
        dataset = teacher_task(256, seed=1, image_shape=(1, 12, 12))
        sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank, seed=3)
        loader = torch.utils.data.DataLoader(dataset, batch_size=32, sampler=sampler)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        controller = TunnelController(
            ddp, optimizer, F.cross_entropy, loader, k=2, open_at=[3, 11], close_after=4, batches=2,
            through=("batchnorm", "pooling"), detector=PlateauDetector(window=6, rel_change=0.5),
        )
        step = 0
        while step < STEPS:
            for x, y in loader:
                loss = F.cross_entropy(controller.model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                controller.step(loss)
                step += 1
                if step == STEPS:
                    break
        # parameters: buffers (batch norm's running statistics) are rank-local until DDP's next
        # forward broadcasts rank 0's
        state = {name: value.detach().clone() for name, value in model.named_parameters()}
        torch.save(state, f"{folder}/state{rank}.pt")
        Path(f"{folder}/events{rank}.json").write_text(json.dumps(controller.summary()))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this build")
def test_two_gloo_ranks_open_and_close_at_the_same_steps_and_end_bit_identical(tmp_path: Path) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    events = [json.loads((tmp_path / f"events{rank}.json").read_text()) for rank in range(2)]
    states = [torch.load(tmp_path / f"state{rank}.pt") for rank in range(2)]
    steps = [[(e["step"], e["action"], e["sites"]) for e in summary["events"]] for summary in events]
    assert steps[0] == steps[1]
    actions = [action for _, action, _ in steps[0]]
    assert actions.count("open") >= 2 and actions.count("close") >= 2, steps[0]
    assert {3, 7, 11, 15} <= {step for step, _, _ in steps[0]}
    assert states[0].keys() == states[1].keys()
    for name in states[0]:
        assert torch.equal(states[0][name], states[1][name]), name
    for event in events[0]["events"]:
        if event["action"] == "open":
            assert event["max_rel_change"] < 1e-4  # float32 rounding
