"""Run with 2 ranks (mpiexec or torchrun-style env): `ok LOG_DIR` checks dist_util collectives and the
logger's cross-rank means; `fail` checks that a raising rank aborts the job."""

import sys
import time

import torch

from guided_diffusion import dist_util, logger


def check_collectives() -> None:
    """Assert setup, all_reduce_mean, sync_params, all_gather_tensors and broadcast_object on each rank."""
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    assert world == 2, world
    assert dist_util.dev() == torch.device("cpu")
    mean = dist_util.all_reduce_mean(torch.tensor([float(rank), 10.0 * rank]))
    assert torch.allclose(mean, torch.tensor([0.5, 5.0])), mean
    params = [torch.full((3,), float(rank + 1)), torch.full((2, 2), 7.0 * (rank + 1))]
    dist_util.sync_params(params)
    assert torch.equal(params[0], torch.ones(3)) and torch.equal(params[1], torch.full((2, 2), 7.0)), params
    local = torch.arange((rank + 1) * 4, dtype=torch.float32).reshape(rank + 1, 4) + 100 * rank
    parts = dist_util.all_gather_tensors(local)
    assert [tuple(p.shape) for p in parts] == [(1, 4), (2, 4)], parts
    assert torch.equal(parts[0], torch.arange(4.0).reshape(1, 4))
    assert torch.equal(parts[1], torch.arange(8.0).reshape(2, 4) + 100)
    assert dist_util.broadcast_object({"rank": rank}) == {"rank": 0}
    dist_util.barrier()
    print(f"rank {rank} OK", flush=True)


def check_logger(log_dir: str) -> None:
    """logkv_mean values are averaged over ranks (count-weighted); only rank 0 writes files."""
    rank = dist_util.get_rank()
    logger.configure(dir=log_dir, format_strs=["log", "csv"])
    logger.logkv("step", 3)
    for _ in range(rank + 1):
        logger.logkv_mean("loss", float(rank + 1))
    logger.logkv_mean(f"only_rank{rank}", 1.0)
    got = logger.dumpkvs()
    assert got == {"step": 3, "loss": (1.0 + 2.0 * 2) / 3, "only_rank0": 1.0, "only_rank1": 1.0}, got
    logger.reset()


def main() -> None:
    """Set up the group, then run the mode named by argv[1]."""
    dist_util.setup_dist(timeout_s=60)
    if sys.argv[1] == "ok":
        check_collectives()
        check_logger(sys.argv[2])
    else:
        if dist_util.get_rank() == 1:
            time.sleep(0.5)
            raise RuntimeError("deliberate failure on rank 1")
        dist_util.barrier()
    dist_util.cleanup()


if __name__ == "__main__":
    main()
