"""The DKDM pool: preparation covers all noise levels, draws advance exactly the drawn items, modes, state."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from guided_diffusion.config import load_config, model_and_diffusion_kwargs
from guided_diffusion.distill.dkdm.cache import CacheError, load_cache, save_cache
from guided_diffusion.distill.dkdm.pool import (
    DYNAMIC,
    ITERATIVE,
    SHUFFLED,
    DynamicBatch,
    balanced_end_steps,
    padded_call_sizes,
    pool_size,
)
from guided_diffusion.script_util import create_model_and_diffusion

ROOT = Path(__file__).resolve().parents[1]
TINY_KD = ROOT / "tests" / "configs" / "tiny_kd.yaml"
B = 4

torch.set_num_threads(1)  # the CI box has 2 shared cores; more threads only contend


class CountingTeacher(torch.nn.Module):
    """Wraps the teacher to count how many images it was applied to."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner
        self.images = 0

    def forward(self, x, t, **kwargs):
        self.images += x.shape[0]
        return self.inner(x, t, **kwargs)


@pytest.fixture(scope="module")
def teacher_and_diffusion():
    cfg = load_config(TINY_KD)
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**model_and_diffusion_kwargs(cfg.teacher))
    return CountingTeacher(model.eval()), diffusion


def make_pool(
    teacher_and_diffusion, iter_choice=DYNAMIC, prob=1.0, seed=0, rank=0, world_size=1, prob_per_item=False
):
    teacher, diffusion = teacher_and_diffusion
    return DynamicBatch(
        teacher,
        diffusion,
        batch_size=B,
        image_shape=(3, 16, 16),
        iter_choice=iter_choice,
        rho=0.4,
        prob=prob,
        prob_per_item=prob_per_item,
        teacher_batch_size=8,
        seed=seed,
        rank=rank,
        world_size=world_size,
    )


@pytest.fixture(scope="module")
def prepared_state(teacher_and_diffusion):
    """One prepared dynamic pool (and the teacher images it cost), reused by tests that only draw from it."""
    teacher, _ = teacher_and_diffusion
    teacher.images = 0
    pool = make_pool(teacher_and_diffusion)
    pool.prepare(progress=False)
    return pool.state_dict(), teacher.images


def prepared_pool(teacher_and_diffusion, prepared_state, **kwargs):
    pool = make_pool(teacher_and_diffusion, **kwargs)
    pool.load_state_dict(prepared_state[0])
    return pool


def test_pool_size_follows_rho_and_mode():
    assert pool_size(DYNAMIC, 0.4, 1000, 128) == 400 * 128
    assert pool_size(SHUFFLED, 0.4, 1000, 128) == 128
    assert pool_size(ITERATIVE, 0.4, 1000, 128) == 128
    with pytest.raises(ValueError, match="iter_choice"):
        pool_size("bogus", 0.4, 1000, 128)


def test_end_steps_uniform_over_1_to_T_minus_1_and_balanced_over_ranks():
    T, n, world = 20, 6000, 3
    ends = balanced_end_steps(n, world, T, seed=1)
    assert ends.shape == (world, n)
    assert int(ends.min()) == 1 and int(ends.max()) == T - 1
    counts = np.bincount(ends.flatten().numpy(), minlength=T)[1:]
    assert chisquare(counts).pvalue > 1e-3
    steps = (T - ends).sum(dim=1)
    assert bool((steps == steps[0]).all())
    torch.testing.assert_close(ends, balanced_end_steps(n, world, T, seed=1))
    assert not torch.equal(ends, balanced_end_steps(n, world, T, seed=2))


def test_prepare_reaches_end_steps_with_only_needed_teacher_calls(teacher_and_diffusion, prepared_state):
    _, diffusion = teacher_and_diffusion
    state, images = prepared_state
    n = round(0.4 * 20) * B
    ends = balanced_end_steps(n, 1, diffusion.num_timesteps, seed=0)[0]
    np.testing.assert_array_equal(state["total_t"], ends.numpy())
    assert images == int((diffusion.num_timesteps - ends).sum())
    assert np.isfinite(state["total_x_t_1"]).all() and state["total_x_t_1"].shape == (n, 3, 16, 16)
    assert len(np.unique(state["total_x_t_1"].reshape(n, -1), axis=0)) == n


