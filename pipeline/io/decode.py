"""Turn image bytes into RGB pixels the backbone can take, or a one-line reason why not.

Everything a corpus throws at us is normalised here: EXIF orientation, grey, grey+alpha, palette, RGBA,
CMYK and 16-bit images become 8-bit RGB (alpha is composited onto white). Truncated files, non-images,
empty files, decompression bombs and absurd dimensions raise :class:`ImageDecodeError`, which the jobs
record as a failed manifest row instead of stopping.
"""

from __future__ import annotations

import io
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["DecodeConfig", "DecodedImage", "ImageDecodeError", "decode_image", "resize_pixels", "resize_to_tensor",
           "decode_batch", "pixels_to_float"]


class ImageDecodeError(ValueError):
    """An input image cannot be used; the message is the reason stored in the manifest."""


@dataclass(frozen=True)
class DecodeConfig:
    """Limits on what is accepted as an image.

    Every image that decodes is used: :func:`resize_to_tensor` stretches it to the square input, however small or
    elongated (a 3x5 icon, a 2000x40 strip), as the DVT reference does. The size and shape limits are opt-in.

    Attributes:
        max_pixels: larger images are refused before their pixels are decoded (decompression bombs).
        min_side: refuse images with a side shorter than this many pixels (default 1: no limit).
        max_aspect: refuse images whose longer/shorter side ratio is above this (default ``None``: no limit).
    """

    max_pixels: int = 100_000_000
    min_side: int = 1
    max_aspect: float | None = None

    def __post_init__(self) -> None:
        if self.max_pixels < 1 or self.min_side < 1 or (self.max_aspect is not None and self.max_aspect < 1):
            raise ValueError(f"DecodeConfig: max_pixels and min_side must be at least 1 and max_aspect (--max-aspect) "
                             f"at least 1, got {self}")


