"""Stage 3: student selection, held-out split, decoding, export to timm, and a 2-worker Ray Train run with resume."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.vit.backbone import create_backbone
from pipeline.stage2.denoiser import Denoiser, DenoiserConfig, DenoiserSpec, save_denoiser
from pipeline.stage3.pixels import decode_batch, flip_batch, split_listing
from pipeline.stage3.student import (build_student_and_teacher, distance_from_sums, distance_sums, export_student,
                                    load_student, parse_train_blocks, read_note, select_trainable)

MODEL, SIZE = "test_vit", 64  # timm's 6-block, 64-channel test ViT (with a classifier head): a 4 x 4 grid


@pytest.fixture()
def denoiser_file(tmp_path) -> str:
    """A fixed, randomly initialised denoiser for ``test_vit`` (block 5), saved with stage 2's own writer."""
    torch.manual_seed(0)
    config = DenoiserConfig(channels=64, pos_grid=(4, 4))
    spec = DenoiserSpec(denoiser=config, backbone=MODEL, block=5, input_size=(SIZE, SIZE), patch_size=16, stride=16)
    return save_denoiser(str(tmp_path / "denoiser.safetensors"), Denoiser(config), spec)


def _png(seed: int, size: tuple[int, int] = (48, 40)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_parse_train_blocks():
    assert parse_train_blocks("all", 12, 11) == list(range(12))
    assert parse_train_blocks("all", 12, 7) == list(range(8))  # blocks after the distilled one change nothing
    assert parse_train_blocks("last:2", 12, 11) == [10, 11]
    assert parse_train_blocks("last:20", 12, 3) == [0, 1, 2, 3]
    assert parse_train_blocks("0, 3,-1", 12, 11) == [0, 3, 11]
    for bad in ("last:0", "last:x", "a,b", "12", "9"):
        with pytest.raises(ValueError, match="train-blocks"):
            parse_train_blocks(bad, 12, 8)


def test_select_trainable_keeps_only_what_reaches_the_features():
    student = create_backbone(MODEL, weights="none", img_size=SIZE)
    names = select_trainable(student, "last:1")
    assert {n.split(".")[0] for n in names} == {"blocks", "norm"}
    assert all(n.startswith(("blocks.5.", "norm.")) for n in names)
    everything = select_trainable(student, "all")
    assert "pos_embed" in everything and "cls_token" in everything and "patch_embed.proj.weight" in everything
    assert all(p.grad is None for p in student.model.parameters())
    middle = create_backbone(MODEL, weights="none", img_size=SIZE, block=2)
    assert not any(n.startswith(("blocks.3.", "blocks.4.", "blocks.5.")) for n in select_trainable(middle, "all"))


def test_split_listing_is_a_rule_on_file_names():
    uris = [f"s3://bucket/img/{i:05d}.jpg" for i in range(2000)]
    train, held = split_listing(uris, 0.05, 16)
    assert len(held) == 16 and len(train) == 2000 - 16 and not set(train) & set(held)
    again_train, again_held = split_listing(list(reversed(uris)), 0.05, 16)  # order does not matter
    assert sorted(uris[i] for i in held) == sorted(uris[::-1][i] for i in again_held)
    assert len(split_listing(uris[:3], 0.0, 16)[1]) == 0
    assert len(split_listing(uris[:2], 0.01, 16)[1]) == 1  # at least one when asked for
    # the same images elsewhere (a local copy, another working directory) keep their side of the split
    moved = [u.replace("s3://bucket/img", "/tmp/somewhere/else") for u in uris]
    assert list(split_listing(moved, 0.05, 16)[1]) == list(held)


def test_decode_batch_flags_what_cannot_be_used(caplog):
    batch = {"uri": np.array(["a.png", "b.png", "c.png"], dtype=object),
             "bytes": np.array([_png(0), b"not an image", b""], dtype=object),
             "error": np.array(["", "", "cannot read c.png: FileNotFoundError"], dtype=object)}
    out = decode_batch(batch, 32)
    assert out["pixels"].shape == (3, 3, 32, 32) and out["pixels"].dtype == np.uint8
    assert out["ok"].tolist() == [True, False, False]
    assert out["pixels"][0].any() and not out["pixels"][1:].any()
    assert "b.png" in caplog.text and "c.png" in caplog.text


def test_flip_batch_is_seeded():
    x = torch.arange(16 * 3 * 2 * 2, dtype=torch.float32).view(16, 3, 2, 2)
    a, b = flip_batch(x, 7), flip_batch(x, 7)
    assert torch.equal(a, b)
    flipped = (a != x).flatten(1).any(1)
    assert 0 < int(flipped.sum()) < 16
    assert torch.equal(a[flipped], x[flipped].flip(-1))


def test_export_loads_in_timm_and_reproduces_the_student(denoiser_file, tmp_path):
    import timm

    torch.manual_seed(0)
    student, teacher, spec = build_student_and_teacher(denoiser_file, "none")
    select_trainable(student, "all")
    with torch.no_grad():  # stand-in for training: move every trainable weight
        for p in student.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    pixels = torch.rand(2, 3, SIZE, SIZE)
    d = distance_from_sums(distance_sums(student, teacher, [pixels]))
    assert d["images"] == 2 and d["distance"] == pytest.approx(d["mse"] + 1 - d["cos"])
    path = export_student(student, str(tmp_path / "student.safetensors"), {"teacher": denoiser_file, "steps": 1})
    note = read_note(path)
    assert note["model"] == MODEL and note["teacher"] == denoiser_file and note["img_size"] == SIZE
    assert note["extra_keys_from_original"] == ["head.bias", "head.weight"]
    assert (tmp_path / "student.json").is_file() and "timm.create_model" in (tmp_path / "student.md").read_text()
    # exactly the call users make: timm's own loader, default arguments, strict
    plain = timm.create_model(MODEL, pretrained=True, pretrained_cfg_overlay=dict(file=path))
    assert plain.head.out_features == 1000
    loaded = load_student(path)
    with torch.no_grad():
        assert torch.allclose(loaded.features(pixels), student.features(pixels), atol=1e-6)
        assert not torch.allclose(loaded.features(pixels), teacher.backbone.features(pixels), atol=1e-3)


@pytest.mark.slow
def test_distill_two_workers_falls_resumes_and_exports(ray_local, s3_bucket, denoiser_file, tmp_path):
    import timm

    from pipeline.stage3.distill import STATE_FILE, DistillConfig, run_distillation
    from pipeline.io.listing import iter_uris
    from pipeline.io.storage import filesystem

    images = tmp_path / "images"
    images.mkdir()
    for i in range(14):
        (images / f"{i:02d}.png").write_bytes(_png(i, (40 + i, 48)))
    (images / "broken.png").write_bytes(b"not an image")
    output = f"{s3_bucket}/distill"
    config = DistillConfig(images=str(images), denoiser=denoiser_file, output=output, weights="none", epochs=1,
                           batch_size=4, lr=1e-3, workers=2, cpus_per_worker=0.5, val_fraction=0.2, max_val_images=3)
    first = run_distillation(config)
    assert first.steps == 3 and first.resumed_from == [] and first.num_val == 3 and first.num_train == 12
    assert first.after["distance"] < first.before["distance"]  # closer to the teacher after 3 steps

    second = run_distillation(dataclasses.replace(config, epochs=2))  # same run folder: continues
    assert second.resumed_from == [3] and [h["step"] for h in second.history] == [3, 6]
    assert second.before == first.before
    assert second.after["distance"] < first.before["distance"]
    uris = list(iter_uris(str(images)))
    train, _ = split_listing(uris, 0.2, 3)
    broken_in_train = any(uris[i].endswith("broken.png") for i in train)
    # Counted each time a step meets it: about once a pass (whether a third pass has begun within the 6 steps
    # depends on the split's sizes, not on timing).
    if broken_in_train:
        assert 1 <= second.skipped_images <= 3
    else:
        assert second.skipped_images == 0

    fs, _ = filesystem(output)
    local = tmp_path / "student.safetensors"
    fs.get_file(second.student.removeprefix("s3://"), str(local))
    timm.create_model(MODEL, pretrained=True, pretrained_cfg_overlay=dict(file=str(local)))
    with fs.open(f"{second.checkpoint.removeprefix('s3://')}/{STATE_FILE}", "rb") as f:
        state = torch.load(f, map_location="cpu", weights_only=True)
    assert int(state["step"]) == 6
    student = create_backbone(MODEL, weights="none", img_size=SIZE, block=5)
    student.model.load_state_dict(state["model"])
    pixels = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.allclose(load_student(second.student).features(pixels), student.features(pixels), atol=1e-6)
    assert read_note(second.student)["steps"] == 6


def test_a_custom_backbone_distils_exports_and_loads_through_its_factory(tmp_path):
    custom = "tests.custom_backbone:create"
    torch.manual_seed(0)
    config = DenoiserConfig(channels=12, pos_grid=(4, 4))
    spec = DenoiserSpec(denoiser=config, backbone=custom, block=0, input_size=(32, 32), patch_size=8, stride=8)
    denoiser = save_denoiser(str(tmp_path / "denoiser.safetensors"), Denoiser(config), spec)
    student, teacher, _ = build_student_and_teacher(denoiser, "none")
    assert student.custom and select_trainable(student, "all") == ["proj.weight", "proj.bias"]
    with pytest.raises(ValueError, match="no numbered blocks"):
        select_trainable(student, "last:1")
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = export_student(student, str(tmp_path / "student.safetensors"), {"teacher": denoiser, "steps": 1})
    note = read_note(path)
    assert note["model"] == custom and note["timm"] is None and "extra_keys_from_original" not in note
    loaded = load_student(path)  # the factory reads the exported file
    pixels = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.features(pixels), student.features(pixels), atol=1e-6)
        assert not torch.allclose(loaded.features(pixels), teacher.backbone.features(pixels), atol=1e-3)
