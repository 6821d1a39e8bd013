"""Stage 1 against the synthetic backbone's known answer: recovery with the mean kept, the gauge, determinism,
batching, high-norm tokens, errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline.stage1.field import FieldConfig, HashGridConfig
from pipeline.stage1.noise_model import NoiseModel
from pipeline.stage1.fit import PRESETS, Stage1Config, Stage1Error, fit_generator, fit_images
from pipeline.testing.synthetic import SyntheticBackbone, clean_scores, make_problem, recovery_error, smooth_images
from pipeline.stage1.view_features import extract_batch, view_boxes
from pipeline.vit.views import ViewConfig, make_views

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
    assert {"mse", "cos", "total"} <= set(r.losses)
    assert r.seconds > r.view_seconds > 0 and r.residual_norm_max >= r.residual_norm_mean > 0
    # the stored arrays add up on the full view: raw = clean + artifact + residual
    torch.testing.assert_close((r.raw - r.clean - r.artifact).norm(dim=-1), r.residual_norm, atol=1e-4, rtol=1e-4)
    # the gauge: G has zero mean over the grid, so the image's mean lives in F
    assert r.artifact.mean((0, 1)).abs().max() < 1e-5


def test_recovers_the_clean_map_with_its_mean(fitted, backbone, images):
    true = backbone.clean_map(images[:2])
    raw = clean_scores(torch.stack([r.raw for r in fitted]), true)
    ours = clean_scores(torch.stack([r.clean for r in fitted]), true)
    assert raw["uncentred"] > 0.5
    assert ours["uncentred"] < 0.3 * raw["uncentred"], (ours, raw)
    assert ours["cosine"] > 0.99 > raw["cosine"]
    assert 0.9 <= ours["mean_norm_ratio"] <= 1.1, ours
    art_err = recovery_error(fitted[0].artifact, backbone.artifact_map(10, 10))
    assert art_err < 0.3, art_err


@pytest.mark.parametrize("config", [
    PRESETS["ci"],
    PRESETS["ci"].replace(steps=60, lr=3e-3, min_lr=3e-4, warmup=0.0, freeze_artifact_at=0.5),  # + Adam, h
    pytest.param(Stage1Config(views=ViewConfig(num_views=8), steps=150, batch_tokens=512, lr=0.01, min_lr=0.001,
                              field=FieldConfig(hash=HashGridConfig(levels=4, log2_table_size=10, max_resolution=32))),
                 marks=pytest.mark.slow)],
    ids=["closed-form", "closed-form+adam", "hash-field"])
def test_every_path_keeps_the_image_mean_in_the_clean_map(config, images):
    # an artifact with a large mean: whatever the solver, the mean must end up in F, not G
    bb = SyntheticBackbone(embed_dim=DIM, patch_size=PATCH, artifact="learned", artifact_mean=2.0, noise_std=0.02)
    res = fit_images(bb, images[:1], config, image_ids=[0], seed=0)[0]
    scores = clean_scores(res.clean[None], bb.clean_map(images[:1]))
    assert 0.9 <= scores["mean_norm_ratio"] <= 1.1 and scores["cosine"] > 0.9, scores
    assert res.artifact.mean((0, 1)).abs().max() < 1e-4


@pytest.mark.parametrize("kind", ["grid", "hash"])
def test_fix_gauge_moves_the_mean_without_changing_any_prediction(kind):
    gens = [fit_generator(i, 0) for i in range(2)]
    coords = torch.stack(torch.meshgrid(torch.linspace(0.05, 0.95, 5), torch.linspace(0.05, 0.95, 5),
                                        indexing="xy"), -1)
    field = FieldConfig(kind=kind, grid_factor=2, hash=HashGridConfig(levels=2, log2_table_size=8, max_resolution=16))
    model = NoiseModel(field, 6, coords, coords, gens, g_init_std=0.5)
    with torch.no_grad():
        model.artifact.grid.add_(torch.randn(2, 6, 1, 1))
        if kind == "grid":
            model.field.grid.normal_()
    xy = torch.rand(2, 50, 2)
    pos = torch.randint(25, (2, 50))
    before = model.explain(50, xy, pos)
    moved = model.fix_gauge()
    assert moved.shape == (2, 6) and moved.abs().max() > 0.1
    torch.testing.assert_close(model.explain(50, xy, pos), before, atol=1e-5, rtol=1e-5)
    assert model.artifact.grid.mean((2, 3)).abs().max() < 1e-6


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


@pytest.mark.slow
def test_batched_and_single_agree_with_minibatch_hash_field(backbone, images):
    cfg = Stage1Config(views=ViewConfig(num_views=4), steps=20, batch_tokens=256,
                       field=FieldConfig(hash=HashGridConfig(levels=4, log2_table_size=10, max_resolution=64)))
    both = fit_images(backbone, images[1:3], cfg, image_ids=[5, 6], seed=0)
    alone = fit_images(backbone, images[2:3], cfg, image_ids=[6], seed=0)[0]
    torch.testing.assert_close(alone.clean, both[1].clean, atol=1e-4, rtol=1e-4)
    assert set(both[0].losses) >= {"residual", "sparsity"}


def test_high_norm_tokens_stay_out_of_the_clean_map():
    # DINOv2-like: high-norm tokens on flat patches, at the same image places in every view
    bb, img = make_problem("outliers", 2, SIZE, embed_dim=DIM, patch_size=PATCH, seed=0)
    full = torch.cat([make_views(i, ViewConfig(num_views=0), SIZE, PATCH).images for i in img])
    mask = bb.parts(full)["outlier"]
    assert 2 <= int(mask.sum()) <= 30
    res = fit_images(bb, img, PRESETS["ci"], image_ids=[0, 1], seed=0)
    norms = torch.stack([r.residual_norm for r in res])
    assert norms[mask].median() > 4 * norms[~mask].median(), (norms[mask], norms[~mask].median())
    # F at those places is the clean content, not the outlier (a plain least-squares F keeps most of it)
    err = (torch.stack([r.clean for r in res]) - bb.clean_map(img)).norm(dim=-1)
    assert err[mask].mean() < 2 * err[~mask].mean(), (err[mask], err[~mask].mean())


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
    assert default.field.kind == "grid" and default.linear_solve_iters > 0
    assert paper.lr_at(0) < paper.lr_at(2000) == pytest.approx(0.01, rel=1e-3)
    assert paper.lr_at(19999) == pytest.approx(0.001, rel=1e-2)


def test_a_full_view_weight_per_image_follows_the_full_views_disagreement_with_the_crops(backbone, images):
    """The rule (``full_view_rule``): a first solve's residuals choose each image's full-view weight in [1, limit]:
    1 where the full view and the crops agree up to noise, more where the full view holds what the crops do not.
    On smooth images it keeps the fixed weight's fit. Bad values are refused by name."""
    torch.manual_seed(0)
    g, views, c = 5, 8, 4
    centres = (torch.arange(g) + 0.5) / g
    full = torch.stack(torch.meshgrid(centres, centres, indexing="xy"), -1).reshape(-1, 2)
    xy = [full]
    for _ in range(1, views):
        scale = 0.5 + 0.3 * torch.rand(())
        xy.append(full * scale + torch.rand(2) * (1 - scale))
    coords = torch.cat(xy)[None].repeat(2, 1, 1)
    raw = 0.05 * torch.randn(2, views * g * g, c)
    raw[1, : g * g] += 0.5 * torch.randn(g * g, c)  # image 1: its full view holds detail no crop sees
    model = NoiseModel(FieldConfig(kind="grid", grid_factor=2), c, full.reshape(g, g, 2), full.reshape(g, g, 2),
                       [torch.Generator().manual_seed(i) for i in range(2)])
    keep = model.solve_linear(raw, coords, views, 10)
    weights = model.full_view_weights(raw, coords, views, keep, k=10.0, limit=50.0)
    assert weights[0] == 1.0 and weights[1] == 50.0, weights

    fixed = PRESETS["ci"].replace(full_view_weight=1.0)
    true = backbone.clean_map(images[:2])
    scores = {name: clean_scores(torch.stack([r.clean for r in fit_images(backbone, images[:2], config,
                                                                              image_ids=[0, 1], seed=0)]), true)
              for name, config in (("fixed", fixed), ("rule", fixed.replace(full_view_rule=10.0)))}
    assert scores["rule"]["uncentred"] <= scores["fixed"]["uncentred"] * 1.02, scores
    assert scores["rule"]["cosine"] > 0.99 and 0.9 <= scores["rule"]["mean_norm_ratio"] <= 1.1, scores

    with pytest.raises(ValueError, match="full_view_rule"):
        PRESETS["ci"].replace(full_view_rule=-1.0)
    with pytest.raises(ValueError, match="full_view_rule"):
        PRESETS["paper"].replace(full_view_rule=10.0)  # Adam only: no closed-form solve to weigh


