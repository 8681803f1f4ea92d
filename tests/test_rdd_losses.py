"""RDD's feature losses against shared/reference/rdd: RCFD's KL, the pixel-to-pixel relation over sample
pairs, and three calls of the memory contrast (queue writes, the wrap branch, BatchNorm statistics)."""

from __future__ import annotations

import pytest
import torch

from guided_diffusion.distill.rdd_losses import MemoryP2PLoss, contrast_indices, intra_p2p, rcfd_kl

torch.set_num_threads(1)
TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def losses(reference_dir):
    return torch.load(reference_dir / "rdd" / "vectors.pt", weights_only=True)["losses"]


def test_rcfd_kl_and_intra_p2p(losses):
    for tau in (0.9, 1.0):
        torch.testing.assert_close(rcfd_kl(losses["pooled_S"], losses["pooled_T"], tau),
                                   losses[f"rcfd_kl_temp{tau}"], **TOL)
        torch.testing.assert_close(intra_p2p(losses["feat_S"], losses["feat_T"], tau),
                                   losses[f"intra_p2p_temperature{tau}"], **TOL)


def test_memory_p2p_three_calls_with_the_authors_queue(losses):
    ref = losses["memory_p2p"]
    init = ref["state_dict_initial"]
    memory, contrast = init["teacher_pixel_queue"].shape[0], ref["sampled_indices"].shape[0]
    loss = MemoryP2PLoss(s_channels=64, t_channels=64, pixel_memory_size=memory, pixel_contrast_size=contrast,
                         contrast_kd_temperature=1.0, factor=0.1)
    loss.load_state_dict(init)
    assert torch.equal(loss.sampled_indices, ref["sampled_indices"])
    assert torch.equal(contrast_indices(20000, 4096), losses["memory_p2p_default_sampled_indices"])
    loss.train()
    for call in ref["calls"]:
        value = loss(call["feat_S"], call["feat_T"], perm=call["perm"])
        torch.testing.assert_close(value, call["loss"], **TOL)
        torch.testing.assert_close(loss.teacher_pixel_queue, call["queue_after"], **TOL)
        assert int(loss.pixel_queue_ptr[0]) == int(call["ptr_after"])
        bn = loss.project_head[1]
        torch.testing.assert_close(bn.running_mean, call["bn_running_mean_after"], **TOL)
        torch.testing.assert_close(bn.running_var, call["bn_running_var_after"], **TOL)
    assert int(ref["calls"][-1]["ptr_after"]) == 0  # the third call took the wrap branch


def test_pixel_layout_option_enqueues_true_pixel_vectors():
    torch.manual_seed(0)
    feats = torch.rand(2, 4, 2, 2)
    loss = MemoryP2PLoss(s_channels=4, t_channels=4, pixel_memory_size=16, pixel_contrast_size=4,
                         queue_layout="pixels")
    perm = torch.arange(8)
    loss.enqueue(feats, perm)
    expected = torch.nn.functional.normalize(feats.permute(0, 2, 3, 1).reshape(8, 4), dim=1)
    torch.testing.assert_close(loss.teacher_pixel_queue[:8], expected)
    authors = MemoryP2PLoss(s_channels=4, t_channels=4, pixel_memory_size=16, pixel_contrast_size=4)
    authors.enqueue(feats, perm)
    assert not torch.allclose(authors.teacher_pixel_queue[:8], expected)
    with pytest.raises(ValueError, match="queue_layout"):
        MemoryP2PLoss(queue_layout="rows")


def _kl_rows(log_p_s: torch.Tensor, p_t: torch.Tensor) -> torch.Tensor:
    """sum over a row's entries of p_t (log p_t - log p_s), one value per row: the KL written out."""
    return (p_t * (p_t.log() - log_p_s)).sum(-1)


