"""Distributed setup: one process per GPU under `mpiexec -n N` (mpi4py) or `torchrun`, or a plain single
process. NCCL when CUDA is available, gloo otherwise. The helpers also work when no group is set up."""

from __future__ import annotations

import datetime
import os
import socket
import sys
import time
import traceback
from collections.abc import Iterable
from types import TracebackType
from typing import Any

import torch
import torch.distributed as dist

from .infra.checkpoint import safe_torch_load

DEFAULT_TIMEOUT_S = 600.0
_MPI_ENV_VARS = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE")

_device: torch.device | None = None


def _under_mpi() -> bool:
    return any(v in os.environ for v in _MPI_ENV_VARS)


def _mpi_comm() -> Any:
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise RuntimeError(f"launched under mpiexec but mpi4py cannot be imported: {exc}") from None
    return MPI.COMM_WORLD


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def _timeout_seconds(timeout_s: float | None) -> float:
    if timeout_s is not None:
        value = float(timeout_s)
    else:
        raw = os.environ.get("GD_DIST_TIMEOUT", str(DEFAULT_TIMEOUT_S))
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"GD_DIST_TIMEOUT must be a number of seconds, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"distributed timeout must be positive, got {value}")
    return value


def _mpi_rendezvous() -> tuple[int, int, int]:
    """Rank, world size and node-local rank from MPI; rank 0 picks the master address and a free port."""
    from mpi4py import MPI

    comm = _mpi_comm()
    rank, size = comm.Get_rank(), comm.Get_size()
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    local_rank, node_size = node.Get_rank(), node.Get_size()
    node.Free()
    addr = None
    if rank == 0:
        host = "127.0.0.1" if node_size == size else socket.gethostbyname(socket.getfqdn())
        addr = (host, _free_port())
    host, port = comm.bcast(addr, root=0)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = host, str(port)
    return rank, size, local_rank


def setup_dist(backend: str | None = None, timeout_s: float | None = None) -> None:
    """Join the process group (idempotent). `timeout_s` bounds every collective (default $GD_DIST_TIMEOUT
    or 600 s). Under mpiexec with several ranks an uncaught exception aborts the whole job."""
    global _device
    if dist.is_initialized():
        return
    timeout = datetime.timedelta(seconds=_timeout_seconds(timeout_s))
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        launcher = "torchrun"
        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    elif _under_mpi():
        launcher = "mpi"
        rank, size, local_rank = _mpi_rendezvous()
    else:
        launcher, rank, size, local_rank = "single", 0, 1, 0

    if torch.cuda.is_available():
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        _device = torch.device("cuda", index)
    else:
        _device = torch.device("cpu")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")

    if launcher == "single":
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    else:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(local_rank))
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=size, timeout=timeout)
    if launcher == "mpi" and size > 1:
        abort_on_exception()


ABORT_GRACE_S = 1.0  # seconds between printing a rank's uncaught error and aborting the MPI job


def _abort_hook(
    exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None
) -> None:
    rank = get_rank()
    text = "".join(traceback.format_exception(exc_type, exc, tb))
    sys.stderr.write(f"[rank {rank}] uncaught {exc_type.__name__}: {exc}\n{text}")
    sys.stderr.write(f"[rank {rank}] aborting all MPI ranks\n")
    sys.stderr.flush()
    # mpiexec forwards each rank's output through a pipe; an immediate Abort can kill the forwarder before
    # it has drained the message (seen once in a CI run: empty stderr). Give it a moment.
    time.sleep(ABORT_GRACE_S)
    _mpi_comm().Abort(1)


def abort_on_exception() -> None:
    """Install an excepthook that, under MPI with several ranks, prints the error with the rank and calls
    MPI.COMM_WORLD.Abort(1), so one failing rank ends the job instead of leaving others at a barrier."""
    if _under_mpi() and _mpi_comm().Get_size() > 1:
        sys.excepthook = _abort_hook


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def dev() -> torch.device:
    """The device this process computes on (its GPU, or the CPU)."""
    if _device is not None:
        return _device
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def get_rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if _active() else 0


def get_world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if _active() else 1


def is_main_process() -> bool:
    """True on rank 0, which writes files and logs."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for all ranks (bounded by the group timeout)."""
    if _active() and get_world_size() > 1:
        dist.barrier()


def _comm_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of `tensor` on the device the backend communicates from."""
    device = dev() if dist.get_backend() == "nccl" else torch.device("cpu")
    return tensor.detach().to(device, copy=True)


def sync_params(params: Iterable[torch.Tensor]) -> None:
    """Overwrite every rank's parameters (and buffers) in place with rank 0's values."""
    if not (_active() and get_world_size() > 1):
        return
    for p in params:
        buf = _comm_tensor(p)
        dist.broadcast(buf, src=0)
        with torch.no_grad():
            p.copy_(buf)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of `tensor` over all ranks (a new tensor on the input's device; integers become float)."""
    out = tensor.detach().clone()
    if not out.is_floating_point():
        out = out.float()
    if not (_active() and get_world_size() > 1):
        return out
    buf = _comm_tensor(out)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return (buf / get_world_size()).to(out.device)


def all_gather_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's `tensor`, in rank order; first-dim sizes may differ, other dims and dtype must match."""
    if not (_active() and get_world_size() > 1):
        return [tensor.detach().clone()]
    meta = [None] * get_world_size()
    dist.all_gather_object(meta, (tuple(tensor.shape), str(tensor.dtype)))
    shapes = [m[0] for m in meta]
    if any(len(s) == 0 for s in shapes):
        raise ValueError(f"all_gather_tensors needs at least one dimension on every rank, got {shapes}")
    if any(s[1:] != shapes[0][1:] or m[1] != meta[0][1] for s, m in zip(shapes, meta, strict=True)):
        raise ValueError(f"all_gather_tensors: ranks disagree beyond the first dim: {meta}")
    longest = max(s[0] for s in shapes)
    buf = _comm_tensor(tensor)
    if buf.shape[0] < longest:
        pad = buf.new_zeros((longest - buf.shape[0], *buf.shape[1:]))
        buf = torch.cat([buf, pad])
    parts = [torch.empty_like(buf) for _ in shapes]
    dist.all_gather(parts, buf)
    return [p[: s[0]].to(tensor.device) for p, s in zip(parts, shapes, strict=True)]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order."""
    if not (_active() and get_world_size() > 1):
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` (any picklable object) on every rank."""
    if not (_active() and get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def load_state_dict(path: str, map_location: Any = "cpu") -> Any:
    """Load a checkpoint safely (`weights_only=True`); each rank reads the (shared) file itself."""
    return safe_torch_load(path, map_location=map_location)


def cleanup() -> None:
    """Leave the process group (idempotent), after every rank got here: a rank tearing gloo down while a peer
    still talks to it is the likely source of a rare "terminate called without an active exception"."""
    if _active():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
