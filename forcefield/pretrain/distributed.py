"""Multi-process pretraining: process-group setup from torchrun's environment, helpers, a local launcher.

``torchrun --nproc_per_node=N oreo pretrain ...`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and
``MASTER_ADDR``/``MASTER_PORT``; :func:`init_distributed` reads them and starts a process group with NCCL when
CUDA is available (one GPU per local rank) and gloo on CPU. Without those variables it returns a
single-process :class:`DistInfo` and starts nothing. :func:`launch_local` spawns N CPU processes with gloo
(what the tests use; no torchrun needed).
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init_distributed", "cleanup", "barrier", "all_reduce_mean", "broadcast_object",
           "launch_local", "free_port"]


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None
    started_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto", backend: Optional[str] = None) -> DistInfo:
    """Join (or start) the process group described by torchrun's environment variables."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() if device == "auto" else str(device).startswith("cuda")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world <= 1:
        return DistInfo(device=dev)
    rank = int(os.environ["RANK"])
    backend = backend or ("nccl" if use_cuda else "gloo")
    started = False
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
        started = True
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev, backend=backend,
                    started_here=started)


def cleanup(info: DistInfo) -> None:
    if info.started_here and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_mean(values: Dict[str, float], info: DistInfo) -> Dict[str, float]:
    """Average scalars over ranks (keys must be the same on every rank)."""
    if not info.enabled or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64,
                     device=info.device if info.backend == "nccl" else "cpu")
    dist.all_reduce(t)
    t /= info.world_size
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def broadcast_object(obj: Any, info: DistInfo, src: int = 0) -> Any:
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local_worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    info = init_distributed(device="cpu", backend="gloo")
    try:
        fn(info, *args)
    finally:
        cleanup(info)


def launch_local(fn: Callable, world_size: int, *args, start_method: str = "spawn") -> None:
    """Run ``fn(info, *args)`` in ``world_size`` CPU processes joined by gloo (``fn`` must be importable).
    ``start_method="fork"`` starts faster (no re-import of torch) where fork is safe (Linux, no CUDA in use)."""
    import torch.multiprocessing as mp
    mp.start_processes(_local_worker, args=(world_size, free_port(), fn, args), nprocs=world_size, join=True,
                       start_method=start_method)
