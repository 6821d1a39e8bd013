"""Images per pass chosen per device: CPUs keep the jobs' old defaults, GPUs fill half their free memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.runtime.batching import (CPU_DEFAULT, GPU_CAP, forward_bytes_per_image, images_per_pass, stage1_bytes_per_image,
                               unit_size)
from pipeline.runtime.image_job import ImageBatchWorker
from pipeline.store import FeatureStore, StoreLayout

GIB = 2 ** 30


def test_cpu_keeps_the_old_defaults_whatever_the_memory():
    cpu = torch.device("cpu")
    assert images_per_pass("denoise", cpu, 10 * GIB) == CPU_DEFAULT["denoise"] == 4
    assert images_per_pass("apply", cpu, 1) == CPU_DEFAULT["apply"] == 16
    assert unit_size("denoise", cluster_has_gpus=False) == 4 and unit_size("apply", cluster_has_gpus=False) == 16


def test_gpu_fills_half_the_free_memory_between_one_and_the_cap():
    gpu = torch.device("cuda")
    per_image = stage1_bytes_per_image(views=24, grid=(37, 37), channels=768)  # ViT-B/14 at 518, default preset
    assert 1.5 * GIB < per_image < 2 * GIB
    assert images_per_pass("denoise", gpu, per_image, free_bytes=79 * GIB) == GPU_CAP["denoise"] == 16  # an H100
    assert images_per_pass("denoise", gpu, per_image, free_bytes=10 * GIB) == 3  # 5 GiB usable / 1.66 GiB
    assert images_per_pass("denoise", gpu, per_image, free_bytes=1 * GIB) == 1  # never 0: one image is tried
    per_view = forward_bytes_per_image(grid=(37, 37), channels=768)
    assert images_per_pass("apply", gpu, per_view, free_bytes=79 * GIB) == GPU_CAP["apply"] == 64
    assert unit_size("denoise", cluster_has_gpus=True) == 16 and unit_size("apply", cluster_has_gpus=True) == 64


def test_stage1_estimate_counts_only_the_tokens_a_step_uses():
    full = stage1_bytes_per_image(views=768, grid=(37, 37), channels=768)
    sampled = stage1_bytes_per_image(views=768, grid=(37, 37), channels=768, batch_tokens=2048)
    features = 769 * 37 * 37 * 768 * 4
    assert sampled < 1.1 * features < full  # the paper preset: the stored view features dominate
    assert stage1_bytes_per_image(views=24, grid=(37, 37), channels=768, feature_bytes=2) < \
        stage1_bytes_per_image(views=24, grid=(37, 37), channels=768)


class _CountingWorker(ImageBatchWorker):
    """Features of zeros, recording how many images each model call got."""

    stage = "counting"

    def __init__(self, output: str, layout: dict, images_per_pass: int | None):
        self.calls: list[int] = []
        self.images_per_pass = images_per_pass
        super().__init__(output, layout, input_size=28)

    def process(self, ids, images):
        self.calls.append(len(ids))
        assert images.shape == (len(ids), 3, 28, 28)
        return [({"seconds": 0.0}, {"clean": torch.full((2, 2, 4), float(i))}) for i in ids]


@pytest.mark.parametrize("per_pass, calls", [(None, [5]), (2, [2, 2, 1])])
def test_a_unit_is_processed_in_passes_and_stored_whole(tmp_path, sample_images, per_pass, calls):
    layout = StoreLayout(backbone="counting", block=0, input_size=(28, 28), patch_size=14, stride=14, grid=(2, 2),
                         channels=4, arrays=("clean",))
    uris = [str(sample_images[i % len(sample_images)]) for i in range(5)]
    store = FeatureStore.create(str(tmp_path / "s.zarr"), layout, uris)
    worker = _CountingWorker(store.url, layout.geometry(), per_pass)
    ids = list(range(5))
    out = worker({"image_id": np.array(ids), "uri": np.array(uris, dtype=object),
                  "bytes": [Path(u).read_bytes() for u in uris], "error": [""] * 5})
    assert worker.calls == calls and list(out["status"]) == ["ok"] * 5
    store = FeatureStore.open(store.url)
    assert sorted(store.ids("ok")) == ids
    np.testing.assert_array_equal(store.read("clean", ids)[:, 0, 0, 0], ids)  # each image kept its own result


def test_forward_only_workers_take_applys_unit_sizes():
    from pipeline.denoise.job import Stage1Worker
    from pipeline.denoise.method_worker import MethodWorker

    assert Stage1Worker.unit_job is None  # a stage-1 fit: the denoise job's own (4 on CPUs)
    assert unit_size(MethodWorker.unit_job, cluster_has_gpus=False) == 16
    assert unit_size(MethodWorker.unit_job, cluster_has_gpus=True) == 64
