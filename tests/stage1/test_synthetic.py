"""The synthetic backbone's decomposition is what stage 1 is scored against, so check it holds."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.vit.backbone import FeatureBackbone
from pipeline.testing.synthetic import FAMILIES, SyntheticBackbone, clean_scores, make_problem, recovery_error, smooth_images
from pipeline.vit.views import ViewConfig, make_views


def test_parts_sum_to_features_and_artifact_is_position_only():
    bb = SyntheticBackbone(embed_dim=8, patch_size=16, outlier_prob=0.1)
    assert isinstance(bb, FeatureBackbone) and not isinstance(object(), FeatureBackbone)
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


def test_every_family_builds_and_its_truth_is_in_stage1s_gauge():
    for name in FAMILIES:
        bb, imgs = make_problem(name, 2, 96, embed_dim=16, seed=0)
        assert imgs.shape == (2, 3, 96, 96) and 0 <= imgs.min() and imgs.max() <= 1
        p = bb.parts(imgs)
        # features = clean map (with the artifact's mean) + zero-mean artifact + noise + outliers
        rebuilt = bb.clean_map(imgs) + bb.artifact_map(6, 6) + p["noise"] + \
            p["outlier"][..., None] * bb.config.outlier_norm * bb.outlier_dir
        torch.testing.assert_close(bb.features(imgs), rebuilt, atol=1e-4, rtol=1e-4)
        assert bb.artifact_map(6, 6).mean((0, 1)).abs().max() < 1e-5


def test_learned_artifact_has_a_mean_that_belongs_to_the_clean_map():
    bb = SyntheticBackbone(embed_dim=16, patch_size=16, artifact="learned", artifact_mean=1.0)
    art = bb.artifact(8, 8)
    assert art.mean((0, 1)).norm() > 0.5 * bb.config.artifact_strength * 4  # ~ strength * sqrt(C)
    torch.testing.assert_close(bb.artifact(8, 8), art)  # fixed per grid
    imgs = smooth_images(1, 128)
    torch.testing.assert_close(bb.clean_map(imgs) - bb.clean(imgs), art.mean((0, 1)).expand(1, 8, 8, -1))


def test_photo_content_changes_with_the_crop_scale():
    # a zoomed-in view's patch averages a smaller piece of the image: its clean term differs from the full view's
    bb, img = make_problem("photo", 1, 160, embed_dim=16, seed=0)
    views = make_views(img[0], ViewConfig(num_views=6), 160, 16, image_id=0, seed=0)
    on_view = bb.clean(views.images[1:])
    full = bb.clean(views.images[:1])[0].permute(2, 0, 1)[None]
    grid = (views.coords[1:] * 10 - 0.5) / 9 * 2 - 1  # full-view patch centres sit at (k + 0.5) / 10
    at_global = F.grid_sample(full.expand(len(on_view), -1, -1, -1), grid, align_corners=True,
                              padding_mode="border").permute(0, 2, 3, 1)
    assert recovery_error(on_view, at_global) > 0.2


def test_content_outliers_are_sparse_and_recur_at_the_same_places():
    bb, imgs = make_problem("outliers", 3, 224, embed_dim=16, seed=0)
    fractions, recurrence = [], []
    for i, img in enumerate(imgs):
        views = make_views(img, ViewConfig(num_views=12), 224, 16, image_id=i, seed=0)
        mask = bb.parts(views.images)["outlier"]
        fractions.append(float(mask.float().mean()))
        if mask[0].any():  # crop outliers lie on full-view outliers' places more often than chance
            full = mask[0].float()[None, None]
            grid = (views.coords[1:] * 14 - 0.5) / 13 * 2 - 1
            near = F.grid_sample(full.expand(len(grid), -1, -1, -1), grid, mode="nearest", align_corners=True)[:, 0]
            recurrence.append(float(near[mask[1:]].mean()) / float(mask[0].float().mean()))
    assert 0.005 < sum(fractions) / len(fractions) < 0.08, fractions
    assert recurrence and min(recurrence) > 3, recurrence


def test_clean_scores_see_a_lost_mean():
    true = torch.randn(2, 5, 5, 8) + 3 * torch.randn(2, 1, 1, 8)
    lost = true - true.mean((1, 2), keepdim=True)
    s = clean_scores(lost, true)
    assert s["centred"] < 1e-5 and s["uncentred"] > 1 and s["mean_norm_ratio"] < 1e-5 and s["cosine"] < 0.7
    same = clean_scores(true, true)
    assert same["uncentred"] < 1e-6 and abs(same["cosine"] - 1) < 1e-6 and abs(same["mean_norm_ratio"] - 1) < 1e-6
