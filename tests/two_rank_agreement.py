"""A 2-rank gloo worker for tests/test_gpu_readiness.py (kept apart so that the spawned ranks import
little): the stop agreement and the memory peak over ranks, as train_one_epoch uses them."""
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist


def worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from util.loop import peak_memory_over_ranks
    from util.stop import StopAgreement
    requested = {"now": False}
    agree = StopAgreement(lambda: requested["now"], torch.device("cpu"), pipelined=True)
    stops = []
    for step in range(40):
        if rank == 1 and step == 9:      # the signal reaches rank 1 only, between two checks
            requested["now"] = True
        if agree(step, 1, 40):
            stops.append(step)
            break
    import util.loop
    # each rank's own peaks (allocated, reserved), rank 1 larger in one and smaller in the other
    util.loop.peak_memory_mb = lambda device: ((100.0, 900.0), (300.0, 700.0))[rank]
    reduced = peak_memory_over_ranks(torch.device("cpu"))
    Path(out, f"{rank}.json").write_text(json.dumps({"stops": stops, "reduced": reduced}))
    dist.destroy_process_group()
