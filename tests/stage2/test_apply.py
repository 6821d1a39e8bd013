"""``dvt apply``: images -> backbone -> denoiser -> feature store, through the denoise job's pipeline."""

import numpy as np
import pytest
import torch

from pipeline.stage2.apply import ApplyConfig, ApplyWorker, prepare_apply_store, run_apply
from pipeline.vit.backbone import create_backbone
from pipeline.io.decode import decode_image, resize_to_tensor
from pipeline.io.listing import fetch_bytes
from pipeline.stage2.denoiser import (DenoisedViT, Denoiser, DenoiserConfig, DenoiserMismatchError, DenoiserSpec, load_denoiser,
                               save_denoiser)
from pipeline.store import FeatureStore, StoreMismatchError
from tests.custom_backbone import write_custom_denoiser
from pipeline.testing.synthetic_pairs import write_synthetic_store

TINY = "vit_small_patch14_dinov2"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A fixed tiny backbone (weights in a file, so every process builds the same one) and a denoiser for it."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("apply")
    torch.manual_seed(0)
    backbone = create_backbone(TINY, weights="none", img_size=56)
    weights = str(folder / "backbone.safetensors")
    save_file({k: v.contiguous() for k, v in backbone.model.state_dict().items()}, weights)
    denoiser = Denoiser(DenoiserConfig(channels=384, pos_grid=(4, 4))).eval()
    spec = DenoiserSpec(denoiser=denoiser.config, backbone=TINY, block=backbone.block, input_size=(56, 56),
                        patch_size=14, stride=14, training={"stores": ["test"]})
    path = save_denoiser(str(folder / "denoiser.safetensors"), denoiser, spec)
    return {"weights": weights, "denoiser": path, "model": DenoisedViT(backbone, denoiser, spec)}


@pytest.mark.slow
def test_apply_samples_into_a_store_and_resume(ray_local, tmp_path, sample_images, trained):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for p in sample_images[:3]:
        (corpus / p.name).write_bytes(p.read_bytes())
    (corpus / "broken.jpg").write_bytes(b"not an image at all")
    url = str(tmp_path / "applied.zarr")
    config = ApplyConfig(images=str(corpus), output=url, denoiser=trained["denoiser"], weights=trained["weights"],
                         images_per_batch=2, workers=1, cpus_per_worker=0.5, progress_every_s=1.0)
    summary = run_apply(config)
    assert (summary.ok, summary.failed, summary.job) == (3, 1, "apply")
    store = FeatureStore.open(url)
    layout = store.layout
    assert (layout.backbone, tuple(layout.grid), layout.channels, tuple(layout.input_size)) == (TINY, (4, 4), 384, (56, 56))
    assert store.attrs["method"]["stage"] == 2 and len(store.attrs["method"]["sha1"]) == 40
    rows = {r["uri"].rsplit("/", 1)[-1]: r for r in store.manifest().to_pylist()}
    assert rows["broken.jpg"]["status"] == "failed" and "not an image" in rows["broken.jpg"]["error"]
    # the stored features are what DenoisedViT gives for the same images
    good = sorted((r["image_id"], name) for name, r in rows.items() if r["status"] == "ok")
    pixels = torch.stack([resize_to_tensor(decode_image((corpus / name).read_bytes()).pixels, 56) for _, name in good])
    raw, clean = trained["model"].features(pixels, return_raw=True)
    data = store.get([i for i, _ in good])
    np.testing.assert_allclose(data["clean"].astype(np.float32), clean.numpy(), atol=2e-2, rtol=1e-2)
    np.testing.assert_allclose(data["raw"].astype(np.float32), raw.numpy(), atol=2e-2, rtol=1e-2)
    # a re-run has nothing left to do; more images are added to the same store
    again = run_apply(ApplyConfig(**{**config.__dict__, "retry_failed": False}))
    assert again.todo == 0 and again.skipped == 4
    (corpus / sample_images[3].name).write_bytes(sample_images[3].read_bytes())
    more = run_apply(ApplyConfig(**{**config.__dict__, "retry_failed": False}))
    assert (more.todo, more.ok, more.store_ok) == (1, 1, 4)


def test_a_denoiser_for_another_backbone_or_store_is_refused(tmp_path, sample_images, trained):
    base = ApplyConfig(images=str(sample_images[0].parent), output=str(tmp_path / "out.zarr"),
                       denoiser=trained["denoiser"], weights="none")
    with pytest.raises(DenoiserMismatchError, match=r"trained for backbone 'vit_small_patch14_dinov2', not 'deit3"):
        prepare_apply_store(ApplyConfig(**{**base.__dict__, "model": "deit3_small_patch16_224"}))
    other = str(tmp_path / "other.zarr")
    write_synthetic_store(other, 2, channels=16)
    with pytest.raises(StoreMismatchError, match="synthetic"):
        prepare_apply_store(ApplyConfig(**{**base.__dict__, "output": other}))
    with pytest.raises(FileNotFoundError, match="dvt train"):
        prepare_apply_store(ApplyConfig(**{**base.__dict__, "denoiser": str(tmp_path / "none.safetensors")}))


