"""RDD relational losses against loop-based computations, chunking, the pixel memory ring buffer (also
across two MPI ranks) and the bundled module."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from guided_diffusion.config import method_defaults
from guided_diffusion.distill.rdd_losses import rcfd_kl
from guided_diffusion.distill.relational import (
    PixelMemoryQueue,
    RelationalLoss,
    memory_contrast_loss,
    pixel_embeddings,
    pixel_relation_loss,
    projection_head,
    resolve_relational_config,
    select_unet_feature,
    unet_feature_channels,
)
from guided_diffusion.distill.relational import (
    defaults as relational_defaults,
)

ROOT = Path(__file__).resolve().parents[1]


def unit(v):
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def dot(a, b):
    return sum(x * y for x, y in zip(a, b, strict=True))


def softmax(row):
    top = max(row)
    ex = [math.exp(x - top) for x in row]
    return [x / sum(ex) for x in ex]


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))


def pixels(feat):
    """Per-pixel channel vectors in (n, h, w) order, normalized, by plain loops."""
    n, c, h, w = feat.shape
    out = []
    for b in range(n):
        for y in range(h):
            for x in range(w):
                out.append(unit([feat[b, k, y, x].item() for k in range(c)]))
    return out


def test_pixel_relation_equals_direct_computation():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 2, 2, generator=g), torch.randn(2, 5, 2, 2, generator=g)
    ps, pt = pixels(s), pixels(t)
    temp = 0.5
    direct = 0.0
    for i in range(len(ps)):
        p_s = softmax([dot(ps[i], ps[j]) / temp for j in range(len(ps))])
        p_t = softmax([dot(pt[i], pt[j]) / temp for j in range(len(pt))])
        direct += kl(p_t, p_s)
    direct /= len(ps)
    assert pixel_relation_loss(s, t, temperature=temp).item() == pytest.approx(direct, rel=1e-5)
    assert pixel_relation_loss(t, t).item() == pytest.approx(0.0, abs=1e-6)


def test_chunked_pixel_relation_equals_unchunked_in_value_and_gradient():
    g = torch.Generator().manual_seed(1)
    t = torch.randn(3, 4, 3, 3, generator=g)
    s1 = torch.randn(3, 6, 3, 3, generator=g, requires_grad=True)
    s2 = s1.detach().clone().requires_grad_(True)
    whole = pixel_relation_loss(s1, t, 0.7)
    chunked = pixel_relation_loss(s2, t, 0.7, chunk_size=4)  # 27 rows: blocks of 4 and a ragged tail
    whole.backward()
    chunked.backward()
    assert chunked.item() == pytest.approx(whole.item(), rel=1e-6)
    torch.testing.assert_close(s2.grad, s1.grad)


def test_memory_contrast_equals_direct_computation():
    g = torch.Generator().manual_seed(2)
    s = torch.nn.functional.normalize(torch.randn(5, 3, generator=g), dim=1)
    t = torch.nn.functional.normalize(torch.randn(5, 3, generator=g), dim=1)
    a = torch.nn.functional.normalize(torch.randn(4, 3, generator=g), dim=1)
    c, kd_t = 0.1, 2.0
    direct = 0.0
    for i in range(5):
        p_s = softmax([dot(s[i].tolist(), a[j].tolist()) / c / kd_t for j in range(4)])
        p_t = softmax([dot(t[i].tolist(), a[j].tolist()) / c / kd_t for j in range(4)])
        direct += kl(p_t, p_s)
    direct = direct / 5 * kd_t**2
    assert memory_contrast_loss(s, t, a, c, kd_t).item() == pytest.approx(direct, rel=1e-5)
    assert memory_contrast_loss(s, t, a, c, kd_t, chunk_size=2).item() == pytest.approx(direct, rel=1e-5)


def test_logit_relation_equals_direct_computation():
    g = torch.Generator().manual_seed(3)
    zs, zt = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    rows = [kl(softmax([v / 0.9 for v in zt[i].tolist()]), softmax(zs[i].tolist())) for i in range(3)]
    direct = sum(rows) / 3
    assert rcfd_kl(zs, zt, 0.9).item() == pytest.approx(direct, rel=1e-5)
    with pytest.raises(ValueError, match="RCFD KL needs equal"):
        rcfd_kl(zs, zt[:2])


def test_bad_shapes_and_config_raise():
    with pytest.raises(ValueError, match="equal N, H, W"):
        pixel_relation_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 2, 2))
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        pixel_embeddings(torch.randn(4, 3))
    with pytest.raises(ValueError, match="unknown key 'queue_sz'"):
        resolve_relational_config({"queue_sz": 3})
    with pytest.raises(ValueError, match="unet_feature"):
        resolve_relational_config({"unet_feature": "side.1"})
    with pytest.raises(ValueError, match="contrast_temperature"):
        resolve_relational_config({"contrast_temperature": 0.0})


def test_defaults_hold_the_published_rdd_values():
    d = relational_defaults()
    assert method_defaults("relational") == d
    published = {"queue_size": 20000, "enqueue_per_step": 128, "num_anchors": 4096,
                 "contrast_temperature": 0.1, "kd_temperature": 1.0, "memory_factor": 0.1,
                 "logit_temperature": 0.9}
    assert {k: d[k] for k in published} == published


# ---------------------------------------------------------------------------------------------------------
# Memory queue


def test_queue_wraps_around_in_write_order():
    torch.manual_seed(0)
    q = PixelMemoryQueue(dim=2, size=5, enqueue_per_step=3)
    written = []
    for step in range(3):
        rows = torch.stack([torch.ones(3), torch.arange(3.0) + 10 * step + 1], dim=1)
        got = q.enqueue(rows)
        assert sorted(got[:, 1].tolist()) == sorted(pixel_embeddings(rows[:, :, None, None])[:, 1].tolist())
        written.append(got)
    stream = torch.cat(written)  # 9 rows into 5 slots: slot j holds the last row written there
    assert q.num_filled == 5 and int(q.ptr) == 4
    torch.testing.assert_close(q.queue, stream[[5, 6, 7, 8, 4]])
    torch.testing.assert_close(q.ordered(), stream[-5:])
    torch.testing.assert_close(q.queue.norm(dim=1), torch.ones(5))


def test_queue_partial_fill_oversized_write_and_anchors():
    q = PixelMemoryQueue(dim=3, size=10, enqueue_per_step=4)
    q.enqueue(torch.randn(4, 3))
    assert q.num_filled == 4 and q.anchors(4096).shape == (4, 3)
    torch.testing.assert_close(q.ordered(), q.queue[:4])
    big = PixelMemoryQueue(dim=3, size=5, enqueue_per_step=7)
    got = big.enqueue(torch.randn(7, 3))
    torch.testing.assert_close(big.ordered(), got[-5:])
    full = PixelMemoryQueue(dim=3, size=10, enqueue_per_step=10)
    full.enqueue(torch.randn(2, 3, 1, 5))  # a feature map: 10 pixels of 3 channels
    torch.testing.assert_close(full.anchors(4), full.queue[[0, 2, 5, 7]])
    with pytest.raises(ValueError, match="3-dim embeddings"):
        full.enqueue(torch.randn(4, 2))


def test_queue_state_dict_resumes_ring_position():
    torch.manual_seed(1)
    q = PixelMemoryQueue(dim=2, size=4, enqueue_per_step=3)
    q.enqueue(torch.randn(3, 2))
    q.enqueue(torch.randn(3, 2))
    fresh = PixelMemoryQueue(dim=2, size=4, enqueue_per_step=3)
    fresh.load_state_dict(q.state_dict())
    assert fresh.num_filled == 4 and int(fresh.ptr) == 2
    torch.testing.assert_close(fresh.ordered(), q.ordered())
    rows = torch.randn(3, 2)
    torch.manual_seed(5)
    q.enqueue(rows)
    torch.manual_seed(5)
    fresh.enqueue(rows)
    torch.testing.assert_close(fresh.queue, q.queue)


# ---------------------------------------------------------------------------------------------------------
# Bundled module


def test_relational_loss_terms_match_the_functions():
    torch.manual_seed(0)
    rel = RelationalLoss(6, 4, {"queue_size": 50, "enqueue_per_step": 8, "num_anchors": 16})
    assert isinstance(rel.head[1], nn.BatchNorm2d) and rel.head[0].in_channels == 6
    s = torch.randn(2, 6, 4, 4, requires_grad=True)
    t = torch.randn(2, 4, 4, 4)
    out = rel(s, t)
    assert rel.memory.num_filled == 8
    anchors = rel.memory.anchors(16)
    expected_memory = memory_contrast_loss(
        pixel_embeddings(rel.head(s)), pixel_embeddings(t), anchors, 0.1, 1.0
    )
    torch.testing.assert_close(out["memory"], expected_memory.detach())
    torch.testing.assert_close(out["p2p"], pixel_relation_loss(s, t).detach())
    torch.testing.assert_close(out["loss"], (out["p2p"] + 0.1 * out["memory"]))
    assert "logit" not in out  # unet source: no logit term
    out["loss"].backward()
    assert s.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in rel.head.parameters())


def test_classifier_source_logit_term_and_resized_student_maps():
    rel = RelationalLoss(3, 3, {"feature_source": "classifier", "memory_factor": 0.0, "factor": 0.5})
    assert rel.head is None and list(rel.parameters()) == []
    s, t = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4)
    zs, zt = torch.randn(2, 10), torch.randn(2, 10)
    out = rel(s, t, zs, zt)
    resized = torch.nn.functional.interpolate(s, size=(4, 4), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out["p2p"], pixel_relation_loss(resized, t))
    torch.testing.assert_close(out["loss"], 0.5 * out["p2p"] + rcfd_kl(zs, zt, 0.9))
    with pytest.raises(ValueError, match="needs student_logits"):
        rel(s, t)


def test_unet_feature_selection():
    feats = {"middle": torch.zeros(1, 8, 2, 2), "down": [torch.zeros(1, 4, 4, 4)],
             "up": [torch.ones(1, 6, 2, 2)]}
    chans = {"emb": 16, "down": [4], "middle": 8, "up": [6]}
    assert select_unet_feature(feats, "up.0") is feats["up"][0]
    assert select_unet_feature(feats, "middle") is feats["middle"]
    assert unet_feature_channels(chans, "down.0") == 4 and unet_feature_channels(chans, "middle") == 8


def test_projection_head_keeps_batchnorm_without_process_group():
    head = projection_head(3, 5)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in head.modules())
    assert [type(m) for m in head] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Conv2d]


MPI_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from torch import nn
    from guided_diffusion import dist_util
    from guided_diffusion.distill.relational import PixelMemoryQueue, RelationalLoss

    dist_util.setup_dist(timeout_s=60)
    rank = dist_util.get_rank()
    torch.manual_seed(100 + rank)  # different local picks on each rank
    queue = PixelMemoryQueue(dim=3, size=10, enqueue_per_step=3)
    written = []
    for step in range(3):
        rows = torch.zeros(5, 3)
        rows[:, rank] = 1.0  # rank 0 rows point along axis 0, rank 1 rows along axis 1
        rows[:, 2] = torch.arange(5.0) + 10 * step
        written.append(queue.enqueue(rows))
    rel = RelationalLoss(4, 3, {"queue_size": 10})
    sync = any(isinstance(m, nn.SyncBatchNorm) for m in rel.head.modules())
    torch.save({"state": queue.state_dict(), "written": torch.cat(written), "sync": sync},
               f"{sys.argv[1]}/rank{rank}.pt")
    dist_util.cleanup()
    """
)