@dataclass
class DecodedImage:
    pixels: np.ndarray  # (H, W, 3) uint8, upright
    width: int  # original width and height, after EXIF rotation
    height: int


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(image, dtype=np.float64)
        hi = 65535.0 if image.mode.startswith("I;16") or a.max() > 255 else 255.0
        return Image.fromarray(np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


#: EXIF orientations that swap width and height.
_TRANSPOSED = {5, 6, 7, 8}


def decode_image(data: bytes, config: DecodeConfig = DecodeConfig(), *, draft: int | None = None) -> DecodedImage:
    """Decode ``data`` into upright 8-bit RGB, enforcing ``config``'s limits.

    Args:
        draft: for a JPEG at least twice this size on both sides, let the decoder scale it down by a power of two
            while decoding (PIL's ``draft``: the DCT is decoded at 1/2, 1/4 or 1/8 size, never below ``draft``
            pixels a side). Much faster on large photos, but the pixels differ from a full decode followed by the
            resize, so it is opt-in. ``width`` and ``height`` stay the file's own (upright).
    """
    if not data:
        raise ImageDecodeError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            w, h = image.size
            if w * h > config.max_pixels:
                raise ImageDecodeError(f"{w}x{h} pixels exceeds the limit of {config.max_pixels} "
                                       "(decompression bomb?); raise DecodeConfig.max_pixels to accept it")
            if min(w, h) < config.min_side:
                raise ImageDecodeError(f"{w}x{h} is too small: sides must be at least {config.min_side} pixels "
                                       f"(--min-side)")
            if config.max_aspect is not None and max(w, h) / max(1, min(w, h)) > config.max_aspect:
                raise ImageDecodeError(f"{w}x{h} has an aspect ratio above {config.max_aspect:g} (--max-aspect)")
            if draft is not None and image.format == "JPEG" and min(w, h) >= 2 * draft:
                image.draft("RGB", (draft, draft))
            image.load()
            orientation = image.getexif().get(0x0112)
            image = ImageOps.exif_transpose(image)
            rgb = _to_rgb(image)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError(f"decompression bomb: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageDecodeError(f"corrupt or truncated image: {e}") from None
    pixels = np.asarray(rgb, dtype=np.uint8)
    if draft is None:
        return DecodedImage(pixels=pixels, width=pixels.shape[1], height=pixels.shape[0])
    return DecodedImage(pixels=pixels, width=h if orientation in _TRANSPOSED else w,
                        height=w if orientation in _TRANSPOSED else h)


def resize_to_tensor(pixels: np.ndarray, size: int) -> torch.Tensor:
    """``(H, W, 3)`` uint8 -> ``(3, size, size)`` float in ``[0, 1]``, resized with an antialiased bicubic.

    Images are stretched to a square, as the DVT reference does, whatever their size and aspect (a 3x5 image is
    upsampled, a 2000x40 strip squeezed); the original width and height are kept in the manifest so features can
    be mapped back to the image's aspect ratio.
    """
    return pixels_to_float(torch.from_numpy(resize_pixels(pixels, size))[None])[0]


def resize_pixels(pixels: np.ndarray, size: int) -> np.ndarray:
    """``(H, W, 3)`` uint8 -> ``(3, size, size)`` uint8, channels first: the resize of :func:`resize_to_tensor`
    (antialiased bicubic, stretched to a square) before the conversion to float, so a quarter of the bytes travel
    to the model, already in the layout it takes.

    Torch's uint8 kernel for PIL's filter (bicubic with ``a = -0.5``, antialiased when shrinking), reading the
    pixels in place as a channels-last image: within 2 grey levels of PIL's ``Image.resize`` (mean difference
    under 0.01) for 5-8x less CPU (``benchmarks/feed.py --parts steps``), and it releases the GIL, so decode
    threads resize in parallel.
    """
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise ValueError(f"resize_pixels: expected (H, W, 3) uint8 pixels, got {pixels.shape} {pixels.dtype}")
    if not pixels.flags.writeable:  # torch.from_numpy wants a writable array; the pixels are only read
        pixels = np.array(pixels)
    source = torch.from_numpy(pixels).permute(2, 0, 1)  # (3, H, W) view, channels-last in memory
    if pixels.shape[:2] == (size, size):
        return source.contiguous().numpy()
    out = torch.nn.functional.interpolate(source[None], size=(size, size), mode="bicubic", antialias=True,
                                          align_corners=False)
    return out[0].contiguous().numpy()


def pixels_to_float(pixels: torch.Tensor | Sequence[np.ndarray]) -> torch.Tensor:
    """``(B, 3, S, S)`` uint8 (on any device), or a list of ``(3, S, S)`` uint8 images, -> ``(B, 3, S, S)`` float32
    in ``[0, 1]``, contiguous: the numbers :func:`resize_to_tensor` gives (``x / 255`` in float32), computed where
    the pixels are (on the GPU after a uint8 upload). A list is converted image by image into the one output
    buffer (no stacked uint8 copy first)."""
    if isinstance(pixels, torch.Tensor):
        return pixels.to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)
    rows = [torch.from_numpy(np.ascontiguousarray(a)) for a in pixels]
    out = torch.empty((len(rows), *rows[0].shape), dtype=torch.float32)
    for j, row in enumerate(rows):
        out[j].copy_(row)
    return out.div_(255.0)


def decode_batch(batch: dict[str, np.ndarray], *, size: int, config: DecodeConfig = DecodeConfig(),
                 draft: bool = False, threads: int = 1) -> dict[str, np.ndarray]:
    """The jobs' decode step (a Ray Data CPU task, or a worker's own): rows ``image_id, uri, bytes, error`` (what
    :func:`pipeline.io.listing.fetch_bytes` and shard readers produce) -> ``image_id, uri, pixels`` (``(n, 3, size,
    size)`` uint8, the model's input), ``width, height`` (the image's own, 0 when it failed) and ``error``
    (empty when it decoded; a failed read's error is kept). ``draft``: :func:`decode_image`'s fast JPEG path.
    ``threads``: images decoded at once (PIL releases the GIL while it decodes and resizes, so threads of one
    process use several cores)."""
    ids = np.asarray(batch["image_id"], dtype=np.int64)
    n = len(ids)
    pixels = np.zeros((n, 3, size, size), dtype=np.uint8)
    width, height = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    errors = [str(e) if e else "" for e in batch["error"]]
    data = batch["bytes"]

    def one(j: int) -> None:
        try:
            image = decode_image(bytes(data[j]) if data[j] is not None else b"", config,
                                 draft=size if draft else None)
        except ImageDecodeError as e:
            errors[j] = str(e)
            return
        width[j], height[j] = image.width, image.height
        pixels[j] = resize_pixels(image.pixels, size)

    todo = [j for j in range(n) if not errors[j]]
    if threads > 1 and len(todo) > 1:
        list(_pool(threads).map(one, todo))
    else:
        for j in todo:
            one(j)
    return {"image_id": ids, "uri": np.asarray(batch["uri"], dtype=object), "pixels": pixels, "width": width,
            "height": height, "error": np.asarray(errors, dtype=object)}


_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _pool(threads: int) -> ThreadPoolExecutor:
    """One decode pool per size and process, shared by the batches a worker has in flight."""
    with _pools_lock:
        if threads not in _pools:
            _pools[threads] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="dvt-decode")
        return _pools[threads]
