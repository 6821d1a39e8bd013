"""Ray Train plumbing shared by stages 2 and 3 (:mod:`pipeline.runtime.ray_train`): schedules, batches, early
stopping, the held-out split, run-folder records and checkpoints, without starting Ray."""

from __future__ import annotations

import os

import pytest
import torch

from pipeline.runtime.ray_train import (STATE_FILE, Plateau, all_reduce, lr_lambda, per_worker_batch, previous_record,
                                        ray_storage, read_state, refuse_changes, scaled_lr, uri_fraction, write_record)


def test_warmup_then_cosine_to_zero():
    f = lr_lambda(total_steps=100, warmup_steps=15)
    assert f(0) == pytest.approx(1 / 15) and f(14) == pytest.approx(1.0)
    values = [f(s) for s in range(15, 101)]
    assert all(a >= b for a, b in zip(values, values[1:])) and values[-1] == pytest.approx(0, abs=1e-9)
    assert scaled_lr(2e-4, 64) == pytest.approx(2e-4 * 0.5) and scaled_lr(1e-3, 256) == pytest.approx(1e-3)


def test_plateau_stops_after_patience_checks_without_a_real_improvement():
    p = Plateau(patience=2, min_delta=0.01)
    assert p.update(1.0, 10) and not p.stop
    assert p.update(0.995, 20) and p.bad == 1  # a new best (its weights are kept) but not by 1%: no progress
    assert not p.update(1.2, 30) and p.stop and (p.best, p.best_step) == (0.995, 20)
    assert Plateau(**{**p.to_dict(), "patience": 0}).stop is False  # patience 0 trains to the budget
    assert not Plateau(patience=1).update(float("nan"), 5)  # a non-finite loss is never the best


def test_the_global_batch_splits_evenly_or_is_refused_naming_the_flag():
    assert per_worker_batch(16, 4) == 4 and per_worker_batch(16, 1) == 16
    with pytest.raises(ValueError, match=r"--batch-size 10 is the global batch: .* multiple of --workers \(4\); pass e.g. --batch-size 8"):
        per_worker_batch(10, 4)
    with pytest.raises(ValueError, match="--workers"):
        per_worker_batch(2, 4)


def test_the_held_out_split_follows_the_file_name_wherever_it_lives():
    a = uri_fraction("/data/train/img_0001.jpg")
    assert a == uri_fraction("s3://bucket/copy/img_0001.jpg") == uri_fraction("img_0001.jpg")
    assert 0 <= a < 1 and a != uri_fraction("/data/train/img_0002.jpg")
    fractions = [uri_fraction(f"{i}.jpg") for i in range(2000)]
    assert 0.45 < sum(f < 0.5 for f in fractions) / 2000 < 0.55  # spread evenly


def test_run_folder_record_is_written_compared_and_deleted_on_overwrite(tmp_path):
    out = str(tmp_path / "run")
    assert previous_record(out, "config.json", overwrite=False) is None
    write_record(out, "config.json", {"lr": 1e-3, "batch": 16})
    old = previous_record(out, "config.json", overwrite=False)
    assert old == {"lr": 1e-3, "batch": 16}
    refuse_changes(out, "a denoiser run", old, {"lr": 1e-3, "batch": 16, "steps": 5}, ("lr", "batch"))
    with pytest.raises(ValueError, match=r"other settings \(batch: run has 16, now 32\): pass --overwrite"):
        refuse_changes(out, "a denoiser run", old, {"lr": 1e-3, "batch": 32}, ("lr", "batch"))
    assert previous_record(out, "config.json", overwrite=True) is None and not os.path.exists(out)


def test_ray_storage_keeps_local_paths_and_wraps_object_storage(tmp_path, s3_bucket):
    path, fs = ray_storage(str(tmp_path / "run"))
    assert path == str(tmp_path / "run") and fs is None
    path, fs = ray_storage(f"{s3_bucket}/runs/a")
    assert not path.startswith("s3://") and path.endswith("/runs/a") and fs is not None
    fs.create_dir(path)
    with fs.open_output_stream(f"{path}/probe.txt") as f:
        f.write(b"ok")
    with fs.open_input_stream(f"{path}/probe.txt") as f:
        assert f.read() == b"ok"


def test_a_checkpoint_folder_reads_back_its_state(tmp_path):
    state = {"step": 7, "weights": torch.arange(4.0)}
    torch.save(state, tmp_path / STATE_FILE)
    got = read_state(str(tmp_path))
    assert got["step"] == 7 and torch.equal(got["weights"], state["weights"])


def test_all_reduce_is_the_identity_on_one_process():
    assert all_reduce({"loss": 2.5, "n": 3.0}) == {"loss": 2.5, "n": 3.0}
    assert all_reduce([1.0, 2.0], op="max") == [1.0, 2.0]