def test_stores_recorded_before_the_rule_existed_record_the_same_settings():
    """A field added later is left out of a store's record while it holds the value that behaves as before, so a
    store written before it existed resumes under the same preset; a preset that uses it records it."""
    import dataclasses

    from pipeline.stage1.fit import ADDED_LATER

    for name in ("default", "ci", "paper"):
        before = dataclasses.asdict(PRESETS[name])
        for path in ADDED_LATER:  # what a store written before these fields existed holds
            *parents, field = path.split(".")
            holder = before
            for key in parents:
                holder = holder[key]
            del holder[field]
        assert PRESETS[name].record() == before
    record = PRESETS["quality"].record()
    assert record["near_full_weight"] == 3.0 and record["views"]["near_full_share"] == 0.4
    assert record["near_full_rule"] == 3.0 and "full_view_rule" not in record
    assert "near_full_scale" not in record["views"]  # at the value it has always had: implied
    quality = PRESETS["quality"]
    assert quality.views.num_views + 1 <= 96 and quality.linear_solve_iters and quality.steps == 0


def test_near_full_views_average_the_noise_the_zoomed_crops_cannot(backbone, images):
    """Views near the full view's scale (``views.near_full_share``) see nearly what the full view sees, with their
    own noise: weighted in (``near_full_weight``) they lower the clean map's error on noisy photographs, where
    zoomed-in crops (finer content) cannot be averaged in without bias. Bad values are refused by name."""
    bb, photos = make_problem("noise-0.1", 1, 224, embed_dim=32, patch_size=PATCH, seed=0)
    near = PRESETS["quality"].replace(near_full_rule=0.0)
    base = near.replace(views=dataclasses.replace(near.views, near_full_share=0.0), near_full_weight=1.0)
    assert near.views.near_full_views == 38
    true = bb.clean_map(photos)

    def score(config: Stage1Config) -> dict[str, float]:
        return clean_scores(fit_images(bb, photos, config, image_ids=[0], seed=0)[0].clean[None], true)

    scores = {"crops": score(base), "near": score(near)}
    assert scores["near"]["uncentred"] < 0.8 * scores["crops"]["uncentred"], scores
    assert 0.95 <= scores["near"]["mean_norm_ratio"] <= 1.05, scores

    # the rule: the zoomed-in crops disagree with the fit far more than the near-full views on photographs, and
    # about as much on smooth images (point content: every view sees the same colour at a place)
    ruled = near.replace(near_full_rule=3.0)
    disagreement = {}
    for name, (model, pixels) in (("photo", (bb, photos)), ("smooth", (backbone, images[:1]))):
        batch = extract_batch(model, pixels, ruled.views, image_ids=[0], seed=0)
        noise = NoiseModel(ruled.field, batch.raw.shape[-1], batch.full_coords, batch.full_coords,
                           [torch.Generator()])
        zoomed = (torch.arange(batch.views) < batch.views - 38).float()  # G from the full view and zoomed crops
        keep = noise.solve_linear(batch.raw, batch.xy, batch.views, 30, high_norm=3.0, smooth=0.03,
                                  artifact_views=zoomed)
        disagreement[name] = noise.zoomed_crop_disagreement(batch.raw, batch.xy, batch.views, keep, 38)
    assert (disagreement["photo"] > 1 / 3).all() and (disagreement["smooth"] < 0.1).all(), disagreement
    rule_scores = score(ruled)
    assert rule_scores["uncentred"] == pytest.approx(scores["near"]["uncentred"], rel=1e-3), (rule_scores, scores)

    with pytest.raises(ValueError, match="near_full_weight"):
        PRESETS["ci"].replace(near_full_weight=0.0)
    with pytest.raises(ValueError, match="near_full_weight"):
        PRESETS["paper"].replace(near_full_weight=3.0)  # Adam only: no closed-form solve to weigh
    with pytest.raises(ValueError, match="near_full_share"):
        ViewConfig(near_full_share=1.5)
    with pytest.raises(ValueError, match="near_full_rule"):
        base.replace(near_full_rule=3.0)  # no near-full views to weigh
    with pytest.raises(ValueError, match="set one of them"):
        ruled.replace(full_view_rule=10.0)
