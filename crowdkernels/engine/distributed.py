"""Multi-process training through torchrun: DDP with NCCL on GPUs and gloo on CPUs, I/O on rank 0.

``torchrun --nproc_per_node N -m crowdkernels train ...`` sets RANK, WORLD_SIZE and LOCAL_RANK;
:func:`init_from_env` joins the process group then. Without those variables everything here reports a
world of one process, so the same command runs on one process unchanged.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["init_from_env", "is_distributed", "rank", "world_size", "is_main", "all_reduce_sum", "barrier", "cleanup", "local_device"]


def init_from_env(device_type: str | None = None) -> bool:
    """Joins the process group described by torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT); backend NCCL when CUDA is used, gloo otherwise. Returns whether it is distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    use_cuda = (device_type or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return True


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes checkpoints, logs and progress bars."""
    return rank() == 0


def local_device(requested: str | None = None) -> torch.device:
    """The device of this process: the requested one, or cuda:LOCAL_RANK when CUDA is there, else cpu.

    A CUDA device with an index (`--device cuda:1`) is also made the current device when the run is not
    distributed (a distributed run has set cuda:LOCAL_RANK in `init_from_env`): code that launches on the
    current device (Triton kernels, `torch.cuda` streams and events, `.cuda()`) then uses the one asked for,
    not device 0."""
    if requested:
        dev = torch.device(requested)
        if dev.type == "cuda" and dev.index is None and is_distributed():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    elif torch.cuda.is_available():
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    else:
        dev = torch.device("cpu")
    if dev.type == "cuda" and dev.index is not None and not is_distributed():
        torch.cuda.set_device(dev)
    return dev


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over processes (a copy; the input itself on one process). NCCL needs the
    tensor on the GPU, so it travels there and back."""
    if not is_distributed():
        return tensor
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = tensor.detach().to(device).clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.to(tensor.device)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
