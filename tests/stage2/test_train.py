"""Denoiser training: loss, schedule, split and store checks, and a real 2-worker Ray Train run that loses a
worker, resumes from its checkpoint, exports a denoiser file to S3 and resumes again when re-run."""

import functools
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import torch.nn.functional as F

from pipeline.stage2.denoiser import Denoiser, DenoiserConfig, load_denoiser
from pipeline.runtime.fault_injection import planned_fault
from pipeline.store import FeatureStore, StoreError, StoreLayout, StoreMismatchError
from pipeline.testing.synthetic_pairs import synthetic_pairs, write_synthetic_store
from pipeline.stage2.train import TrainConfig, denoising_loss, lr_lambda, open_stores, run_training, split_ids
from pipeline.stage2.train import MAX_STEPS, MIN_STEPS, PASSES, step_budget
from pipeline.io.storage import filesystem
from pipeline.runtime.ray_train import RUN_NAME
from pipeline.runtime.ray_train import denoising_loss as loss_fn


def die_once(marker: str, at_step: int, at_rank: int, *, step: int, rank: int, output: str | None = None) -> None:
    """An ``after_checkpoint`` fault: the first time ``at_rank`` reports ``at_step``, its process dies. With
    ``output``, it first waits (up to a minute) until Ray Train's controller has registered a checkpoint of the
    run, so the death tests a resume and not a fresh start on a machine too busy for the controller to poll."""
    if step == at_step and rank == at_rank and not os.path.exists(marker):
        waited = time.monotonic()
        if output is not None:
            fs, root = filesystem(f"{output}/{RUN_NAME}/checkpoint_manager_snapshot.json")
            while time.monotonic() < waited + 60:
                try:
                    if json.loads(fs.cat_file(root)).get("latest_checkpoint_result"):
                        break
                except (FileNotFoundError, ValueError):  # not written yet, or caught mid-write
                    pass
                time.sleep(0.2)
        Path(marker).write_text(f"{time.monotonic() - waited:.1f}")  # seconds waited for the controller
        os._exit(1)


def test_loss_is_mse_plus_one_minus_cosine():
    x = torch.randn(2, 3, 3, 8)
    loss, parts = denoising_loss(x, x)
    assert loss.item() == pytest.approx(0, abs=1e-6)
    loss, parts = denoising_loss(-x, x)
    assert parts["cos"].item() == pytest.approx(-1, abs=1e-5)
    assert loss.item() == pytest.approx((4 * x ** 2).mean().item() + 2, rel=1e-5)


def test_peak_lr_follows_the_global_batch_only():
    config = TrainConfig(stores=["x"], output="y", batch_size=64, workers=4, base_lr=2e-4)
    assert config.peak_lr() == pytest.approx(2e-4 * (64 / 256) ** 0.5)
    # the batch is global: more workers split it, the rate stays
    assert TrainConfig(**{**config.__dict__, "workers": 1}).peak_lr() == config.peak_lr()


def test_step_budget_grows_with_the_data_between_bounds():
    assert step_budget(48, 32) == MIN_STEPS
    assert step_budget(20_000, 32) == round(PASSES * 20_000 / 32)
    assert step_budget(10**8, 32) == MAX_STEPS
    config = TrainConfig(stores=["x"], output="y", batch_size=32)
    assert config.total_steps(1000) == step_budget(1000, 32)
    assert TrainConfig(**{**config.__dict__, "epochs": 2.0}).total_steps(1000) == round(2 * 1000 / 32)
    assert TrainConfig(**{**config.__dict__, "max_steps": 7, "epochs": 2.0}).total_steps(1000) == 7


def test_synthetic_pairs_have_a_positional_artifact():
    raw, clean = synthetic_pairs(3, (4, 5), 16, seed=1)
    artifact = raw - clean
    np.testing.assert_allclose(artifact[0], artifact[2], atol=1e-5)  # same at each position in every image
    assert not np.allclose(clean[0], clean[1])


def test_synthetic_pairs_carry_each_images_mean_and_a_zero_mean_artifact():
    raw, clean = synthetic_pairs(6, (4, 5), 16, seed=2)
    np.testing.assert_allclose((raw - clean).mean((1, 2)), 0, atol=1e-5)  # stage 1's gauge
    assert np.linalg.norm(clean.mean((1, 2)), axis=-1).min() > 1.0  # each image's own mean vector


