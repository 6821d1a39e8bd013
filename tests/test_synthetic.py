"""The synthetic backbone's decomposition is what stage 1 is scored against, so check it holds."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.synthetic import SyntheticBackbone, recovery_error, smooth_images
from pipeline.views import ViewConfig, make_views


def test_parts_sum_to_features_and_artifact_is_position_only():
    bb = SyntheticBackbone(embed_dim=8, patch_size=16, outlier_prob=0.1)
    imgs = smooth_images(2, 96, seed=1)
    p = bb.parts(imgs)
    feats = bb.features(imgs)
    assert feats.shape == (2, 6, 6, 8)
    total = p["clean"] + p["artifact"] + p["noise"] + p["outlier"][..., None] * bb.config.outlier_norm * bb.outlier_dir
    torch.testing.assert_close(feats, total)
    torch.testing.assert_close(p["artifact"][0], p["artifact"][1])
    assert p["outlier"].any()


def test_view_clean_term_equals_global_clean_map():
    bb = SyntheticBackbone(embed_dim=8, patch_size=16)
    img = smooth_images(1, 160, seed=2)[0]
    views = make_views(img, ViewConfig(num_views=6), 160, 16, image_id=3, seed=0)
    on_view = bb.clean(views.images)
    colour = F.grid_sample(img[None].expand(len(views), -1, -1, -1), views.coords * 2 - 1,
                           align_corners=False).permute(0, 2, 3, 1)
    at_global = torch.sin(colour @ bb.phi_a + bb.phi_b) @ bb.phi_m
    assert recovery_error(on_view, at_global) < 1e-3


def test_noise_is_deterministic_and_view_dependent():
    bb = SyntheticBackbone(embed_dim=8, patch_size=16, noise_std=0.1)
    img = smooth_images(1, 96, seed=0)
    a, b = bb.parts(img)["noise"], bb.parts(img.clone())["noise"]
    torch.testing.assert_close(a, b)
    assert 0.07 < a.std() < 0.13
    shifted = bb.parts(torch.roll(img, 1, -1) * 0.999)["noise"]
    assert torch.corrcoef(torch.stack([a.flatten(), shifted.flatten()]))[0, 1].abs() < 0.3


def test_recovery_error_ignores_channel_means():
    true = torch.randn(5, 5, 4)
    assert recovery_error(true + torch.randn(4), true) < 1e-6
    assert abs(recovery_error(torch.zeros_like(true), true) - 1) < 1e-6
    bb = SyntheticBackbone(embed_dim=16, patch_size=16)
    imgs = smooth_images(2, 128, seed=0)
    raw_err = recovery_error(bb.features(imgs), bb.clean_map(imgs))
    assert 0.4 < raw_err < 1.2  # raw features score about the artifact's energy
