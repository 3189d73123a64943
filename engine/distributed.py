"""torch.distributed set-up for torchrun (and SLURM / submitit) runs.

NCCL on CUDA, gloo on CPU. A process-group timeout bounds how long the other
ranks wait when one rank dies.
"""
from __future__ import annotations

import datetime
import os
import socket
import sys
import types
from dataclasses import dataclass

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


@dataclass(frozen=True)
class Placement:
    """This process's place in the run: its rank, the number of processes, its device, and whether a
    launcher started it (then it is in a process group, one process included)."""
    rank: int
    world: int
    device: str          # "cpu", or "cuda:N" (the process's own GPU)
    distributed: bool = False


def local_gpu(local_rank: int, rank: int) -> int:
    """The CUDA device of a rank: LOCAL_RANK modulo the GPUs this process sees, and a line saying so
    when they differ (SLURM's --gpus-per-task / --gpu-bind show each task only its own GPU as cuda:0)."""
    count = torch.cuda.device_count()
    if count < 1:
        raise SystemExit("error: CUDA is available but no GPU is visible to this process (CUDA_VISIBLE_DEVICES="
                         f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')})")
    gpu = local_rank % count
    if gpu != local_rank:
        print(f"rank {rank}: LOCAL_RANK {local_rank}, {count} visible GPU(s) (CUDA_VISIBLE_DEVICES="
              f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}): using cuda:{gpu}", flush=True)
    return gpu


def init_distributed(device: str, dist_url: str = "env://", timeout_min: float = 3.0) -> Placement:
    """Read torchrun's (or submitit's) environment and join the process group when there is one.

    A launcher's environment (RANK and WORLD_SIZE) always builds a process group and DDP, one
    process included, so that a 1-GPU torchrun runs the code path of the 8-GPU run.
    ``device`` "cuda" becomes this process's GPU (``LOCAL_RANK`` modulo the visible GPUs; ``cuda:N``
    in a single process); ``timeout_min`` bounds collective waits: when a rank dies the others fail
    with an error within that time instead of hanging.
    """
    env = os.environ
    use_cuda = str(device).startswith("cuda")
    launched = "RANK" in env and "WORLD_SIZE" in env
    if launched:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        gpu = int(env.get("LOCAL_RANK", 0))
    else:  # one process: honour --device cuda:N
        rank, world = 0, 1
        gpu = (torch.device(device).index or 0) if use_cuda else 0
    if use_cuda:
        if not torch.cuda.is_available():
            raise SystemExit(f"error: --device {device} but CUDA is not available; use --device cpu")
        if launched:
            gpu = local_gpu(gpu, rank)
        torch.cuda.set_device(gpu)
        device = f"cuda:{gpu}"
    if launched:
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend=backend, init_method=dist_url, world_size=world, rank=rank,
                                timeout=datetime.timedelta(minutes=float(timeout_min)),
                                device_id=torch.device(device) if use_cuda else None)
    return Placement(rank, world, device, launched)


def cleanup() -> None:
    """End of the process group: the one shutdown path of every multi-process program and test. Every
    caller is a point all ranks reach together (the end of a run, an agreed stop). The ranks meet once more,
    so that no rank tears the group down while another still talks to it; then the group is destroyed, and
    with it its backend's threads, while the interpreter is still whole (``_release_group``)."""
    global _main_wait_group
    if not is_dist():
        return
    world, _main_wait_group = dist.group.WORLD, None  # (destroy_process_group ends every group)
    try:
        dist.barrier()
    except RuntimeError:  # a peer already gone: nothing left to wait for
        pass
    dist.destroy_process_group()
    _release_group(world)


# Modules of torch.distributed that keep a process group in a default argument, bound when they are imported.
_GROUP_DEFAULT_HOLDERS = ("torch.distributed.nn.functional", "torch.distributed.optim.zero_redundancy_optimizer",
                          "torch.distributed.fsdp.sharded_grad_scaler")


