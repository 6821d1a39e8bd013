"""Weights identity: a store never mixes features of two networks (docs/reliability.md 1)."""

from __future__ import annotations

import dataclasses
import logging
import uuid

import pytest

from pipeline.vit.backbone import BackboneConfig, create_backbone
from pipeline.denoise.job import DenoiseConfig, plan_denoise, prepare_store
from pipeline.store import FeatureStore, StoreLayout, StoreMismatchError
from pipeline.vit.weights import weights_identity


TINY = dict(model="vit_small_patch14_dinov2", weights="none", input_size=56, preset="ci", views=4, steps=10,
            images_per_batch=1, workers=1, cpus_per_worker=0.5, progress_every_s=1.0)
URIS = ["a.jpg", "b.jpg"]
LAYOUT = StoreLayout(backbone="vit_small_patch14_dinov2", block=11, input_size=(56, 56), patch_size=14, stride=14,
                     grid=(4, 4), channels=8, method={"steps": 10, "views": {"num_views": 4}},
                     weights={"source": "random", "seed": 0}, seed=0, stage1_version=1)

@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> str:
    """Valid weights for the tiny backbone that differ from the seeded random ones."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(123)
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, dynamic_img_size=True,
                              img_size=56)
    path = tmp_path_factory.mktemp("weights") / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def _mem() -> str:
    return f"memory://integrity-{uuid.uuid4().hex[:8]}/s.zarr"


def test_random_weights_are_seeded_and_recorded():
    a = create_backbone("vit_small_patch14_dinov2", weights="none", img_size=56)
    b = create_backbone("vit_small_patch14_dinov2", weights="none", img_size=56)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert x.equal(y), name
    assert weights_identity(BackboneConfig(model="vit_small_patch14_dinov2", weights="none")) == \
        {"source": "random", "seed": 0}
    hub = weights_identity(BackboneConfig(model="vit_small_patch14_dinov2", weights="hub"))
    assert hub["source"] == "hub" and hub["model"] == "vit_small_patch14_dinov2.lvd142m"  # the tag is resolved


def test_a_resume_with_other_weights_seed_or_version_is_refused_naming_the_field(tmp_path, weights_file):
    url = _mem()
    FeatureStore.create(url, LAYOUT, URIS)
    file_weights = weights_identity(BackboneConfig(model="vit_small_patch14_dinov2", weights=weights_file))
    assert file_weights["source"] == "file" and len(file_weights["sha256"]) == 64
    other = dataclasses.replace(LAYOUT, weights=file_weights)
    for allow in (False, True):  # two networks never share a store, whatever the flags
        with pytest.raises(StoreMismatchError, match=r"weights: store has random init \(seed 0\), this run file "
                                                     r"w.safetensors \(sha256 [0-9a-f]{12}\).*--overwrite"):
            FeatureStore.create(url, other, URIS, allow_config_change=allow)
    for change, text in [({"seed": 1}, "seed: store has 0, this run 1"),
                         ({"stage1_version": 2}, "stage1_version: store has 1, this run 2"),
                         ({"method": {"steps": 20, "views": {"num_views": 4}}}, "steps: store has 10, this run 20")]:
        with pytest.raises(StoreMismatchError, match=f"other run settings: {text}\\. Pass .*--allow-config-change") as e:
            FeatureStore.create(url, dataclasses.replace(LAYOUT, **change), URIS)
        assert len(str(e.value)) < 400
    changed = FeatureStore.create(url, dataclasses.replace(LAYOUT, seed=1), URIS, allow_config_change=True)
    assert changed.attrs["seed"] == 1 and changed.attrs["history"][-1]["seed"] == 0
    info = changed.info(size=False).format()
    assert "weights:  random init (seed 0)" in info and "stage 1:  version 1, seed 1" in info


def test_a_store_written_before_identities_counts_as_version_1(caplog):
    url = _mem()
    old = dataclasses.replace(LAYOUT, weights={}, seed=None, stage1_version=None)
    store = FeatureStore.create(url, old, URIS)
    assert "stage1_version" not in {k for k, v in store.attrs.items() if v is not None}
    with pytest.raises(StoreMismatchError, match="stage1_version: store has 1, this run 2"):
        FeatureStore.create(url, dataclasses.replace(LAYOUT, stage1_version=2), URIS)
    with caplog.at_level(logging.WARNING):
        again = FeatureStore.create(url, LAYOUT, URIS)
    assert "does not record its weights" in caplog.text and again.attrs["weights"] == {"source": "random", "seed": 0}


def test_mixing_weights_is_refused_before_anything_runs(tmp_path, sample_images, weights_file):
    config = DenoiseConfig(images=str(sample_images[0].parent), output=str(tmp_path / "s.zarr"), limit=1, **TINY)
    prepare_store(config)  # a store made with --weights none
    with pytest.raises(StoreMismatchError, match="weights: store has random init"):
        plan_denoise(dataclasses.replace(config, weights=weights_file, limit=2))
    with pytest.raises(StoreMismatchError, match="seed: store has 0, this run 5"):
        plan_denoise(dataclasses.replace(config, seed=5))
    plan = plan_denoise(dataclasses.replace(config, limit=2))
    layout, uris, existed = plan.layout, plan.uris, plan.existed
    assert existed and len(uris) == 2 and layout.stage1_version >= 1
