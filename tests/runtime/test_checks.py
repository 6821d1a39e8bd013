"""Everything checked up front: a wrong flag is one line before Ray starts or anything is written."""

from __future__ import annotations

import logging

import pytest

from jobs.cli import main
from pipeline.denoise.job import DenoiseConfig, prepare_store
from pipeline.runtime.failures import EXIT_REFUSED


TINY = dict(model="vit_small_patch14_dinov2", weights="none", input_size=56, preset="ci", views=4, steps=10,
            images_per_batch=1, workers=1, cpus_per_worker=0.5, progress_every_s=1.0)
FLAGS = ["--model", "vit_small_patch14_dinov2", "--input-size", "56", "--preset", "ci", "--views", "4", "--steps",
         "10", "--images-per-batch", "1", "--cpus-per-worker", "0.5"]


@pytest.mark.parametrize("flags,message", [
    (["--input-size", "100"], "--input-size 100: vit_small_patch14_dinov2: Input height 100 does not fit patch 14"),
    (["--views", "0"], "--views must be at least 1"),
    (["--workers", "0"], "--workers must be at least 1, got 0"),
    (["--images-per-batch", "0"], "--images-per-batch must be at least 1, got 0"),
    (["--weights", "MISSING"], "Weights file .*no.safetensors does not exist"),
    (["--weights", "GARBAGE"], "Could not read weights file .*garbage.safetensors"),
    (["--weights", "hub", "--model", "vit_small_patch14_dinov2.lvd142m"],
     "not in the local Hugging Face cache and HF_HUB_OFFLINE=1 is set"),
    (["--images", "/no/such/folder"], "Image source /no/such/folder does not exist"),
])
def test_bad_flags_fail_in_one_line_before_anything_is_written(tmp_path, caplog, flags, message):
    (tmp_path / "garbage.safetensors").write_bytes(b"not weights" * 10)
    flags = [{"MISSING": str(tmp_path / "no.safetensors"), "GARBAGE": str(tmp_path / "garbage.safetensors")}.get(f, f)
             for f in flags]
    out = tmp_path / "out.zarr"
    weights = [] if "--weights" in flags else ["--weights", "none"]
    with caplog.at_level(logging.ERROR, logger="dvt"):
        assert main(["denoise", "--output", str(out), *FLAGS, *weights, *flags]) == EXIT_REFUSED
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0].getMessage(), errors
    import re

    assert re.search(message, errors[0].getMessage()), errors[0].getMessage()
    assert not out.exists(), "a refused run left a store behind"


def test_limit_0_says_there_is_nothing_to_do(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        assert main(["denoise", "--output", str(tmp_path / "out.zarr"), *FLAGS, "--weights", "none",
                     "--limit", "0"]) == 0
    assert "--limit 0 selects no images: nothing to do" in caplog.text and not (tmp_path / "out.zarr").exists()


def test_a_typo_in_weights_on_a_finished_store_changes_nothing(tmp_path, sample_images):
    url = str(tmp_path / "s.zarr")
    store, _, _ = prepare_store(DenoiseConfig(images=str(sample_images[0].parent), output=url, limit=1, **TINY))
    store.update_attrs(last_run={"ok": 1})
    before = (tmp_path / "s.zarr" / "zarr.json").read_bytes()
    assert main(["denoise", "--images", str(sample_images[0].parent), "--output", url, *FLAGS, "--limit", "1",
                 "--weights", str(tmp_path / "wieghts.safetensors")]) == EXIT_REFUSED
    assert (tmp_path / "s.zarr" / "zarr.json").read_bytes() == before
