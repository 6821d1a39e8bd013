"""Sizing the decode step to the model workers, and the worker fed decoded pixels (the Ray Data decode stage)
against the worker decoding bytes itself: the same store, byte for byte."""

import glob

import numpy as np
import pytest
import torch

from pipeline.io.decode import decode_batch
from pipeline.io.listing import fetch_bytes
from pipeline.runtime.checks import JobConfigError
from pipeline.runtime.feeding import plan_feed
from pipeline.runtime.image_job import ImageBatchWorker, _host
from pipeline.store import FeatureStore, StoreLayout


def test_decode_tasks_fill_the_cpus_the_gpu_workers_leave():
    plan = plan_feed(input_size=518, cluster_cpus=16, workers=1, gpus=1, cpus=1)
    assert (plan.decode_tasks, plan.decode_cpus) == (14, 1.0)
    plan = plan_feed(input_size=518, cluster_cpus=64, workers=8, gpus=1, cpus=2)
    assert (plan.decode_tasks, plan.decode_cpus) == (47, 1.0)
    assert not plan.in_workers
    plan = plan_feed(input_size=518, cluster_cpus=2, workers=1, gpus=0, cpus=1.8, decode_tasks=2)
    assert plan.decode_tasks == 2 and 0 < plan.decode_cpus * 2 <= 2 - 1.8 and not plan.in_workers
    plan = plan_feed(input_size=224, cluster_cpus=16, workers=1, gpus=1, cpus=1, decode_tasks=3, decode_cpus=2)
    assert (plan.decode_tasks, plan.decode_cpus) == (3, 2.0)
    plan = plan_feed(input_size=518, cluster_cpus=16, workers=1, gpus=0, cpus=4)  # a CPU node with cores to spare
    assert (plan.decode_tasks, plan.threads) == (2, 0) and plan.decode_cpus == 1.0


def test_workers_decode_in_threads_when_too_few_cpus_are_free():
    plan = plan_feed(input_size=518, cluster_cpus=2, workers=1, gpus=0, cpus=1.8)  # this 2-core machine
    assert plan.in_workers and (plan.threads, plan.decode_tasks, plan.decode_cpus) == (2, 0, 0.0)
    plan = plan_feed(input_size=518, cluster_cpus=4, workers=2, gpus=0, cpus=1.8)
    assert plan.in_workers and plan.threads == 2
    plan = plan_feed(input_size=518, cluster_cpus=2, workers=1, gpus=1, cpus=1)  # a GPU on a 2-core node
    assert plan.in_workers and plan.threads == 1
    plan = plan_feed(input_size=518, cluster_cpus=16, workers=1, gpus=1, cpus=1, decode_threads=3)  # asked for
    assert plan.in_workers and plan.threads == 3 and plan.decode_tasks == 0


@pytest.mark.parametrize("bad, flag", [(dict(decode_tasks=0), "--decode-tasks"), (dict(decode_cpus=0), "--decode-cpus"),
                                       (dict(decode_threads=0), "--decode-threads"),
                                       (dict(decode_threads=2, decode_tasks=2), "--decode-threads .* --decode-tasks")])
def test_bad_decode_flags_are_refused_naming_the_flag(bad, flag):
    with pytest.raises(JobConfigError, match=flag):
        plan_feed(input_size=56, cluster_cpus=2, workers=1, gpus=0, cpus=1, **bad)


class PatchMeans(ImageBatchWorker):
    """Per 8x8 patch: its mean colour, twice; image 1's ``clean`` overflows float16 (so the writer fails it)."""

    stage = "means"

    def process(self, ids, images):
        assert images.dtype == torch.float32 and images.shape[1:] == (3, self.input_size, self.input_size)
        feats = torch.nn.functional.avg_pool2d(images, 8).permute(0, 2, 3, 1).repeat(1, 1, 1, 2)
        return [({"seconds": 0.0}, {"raw": feats[j], "clean": feats[j] * 1e6 if ids[j] == 1 else feats[j]})
                for j in range(len(ids))]