def test_intra_p2p_is_the_per_pixel_kl_over_each_partners_pixels_written_out():
    g = torch.Generator().manual_seed(3)
    feat_s, feat_t = torch.randn(2, 3, 2, 3, generator=g), torch.randn(2, 3, 2, 3, generator=g)
    temperature, factor = 0.5, 3.0
    def sims(f, b, d):  # cosine similarities, pixels of sample b against pixels of sample d, tempered
        u = f[b].reshape(3, -1) / f[b].reshape(3, -1).norm(dim=0)
        v = f[d].reshape(3, -1) / f[d].reshape(3, -1).norm(dim=0)
        return (u.t() @ v) / temperature

    rows = [_kl_rows(torch.log_softmax(sims(feat_s, b, d), 1), torch.softmax(sims(feat_t, b, d), 1))
            for b in range(2) for d in range(2)]
    expected = torch.cat(rows).sum() / (2 * 2 * 6) * factor
    torch.testing.assert_close(intra_p2p(feat_s, feat_t, temperature, factor), expected, rtol=1e-5, atol=1e-7)


def test_rcfd_kl_tempers_the_teacher_only_by_0_9_unless_told():
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    for temperature in (0.9, 2.0):
        expected = _kl_rows(torch.log_softmax(s, 1), torch.softmax(t / temperature, 1)).mean()
        torch.testing.assert_close(rcfd_kl(s, t, temperature), expected)
    torch.testing.assert_close(rcfd_kl(s, t), rcfd_kl(s, t, 0.9))
    with pytest.raises(ValueError, match=r"equal \[N, K\] inputs, got \(4, 5\) and \(4, 6\)"):
        rcfd_kl(s, torch.zeros(4, 6))


def test_memory_p2p_with_tau_factor_and_temperature_apart_from_one_written_out():
    torch.manual_seed(5)
    loss = MemoryP2PLoss(s_channels=3, t_channels=4, pixel_memory_size=10, pixel_contrast_size=5,
                         contrast_kd_temperature=2.0, contrast_temperature=0.2, factor=0.3).eval()
    s_feats, t_feats = torch.randn(2, 3, 2, 2), torch.randn(2, 4, 2, 2)
    perm = torch.arange(8).flip(0)
    value = loss(s_feats, t_feats, perm=perm)
    contrast = loss.teacher_pixel_queue[loss.sampled_indices]  # the queue after this call's enqueue

    def logits(f):  # [B, HW, contrast rows]: per-pixel unit vectors against the contrast rows
        pixels = torch.nn.functional.normalize(f, dim=1).reshape(2, 4, 4).transpose(1, 2)
        return pixels @ contrast.t() / 0.2
    with torch.no_grad():
        s_logits, t_logits = logits(loss.project_head(s_feats)), logits(t_feats)
    kl = _kl_rows(torch.log_softmax(s_logits / 2.0, 2), torch.softmax(t_logits / 2.0, 2)).sum() / 2 * 2.0**2
    torch.testing.assert_close(value.detach(), kl / 4 * 0.3, rtol=1e-5, atol=1e-7)
    assert loss.pixel_queue_ptr.dtype == torch.long and int(loss.pixel_queue_ptr[0]) == 8
    torch.testing.assert_close(loss.teacher_pixel_queue.norm(dim=1), torch.ones(10))  # unit rows throughout


def test_memory_p2p_defaults_are_the_authors():
    import inspect

    defaults = {k: p.default for k, p in inspect.signature(MemoryP2PLoss).parameters.items()}
    assert defaults == {"s_channels": 1920, "t_channels": 1920, "pixel_memory_size": 20000,
                        "pixel_contrast_size": 4096, "contrast_kd_temperature": 1.0,
                        "contrast_temperature": 0.1, "factor": 0.1, "update_per_step": 128,
                        "queue_layout": "authors"}
    loss = MemoryP2PLoss()  # the defaults as constructed (a signature check alone reads the declared ones)
    head = loss.project_head
    assert [type(m).__name__ for m in head] == ["Conv2d", "BatchNorm2d", "ReLU", "Conv2d"]
    assert head[0].bias is None and head[3].bias is None
    assert (head[0].in_channels, head[0].out_channels, head[3].out_channels) == (1920, 1920, 1920)
    assert loss.teacher_pixel_queue.shape == (20000, 1920) and loss.sampled_indices.shape == (4096,)
    assert (loss.contrast_kd_temperature, loss.contrast_temperature, loss.factor, loss.update_per_step,
            loss.queue_layout) == (1.0, 0.1, 0.1, 128, "authors")
