import io

import numpy as np
import pytest
from PIL import Image

from pipeline.io.decode import DecodeConfig, ImageDecodeError, decode_image, resize_to_tensor


def encode(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def gradient(w=40, h=30) -> np.ndarray:
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
    return np.concatenate([x + 0 * y, y + 0 * x, np.full((h, w, 1), 128.0)], 2).astype(np.uint8)


def test_rgb_png_and_jpeg_round_trip():
    rgb = gradient()
    out = decode_image(encode(Image.fromarray(rgb)))
    assert (out.width, out.height) == (40, 30) and np.array_equal(out.pixels, rgb)
    out = decode_image(encode(Image.fromarray(rgb), "JPEG", quality=95))
    assert np.abs(out.pixels.astype(int) - rgb).mean() < 3


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "1"])
def test_modes_become_rgb(mode):
    base = Image.fromarray(gradient())
    if mode == "I;16":
        image = Image.fromarray((np.asarray(base.convert("L"), dtype=np.uint16) * 257))
        assert image.mode.startswith("I;16")
        fmt = "PNG"
    else:
        image = base.convert(mode)
        fmt = "JPEG" if mode == "CMYK" else "PNG"
    out = decode_image(encode(image, fmt))
    assert out.pixels.shape == (30, 40, 3) and out.pixels.dtype == np.uint8
    if mode in ("L", "I;16"):
        grey = np.asarray(base.convert("L"))
        assert np.abs(out.pixels[..., 0].astype(int) - grey).max() <= 1  # 16-bit is scaled, not clipped


def test_alpha_is_composited_onto_white():
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[..., 3] = 0  # fully transparent black
    out = decode_image(encode(Image.fromarray(rgba, "RGBA")))
    assert (out.pixels == 255).all()


def test_exif_orientation_is_applied():
    image = Image.fromarray(gradient(40, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    out = decode_image(encode(image, "JPEG", exif=exif.tobytes(), quality=95))
    assert (out.width, out.height) == (30, 40)


@pytest.mark.parametrize("data,reason", [
    (b"", "empty file"),
    (b"this is not an image at all", "not an image"),
])
def test_unusable_bytes_raise_clear_reasons(data, reason):
    with pytest.raises(ImageDecodeError, match=reason):
        decode_image(data)


def test_truncated_image_is_refused():
    data = encode(Image.fromarray(gradient(200, 200)), "JPEG")
    with pytest.raises(ImageDecodeError, match="corrupt or truncated"):
        decode_image(data[: len(data) // 3])


def test_bombs_are_refused_and_size_limits_are_opt_in():
    big = encode(Image.new("L", (3000, 3000)))
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode_image(big, DecodeConfig(max_pixels=1_000_000))
    with pytest.raises(ImageDecodeError, match=r"too small.*--min-side"):
        decode_image(encode(Image.new("RGB", (4, 100))), DecodeConfig(min_side=8))
    with pytest.raises(ImageDecodeError, match=r"aspect ratio above 20 \(--max-aspect\)"):
        decode_image(encode(Image.new("RGB", (2000, 20))), DecodeConfig(max_aspect=20))
    with pytest.raises(ValueError, match="max_aspect"):
        DecodeConfig(max_aspect=0.5)


def test_tiny_and_elongated_images_are_stretched_to_the_input():
    """A 3x5 PNG and a 2000x40 JPEG are valid images: decoded at their size, then stretched to the square."""
    rng = np.random.default_rng(0)
    tiny = decode_image(encode(Image.fromarray(rng.integers(0, 255, (5, 3, 3), np.uint8))))
    strip = decode_image(encode(Image.fromarray(rng.integers(0, 255, (40, 2000, 3), np.uint8)), "JPEG"))
    assert (tiny.width, tiny.height, strip.width, strip.height) == (3, 5, 2000, 40)
    for image in (tiny, strip):
        t = resize_to_tensor(image.pixels, 56)
        assert t.shape == (3, 56, 56) and 0 <= t.min() and t.max() <= 1 and t.std() > 0.01


def test_resize_to_tensor_range_and_shape():
    t = resize_to_tensor(gradient(), 28)
    assert t.shape == (3, 28, 28) and t.min() >= 0 and t.max() <= 1
    assert t[0, :, -1].mean() > t[0, :, 0].mean()  # x gradient survives