@pytest.mark.parametrize("pad", [False, True])
def test_prepare_fills_every_teacher_call_with_mixed_timesteps(teacher_and_diffusion, pad):
    """Issue 17: the pool advanced one timestep at a time, so the active set shrank and every teacher call had
    a new batch size. Calls now take the first unfinished items whatever their timesteps: full-size until
    the last items (exactly one size with padding), and every item still ends at its own end step."""
    teacher, diffusion = teacher_and_diffusion
    sizes, timesteps = [], []
    forward = teacher.forward

    def recording(x, t, **kwargs):
        sizes.append(x.shape[0])
        timesteps.append(t.unique().numel())
        return forward(x, t, **kwargs)

    teacher.forward = recording
    try:
        pool = make_pool(teacher_and_diffusion)
        pool.prepare(progress=False, pad_to_full=pad)
    finally:
        del teacher.forward
    n = round(0.4 * 20) * B
    ends = balanced_end_steps(n, 1, diffusion.num_timesteps, seed=0)[0]
    assert torch.equal(pool.total_t, ends)
    needed = int((diffusion.num_timesteps - ends).sum())
    assert pool.teacher_batch_size == 8 and sizes[0] == 8
    if pad:
        assert set(sizes) == {8}
    else:
        assert sum(sizes) == needed
        first_short = next((i for i, size in enumerate(sizes) if size < 8), len(sizes))
        tail = sizes[first_short:]
        assert sizes[:first_short] == [8] * first_short  # full-size until the last items
        assert tail == sorted(tail, reverse=True) and len(tail) < diffusion.num_timesteps
    assert max(timesteps) > 1  # calls mix timesteps
    assert len(sizes) <= -(-needed // 8) + 20  # about total steps / batch, not one call per timestep


def test_draw_advances_exactly_the_drawn_items(teacher_and_diffusion, prepared_state):
    teacher, diffusion = teacher_and_diffusion
    pool = prepared_pool(teacher_and_diffusion, prepared_state)
    for _ in range(2):
        old_t, old_x = pool.total_t.clone(), pool.total_x.clone()
        batch = pool.draw()
        changed = (pool.total_t != old_t) | (pool.total_x != old_x).flatten(1).any(dim=1)
        idx = torch.nonzero(changed).flatten()
        assert idx.numel() == B
        order = torch.argsort(batch["t"] * 1000 + torch.arange(B))
        # the batch's items are the drawn pool items, one step further
        new_t = pool.total_t[idx]
        assert sorted(new_t.tolist()) == sorted(batch["t"].tolist())
        assert sorted((old_t[idx] - 1).tolist()) == sorted(batch["t"].tolist())
        for i in range(B):
            j = int(torch.nonzero((old_x == batch["x_t"][order[i]]).flatten(1).all(dim=1)).flatten()[0])
            assert int(old_t[j]) - 1 == int(batch["t"][order[i]])
            torch.testing.assert_close(pool.total_x[j], batch["x_tm1"][order[i]])
        expected = diffusion.p_mean_variance(teacher, batch["x_t"], batch["t"], clip_denoised=True)
        for key in ("mean", "log_variance", "model_output"):
            torch.testing.assert_close(batch["teacher_out"][key], expected[key])
        assert batch["weights"].tolist() == [1.0] * B


def test_clean_items_restart_from_fresh_noise(teacher_and_diffusion):
    _, diffusion = teacher_and_diffusion
    T = diffusion.num_timesteps
    pool = make_pool(teacher_and_diffusion, iter_choice=SHUFFLED)
    pool.prepare(progress=False)
    pool.total_t[:2] = 0
    old_x = pool.total_x.clone()
    batch = pool.draw()
    assert batch["t"][:2].tolist() == [T - 1, T - 1]
    assert not torch.equal(batch["x_t"][:2], old_x[:2])
    assert abs(float(batch["x_t"][:2].std()) - 1.0) < 0.2
    torch.testing.assert_close(batch["x_t"][2:], old_x[2:])
    assert batch["t"][0] != 0 and pool.total_t[:2].tolist() == [T - 1, T - 1]


def test_t0_step_has_no_noise(teacher_and_diffusion):
    pool = make_pool(teacher_and_diffusion, iter_choice=SHUFFLED)
    pool.prepare(progress=False)
    pool.total_t.fill_(1)
    batch = pool.draw()
    assert batch["t"].tolist() == [0] * B
    torch.testing.assert_close(batch["x_tm1"], batch["teacher_out"]["mean"])
    assert pool.total_t.tolist() == [0] * B


def test_iterative_mode_moves_all_items_in_lockstep_and_restarts(teacher_and_diffusion):
    _, diffusion = teacher_and_diffusion
    T = diffusion.num_timesteps
    pool = make_pool(teacher_and_diffusion, iter_choice=ITERATIVE)
    pool.setup("unused-for-iterative.cache")
    assert pool.size == B and pool.total_t.tolist() == [T] * B
    seen = [pool.draw()["t"].tolist() for _ in range(T + 2)]
    assert seen == [[t] * B for t in range(T - 1, -1, -1)] + [[T - 1] * B, [T - 2] * B]


def test_shuffled_mode_advances_the_whole_prepared_pool(teacher_and_diffusion):
    pool = make_pool(teacher_and_diffusion, iter_choice=SHUFFLED)
    pool.prepare(progress=False)
    assert pool.size == B
    before = pool.total_t.clone()
    assert len(set(before.tolist())) > 1  # random end steps, not lockstep
    batch = pool.draw()
    assert batch["t"].tolist() == (before - 1).tolist()


def test_prob_discards_whole_batches_without_writing_them_back(teacher_and_diffusion):
    """The authors' prob: one draw per batch; a discarded batch advances in place (another teacher step on
    the same items) and only the kept step is trained on and written back to the pool."""
    teacher, _ = teacher_and_diffusion
    pool = make_pool(teacher_and_diffusion, iter_choice=ITERATIVE, prob=0.5)
    pool.prepare(progress=False)
    calls = []
    for _ in range(12):
        old_t = pool.total_t.clone()
        teacher.images = 0
        batch = pool.draw()
        calls.append(teacher.images // B)
        assert torch.equal(batch["weights"], torch.ones(B))
        assert torch.equal(pool.total_t, (old_t - calls[-1]) % pool.T)
        assert torch.equal(batch["t"], pool.total_t) and torch.equal(batch["x_tm1"], pool.total_x)
    assert min(calls) == 1 and max(calls) > 1


def test_prob_per_item_masks_the_batch_but_advances_the_pool(teacher_and_diffusion, prepared_state):
    pool = prepared_pool(teacher_and_diffusion, prepared_state, prob=0.5, prob_per_item=True)
    kept = []
    for _ in range(10):
        old_t = pool.total_t.clone()
        batch = pool.draw()
        assert batch["x_t"].shape[0] == B and batch["weights"].shape == (B,)
        assert int((pool.total_t != old_t).sum()) == B
        kept += batch["weights"].tolist()
    assert set(kept) == {0.0, 1.0}
    assert 0.3 < np.mean(kept) < 0.7


def test_state_dict_restores_pool_and_future_draws(teacher_and_diffusion, prepared_state):
    a = prepared_pool(teacher_and_diffusion, prepared_state)
    a.draw()
    state = a.state_dict()
    b = make_pool(teacher_and_diffusion, seed=7)
    b.load_state_dict(state)
    for _ in range(2):
        da, db = a.draw(), b.draw()
        torch.testing.assert_close(da["x_tm1"], db["x_tm1"])
        torch.testing.assert_close(da["t"], db["t"])
    torch.testing.assert_close(a.total_x, b.total_x)


def test_cache_slices_and_size_check(teacher_and_diffusion, prepared_state, tmp_path):
    path = tmp_path / "pool.cache"
    pool = prepared_pool(teacher_and_diffusion, prepared_state)
    pool.save(str(path))
    saved = load_cache(path)
    np.testing.assert_array_equal(saved["total_t"], prepared_state[0]["total_t"])
    rank1 = make_pool(teacher_and_diffusion, rank=1, world_size=2)
    with pytest.raises(CacheError, match=r"pool\.cache.*holds 32 items.*64"):
        rank1.load_slice(str(path))
    double = tmp_path / "double.cache"
    save_cache(double, np.concatenate([saved["total_t"]] * 2), np.concatenate([saved["total_x_t_1"] + 1] * 2))
    rank1.load_slice(str(double))
    np.testing.assert_array_equal(rank1.total_x.numpy(), saved["total_x_t_1"] + 1)
    # a resumed pool must be exactly this run's size: a prefix would silently drop items (issue 19)
    with pytest.raises(CacheError, match=r"resumed pool holds 64 items but this run.s pool is 1 rank"):
        make_pool(teacher_and_diffusion).load_slice(str(double), exact=True)
    rank1.load_slice(str(double), exact=True)


def test_training_draws_do_not_depend_on_where_the_pool_came_from(teacher_and_diffusion, tmp_path):
    """Issue 19: a run that prepared its pool in-process trained differently from step 2 on than one that
    loaded the file it had just written. Both now start their draws from the same generator states."""
    path = str(tmp_path / "pool.cache")
    prepared, loaded = make_pool(teacher_and_diffusion), make_pool(teacher_and_diffusion)
    prepared.setup(path, progress=False)
    loaded.setup(path, progress=False)
    for _ in range(4):
        a, b = prepared.draw(), loaded.draw()
        assert torch.equal(a["t"], b["t"]) and torch.equal(a["x_tm1"], b["x_tm1"])


MPI_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import torch
    from guided_diffusion import dist_util
    from guided_diffusion.config import load_config, model_and_diffusion_kwargs
    from guided_diffusion.distill.dkdm.pool import DynamicBatch
    from guided_diffusion.script_util import create_model_and_diffusion

    dist_util.setup_dist()
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    cfg = load_config(sys.argv[1])
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**model_and_diffusion_kwargs(cfg.teacher))
    pool = DynamicBatch(model.eval(), diffusion, batch_size=2, image_shape=(3, 16, 16), rho=0.4,
                        teacher_batch_size=8, rank=rank, world_size=world)
    pool.prepare_and_save(sys.argv[2], progress=False)
    mine = pool.state_dict()
    pool.load_slice(sys.argv[2])
    assert np.array_equal(pool.total_t.numpy(), mine["total_t"])
    assert np.array_equal(pool.total_x.numpy(), mine["total_x_t_1"])
    np.save(f"{sys.argv[3]}/rank{rank}.npy", mine["total_t"])
    dist_util.cleanup()
    """
)


@pytest.mark.mpi
def test_mpi_prepare_writes_all_ranks_and_each_rank_loads_its_slice(tmp_path):
    script = tmp_path / "prep.py"
    script.write_text(MPI_SCRIPT)
    cache = tmp_path / "mpi.cache"
    mpiexec = Path(sys.executable).parent / "mpiexec"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [str(mpiexec), "-n", "2", sys.executable, str(script), str(TINY_KD), str(cache), str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    saved = load_cache(cache, T=20)
    n = round(0.4 * 20) * 2
    assert saved["total_t"].shape[0] == 2 * n
    r0, r1 = np.load(tmp_path / "rank0.npy"), np.load(tmp_path / "rank1.npy")
    np.testing.assert_array_equal(saved["total_t"], np.concatenate([r0, r1]))
    assert (20 - r0).sum() == (20 - r1).sum()  # equal teacher work per rank
    assert not np.array_equal(saved["total_x_t_1"][:n], saved["total_x_t_1"][n:])


def test_padding_never_exceeds_a_pool_smaller_than_the_teacher_batch(teacher_and_diffusion):
    """Issue 17: a pool of 1,280 items (BATCH 0.01) prepared with teacher batch 3072 was padded to 3072 per
    call, 2.4x the teacher work of the authors' calls of all unfinished items; then every call held the whole
    pool (still about 2x, as the unfinished items dwindle). Now a call is padded only up to the smallest of
    four sizes that holds its items, and each item still ends at its end step."""
    teacher, diffusion = teacher_and_diffusion
    sizes = []
    forward = teacher.forward

    def recording(x, t, **kwargs):
        sizes.append(x.shape[0])
        return forward(x, t, **kwargs)

    teacher.forward = recording
    try:
        pool = make_pool(teacher_and_diffusion)
        pool.teacher_batch_size = 1000
        pool.prepare(progress=False, pad_to_full=True)
    finally:
        del teacher.forward
    assert pool.size == 32 and max(sizes) == pool.size
    assert set(sizes) == set(padded_call_sizes(pool.size)) == {32, 16, 8}
    ends = balanced_end_steps(pool.size, 1, diffusion.num_timesteps, seed=0)[0]
    assert torch.equal(pool.total_t, ends)
    needed = int((diffusion.num_timesteps - ends).sum())
    assert needed <= sum(sizes) < 1.5 * needed  # one size for every call would be ~2x the items' steps


def test_padded_call_sizes_halve_the_full_size_in_multiples_of_eight():
    assert padded_call_sizes(1280) == [1280, 640, 320, 160]
    assert padded_call_sizes(3072) == [3072, 1536, 768, 384]
    assert padded_call_sizes(1000) == [1000, 504, 256, 128]
    assert padded_call_sizes(20) == [20, 16, 8]
    assert padded_call_sizes(8) == [8]
    assert padded_call_sizes(1280, count=1) == [1280]


def test_a_dynamic_pool_from_a_larger_cache_warns_once_and_the_shuffled_one_stays_silent(
    teacher_and_diffusion, prepared_state, tmp_path, monkeypatch
):
    """Issue 32: a dynamic run given a cache of 4x its pool trains on its prefix, as the authors' code does,
    but says so once (file, count held, count used); the shuffled mode reads a prefix by design."""
    from guided_diffusion import logger

    warnings: list[str] = []
    monkeypatch.setattr(logger, "warn", lambda *args: warnings.append(" ".join(map(str, args))))
    saved = {k: np.asarray(prepared_state[0][k]) for k in ("total_t", "total_x_t_1")}
    big = tmp_path / "big.cache"
    save_cache(big, np.concatenate([saved["total_t"]] * 4), np.concatenate([saved["total_x_t_1"]] * 4))
    make_pool(teacher_and_diffusion).load_slice(str(big))
    n = len(saved["total_t"])
    assert warnings == [
        f"{big} holds {4 * n} items and this run's dynamic pool uses the first {n} (1 rank(s) x {n}); "
        "was it made for another BATCH (rho) or batch?"
    ]
    make_pool(teacher_and_diffusion, iter_choice=SHUFFLED).load_slice(str(big))
    exact = tmp_path / "exact.cache"
    save_cache(exact, saved["total_t"], saved["total_x_t_1"])
    make_pool(teacher_and_diffusion).load_slice(str(exact))
    make_pool(teacher_and_diffusion, rank=1, world_size=2).load_slice(str(big))  # rank 1 leaves it to rank 0
    assert len(warnings) == 1


def test_teacher_step_is_the_mean_plus_its_std_times_the_pools_own_noise(teacher_and_diffusion):
    """x_{t-1} = mean + exp(0.5 * log_variance) * z with z the next draw of the pool's noise generator,
    replayed by hand (a variance in place of the standard deviation, or another generator, fails)."""
    pool = make_pool(teacher_and_diffusion, iter_choice=SHUFFLED)
    pool.prepare(progress=False)
    x_t = torch.randn(B, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([5, 1, 9, 12])
    replay = torch.Generator().set_state(pool.noise_gen.get_state())
    x_tm1, out = pool.teacher_step(x_t, t)
    z = torch.randn((B, 3, 16, 16), generator=replay)
    assert out["log_variance"].exp().max() < 0.9  # std and variance differ here
    torch.testing.assert_close(x_tm1, out["mean"] + torch.exp(0.5 * out["log_variance"]) * z, rtol=0, atol=0)


def test_keep_fraction_follows_an_asymmetric_prob(teacher_and_diffusion, prepared_state):
    """prob = 0.2 keeps about a fifth of the items (0.5 cannot tell `<` from `>` in the draw)."""
    pool = prepared_pool(teacher_and_diffusion, prepared_state, prob=0.2, prob_per_item=True)
    kept = [w for _ in range(60) for w in pool.draw()["weights"].tolist()]
    assert 0.1 < np.mean(kept) < 0.3
