"""Stage 1 against the synthetic backbone's known answer: recovery, determinism, batching, outliers, errors."""

from __future__ import annotations

import pytest
import torch

from pipeline.field import FieldConfig, HashGridConfig
from pipeline.stage1 import PRESETS, Stage1Config, Stage1Error, fit_images
from pipeline.synthetic import SyntheticBackbone, recovery_error, smooth_images
from pipeline.view_features import view_boxes
from pipeline.views import ViewConfig, make_views

SIZE, PATCH, DIM = 160, 16, 16  # a 10 x 10 patch grid


@pytest.fixture(scope="module")
def backbone():
    return SyntheticBackbone(embed_dim=DIM, patch_size=PATCH, noise_std=0.05, seed=0)


@pytest.fixture(scope="module")
def images():
    return smooth_images(3, SIZE, seed=0)


@pytest.fixture(scope="module")
def fitted(backbone, images):
    return fit_images(backbone, images[:2], PRESETS["ci"], image_ids=[0, 1], seed=0)


def test_result_shapes_and_fields(fitted, backbone, images):
    r = fitted[0]
    assert r.clean.shape == r.raw.shape == r.artifact.shape == (10, 10, DIM)
    assert r.artifact_native.shape == (10, 10, DIM) and r.residual_norm.shape == (10, 10)
    full = make_views(images[0], ViewConfig(num_views=0), SIZE, PATCH).images  # the full view, as rendered
    torch.testing.assert_close(r.raw, backbone.features(full)[0])
    assert {"mse", "cos", "residual", "sparsity", "total"} <= set(r.losses)
    assert r.seconds > r.view_seconds > 0 and r.residual_norm_max >= r.residual_norm_mean > 0


def test_recovers_the_clean_map_far_below_raw(fitted, backbone, images):
    true = backbone.clean_map(images[:2])
    clean = torch.stack([r.clean for r in fitted])
    raw = torch.stack([r.raw for r in fitted])
    raw_err, err = recovery_error(raw, true), recovery_error(clean, true)
    assert raw_err > 0.5
    assert err < 0.3 * raw_err, (err, raw_err)
    art_err = recovery_error(fitted[0].artifact, backbone.artifact(10, 10))
    assert art_err < 0.3, art_err


@pytest.fixture(scope="module")
def single(backbone, images):
    return fit_images(backbone, images[1:2], PRESETS["ci"], image_ids=[1], seed=0)[0]


def test_same_seed_same_result_other_seed_differs(single, backbone, images):
    again = fit_images(backbone, images[1:2], PRESETS["ci"], image_ids=[1], seed=0)[0]
    other = fit_images(backbone, images[1:2], PRESETS["ci"], image_ids=[1], seed=1)[0]
    assert torch.equal(again.clean, single.clean) and torch.equal(again.artifact, single.artifact)
    assert not torch.allclose(again.clean, other.clean)


def test_batched_and_single_fits_agree(fitted, single):
    # image 1 alone vs inside a batch of two: same views, initial values and draws; only float summation order
    # in the batched kernels may differ.
    scale = float(fitted[1].clean.abs().max())
    torch.testing.assert_close(single.clean, fitted[1].clean, atol=1e-3 * scale, rtol=0)
    torch.testing.assert_close(single.artifact, fitted[1].artifact, atol=1e-3 * scale, rtol=0)


def test_batched_and_single_agree_with_minibatch_hash_field(backbone, images):
    cfg = Stage1Config(views=ViewConfig(num_views=4), steps=20, batch_tokens=256,
                       field=FieldConfig(hash=HashGridConfig(levels=4, log2_table_size=10, max_resolution=64)))
    both = fit_images(backbone, images[1:3], cfg, image_ids=[5, 6], seed=0)
    alone = fit_images(backbone, images[2:3], cfg, image_ids=[6], seed=0)[0]
    torch.testing.assert_close(alone.clean, both[1].clean, atol=1e-4, rtol=1e-4)
    assert set(both[0].losses) >= {"residual", "sparsity"}


