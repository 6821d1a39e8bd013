"""``dvt denoise --method``: test-time averaging, a dataset-level artifact map, a trained denoiser, one store layout."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.vit.backbone import create_backbone
from pipeline.denoise.job import DenoiseConfig, Stage1Worker, plan_denoise, prepare_store
from pipeline.runtime.checks import JobConfigError
from pipeline.io.listing import fetch_bytes
from pipeline.denoise.methods import ArtifactFileError, ArtifactMap, store_method
from pipeline.denoise.average import AverageConfig, average_features, copy_boxes, warp_back
from pipeline.denoise.bias import from_store
from pipeline.denoise.method_worker import MethodWorker
from pipeline.analysis.metrics import positional_energy
from pipeline.stage1.fit import fit_images
from pipeline.store import FeatureStore, StoreMismatchError
from tests.custom_backbone import write_custom_denoiser
from pipeline.testing.synthetic import photo_images
from pipeline.vit.views import patch_coords

SMALL = "pipeline.testing.artifact_vit:create_small"
FIXTURE = dict(model=SMALL, weights="none", input_size=128, preset="ci", views=4)


def _run_worker(worker_class, config, store, pending):
    worker = worker_class(config, store.layout.geometry())  # the Ray actor's code, in this process
    out = worker(fetch_bytes({"image_id": pending["image_id"].to_numpy(), "uri": np.array(pending["uri"].to_pylist())}))
    assert set(out["status"]) == {"ok"}, out["error"]
    return store.refresh()


def test_warping_back_puts_every_copy_on_the_image_grid_exactly():
    # A "backbone" whose features are the global coordinates of each patch centre: warped back, every copy must
    # give the image's own patch centres wherever it covers them (shifts, flips, sub-patch shifts).
    size, patch = 128, 16
    full = patch_coords(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.zeros(1, dtype=torch.bool), size, patch)[0]
    for config in (AverageConfig(copies=9, max_shift=2), AverageConfig(copies=6, max_shift=1.5, whole_patches=False)):
        boxes, flips = copy_boxes(config, size, patch)
        assert flips.any() and (boxes[1:, :2].abs() > 0).any(1).all()  # every copy but the first is shifted
        maps = patch_coords(boxes, flips, size, patch)
        sampled, weight = warp_back(maps, boxes, flips, size, patch, patch)
        inside = weight > 0
        assert inside[0].all() and inside.float().mean() > 0.5
        err = (sampled - full[None]).norm(dim=-1)[inside]
        assert float(err.max()) < 1e-5


def test_average_lowers_positional_energy_on_the_artifact_vit(one_torch_thread):
    backbone = create_backbone(SMALL, weights="none")
    reference = create_backbone(SMALL.replace("create_small", "create_small_reference"), weights="none")
    images = photo_images(6, 128, seed=1)
    raw, clean = average_features(backbone, images, AverageConfig(copies=8))
    truth = reference.features(images)
    torch.testing.assert_close(raw, backbone.features(images), atol=1e-4, rtol=1e-4)
    assert positional_energy(clean) < 0.5 * positional_energy(raw)
    assert F.cosine_similarity(clean, truth, dim=-1).mean() > F.cosine_similarity(raw, truth, dim=-1).mean() + 0.05
    own, same = average_features(backbone, images, AverageConfig(copies=1))
    torch.testing.assert_close(same, raw, atol=1e-5, rtol=1e-5)  # one copy: the raw features
    assert same is own  # computed once, so a worker converts and stores it once


@pytest.fixture(scope="module")
def dvt_store(tmp_path_factory, sample_images):
    """A finished `dvt` store of three sample photos on the artifact ViT, written by the stage-1 actor's code."""
    folder = tmp_path_factory.mktemp("methods")
    config = DenoiseConfig(images=str(sample_images[0].parent), output=str(folder / "dvt.zarr"), limit=3, **FIXTURE)
    store, _, pending = prepare_store(config)
    torch.set_num_threads(1)
    return config, _run_worker(Stage1Worker, config, store, pending)


def test_bias_from_a_store_is_stage_1s_mean_g_and_is_applied_at_one_pass(dvt_store, tmp_path):
    config, store = dvt_store
    ids = store.ids()
    amap = from_store(store.url)
    # stage 1 on the same images here: the same mean G (to float16 storage precision)
    backbone = create_backbone(SMALL, weights="none")
    from pipeline.io.decode import decode_image, resize_to_tensor

    uris = store.listing()["uri"].to_pylist()
    pixels = torch.stack([resize_to_tensor(decode_image(open(uris[i], "rb").read()).pixels, 128) for i in ids])
    results = fit_images(backbone, pixels, config.stage1_config(), image_ids=ids.tolist(), seed=config.seed)
    mean_g = torch.stack([r.artifact for r in results]).mean(0).numpy()
    assert amap.meta["images"] == 3 and amap.meta["grid"] == [8, 8]
    np.testing.assert_allclose(amap.map, mean_g, atol=2e-3 * np.abs(mean_g).max() + 1e-3)

    path = str(tmp_path / "bias.npz")
    amap.save(path)
    bias = dataclasses.replace(config, output=str(tmp_path / "bias.zarr"), method="bias", artifact=path)
    out, _, pending = prepare_store(bias)
    out = _run_worker(MethodWorker, bias, out, pending)
    data = out.get(out.ids())
    assert store_method(out.attrs) == "bias" and out.attrs["method"]["images"] == 3
    np.testing.assert_allclose(data["clean"].astype(np.float32),
                               data["raw"].astype(np.float32) - amap.map, atol=2e-2)
    raw = store.get(ids, ("raw",))["raw"].astype(np.float32)
    assert positional_energy(torch.from_numpy(data["clean"].astype(np.float32))) < positional_energy(torch.from_numpy(raw))