@pytest.mark.slow
def test_the_denoiser_keeps_each_images_mean_on_held_out_images(tmp_path):
    # the model and loss of the Ray Train loop, trained in-process on a synthetic store: stage-1 stores carry each
    # image's mean in `clean`, and the denoiser's output on images it never saw must keep it
    store = write_synthetic_store(str(tmp_path / "pairs.zarr"), 240, channels=64, grid=(4, 4), dtype="float32")
    data = store.get(np.arange(240), as_torch=True)
    raw, clean = data["raw"].float(), data["clean"].float()
    train, val = slice(0, 200), slice(200, 240)
    torch.manual_seed(0)
    model = Denoiser(DenoiserConfig(channels=64, pos_grid=(4, 4)))
    steps = 300
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps, steps // 10))
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(200, (4,), generator=g)
        loss, _ = loss_fn(model(raw[train][idx]), clean[train][idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        pred = model(raw[val])
    truth = clean[val]
    assert F.cosine_similarity(raw[val], truth, dim=-1).mean() < 0.9  # the artifact is there to remove
    assert F.cosine_similarity(pred, truth, dim=-1).mean() >= 0.98
    ratio = pred.mean((1, 2)).norm(dim=-1) / truth.mean((1, 2)).norm(dim=-1)
    assert ((ratio > 0.9) & (ratio < 1.1)).all(), ratio


def test_split_is_by_file_name_stable_and_disjoint(tmp_path):
    store = write_synthetic_store(str(tmp_path / "a.zarr"), 40, channels=16)
    train, val = split_ids(store, 0.25)
    assert len(val) and len(train) and not set(train) & set(val) and len(train) + len(val) == 40
    again_train, again_val = split_ids(FeatureStore.open(str(tmp_path / "a.zarr")), 0.25)
    assert list(val) == list(again_val)
    _, one = split_ids(write_synthetic_store(str(tmp_path / "b.zarr"), 2, channels=16), 0.01)
    assert len(one) == 1  # a tiny store still holds one image out


def test_stores_of_another_backbone_or_empty_are_refused(tmp_path):
    a = str(tmp_path / "a.zarr")
    write_synthetic_store(a, 8, channels=16)
    other = str(tmp_path / "other.zarr")
    write_synthetic_store(other, 8, channels=32, backbone="another_vit")
    with pytest.raises(StoreMismatchError, match="another_vit"):
        open_stores(TrainConfig(stores=[a, other], output=str(tmp_path / "out")))
    with pytest.raises(StoreError, match="holds features of backbone 'synthetic', not 'vit_base"):
        open_stores(TrainConfig(stores=[a], output=str(tmp_path / "out"), expect_backbone="vit_base_patch14_dinov2"))
    empty = str(tmp_path / "empty.zarr")
    layout = FeatureStore.open(a).layout
    FeatureStore.create(empty, StoreLayout(**{**layout.to_attrs(), "method": {}}), ["x.png", "y.png"])
    with pytest.raises(StoreError, match="no finished images"):
        open_stores(TrainConfig(stores=[a, empty], output=str(tmp_path / "out")))
    with pytest.raises(ValueError, match="cannot give each of 16 workers one"):
        run_training(TrainConfig(stores=[a], output=str(tmp_path / "out"), batch_size=16, workers=16))
    with pytest.raises(ValueError, match="multiple of --workers"):
        run_training(TrainConfig(stores=[a], output=str(tmp_path / "out"), batch_size=6, workers=4))


@pytest.mark.slow
def test_two_workers_learn_survive_a_killed_worker_and_resume_on_rerun(ray_local, tmp_path, s3_bucket, monkeypatch):
    monkeypatch.setattr(ray_local.data.DataContext.get_current(), "enable_progress_bars", False)
    store = write_synthetic_store(str(tmp_path / "pairs.zarr"), 40, channels=64, grid=(4, 4))
    output = f"{s3_bucket}/denoisers/synthetic"
    marker = str(tmp_path / "worker-died")
    config = TrainConfig(stores=[store.url], output=output, max_steps=16, eval_every=4, patience=0, batch_size=8,
                         workers=2, cpus_per_worker=0.5, lr=3e-3, warmup_fraction=0.25, val_fraction=0.2, max_failures=2)
    with planned_fault("after_checkpoint", functools.partial(die_once, marker, 8, 1, output=output)):
        summary = run_training(config)
    assert os.path.exists(marker), "no worker died: the resume was not tested"
    assert float(Path(marker).read_text()) < 60, "Ray Train registered no checkpoint within a minute"
    # Ray Train restores the latest checkpoint its controller registered: step 8's, or step 4's if the worker
    # died before the controller polled the step-8 report. Either way the steps continue from there.
    assert summary.resumed_from in ([4], [8]), f"the run did not resume from a checkpoint: {summary.resumed_from}"
    assert [h["step"] for h in summary.history] == [4, 8, 12, 16] and summary.steps == 16
    val = [h["val_loss"] for h in summary.history]
    assert val[-1] < 0.6 * val[0], f"validation loss did not fall: {val}"
    assert summary.num_val >= 1 and summary.num_train + summary.num_val == 40
    # the exported file (on S3) holds the best held-out weights, and says so
    denoiser, spec = load_denoiser(summary.denoiser)
    stopping = spec.training["stopping"]
    assert spec.backbone == "synthetic" and spec.training["num_train"] == summary.num_train
    assert len(spec.training["history"]) == 4 and spec.training["batch_size"] == 8 and spec.training["workers"] == 2
    assert (stopping["reason"], stopping["budget_steps"], stopping["exported_step"]) == ("budget", 16, stopping["best_step"])
    assert stopping["best_val_loss"] == pytest.approx(min(val))
    _, val_ids = split_ids(store, 0.2)
    pairs = store.get(val_ids, as_torch=True)
    with torch.no_grad():
        pred = denoiser(pairs["raw"].float())
    mse = ((pred - pairs["clean"].float()) ** 2).flatten(1).mean(1).mean().item()
    assert mse == pytest.approx(stopping["val_mse"], rel=1e-4)
    # re-running with a larger budget continues from the latest checkpoint, here on one worker: the same global
    # batch, so the same learning rate and steps
    more = run_training(TrainConfig(**{**config.__dict__, "max_steps": 20, "workers": 1, "cpus_per_worker": 1.0}))
    assert more.resumed_from == [*summary.resumed_from, 16] and [h["step"] for h in more.history] == [4, 8, 12, 16, 20]
    assert load_denoiser(more.denoiser)[1].training["lr"] == spec.training["lr"]
