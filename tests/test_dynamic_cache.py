"""The safe cache loader: the authors' files load, ours round-trip, malicious or broken files are refused."""

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from guided_diffusion.distill.dkdm.cache import CacheError, load_cache, save_cache

REF = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
if not REF.exists():
    REF = Path("/work/shared/reference")


@pytest.mark.parametrize("name", ["cache_numpy1.cache", "cache_numpy2.cache"])
def test_authors_cache_loads_and_matches_expected(name):
    """Both files as numpy 1.x and 2.x pickle them load through the restricted loader, unrepaired."""
    path = REF / name
    module = b"numpy.core.multiarray" if name == "cache_numpy1.cache" else b"numpy._core.multiarray"
    assert module in path.read_bytes()
    got = load_cache(path, T=1000)
    expected = np.load(REF / "cache_expected.npz")
    assert got["total_t"].dtype == np.int64 and got["total_x_t_1"].dtype == np.float32
    np.testing.assert_array_equal(got["total_t"], expected["total_t"])
    np.testing.assert_array_equal(got["total_x_t_1"], expected["total_x_t_1"])


def test_round_trip_and_authors_layout(tmp_path):
    rng = np.random.default_rng(0)
    t = rng.integers(0, 50, size=7)
    x = rng.standard_normal((7, 3, 8, 8)).astype(np.float32)
    path = tmp_path / "sub" / "pool.cache"
    save_cache(path, t, x)
    got = load_cache(path, T=50)
    np.testing.assert_array_equal(got["total_t"], t)
    np.testing.assert_array_equal(got["total_x_t_1"], x)
    with open(path, "rb") as f:  # our own file, read with plain pickle like the authors' tools do
        raw = pickle.load(f)
    assert type(raw).__name__ == "defaultdict" and raw.default_factory is None
    assert sorted(raw) == ["total_t", "total_x_t_1"]
    assert [p.name for p in path.parent.iterdir()] == ["pool.cache"]  # no temp file left behind


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_running_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.cache"
    with open(path, "wb") as f:
        pickle.dump({"total_t": _Evil(marker), "total_x_t_1": np.zeros((1, 3, 2, 2), np.float32)}, f)
    with pytest.raises(CacheError, match=r"evil\.cache.*refused.*(posix|os|nt)\.system"):
        load_cache(path)
    assert not marker.exists()


def test_truncated_cache_is_one_line_error(tmp_path):
    path = tmp_path / "cut.cache"
    save_cache(path, np.arange(4), np.zeros((4, 3, 4, 4), np.float32))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CacheError) as info:
        load_cache(path)
    msg = str(info.value)
    assert "cut.cache" in msg and "\n" not in msg


def test_inconsistent_arrays_and_range(tmp_path):
    path = tmp_path / "bad.cache"
    with pytest.raises(CacheError, match="3 items"):
        save_cache(path, np.arange(3), np.zeros((4, 3, 2, 2), np.float32))
    save_cache(path, np.array([0, 5, 11]), np.zeros((3, 3, 2, 2), np.float32))
    with pytest.raises(CacheError, match="outside 0..10"):
        load_cache(path, T=10)
    with pytest.raises(CacheError, match="not found"):
        load_cache(tmp_path / "nope.cache")


def test_missing_key_is_refused(tmp_path):
    path = tmp_path / "partial.cache"
    with open(path, "wb") as f:
        pickle.dump({"total_t": np.arange(3)}, f)
    with pytest.raises(CacheError, match="missing key"):
        load_cache(path)


def _raw_cache(path, total_t, total_x):
    """A cache in the authors' layout written without the saver's checks (a broken or foreign file)."""
    with open(path, "wb") as f:
        pickle.dump({"total_t": total_t, "total_x_t_1": total_x}, f, protocol=4)


def test_non_finite_or_out_of_range_states_are_refused(tmp_path):
    """Issue 19: a pool full of NaN trained nothing and exited 0; a flipped byte gave states up to 209."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 3, 4, 4)).astype(np.float32)
    nan = x.copy()
    nan[2, 0, 1, 1] = np.nan
    _raw_cache(tmp_path / "nan.cache", np.arange(6), nan)
    with pytest.raises(CacheError, match=r"nan\.cache: 1 of 6 teacher states hold NaN or inf"):
        load_cache(tmp_path / "nan.cache", T=10)
    far = x.copy()
    far[4, 2, 0, 0] = 209.0
    _raw_cache(tmp_path / "far.cache", np.arange(6), far)
    with pytest.raises(CacheError, match=r"far\.cache: teacher states reach \|x\| = 209, beyond 20"):
        load_cache(tmp_path / "far.cache", T=10)
    with pytest.raises(CacheError, match="hold NaN"):
        save_cache(tmp_path / "out.cache", np.arange(6), nan)
    assert not (tmp_path / "out.cache").exists()


def test_checksummed_cache_detects_a_changed_value_and_stays_in_the_authors_layout(tmp_path):
    """Teacher-state files carry a SHA-256 of their arrays: a value changed inside the sane range (which the
    range check cannot see) is refused; stock pickle still reads the two arrays."""
    rng = np.random.default_rng(1)
    t, x = rng.integers(0, 10, 5), rng.standard_normal((5, 3, 4, 4)).astype(np.float32)
    path = tmp_path / "teacher-state-000010.cache"
    save_cache(path, t, x, checksum=True)
    got = load_cache(path, T=10)
    np.testing.assert_array_equal(got["total_x_t_1"], x)
    with open(path, "rb") as f:
        stock = pickle.load(f)
    np.testing.assert_array_equal(stock["total_t"], t)
    changed = x.copy()
    changed[3, 1, 2, 2] += 0.5
    with open(path, "rb") as f:
        payload = pickle.load(f)
    payload["total_x_t_1"] = changed
    with open(path, "wb") as f:
        pickle.dump(payload, f, protocol=4)
    with pytest.raises(CacheError, match=r"teacher-state-000010\.cache: checksum mismatch"):
        load_cache(path, T=10)
