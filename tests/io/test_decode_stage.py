"""The decode step of the jobs (decode_batch): uint8 pixels at the model's size, numerically what the workers
computed before (resize_to_tensor), failed rows kept, and the opt-in JPEG draft path."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.io.decode import (DecodeConfig, decode_batch, decode_image, pixels_to_float, resize_pixels,
                                resize_to_tensor)


def jpeg(w: int, h: int, seed: int = 0, **kw) -> bytes:
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, w)[None, :, None] * rng.uniform(100, 255, 3) + np.linspace(0, 1, h)[:, None, None] * 60
    buf = io.BytesIO()
    Image.fromarray(np.clip(x + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def test_decoded_batch_is_the_workers_old_input_exactly(sample_images):
    data = [p.read_bytes() for p in sample_images] + [jpeg(451, 300)]
    n = len(data)
    batch = {"image_id": np.arange(n), "uri": np.array([f"u{i}" for i in range(n)], dtype=object),
             "bytes": np.array(data, dtype=object), "error": np.array([""] * n, dtype=object)}
    out = decode_batch(batch, size=70)
    assert out["pixels"].shape == (n, 3, 70, 70) and out["pixels"].dtype == np.uint8
    floats = pixels_to_float(torch.from_numpy(out["pixels"]))
    for j, b in enumerate(data):
        image = decode_image(b)
        assert (out["width"][j], out["height"][j]) == (image.width, image.height)
        assert torch.equal(floats[j], resize_to_tensor(image.pixels, 70))  # bit for bit: same resize, x / 255
    assert floats.is_contiguous() and set(out["error"]) == {""}


def test_failed_reads_and_bad_images_become_errors_with_their_reason():
    batch = {"image_id": np.arange(4), "uri": np.array(list("abcd"), dtype=object),
             "bytes": np.array([jpeg(40, 30), b"", b"not an image", None], dtype=object),
             "error": np.array(["", "", "", "read failed: 404"], dtype=object)}
    out = decode_batch(batch, size=28, config=DecodeConfig(min_side=2))
    assert out["error"][0] == "" and out["width"][0] == 40
    assert out["error"][1] == "empty file"
    assert "not an image" in out["error"][2]
    assert out["error"][3] == "read failed: 404"  # the fetch's reason is kept
    assert (out["pixels"][1:] == 0).all() and (out["width"][1:] == 0).all()


def test_draft_decoding_is_opt_in_keeps_the_size_and_stays_close():
    data = jpeg(1600, 1200, seed=3)
    full = decode_image(data)
    fast = decode_image(data, draft=224)
    assert (fast.width, fast.height) == (full.width, full.height) == (1600, 1200)
    assert min(fast.pixels.shape[:2]) >= 224 and fast.pixels.shape[1] < 1600  # decoded at a reduced scale
    a, b = resize_pixels(full.pixels, 224).astype(float), resize_pixels(fast.pixels, 224).astype(float)
    assert 0 < np.abs(a - b).mean() < 3  # different pixels (why it is opt-in), visually the same image
    small = jpeg(300, 300)
    assert np.array_equal(decode_image(small, draft=224).pixels, decode_image(small).pixels)  # < 2x: full decode


def test_draft_keeps_the_upright_size_of_rotated_photos():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    data = jpeg(1200, 800, exif=exif.tobytes())
    full, fast = decode_image(data), decode_image(data, draft=200)
    assert (full.width, full.height) == (fast.width, fast.height) == (800, 1200)
    assert fast.pixels.shape[0] > fast.pixels.shape[1]


@pytest.mark.parametrize("size", [14, 518])
def test_pixels_to_float_matches_numpy_division(size):
    u8 = np.random.default_rng(size).integers(0, 256, (2, 3, size, size), dtype=np.uint8)
    want = torch.from_numpy(u8.astype(np.float32) / 255.0)
    assert torch.equal(pixels_to_float(torch.from_numpy(u8)), want)
    assert torch.equal(pixels_to_float(list(u8)), want)  # images one by one, as a worker holds them


@pytest.mark.parametrize("shape", [(512, 512), (427, 640), (1411, 1200), (3, 5), (40, 900), (518, 518)])
def test_resize_is_pils_bicubic_within_two_grey_levels(sample_images, shape):
    """The jobs resize with torch's uint8 kernel (5-8x cheaper); a user comparing with PIL's resize (timm's
    transforms) sees the same image: up- and downsampling, squeezed strips, and the identity."""
    h, w = shape
    photo = Image.open(sample_images[0]).convert("RGB").resize((w, h), Image.Resampling.LANCZOS)
    for size in (224, 518):
        ours = resize_pixels(np.asarray(photo), size)  # read-only input, as np.asarray(PIL image) gives
        assert ours.shape == (3, size, size) and ours.dtype == np.uint8 and ours.flags.c_contiguous
        pil = np.asarray(photo.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=None))
        diff = np.abs(ours.astype(int) - pil.transpose(2, 0, 1))
        assert diff.max() <= 2 and diff.mean() < 0.05, (diff.max(), diff.mean())