def test_an_artifact_file_for_another_grid_or_backbone_is_refused_in_one_line(dvt_store, tmp_path):
    config, store = dvt_store
    path = str(tmp_path / "bias.npz")
    from_store(store.url).save(path)
    for change in (dict(input_size=112), dict(model="tests.custom_backbone:create", input_size=32)):
        bad = dataclasses.replace(config, output=str(tmp_path / "x.zarr"), method="bias", artifact=path, **change)
        with pytest.raises(ArtifactFileError, match="was made for other features") as e:
            plan_denoise(bad)
        assert "\n" not in str(e.value)
    with pytest.raises(ArtifactFileError, match="does not exist"):
        plan_denoise(dataclasses.replace(config, output=str(tmp_path / "y.zarr"), method="bias",
                                          artifact=str(tmp_path / "missing.npz")))
    with pytest.raises(ArtifactFileError, match="not an artifact file"):
        (tmp_path / "junk.npz").write_bytes(b"junk")
        ArtifactMap.load(str(tmp_path / "junk.npz"))


def test_the_method_is_part_of_the_stores_identity(dvt_store, tmp_path):
    config, store = dvt_store
    assert store_method(store.attrs) == "dvt"
    average = dataclasses.replace(config, output=str(tmp_path / "avg.zarr"), method="average", copies=4)
    made, _, pending = prepare_store(average)
    made = _run_worker(MethodWorker, average, made, pending)
    assert store_method(made.attrs) == "average" and made.attrs["method"]["copies"] == 4
    assert made.layout.arrays == ("raw", "clean") and len(made.ids()) == 3
    with pytest.raises(StoreMismatchError, match="copies"):
        plan_denoise(dataclasses.replace(average, copies=6))
    with pytest.raises(StoreMismatchError, match="other run settings"):
        plan_denoise(dataclasses.replace(config, output=average.output, keep_artifact=False))
    plan_denoise(dataclasses.replace(average, copies=6, allow_config_change=True))
    with pytest.raises(StoreMismatchError, match="method"):  # a dvt store resumed by another method
        plan_denoise(dataclasses.replace(average, output=config.output))


@pytest.mark.parametrize("flags, message", [
    (dict(method="median"), "not a denoising method"),
    (dict(method="bias"), "needs --artifact"),
    (dict(method="denoiser"), "needs --denoiser"),
    (dict(artifact="x.npz"), "only used with --method bias"),
    (dict(method="average", copies=0), "copies must be at least 1"),
    (dict(method="average", upsample=2), "needs --method dvt"),
])
def test_bad_method_flags_fail_in_one_line(tmp_path, flags, message):
    with pytest.raises(JobConfigError, match=message):
        plan_denoise(DenoiseConfig(images=str(tmp_path), output=str(tmp_path / "s.zarr"), **FIXTURE, **flags))


def test_the_denoiser_method_is_dvt_apply(tmp_path, sample_images, one_torch_thread):
    from pipeline.stage2.apply import ApplyConfig, plan_apply

    weights, path = write_custom_denoiser(str(tmp_path))
    config = DenoiseConfig(images=str(sample_images[0].parent), output=str(tmp_path / "d.zarr"), method="denoiser",
                           denoiser=path, weights=weights, limit=2)
    applied = config.apply_config()
    assert applied.model is None and applied.input_size is None and applied.denoiser == path
    plan = plan_apply(applied)
    resolved, layout = plan.config, plan.layout
    direct = plan_apply(ApplyConfig(images=config.images, output=config.output, denoiser=path, weights=weights,
                                     limit=2)).layout
    assert layout == direct and layout.method == direct.method and store_method({"method": layout.method}) == "denoiser"
    assert resolved.input_size == 32


@pytest.mark.slow
def test_average_through_the_ray_job_into_s3(ray_local, s3_bucket, sample_images):
    from pipeline.denoise.job import run_denoise

    config = DenoiseConfig(images=str(sample_images[0].parent), output=f"{s3_bucket}/avg.zarr", limit=2,
                           method="average", copies=4, **FIXTURE)
    summary = run_denoise(config)
    assert summary.ok == 2 and summary.failed == 0
    store = FeatureStore.open(config.output)
    assert store_method(store.attrs) == "average" and store.get(store.ids())["clean"].shape == (2, 8, 8, 192)