def _store(path, uris):
    layout = StoreLayout(backbone="means", block=0, input_size=32, patch_size=8, stride=8, grid=(4, 4), channels=6)
    return FeatureStore.create(path, layout, uris)


def test_decoded_pixels_and_bytes_give_the_same_store(tmp_path, sample_images):
    uris = [str(p) for p in sample_images] + [str(tmp_path / "missing.png")]
    (tmp_path / "junk.jpg").write_bytes(b"junk")
    uris.append(str(tmp_path / "junk.jpg"))
    rows = {"image_id": np.arange(len(uris)), "uri": np.array(uris)}
    stores = []
    feeds = (("bytes", fetch_bytes), ("pixels", lambda r: decode_batch(fetch_bytes(r), size=32, threads=3)),
             ("rows", lambda r: r))  # listing rows only: the worker fetches and decodes them, in threads
    for name, feed in feeds:
        store = _store(str(tmp_path / f"{name}.zarr"), uris)
        worker = ImageBatchWorker.__new__(PatchMeans)
        ImageBatchWorker.__init__(worker, store.url, store.layout.geometry(), input_size=32, decode_threads=2)
        out = worker(feed(rows))
        status = dict(zip(out["image_id"].tolist(), out["status"]))
        assert status[len(uris) - 1] == status[len(uris) - 2] == "failed"
        assert [status[i] for i in range(len(sample_images))] == ["ok"] * len(sample_images)
        stores.append(store.refresh())
    a = stores[0]
    assert a.ids().tolist() == [i for i in range(len(sample_images)) if i != 1]
    assert "non-finite values in 'clean'" in a.manifest().to_pylist()[1]["error"]
    for b in stores[1:]:
        assert b.ids().tolist() == a.ids().tolist()
        for name in ("raw", "clean"):
            np.testing.assert_array_equal(a.get(a.ids(), (name,), check=False)[name],
                                          b.get(b.ids(), (name,), check=False)[name])
        ma, mb = a.manifest().to_pylist(), b.manifest().to_pylist()
        assert len(ma) == len(mb) == len(uris)
        for ra, rb in zip(ma, mb):
            assert (ra["image_id"], ra["status"], ra["error"], ra["width"], ra["height"]) == \
                   (rb["image_id"], rb["status"], rb["error"], rb["width"], rb["height"])
    for path in ("bytes", "pixels", "rows"):
        assert not glob.glob(str(tmp_path / path) + ".zarr/**/*.partial", recursive=True)


def test_the_host_copy_rounds_as_numpy_and_overflows_to_inf():
    x = torch.cat([torch.randn(10_000) * 3, torch.tensor([7e4, -1e6, 65519.0, 65520.0, 1e-8, float("nan")])])
    ours = _host(x, torch.float16).numpy()
    theirs = x.numpy().astype(np.float16)
    assert np.array_equal(ours.view(np.uint16), theirs.view(np.uint16))
    assert np.isinf(ours[10_000]) and np.isinf(ours[10_001])


def test_results_reach_the_host_in_the_stores_dtype_once_per_tensor(tmp_path):
    store = _store(str(tmp_path / "dtype.zarr"), ["a.png"])
    worker = ImageBatchWorker.__new__(PatchMeans)
    ImageBatchWorker.__init__(worker, store.url, store.layout.geometry(), input_size=32)
    raw, other = torch.randn(2, 4, 4, 6), torch.randn(2, 4, 4, 6)
    a, b, c = worker.to_store(raw, raw, other)
    assert a is b and a is not c and a.dtype == c.dtype == torch.float16 and a.device.type == "cpu"
    assert torch.equal(a, _host(raw, torch.float16)) and torch.equal(c, _host(other, torch.float16))


