"""One plan per image job: every check once, in one order, before Ray starts or anything is written; the same
order and the same refusals for ``dvt denoise`` and ``dvt apply``."""

from __future__ import annotations

import dataclasses
import logging

import pytest

import pipeline.denoise.job as denoise_job
from jobs.cli import main
from pipeline.denoise.job import DenoiseConfig, Stage1Worker, plan_denoise
from pipeline.runtime.failures import EXIT_REFUSED
from pipeline.runtime.plan import ImageJobPlan, open_plan_store, run_plan
from pipeline.stage1 import Stage1Config
from pipeline.stage2.apply import ApplyConfig, ApplyWorker, plan_apply
from pipeline.vit.backbone import BackboneConfig

from ..custom_backbone import write_custom_denoiser

TINY = dict(model="vit_small_patch14_dinov2", weights="none", input_size=56, preset="ci", views=4,
            images_per_batch=1, workers=1)


def _count_calls(monkeypatch, module, name: str) -> list[int]:
    calls = [0]
    real = getattr(module, name)

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_the_denoise_plan_checks_each_thing_once_and_carries_what_it_built(tmp_path, sample_images, monkeypatch):
    counts = {name: _count_calls(monkeypatch, denoise_job, name)
              for name in ("describe_backbone", "check_weights", "check_store", "list_inputs", "check_method")}
    config = DenoiseConfig(images=str(sample_images[0].parent), output=str(tmp_path / "s.zarr"), limit=2, **TINY)
    plan = plan_denoise(config)
    assert {name: c[0] for name, c in counts.items()} == dict.fromkeys(counts, 1)
    assert isinstance(plan, ImageJobPlan) and plan.has_work and plan.worker is Stage1Worker and not plan.existed
    assert len(plan.uris) == 2 and plan.layout.grid == (4, 4)
    assert isinstance(plan.settings["backbone"], BackboneConfig) and isinstance(plan.settings["stage1"], Stage1Config)
    assert plan.settings["stage1"] == config.stage1_config()
    with pytest.raises(dataclasses.FrozenInstanceError):  # a plan is decided once
        plan.existed = True  # type: ignore[misc]
    assert not (tmp_path / "s.zarr").exists()  # planning writes nothing
    store, covered, pending = open_plan_store(plan)
    assert covered == 2 and pending.num_rows == 2 and store.layout.geometry() == plan.layout.geometry()
    assert plan_denoise(config).existed  # a second plan sees the store


def test_the_worker_uses_the_settings_the_plan_built(tmp_path, sample_images):
    config = DenoiseConfig(images=str(sample_images[0].parent), output=str(tmp_path / "s.zarr"), limit=1, **TINY)
    plan = plan_denoise(config)
    store, _, _ = open_plan_store(plan)
    sentinel = plan.settings["stage1"].replace(steps=3)
    worker = Stage1Worker(config, store.layout.geometry(), {**plan.settings, "stage1": sentinel})
    assert worker.stage1 is sentinel and worker.backbone.embed_dim == 384


def test_limit_0_plans_nothing_and_touches_nothing_in_both_jobs(tmp_path):
    denoise = plan_denoise(DenoiseConfig(images=str(tmp_path / "none"), output=str(tmp_path / "d.zarr"), limit=0,
                                         **TINY))
    apply = plan_apply(ApplyConfig(images=str(tmp_path / "none"), output=str(tmp_path / "a.zarr"),
                                   denoiser=str(tmp_path / "missing.safetensors"), limit=0))
    for plan, job in ((denoise, "denoise"), (apply, "apply")):
        assert not plan.has_work and plan.job == job
        summary = run_plan(plan)  # no Ray, no store
        assert (summary.todo, summary.ok, summary.job) == (0, 0, job)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("job", ["denoise", "apply"])
def test_bad_flags_are_refused_before_limit_0_in_both_jobs(tmp_path, caplog, job):
    """The same flags, the same refusal: ``--limit 0`` does not hide ``--workers 0`` in either job."""
    _, denoiser = write_custom_denoiser(str(tmp_path))
    extra = ["--denoiser", denoiser] if job == "apply" else []
    with caplog.at_level(logging.ERROR, logger="dvt"):
        code = main([job, "--images", str(tmp_path), "--output", str(tmp_path / "o.zarr"), "--weights", "none",
                     "--limit", "0", "--workers", "0", *extra])
    assert code == EXIT_REFUSED
    assert any("--workers must be at least 1, got 0" in r.getMessage() for r in caplog.records)


def test_the_apply_plan_resolves_the_input_size_from_the_denoiser(tmp_path, sample_images, one_torch_thread):
    weights, path = write_custom_denoiser(str(tmp_path))
    plan = plan_apply(ApplyConfig(images=str(sample_images[0].parent), output=str(tmp_path / "a.zarr"),
                                  denoiser=path, weights=weights, limit=2))
    assert plan.worker is ApplyWorker and plan.config.input_size == 32 and len(plan.uris) == 2
    denoiser = plan_denoise(DenoiseConfig(images=str(sample_images[0].parent), output=str(tmp_path / "a.zarr"),
                                          method="denoiser", denoiser=path, weights=weights, limit=2))
    assert denoiser.job == "apply" and denoiser.layout == plan.layout and denoiser.worker is ApplyWorker
