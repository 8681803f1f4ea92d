"""The DKDM dynamic batch: a per-rank pool of teacher denoising states that supplies the student's batches.

Pool convention (the authors' cache layout): item ``i`` holds ``x = total_x_t_1[i]``, the state the teacher's
step at ``k = total_t[i]`` produced; its next teacher step runs at ``t = k - 1``. Fresh noise has ``k = T``,
a clean sample ``k = 0``; a drawn clean item restarts from fresh noise.

Modes (``teacher.iter_choice``): ``dynamic_iterative_distillation`` (pool of round(rho * T) * B prepared
states, B random ones advanced per step), ``shuffled_iterative_distillation`` (a prepared pool of B, all
advanced per step) and ``iterative_distillation`` (B trajectories from noise in lockstep, no preparation).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from ... import logger
from ...infra.mixed_precision import autocast_context
from ...infra.run_lock import shared_file_writer
from .cache import CacheError, load_cache, save_cache, validate_cache

DYNAMIC = "dynamic_iterative_distillation"
SHUFFLED = "shuffled_iterative_distillation"
ITERATIVE = "iterative_distillation"
MODES = (DYNAMIC, SHUFFLED, ITERATIVE)

_GATHER_CHUNK = 4096  # items per collective when gathering a pool to rank 0
_GPU_MARGIN_BYTES = 2 << 30  # free GPU memory left untouched when placing the pool
PADDED_CALL_SIZES = 4  # the preparation's padded calls take the full size or one of its 3 halvings


def padded_call_sizes(full: int, count: int = PADDED_CALL_SIZES) -> list[int]:
    """The sizes the preparation pads its tail calls up to, largest first: `full` and its halvings, rounded
    up to multiples of 8, at most `count` of them. A few shapes, each one CUDA graph, instead of a new shape
    per call or every call at full size (a pool smaller than one call shrinks through all of them)."""
    sizes = [full]
    for k in range(1, count):
        size = min(full, -(-full // (2**k * 8)) * 8)
        if size < sizes[-1]:
            sizes.append(size)
    return sizes


def pool_size(iter_choice: str, rho: float, student_timesteps: int, batch_size: int) -> int:
    """Items per rank: round(rho * T_student) * B for the dynamic mode, B for the other two."""
    if iter_choice not in MODES:
        raise ValueError(f"iter_choice must be one of {', '.join(MODES)}; got {iter_choice!r}")
    if iter_choice == DYNAMIC:
        n = round(rho * student_timesteps) * batch_size
        if n < batch_size:
            raise ValueError(
                f"BATCH (rho) {rho} with T={student_timesteps} gives a pool of {n} items, fewer than the "
                f"batch size {batch_size}"
            )
        return n
    return batch_size


def balanced_end_steps(n_items: int, world_size: int, T: int, seed: int) -> torch.Tensor:
    """End steps in 1..T-1 for ``world_size`` ranks x ``n_items`` (LongTensor [W, n]), uniform overall.

    Every rank gets the same total number of teacher steps (sum of T - end): sorted draws are dealt in snake
    order, then ranks above the minimum raise random end steps by one until the totals agree. Deterministic in
    ``seed``, so each rank computes the same table without communication.
    """
    if T < 2:
        raise ValueError(f"the teacher diffusion needs at least 2 steps for a dynamic pool; got T={T}")
    gen = torch.Generator().manual_seed(seed)
    draws = torch.randint(1, T, (n_items * world_size,), generator=gen).sort().values
    pos = torch.arange(draws.numel())
    block, within = pos // world_size, pos % world_size
    owner = torch.where(block % 2 == 0, within, world_size - 1 - within)
    ends = torch.stack([draws[owner == r] for r in range(world_size)])
    target = int((T - ends).sum(dim=1).min())
    for r in range(world_size):
        excess = int((T - ends[r]).sum()) - target
        while excess > 0:
            room = torch.nonzero(ends[r] < T - 1).flatten()
            pick = room[torch.randperm(room.numel(), generator=gen)[:excess]]
            ends[r, pick] += 1
            excess -= pick.numel()
        ends[r] = ends[r][torch.randperm(n_items, generator=gen)]
    return ends


def choose_pool_device(pool_bytes: int, device: torch.device) -> torch.device:
    """Keep the pool on the GPU when it fits in free memory with a margin, else in (pinned) host memory."""
    if device.type != "cuda":
        return torch.device("cpu")
    free, total = torch.cuda.mem_get_info(device)
    margin = max(_GPU_MARGIN_BYTES, total // 10)
    return device if pool_bytes <= free - margin else torch.device("cpu")


def _dist_active(world_size: int) -> bool:
    return world_size > 1 and dist.is_available() and dist.is_initialized()


def _comm_device(fallback: torch.device) -> torch.device:
    """Tensors for collectives must live on CUDA under NCCL and may live on the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return fallback if fallback.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_to_rank0(
    total_t: torch.Tensor, total_x: torch.Tensor, rank: int, world_size: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """Concatenate every rank's equally sized pool on rank 0 in rank order (numpy); None on other ranks."""
    if not _dist_active(world_size):
        return total_t.cpu().numpy().astype(np.int64), total_x.float().cpu().numpy()
    n = total_t.shape[0]
    comm = _comm_device(total_x.device)
    out_t = np.empty((world_size * n,), np.int64) if rank == 0 else None
    out_x = np.empty((world_size * n, *total_x.shape[1:]), np.float32) if rank == 0 else None
    for start in range(0, n, _GATHER_CHUNK):
        stop = min(n, start + _GATHER_CHUNK)
        for src, dst in ((total_t, out_t), (total_x, out_x)):
            piece = src[start:stop].to(comm).contiguous()
            parts = [torch.empty_like(piece) for _ in range(world_size)] if rank == 0 else None
            dist.gather(piece, parts, dst=0)
            if rank == 0:
                for r, part in enumerate(parts):
                    dst[r * n + start : r * n + stop] = part.cpu().numpy()
    return (out_t, out_x) if rank == 0 else None


class DynamicBatch:
    """Per-rank pool of teacher states; ``draw()`` advances B of them one teacher step and returns the batch.

    A batch is a dict: ``x_t`` (student input), ``x_tm1`` (teacher's sampled x_{t-1}), ``t``, ``teacher_out``
    (the teacher's ``p_mean_variance`` dict), ``weights`` (1 = kept, 0 = dropped by ``prob`` in the per-item
    variant) and ``model_kwargs``. ``prob`` < 1 is the authors' random discard: one draw per batch, and a
    discarded batch is neither trained on nor written back, its items advancing another step in place until a
    draw keeps them; ``prob_per_item`` instead drops items from the loss while the pool advances as usual.
    Random draws and noise come from the pool's own generators, saved in ``state_dict``.
    ``precision`` ("fp32", "fp16", "bf16") is the teacher's autocast dtype on CUDA.
    """

    def __init__(
        self,
        teacher: torch.nn.Module,
        diffusion: Any,
        *,
        batch_size: int,
        image_shape: tuple[int, int, int],
        iter_choice: str = DYNAMIC,
        rho: float = 0.4,
        student_timesteps: int | None = None,
        prob: float = 1.0,
        prob_per_item: bool = False,
        teacher_batch_size: int = 256,
        clip_denoised: bool = True,
        precision: str = "fp32",
        device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ) -> None:
        if not 0.0 < prob <= 1.0:
            raise ValueError(f"prob must be in (0, 1]; got {prob}")
        self.teacher = teacher
        self.diffusion = diffusion
        self.T = int(diffusion.num_timesteps)
        self.batch_size = int(batch_size)
        self.image_shape = tuple(int(s) for s in image_shape)
        self.iter_choice = iter_choice
        self.prob = float(prob)
        self.prob_per_item = bool(prob_per_item)
        self.teacher_batch_size = int(teacher_batch_size)
        self.clip_denoised = bool(clip_denoised)
        self.precision = precision
        self.device = torch.device(device)
        self.rank, self.world_size, self.seed = int(rank), int(world_size), int(seed)
        self.size = pool_size(iter_choice, rho, student_timesteps or self.T, self.batch_size)
        self.index_gen = torch.Generator()
        self.noise_gen = torch.Generator(device=self.device)
        self._seed_generators()
        item_bytes = int(np.prod(self.image_shape)) * 4 + 8
        self.pool_device = choose_pool_device(self.size * item_bytes, self.device)
        self.total_t: torch.Tensor | None = None
        self.total_x: torch.Tensor | None = None

    def _seed_generators(self) -> None:
        """Put the index and noise generators at their start (a function of seed and rank)."""
        self.index_gen.manual_seed(self.seed * 1000003 + self.rank)
        self.noise_gen.manual_seed(self.seed * 1000003 + self.rank + 1)

    # ----------------------------------------------------------------------------------------------------
    # Teacher steps

    def _noise(self, n: int) -> torch.Tensor:
        return torch.randn((n, *self.image_shape), generator=self.noise_gen, device=self.device)

    @staticmethod
    def _to(host: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A fresh host tensor on ``device`` without a host sync: staged in pinned memory (a copy from
        pageable memory may wait for the stream), then copied asynchronously."""
        return host if device.type == "cpu" else host.pin_memory().to(device, non_blocking=True)

    def teacher_step(
        self, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One ancestral teacher step at ``t`` (the diffusion's ``p_mean_variance`` plus our own noise)."""
        out = self._predict(x_t, t)
        with torch.inference_mode():
            nonzero = (t != 0).float().view(-1, *([1] * (x_t.dim() - 1)))
            x_tm1 = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * self._noise(x_t.shape[0])
        return x_tm1, out

    def _predict(self, x_t: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.inference_mode(), autocast_context(self.precision, self.device):
            out = self.diffusion.p_mean_variance(self.teacher, x_t, t, clip_denoised=self.clip_denoised)
            return {k: v.float() for k, v in out.items()}

    def teacher_prediction(self, x_t: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        """The teacher's ``p_mean_variance`` at (x_t, t) without gradient, as ordinary tensors (no RNG use);
        for extra objectives that query the teacher on other states (e.g. the student's own next state)."""
        return {k: v.clone() for k, v in self._predict(x_t, t).items()}

    def _allocate(self, n: int) -> None:
        pin = self.pool_device.type == "cpu" and self.device.type == "cuda"
        # The steps stay in (pageable) host memory wherever the states live: draws read them without a sync.
        self.total_t = torch.empty((n,), dtype=torch.int64)
        self.total_x = torch.empty((n, *self.image_shape), device=self.pool_device, pin_memory=pin)

    # ----------------------------------------------------------------------------------------------------
    # Pool setup

    def prepare(self, progress: bool = True, pad_to_full: bool | None = None) -> None:
        """Fill the pool: noise advanced by the teacher to per-item end steps (balanced over ranks).

        Every teacher call takes the first `teacher_batch_size` unfinished items, each at its own timestep
        (as the authors' `manage_denoise_fn`), so calls stay full-size until the last items; with
        `pad_to_full` (default: on CUDA, where one shape serves one CUDA graph or compiled graph) the tail
        calls are padded with repeats, whose results are dropped, up to the smallest of
        `padded_call_sizes` of the full size (the teacher batch, or the whole pool when it is smaller).
        Each item still ends exactly at its end step. The iterative mode starts all B items at fresh noise
        instead.
        """
        self._allocate(self.size)
        self.total_t.fill_(self.T)
        for start in range(0, self.size, self.teacher_batch_size):
            stop = min(self.size, start + self.teacher_batch_size)
            self.total_x[start:stop] = self._noise(stop - start).to(self.pool_device)
        if self.iter_choice == ITERATIVE:
            return
        pad = self.device.type == "cuda" if pad_to_full is None else pad_to_full
        full = min(self.teacher_batch_size, self.size)  # a pool smaller than one call is one call, not padded
        sizes = padded_call_sizes(full)
        ends = balanced_end_steps(self.size, self.world_size, self.T, self.seed)[self.rank]
        steps = self.total_t.clone()
        bar = tqdm(total=int((self.T - ends).sum()), desc="dynamic batch",
                   disable=not progress or self.rank != 0, ncols=80)
        while True:
            unfinished = (steps > ends).nonzero().flatten()
            if unfinished.numel() == 0:
                break
            idx = unfinished[: self.teacher_batch_size]
            n = idx.numel()
            if pad and n < full:
                idx = idx[torch.arange(min(size for size in sizes if size >= n)) % n]
            x = self.total_x[self._to(idx, self.pool_device)].to(self.device, non_blocking=True)
            t = steps[idx] - 1
            x_tm1, _ = self.teacher_step(x, self._to(t, self.device))
            real = self._to(idx[:n], self.pool_device)
            self.total_x[real] = x_tm1[:n].to(self.pool_device)
            steps[idx[:n]] -= 1
            bar.update(n)
        bar.close()
        self.total_t.copy_(ends)

    def load_arrays(self, total_t: np.ndarray, total_x: np.ndarray, source: str = "pool state") -> None:
        """Install this rank's pool from arrays of exactly ``self.size`` items (validated)."""
        validate_cache(source, total_t, total_x, self.T)
        if total_t.shape[0] != self.size or tuple(total_x.shape[1:]) != self.image_shape:
            raise CacheError(
                f"{source}: expected {self.size} items of shape {self.image_shape}, got {total_t.shape[0]} "
                f"of {tuple(total_x.shape[1:])}"
            )
        self._allocate(self.size)
        self.total_t.copy_(torch.from_numpy(np.ascontiguousarray(total_t, dtype=np.int64)))
        self.total_x.copy_(torch.from_numpy(np.ascontiguousarray(total_x, dtype=np.float32)))

    def load_slice(self, path: str, exact: bool = False) -> None:
        """Take this rank's slice [rank*N, (rank+1)*N) of a cache file holding at least world_size*N items
        (exactly that many with `exact`, as a resumed pool must: a prefix of it would silently drop items).
        A dynamic pool read from a larger cache (another rho or batch) trains on a prefix, as the authors'
        code does, with one warning naming both counts; the shuffled mode reads a prefix by design."""
        arrays = load_cache(path, T=self.T)
        need = self.world_size * self.size
        have = arrays["total_t"].shape[0]
        if exact and have != need:
            raise CacheError(
                f"{path}: the resumed pool holds {have} items but this run's pool is {self.world_size} "
                f"rank(s) x {self.size} = {need}; resume with the batch size and BATCH it was made with"
            )
        if have < need:
            raise CacheError(
                f"{path}: holds {have} items but {self.world_size} rank(s) x {self.size} per rank = {need} "
                f"are needed ({self.iter_choice}, batch {self.batch_size}); prepare a new cache or fix BATCH"
            )
        if have > need and self.iter_choice == DYNAMIC and self.rank == 0:
            logger.warn(
                f"{path} holds {have} items and this run's dynamic pool uses the first {need} "
                f"({self.world_size} rank(s) x {self.size}); was it made for another BATCH (rho) or batch?"
            )
        lo, hi = self.rank * self.size, (self.rank + 1) * self.size
        self.load_arrays(arrays["total_t"][lo:hi], arrays["total_x_t_1"][lo:hi], source=path)

    def setup(self, path: str, progress: bool = True) -> None:
        """Training start: iterative mode starts from noise; the others load their slice of ``path``. When
        it does not exist, the dynamic mode prepares and writes it first (rank 0 writes, all ranks wait);
        the shuffled mode, whose ``path`` is the dynamic pool's cache (it reads a prefix of it), prepares its
        small pool in memory and never writes that file, which would then hold too few items for the
        dynamic run that shares it."""
        if self.iter_choice == ITERATIVE:
            self.prepare(progress=False)
        elif os.path.exists(path):
            self.load_slice(path)
        elif self.iter_choice == DYNAMIC:
            self.prepare_and_save(path, progress=progress)
            # training then draws exactly as a run that finds this file would: same pool, same randomness
            self._seed_generators()
            self.load_slice(path)
        else:
            self.prepare(progress=progress)
            self._seed_generators()
        where = "GPU" if self.pool_device.type == "cuda" else "host memory"
        logger.log(f"dynamic batch: {self.iter_choice}, {self.size} items per rank, pool kept in {where}")

    def prepare_and_save(self, path: str, progress: bool = True) -> None:
        """Prepare this rank's share, gather all ranks' pools and write them to ``path`` on rank 0."""
        self.prepare(progress=progress)
        self.save(path)

    # ----------------------------------------------------------------------------------------------------
    # Training draws

    def _require_pool(self) -> None:
        if self.total_t is None:
            raise RuntimeError("the dynamic batch has no pool; call setup(), prepare() or load_state_dict()")

    def draw(self) -> dict[str, Any]:
        """Advance B pool items (random ones in the dynamic mode, all otherwise) one teacher step.

        The steps (``total_t``) live in host memory, so which items restart from noise is decided on the host
        and the draw never waits for the GPU; indices reach the device by asynchronous copies.
        """
        self._require_pool()
        if self.iter_choice == DYNAMIC:
            idx = torch.randperm(self.size, generator=self.index_gen)[: self.batch_size]
        else:
            idx = torch.arange(self.size)
        keep = torch.ones(self.batch_size)
        if self.prob_per_item:
            keep = (torch.rand(self.batch_size, generator=self.index_gen) < self.prob).float()
        k = self.total_t[idx]
        x = self.total_x[self._to(idx, self.pool_device)].to(self.device, non_blocking=True)
        while True:
            t, t_dev, x, x_tm1, out = self._advance(k, x)
            if self.prob_per_item or self.prob >= 1.0:
                break
            if float(torch.rand((), generator=self.index_gen)) < self.prob:
                break
            k, x = t, x_tm1
        self.total_t[idx] = t
        self.total_x[self._to(idx, self.pool_device)] = x_tm1.to(self.pool_device)
        return {
            "x_t": x,
            "x_tm1": x_tm1.clone(),
            "t": t_dev,
            "teacher_out": {name: value.clone() for name, value in out.items()},
            "weights": self._to(keep, self.device),
            "model_kwargs": {},
        }

    def _advance(
        self, k: torch.Tensor, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """One teacher step of items at steps ``k`` (host) with states ``x`` (overwritten); finished items
        (k = 0) restart from fresh noise at T. Returns (t on the host, t on the device, x_t, x_tm1, out)."""
        done = (k == 0).numpy()
        t = torch.where(k == 0, torch.full_like(k, self.T), k) - 1
        n_done = int(done.sum())
        if n_done:
            x[self._to(torch.from_numpy(done.nonzero()[0]), self.device)] = self._noise(n_done)
        t_dev = self._to(t, self.device)
        x_tm1, out = self.teacher_step(x, t_dev)
        return t, t_dev, x, x_tm1, out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            yield self.draw()

    # ----------------------------------------------------------------------------------------------------
    # Persistence

    def state_dict(self) -> dict[str, Any]:
        """This rank's pool in the cache layout (numpy) plus the generator states."""
        self._require_pool()
        return {
            "total_t": self.total_t.cpu().numpy().copy(),
            "total_x_t_1": self.total_x.cpu().numpy().copy(),
            **self.rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a pool saved by ``state_dict`` exactly (items, steps and generators)."""
        self.load_arrays(state["total_t"], state["total_x_t_1"])
        self.load_rng_state(state)

    def rng_state(self) -> dict[str, torch.Tensor]:
        """The pool's generator states (index draws and teacher noise)."""
        return {"index_rng": self.index_gen.get_state(), "noise_rng": self.noise_gen.get_state()}

    def load_rng_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore generator states saved by ``rng_state``."""
        self.index_gen.set_state(state["index_rng"].cpu())
        self.noise_gen.set_state(state["noise_rng"].cpu())

    def save(self, path: str, checksum: bool = False) -> None:
        """Gather all ranks' pools to rank 0 and write them as one cache file (all ranks call this);
        `checksum` for this project's own teacher-state files (`save_cache`)."""
        self._require_pool()
        gathered = gather_to_rank0(self.total_t, self.total_x, self.rank, self.world_size)
        if gathered is not None:
            with shared_file_writer(path):
                save_cache(path, *gathered, checksum=checksum)
            logger.log(f"dynamic batch: wrote {gathered[0].shape[0]} items to {path}")
        if _dist_active(self.world_size):
            dist.barrier()