@pytest.mark.mpi
def test_mpi_ranks_share_identical_queues_and_sync_batchnorm(tmp_path):
    script = tmp_path / "relational_queue_check.py"
    script.write_text(MPI_SCRIPT)
    mpiexec = Path(sys.executable).parent / "mpiexec"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [str(mpiexec), "-n", "2", sys.executable, str(script), str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["sync"] and r1["sync"]
    for key in ("queue", "ptr", "filled"):
        assert torch.equal(r0["state"][key], r1["state"][key]), key
    assert torch.equal(r0["written"], r1["written"])
    written = r0["written"]  # per step: 3 rows from rank 0, then 3 from rank 1
    assert written.shape == (18, 3)
    for step in range(3):
        from_rank0, from_rank1 = written[6 * step : 6 * step + 3], written[6 * step + 3 : 6 * step + 6]
        assert (from_rank0[:, 0] > 0).all() and (from_rank0[:, 1] == 0).all()
        assert (from_rank1[:, 1] > 0).all() and (from_rank1[:, 0] == 0).all()
    queue = r0["state"]["queue"]
    assert int(r0["state"]["filled"]) == 10 and int(r0["state"]["ptr"]) == 8
    torch.testing.assert_close(torch.cat([queue[8:], queue[:8]]), written[-10:])
