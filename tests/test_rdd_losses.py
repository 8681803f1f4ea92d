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
