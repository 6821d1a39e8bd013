"""The whole method on a ViT with a real positional artifact, job by job (a small `benchmarks/chain.py`): each of
stage 1, stage 2 on held-out images and the distilled student must remove most of the artifact while keeping
the features."""

import pytest

from pipeline.analysis.chain import ChainConfig, run_chain


@pytest.mark.slow
def test_every_stage_removes_the_artifact(ray_local, tmp_path, monkeypatch):
    monkeypatch.setattr(ray_local.data.DataContext.get_current(), "enable_progress_bars", False)
    config = ChainConfig(
        workdir=str(tmp_path), model="pipeline.testing.artifact_vit:create_small",
        reference="pipeline.testing.artifact_vit:create_small_reference", input_size=128, train_crops=24,
        held_out_crops=8, preset="ci", consistency_images=0,
        train={"batch_size": 8, "max_steps": 150, "eval_every": 50, "lr": 1e-3, "cpus_per_worker": 1.0},
        apply={"cpus_per_worker": 1.0, "images_per_batch": 8},
        distill={"batch_size": 8, "max_steps": 24, "checkpoint_every": 24, "lr": 3e-4, "cpus_per_worker": 1.0})
    result = run_chain(config)
    rows = result.rows
    raw_train, raw_held = rows["raw (training)"]["positional_energy"], rows["raw (held out)"]["positional_energy"]
    assert raw_train > 0.3 and raw_held > 0.3, "the test ViT lost its artifact"
    pe = {stage: rows[stage]["positional_energy"] for stage in ("stage-1", "stage-2", "student")}
    raw = {"stage-1": "raw (training)", "stage-2": "raw (held out)", "student": "raw (held out)"}
    for stage in pe:
        assert pe[stage] < 0.35 * rows[raw[stage]]["positional_energy"], f"{stage} no longer removes the artifact: {rows}"
        assert rows[stage]["cos_to_raw"] > 0.7, f"{stage} replaces the features instead of cleaning them: {rows}"
        # closer to the same ViT without the artifact than the raw features are
        assert rows[stage]["cos_to_reference"] > rows[raw[stage]]["cos_to_reference"] + 0.05, rows
    assert result.summaries["train"]["stopping"]["steps"] <= 150