class DecodedOnly(PatchMeans):
    """Refuses bytes: the job must hand it pixels decoded by the decode stage."""

    def _process_batch(self, batch):
        assert "bytes" not in batch and batch["pixels"].dtype == np.uint8, sorted(batch)
        return super()._process_batch(batch)


@pytest.mark.slow
def test_the_job_decodes_in_its_own_stage_and_commits_every_unit(ray_local, tmp_path, sample_images):
    from pipeline.runtime.feeding import plan_feed
    from pipeline.runtime.job_runner import open_job_store, run_image_job

    uris = [str(p) for p in sample_images] + [str(tmp_path / "missing.png")]
    store = _store(str(tmp_path / "job.zarr"), uris)
    store, covered, pending = open_job_store(store.url, store.layout, uris)
    feed = plan_feed(input_size=32, cluster_cpus=2, workers=1, gpus=0, cpus=0.5, decode_tasks=2)
    assert not feed.in_workers
    summary = run_image_job(job="feed", store=store, covered=covered, pending=pending, worker=DecodedOnly,
                            worker_kwargs={"output": store.url, "layout": store.layout.geometry(), "input_size": 32},
                            images_per_batch=2, workers=1, gpus=0, cpus=0.5, progress_every_s=600, feed=feed)
    # image 1 overflows float16 (failed by the writer, reported ok by the worker), the missing file fails
    assert (summary.todo, summary.store_ok, summary.store_failed) == (len(uris), len(uris) - 2, 2)
    reference = _store(str(tmp_path / "ref.zarr"), uris)
    worker = ImageBatchWorker.__new__(PatchMeans)
    ImageBatchWorker.__init__(worker, reference.url, reference.layout.geometry(), input_size=32)
    worker(fetch_bytes({"image_id": np.arange(len(uris)), "uri": np.array(uris)}))
    got, want = store.refresh(), reference.refresh()
    assert got.ids().tolist() == want.ids().tolist()
    for name in ("raw", "clean"):
        np.testing.assert_array_equal(got.get(got.ids(), (name,))[name], want.get(want.ids(), (name,))[name])


class ListingRowsOnly(PatchMeans):
    """Refuses bytes and pixels: the job must hand it listing rows, which it fetches and decodes itself."""

    def _process_batch(self, batch):
        assert "bytes" not in batch and "pixels" not in batch and "uri" in batch, sorted(batch)
        return super()._process_batch(batch)


@pytest.mark.slow
def test_workers_fetch_and_decode_their_units_where_cpus_are_scarce(ray_local, tmp_path, sample_images):
    from pipeline.runtime.job_runner import open_job_store, run_image_job

    uris = [str(p) for p in sample_images] + [str(tmp_path / "missing.png")]
    store = _store(str(tmp_path / "job.zarr"), uris)
    store, covered, pending = open_job_store(store.url, store.layout, uris)
    feed = plan_feed(input_size=32, cluster_cpus=2, workers=1, gpus=0, cpus=0.5)
    assert feed.in_workers
    summary = run_image_job(job="feed", store=store, covered=covered, pending=pending, worker=ListingRowsOnly,
                            worker_kwargs={"output": store.url, "layout": store.layout.geometry(), "input_size": 32,
                                           "decode_threads": feed.threads},
                            images_per_batch=2, workers=1, gpus=0, cpus=0.5, progress_every_s=600, feed=feed)
    assert (summary.todo, summary.store_ok, summary.store_failed) == (len(uris), len(uris) - 2, 2)
    reference = _store(str(tmp_path / "ref.zarr"), uris)
    worker = ImageBatchWorker.__new__(PatchMeans)
    ImageBatchWorker.__init__(worker, reference.url, reference.layout.geometry(), input_size=32)
    worker(decode_batch(fetch_bytes({"image_id": np.arange(len(uris)), "uri": np.array(uris)}), size=32))
    got, want = store.refresh(), reference.refresh()
    assert got.ids().tolist() == want.ids().tolist()
    for name in ("raw", "clean"):
        np.testing.assert_array_equal(got.get(got.ids(), (name,))[name], want.get(want.ids(), (name,))[name])


