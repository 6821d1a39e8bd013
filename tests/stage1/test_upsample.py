"""``dvt denoise --upsample 2|4``: stage 1's clean field F read out on a finer grid, stored as its own array."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.denoise.job import DenoiseConfig, Stage1Worker, plan_denoise, prepare_store
from pipeline.io.listing import fetch_bytes
from pipeline.stage1.fit import Stage1Config, fit_images
from pipeline.store import FeatureStore, StoreMismatchError
from pipeline.testing.synthetic import make_problem


def test_the_fine_readout_of_f_beats_upsampling_the_patch_grid(one_torch_thread):
    # smooth images, colour at the patch centre: the true clean map is known at any point of the image
    backbone, images = make_problem("smooth", 2, 224, embed_dim=64, seed=0)
    for k in (2, 4):
        res = fit_images(backbone, images, Stage1Config.preset("default", clean_upsample=k), image_ids=[0, 1])
        fine, coarse = torch.stack([r.clean_fine for r in res]), torch.stack([r.clean for r in res])
        assert fine.shape == (2, 13 * k + 1, 13 * k + 1, 64)
        torch.testing.assert_close(fine[:, ::k, ::k], coarse, atol=1e-4, rtol=1e-4)  # the patch centres
        pos = 8 / 224 + torch.arange(fine.shape[1]) * 16 / k / 224  # node positions (square image)
        grid = torch.stack(torch.meshgrid(pos, pos, indexing="xy"), -1) * 2 - 1
        colour = F.grid_sample(images, grid[None].expand(2, -1, -1, -1), mode="bilinear", padding_mode="border",
                               align_corners=False).permute(0, 2, 3, 1)
        truth = torch.sin(colour @ backbone.phi_a + backbone.phi_b) @ backbone.phi_m + backbone.artifact(14, 14).mean((0, 1))
        naive = F.interpolate(coarse.permute(0, 3, 1, 2), size=fine.shape[1:3], mode="bilinear",
                              align_corners=True).permute(0, 2, 3, 1)
        between = torch.ones(fine.shape[1:3], dtype=torch.bool)
        between[::k, ::k] = False
        err_fine = (fine - truth)[:, between].norm()
        err_naive = (naive - truth)[:, between].norm()
        assert err_fine < 0.75 * err_naive, (k, float(err_fine), float(err_naive))


def test_a_store_keeps_the_fine_grid_with_its_geometry_and_show_draws_it(tmp_path, sample_images, one_torch_thread):
    from jobs.cli import main

    config = DenoiseConfig(images=str(sample_images[0].parent), output=str(tmp_path / "hr.zarr"), limit=2,
                           model="pipeline.testing.artifact_vit:create_small", weights="none", input_size=128,
                           preset="ci", views=4, upsample=2)
    store, _, pending = prepare_store(config)
    assert store.layout.arrays == ("raw", "clean", "artifact", "clean_x2")
    worker = Stage1Worker(config, store.layout.geometry())
    out = worker(fetch_bytes({"image_id": pending["image_id"].to_numpy(), "uri": np.array(pending["uri"].to_pylist())}))
    assert out["status"].tolist() == ["ok", "ok"], out["error"]
    store = FeatureStore.open(config.output)
    data = store.get(store.ids())
    assert data["clean_x2"].shape == (2, 15, 15, 192) and data["clean"].shape == (2, 8, 8, 192)
    np.testing.assert_allclose(data["clean_x2"][:, ::2, ::2].astype(np.float32), data["clean"].astype(np.float32),
                               atol=1e-2)
    attrs = dict(store.zarr_arrays["clean_x2"].attrs)
    assert attrs["upsample"] == 2 and attrs["grid"] == [15, 15]
    assert attrs["first"] == [8 / 128, 8 / 128] and attrs["step"] == [8 / 128, 8 / 128]
    assert store.attrs["method"]["clean_upsample"] == 2
    with pytest.raises(StoreMismatchError, match="arrays"):
        plan_denoise(dataclasses.replace(config, upsample=4))
    assert main(["show", "--store", config.output, "--out", str(tmp_path / "show"), "--cell", "64"]) == 0
    with Image.open(tmp_path / "show" / "features.png") as png:
        assert png.size[0] == 10 * 64  # image, raw x3, clean x3, clean on the x2 grid, G, residual