def test_no_raw_keeps_only_the_denoised_features(tmp_path, sample_images, trained):
    from pipeline.store import StoreError

    config = ApplyConfig(images=str(sample_images[0].parent), output=str(tmp_path / "clean-only.zarr"),
                         denoiser=trained["denoiser"], weights="none", keep_raw=False, limit=1)
    store, covered, pending, config = prepare_apply_store(config)
    assert store.layout.arrays == ("clean",) and covered == 1
    with pytest.raises(StoreError, match="no raw features"):
        next(store.iter_pairs())


def test_an_apply_store_records_its_denoiser_and_weights_and_refuses_others(tmp_path, sample_images, trained):
    from pipeline.stage2.apply import plan_apply

    torch.manual_seed(1)
    other = Denoiser(DenoiserConfig(channels=384, pos_grid=(4, 4))).eval()
    spec = DenoiserSpec(denoiser=other.config, backbone=TINY, block=11, input_size=(56, 56), patch_size=14,
                        stride=14, training={"stores": ["test"]})
    other_path = save_denoiser(str(tmp_path / "other.safetensors"), other, spec)
    config = ApplyConfig(images=str(sample_images[0].parent), output=str(tmp_path / "out.zarr"),
                         denoiser=trained["denoiser"], weights=trained["weights"], limit=1)
    store, _, _, _ = prepare_apply_store(config)
    assert store.attrs["weights"]["source"] == "file" and len(store.attrs["weights"]["sha256"]) == 64
    with pytest.raises(StoreMismatchError, match=r"other run settings: denoiser: store has .*denoiser.safetensors"
                                                 r".*sha1: store has"):
        plan_apply(ApplyConfig(**{**config.__dict__, "denoiser": other_path}))
    with pytest.raises(StoreMismatchError, match=r"weights: store has file backbone.safetensors .* this run random"):
        plan_apply(ApplyConfig(**{**config.__dict__, "weights": "none", "allow_config_change": True}))
    assert plan_apply(ApplyConfig(**{**config.__dict__, "limit": 2})).existed  # same denoiser and weights: fine


def test_apply_runs_a_denoiser_trained_on_a_custom_backbone(tmp_path, sample_images, one_torch_thread):
    # the denoiser's spec records block 0 and the stride of a `module:factory` backbone; apply must accept them
    weights, path = write_custom_denoiser(str(tmp_path))
    config = ApplyConfig(images=str(sample_images[0].parent), output=str(tmp_path / "custom.zarr"), denoiser=path,
                         weights=weights, model="tests.custom_backbone:create", limit=2)
    store, covered, pending, config = prepare_apply_store(config)
    assert covered == 2 and store.layout.backbone == "tests.custom_backbone:create" and tuple(store.layout.grid) == (4, 4)
    worker = ApplyWorker(config, store.layout.geometry())  # the Ray actor's code, in this process
    out = worker(fetch_bytes({"image_id": pending["image_id"].to_numpy(), "uri": np.array(pending["uri"].to_pylist())}))
    assert out["status"].tolist() == ["ok", "ok"], out["error"]
    uris = pending["uri"].to_pylist()
    pixels = torch.stack([resize_to_tensor(decode_image(open(u, "rb").read()).pixels, 32) for u in uris])
    denoiser, spec = load_denoiser(path)
    backbone = create_backbone("tests.custom_backbone:create", weights=weights)
    raw, clean = DenoisedViT(backbone, denoiser.eval(), spec).features(pixels, return_raw=True)
    data = FeatureStore.open(config.output).get(pending["image_id"].to_numpy())
    np.testing.assert_allclose(data["clean"].astype(np.float32), clean.numpy(), atol=2e-2, rtol=1e-2)
    np.testing.assert_allclose(data["raw"].astype(np.float32), raw.numpy(), atol=2e-2, rtol=1e-2)


def test_the_zero_cost_block_worker_writes_raw_plus_the_positional_embedding(tmp_path, sample_images, one_torch_thread):
    """The benchmarks' apply worker (``pipeline.testing.zero_denoiser``) keeps everything but the block: ``clean`` is
    ``raw`` plus the denoiser's positional embedding, the same map for every image."""
    from pipeline.testing.zero_denoiser import ZeroBlockApplyWorker

    weights, path = write_custom_denoiser(str(tmp_path))
    config = ApplyConfig(images=str(sample_images[0].parent), output=str(tmp_path / "zero.zarr"), denoiser=path,
                         weights=weights, model="tests.custom_backbone:create", limit=2)
    store, _, pending, config = prepare_apply_store(config)
    worker = ZeroBlockApplyWorker(config, store.layout.geometry())
    out = worker(fetch_bytes({"image_id": pending["image_id"].to_numpy(), "uri": np.array(pending["uri"].to_pylist())}))
    assert out["status"].tolist() == ["ok", "ok"], out["error"]
    assert isinstance(worker.model.denoiser.blocks, torch.nn.Identity)
    data = FeatureStore.open(config.output).get(pending["image_id"].to_numpy())
    added = data["clean"].astype(np.float32) - data["raw"].astype(np.float32)
    denoiser, _ = load_denoiser(path)
    pos = denoiser.pos_embed_for(added.shape[1:3]).detach().reshape(added.shape[1:]).numpy()
    assert np.abs(data["raw"]).max() > 0 and np.abs(pos).max() > 0
    for image in added:
        np.testing.assert_allclose(image, pos, atol=2e-2)