def test_worker_env_sets_threads_pages_and_allocator_unless_the_caller_says_otherwise(monkeypatch):
    from pipeline.runtime.job_runner import worker_env

    defaults = {"OMP_WAIT_POLICY": "PASSIVE", "THP_MEM_ALLOC_ENABLE": "1", "MALLOC_ARENA_MAX": "1",
                "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(16 << 30)}
    for name in defaults:
        monkeypatch.delenv(name, raising=False)
    assert worker_env() == defaults
    mine = {"THP_MEM_ALLOC_ENABLE": "0", "OMP_WAIT_POLICY": "ACTIVE", "MALLOC_ARENA_MAX": "8"}
    for name, value in mine.items():
        monkeypatch.setenv(name, value)
    assert worker_env() == {**defaults, **mine}


_FAULTS = """
import resource, torch
torch.empty(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    torch.empty(16, 1369, 768).fill_(1.0)  # a batch of ViT-B/14 features at 518 px: fresh memory each time
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_torch_honours_the_huge_page_setting_of_the_workers():
    """What ``THP_MEM_ALLOC_ENABLE=1`` buys the workers: a batch-sized buffer faults in 2 MiB pages, not 4 KiB ones
    (a torch upgrade that dropped the variable would show here)."""
    import subprocess
    import sys
    from pathlib import Path

    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.exists() or "[never]" in thp.read_text():
        pytest.skip("transparent huge pages are off in this kernel")
    faults = {}
    for value in ("0", "1"):
        env = {"THP_MEM_ALLOC_ENABLE": value, "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
        out = subprocess.run([sys.executable, "-c", _FAULTS], env=env, capture_output=True, text=True, check=True)
        faults[value] = int(out.stdout.split()[-1])
    assert faults["1"] * 4 < faults["0"], faults


_BATCHES = """
import resource, threading, torch
faults = []
def batches():  # in a thread of its own, as Ray runs an actor's calls: glibc gives it an arena of its own
    for _ in range(24):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        pixels = torch.empty(16, 3, 518, 518).fill_(0.5)  # a batch's float pixels at 518 px (52 MB)
        normalised = (pixels - 0.5).div_(0.25)
        del pixels
        features = normalised[:, 0, :37, :37, None].expand(16, 37, 37, 768).to(torch.float16)  # 34 MB
        del normalised, features
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
torch.empty(1)
thread = threading.Thread(target=batches)
thread.start()
thread.join()
print(sum(faults[-8:]))
"""


def test_worker_allocator_settings_reuse_a_batch_buffer_instead_of_faulting_it_in_again():
    """What the workers' ``MALLOC_*`` settings buy: once the heap has grown to a batch's buffers (a few batches), a
    batch faults in (almost) nothing, where glibc's defaults fault every buffer in again (a C library that stopped
    honouring the variables would show here)."""
    import subprocess
    import sys

    from pipeline.runtime.job_runner import WORKER_ENV

    faults = {}
    for label, extra in (("glibc defaults", {}),
                         ("worker settings", {k: v for k, v in WORKER_ENV.items() if k.startswith("MALLOC_")})):
        env = {"THP_MEM_ALLOC_ENABLE": "0", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", **extra}
        out = subprocess.run([sys.executable, "-c", _BATCHES], env=env, capture_output=True, text=True, check=True)
        faults[label] = int(out.stdout.split()[-1])
    pages = 16 * 3 * 518 * 518 * 4 // 4096  # one float pixel buffer in 4 KiB pages; the last 8 batches fault
    assert faults["glibc defaults"] > 8 * pages, faults  # ~2.7 buffers' worth each
    assert faults["worker settings"] < pages // 10, faults