def _release_group(group) -> None:
    """Drop the references torch keeps to ``group`` after ``destroy_process_group``, so that it is destroyed
    (its backend's threads joined) when the caller lets go of it, not during the interpreter's shutdown.

    torch 2.14.1: ``torch.distributed.nn.functional`` binds ``group.WORLD`` as the default argument of its
    ten collectives when it is imported, and it is imported lazily, after ``init_process_group``: building
    the first optimizer imports torch._dynamo, which imports it. The default group then outlives
    ``destroy_process_group``: its gloo worker and transport threads (three) keep running into the
    interpreter's finalization: the state in which a good run was seen to abort ('terminate called without
    an active exception', status 134: a C++ destructor meeting a joinable thread; rare, not reproduced in
    70 loaded runs here, tools/teardown_stress.py). Those defaults (and the two others
    of the kind) are set to None, which means the default group at call time; the group is then destroyed and
    its threads joined as soon as the caller lets go of it (tests/test_faults.py counts the threads)."""
    for name in _GROUP_DEFAULT_HOLDERS:
        module = sys.modules.get(name)
        if module is None:
            continue
        functions = [f for f in vars(module).values() if isinstance(f, types.FunctionType)]
        functions += [f for c in vars(module).values() if isinstance(c, type) and c.__module__ == name
                      for f in vars(c).values() if isinstance(f, types.FunctionType)]
        for f in functions:
            if f.__defaults__ and any(d is group for d in f.__defaults__):
                f.__defaults__ = tuple(None if d is group else d for d in f.__defaults__)
            if f.__kwdefaults__ and any(d is group for d in f.__kwdefaults__.values()):
                f.__kwdefaults__ = {k: None if d is group else d for k, d in f.__kwdefaults__.items()}


# Minutes the other ranks wait for rank 0 in wait_for_main_process: rank 0 alone scores an evaluation
# (pycocotools on COCO val: minutes, more with masks), writes checkpoints (GBs with SHA-256, on a
# network file system) and figures. --dist_timeout, which bounds every other wait, is far shorter.
MAIN_PROCESS_WAIT_MIN = 60.0
_main_wait_group = None


def wait_for_main_process(dist_timeout_min: float = 0.0) -> None:
    """Every rank calls this, at the same point, after a phase in which rank 0 works alone.

    The other ranks then wait here, in a barrier of a process group of their own whose timeout is
    ``MAIN_PROCESS_WAIT_MIN`` (or ``dist_timeout_min`` when longer), instead of in the next
    collective, which the short ``--dist_timeout`` bounds (on NCCL its watchdog would abort the
    job). The group has the default group's backend (NCCL or gloo) and is made at the first call,
    which every rank reaches together. No-op without a process group."""
    global _main_wait_group
    if not is_dist():
        return
    if _main_wait_group is None:
        minutes = max(MAIN_PROCESS_WAIT_MIN, float(dist_timeout_min))
        _main_wait_group = dist.new_group(timeout=datetime.timedelta(minutes=minutes))
    dist.barrier(group=_main_wait_group)


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if is_dist():
        t = t.clone()
        dist.all_reduce(t)
        t /= get_world_size()
    return t


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpus_per_rank() -> int:
    """CPUs this rank may use: SLURM's --cpus-per-task when set, else the CPUs this process may run on
    (its affinity: taskset, cgroups) shared by the ranks of this node (torchrun's LOCAL_WORLD_SIZE)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    env = os.environ
    if env.get("SLURM_CPUS_PER_TASK", "").isdigit():
        return max(1, min(cpus, int(env["SLURM_CPUS_PER_TASK"])))
    local = int(env["LOCAL_WORLD_SIZE"]) if env.get("LOCAL_WORLD_SIZE", "").isdigit() else 1
    return max(1, cpus // max(local, 1))


def default_num_workers(device: torch.device, cap: int = 10) -> int:
    """DataLoader workers per rank when --num_workers is not given: the rank's CPUs (at most ``cap``,
    MAE's 10); on a CPU device one fewer, since the training itself runs on those cores."""
    cpus = cpus_per_rank()
    return max(0, min(cap, cpus - 1 if device.type == "cpu" else cpus))
