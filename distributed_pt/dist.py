"""Process-group helpers: rank, world size, rank-0 printing, barriers, teardown."""

from __future__ import annotations

import os
import socket
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist


def setup_single_process_env() -> None:
    """Fill in the variables `deepspeed.init_distributed` needs when started with plain `python -m ...`.

    Without them DeepSpeed falls back to MPI discovery and asks for mpi4py.
    """
    if "RANK" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> None:
    """Start the process group (NCCL on GPU, gloo on CPU) through DeepSpeed."""
    import deepspeed

    setup_single_process_env()
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    # DeepSpeed 0.19's ZeRO calls torch's all_gather_into_tensor, which warns on every call that it is deprecated:
    # not ours to change, and read by users as an error.
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    if not torch.cuda.is_available() and local_rank() == 0:
        remove_stale_shm_buffers()
    deepspeed.init_distributed()


_BEFORE_DESTROY: list[Callable[[], None]] = []


def before_destroy(fn: Callable[[], None]) -> None:
    """Have `destroy` call `fn` (after its barrier, before the process group goes): e.g. shutting down a colocated
    vLLM engine, which tears down the groups it made on top of ours (and ours too)."""
    _BEFORE_DESTROY.append(fn)


def destroy(barrier: bool = True) -> None:
    """Tear the process group down; a rank that exits without this can abort at exit (see ENV.md). `barrier=False`
    on an error path, where a rank that failed differently may already be gone."""
    if dist.is_available() and dist.is_initialized():
        buffer = shm_buffer()
        if barrier:
            dist.barrier()
        while _BEFORE_DESTROY:
            _BEFORE_DESTROY.pop()()
        if dist.is_initialized():
            import deepspeed.comm as ds_comm

            # Through DeepSpeed when it made the group: it then drops its own references to the subgroups it made
            # (sequence-parallel ones among them), which would otherwise be destroyed at interpreter exit and can
            # abort the process ("terminate called without an active exception").
            if getattr(ds_comm, "cdb", None) is not None:
                ds_comm.destroy_process_group()
            else:
                dist.destroy_process_group()
        buffer.unlink(missing_ok=True)


def shm_buffer() -> Path:
    """This rank's buffer of DeepSpeed's CPU shared-memory all-reduce. DeepSpeed 0.19 creates it and never unlinks it
    (ops/csrc/cpu/comm/shm.cpp defines `shared_close` but never calls it), leaving 64 MiB of RAM per rank per run in
    /dev/shm until reboot; `destroy` removes it (a peer that still maps it keeps its mapping)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank()}"


def remove_stale_shm_buffers(min_age_s: float = 120.0) -> list[Path]:
    """Remove this user's DeepSpeed CPU all-reduce buffers that no live process maps and that are older than
    `min_age_s`: a run that crashed never reached `destroy`, and each such file holds 64 MiB of RAM until reboot. (A
    run starting beside this one creates its buffers a moment before mapping them: young files are left alone.)
    Returns what was removed."""
    now = time.time()
    mine = []
    for b in sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*")):
        try:
            if now - b.stat().st_mtime > min_age_s:
                mine.append(b)
        except FileNotFoundError:  # its run removed it meanwhile
            continue
    in_use: set[Path] = set()
    for maps in Path("/proc").glob("[0-9]*/maps") if mine else []:
        try:
            text = maps.read_text()
        except OSError:  # gone, or another user's
            continue
        in_use.update(b for b in mine if str(b) in text)
    stale = [b for b in mine if b not in in_use]
    for b in stale:
        b.unlink(missing_ok=True)
    if stale:
        print(f"removed {len(stale)} stale DeepSpeed buffer(s) of crashed runs from /dev/shm", flush=True)
    return stale


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def print0(*args, **kwargs) -> None:
    if is_main():
        print(*args, **kwargs, flush=True)


def equal_share(items: list) -> list:
    """This rank's strided share of `items`, the same length on every rank (a remainder under world size is left
    out), so collective work such as ZeRO-3's parameter gathers stays in step across ranks."""
    r, w = rank(), world_size()
    return items[r : len(items) // w * w : w]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def device() -> torch.device:
    return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (returns a new tensor on t's device; works for gloo and NCCL, which reduces only CUDA
    tensors: a CPU tensor goes through this rank's GPU)."""
    return _all_reduce(t, dist.ReduceOp.SUM)


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """The element-wise maximum of a tensor over ranks (a new tensor on t's device), as `all_reduce_sum`."""
    return _all_reduce(t, dist.ReduceOp.MAX)


def _all_reduce(t: torch.Tensor, op: dist.ReduceOp) -> torch.Tensor:
    if not (dist.is_available() and dist.is_initialized()):
        return t.clone()
    out = t.to(device(), copy=True) if dist.get_backend() == "nccl" else t.clone()
    dist.all_reduce(out, op=op)
    return out.to(t.device)


def broadcast_object(obj):
    """Send a picklable object from rank 0 to every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's picklable object, in rank order, on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