def test_residual_captures_sparse_high_norm_outliers(images):
    bb = SyntheticBackbone(embed_dim=DIM, patch_size=PATCH, noise_std=0.05, outlier_prob=0.06, outlier_norm=8.0)
    img = images[:2]
    full = torch.cat([make_views(i, ViewConfig(num_views=0), SIZE, PATCH).images for i in img])
    mask = bb.parts(full)["outlier"]  # outliers of the full views as the fit renders them
    assert 2 <= int(mask.sum()) <= 30
    res = fit_images(bb, img, PRESETS["ci"], image_ids=[0, 1], seed=0)
    norms = torch.stack([r.residual_norm for r in res])
    assert norms[mask].median() > 4 * norms[~mask].median(), (norms[mask], norms[~mask].median())
    # F keeps only a small part of the outliers (a plain least-squares F takes about half: ~4 of 8)
    true = bb.clean_map(img)
    clean = torch.stack([r.clean for r in res])
    err = (clean - clean.mean((1, 2), keepdim=True)) - (true - true.mean((1, 2), keepdim=True))
    per_token = err.norm(dim=-1)
    assert per_token[mask].mean() < 0.3 * bb.config.outlier_norm, per_token[mask]
    assert recovery_error(clean, true) < 0.4 * recovery_error(torch.stack([r.raw for r in res]), true)


class _NaNBackbone(SyntheticBackbone):
    def features(self, pixels):
        out = super().features(pixels).clone()
        out[-1, 0, 0, 0] = float("nan")
        return out


def test_bad_inputs_raise_clear_errors(backbone, images):
    cfg = PRESETS["ci"].replace(steps=2)
    with pytest.raises(Stage1Error, match="NaN"):
        fit_images(_NaNBackbone(embed_dim=DIM, patch_size=PATCH), images[:1], cfg, image_ids=[0])
    with pytest.raises(Stage1Error, match="does not match the backbone"):
        fit_images(backbone, smooth_images(1, 150), cfg, image_ids=[0])
    with pytest.raises(Stage1Error, match="at least one random view"):
        fit_images(backbone, images[:1], cfg.replace(views=ViewConfig(num_views=0)), image_ids=[0])
    with pytest.raises(Stage1Error, match="one id per image"):
        fit_images(backbone, images[:2], cfg, image_ids=[0])
    with pytest.raises(Stage1Error, match=r"\[0, 1\]"):
        fit_images(backbone, images[:1] * 3, cfg, image_ids=[0])
    with pytest.raises(ValueError, match="grid"):
        Stage1Config(linear_solve_iters=5)  # a closed-form start needs a linear (grid) F


def test_view_boxes_are_make_views_boxes():
    img = torch.rand(3, 64, 64)
    cfg = ViewConfig(num_views=5)
    boxes, flips = view_boxes(cfg, image_id=7, seed=3)
    views = make_views(img, cfg, 64, 16, image_id=7, seed=3)
    assert torch.equal(boxes, views.boxes) and torch.equal(flips, views.flips)


def test_presets_are_the_reference_and_a_cheaper_default():
    paper = Stage1Config.preset("paper")
    assert paper.views.num_views == 768 and paper.steps == 20000 and paper.batch_tokens == 2048
    assert paper.field.kind == "hash" and paper.field.hash.levels == 16 and paper.field.hash.log2_table_size == 20
    assert (paper.lr, paper.min_lr, paper.betas, paper.eps, paper.weight_decay) == (0.01, 0.001, (0.9, 0.99), 1e-15, 1e-5)
    default = Stage1Config.preset("default")
    assert default.views.num_views * default.steps < paper.views.num_views * paper.steps / 100
    assert paper.lr_at(0) < paper.lr_at(2000) == pytest.approx(0.01, rel=1e-3)
    assert paper.lr_at(19999) == pytest.approx(0.001, rel=1e-2)
