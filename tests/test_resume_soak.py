"""benchmarks/resume_soak.py's readings: the memory lines of a log, growth after warm-up, the comparison of
two checkpoint sets, and the last logged step of a progress.csv cut by a kill."""

from __future__ import annotations

import pytest
import torch

from benchmarks.resume_soak import compare, growth, last_logged_step, memory_trace
from guided_diffusion.train_util import log_memory


def test_memory_lines_written_by_the_loop_are_read_back(tmp_path):
    from guided_diffusion import logger

    logger.configure(str(tmp_path), format_strs=["log"])
    try:
        for step in (500, 1000, 1500):
            log_memory(step, torch.device("cpu"))
    finally:
        logger.configure(str(tmp_path / "after"), format_strs=[])
    trace = memory_trace(tmp_path / "log.txt")
    assert [row["step"] for row in trace] == [500, 1000, 1500]
    assert all(row["host_rss_mib"] > 10 and row["cuda_reserved_mib"] is None for row in trace)
    log = tmp_path / "gpu.txt"
    line = "memory step {}: host_rss_mib {} cuda_allocated_mib 10.0 cuda_reserved_mib {}\n"
    samples = ((500, 900.0, 40.0), (1000, 1000.0, 50.0), (1500, 1010.0, 51.0), (2000, 1005.0, 50.5))
    log.write_text("".join(line.format(*sample) for sample in samples))
    trace = memory_trace(log)
    assert growth(trace, "host_rss_mib") == pytest.approx(0.01)  # from the second sample to the peak
    assert growth(trace, "cuda_reserved_mib") == pytest.approx(0.02)
    assert growth(trace[:2], "host_rss_mib") is None


def test_compare_reports_bit_equality_and_the_largest_difference(tmp_path):
    a = {"model": {"w": torch.zeros(3), "step": torch.tensor(4)}, "opt": {"state": [torch.ones(2)]}}
    b = {"model": {"w": torch.tensor([0.0, -0.25, 0.0]), "step": torch.tensor(4)},
         "opt": {"state": [torch.ones(2)]}}
    paths = {}
    for name, payload in (("a", a), ("b", b)):
        for role, obj in payload.items():
            torch.save(obj, tmp_path / f"{name}_{role}.pt")
        paths[name] = {role: tmp_path / f"{name}_{role}.pt" for role in payload}
    result = compare(paths["a"], paths["b"])
    assert result["model"] == {"equal": False, "max_abs": 0.25}
    assert result["opt"] == {"equal": True, "max_abs": 0.0}


def test_last_logged_step_skips_a_row_torn_by_a_kill(tmp_path):
    assert last_logged_step(tmp_path) == 0
    (tmp_path / "progress.csv").write_text("loss,step\n0.5,10\n0.4,20\n0.3,")
    assert last_logged_step(tmp_path) == 20
