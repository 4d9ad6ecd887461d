"""Image bytes -> model input array, in the API server processes (numpy and Pillow, no torch)."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from model.preprocess import Preprocess, preprocess_array

# Formats a client may send. Pillow opens ~40 formats; some decoders are rarely exercised and
# EPS even runs Ghostscript, so anything else is refused before a decoder sees it.
FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "TIFF", "BMP")  # JPEG includes MPO (phone photos)


@contextlib.contextmanager
def pillow_pixel_limit(max_pixels: int) -> Iterator[None]:
    """While the server runs: Pillow's own, process-wide bomb limit at our cap.

    Some plugins allocate while *opening* an image, before ``decode_image`` can read its size:
    a 43-byte GIF whose frame declares 13000x13000 with a disposal method makes Pillow fill a
    162 MB buffer. They check ``Image.MAX_IMAGE_PIXELS`` first (and raise above twice it), so
    half our cap stops them at the cap (between the two, Pillow only warns).
    """
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max(1, max_pixels // 2)
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


# The leading bytes of each format in FORMATS, to tell an image from other bytes sent without an
# image/* content type (curl --data-binary, many HTTP libraries: application/octet-stream or none).
MAGIC_NUMBERS = {
    "PNG": (b"\x89PNG\r\n\x1a\n",),
    "JPEG": (b"\xff\xd8\xff",),
    "GIF": (b"GIF87a", b"GIF89a"),
    "TIFF": (b"II*\x00", b"MM\x00*"),
    "BMP": (b"BM",),
}


def sniff_format(data: bytes) -> str | None:
    """The format in FORMATS these bytes start like, or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((name for name, magics in MAGIC_NUMBERS.items() if data.startswith(magics)), None)


class ImageError(ValueError):
    """The upload is not a usable image; the message says why."""


def decode_image(data: bytes, cfg: Preprocess, max_pixels: int) -> np.ndarray:
    """Decode, check the pixel cap from the header before decompressing, and preprocess.

    Only ``FORMATS`` are read; an animated image gives its first frame; the EXIF orientation
    is applied, as a browser would show the photo. Pillow's own bomb check, set to the same
    cap by ``pillow_pixel_limit`` while the server runs, guards what Pillow allocates before
    this function sees the size.
    """
    if not data:
        raise ImageError("empty image: the body or file part has zero bytes")
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
        width, height = image.size
        if width * height > max_pixels:
            pixels = width * height
            raise ImageError(f"image is {width}x{height} = {pixels} pixels; the limit is {max_pixels}")
        image.load()
        image = ImageOps.exif_transpose(image)
        return preprocess_array(image, cfg)  # (C, size, size) float32
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"image too large: {e}") from e
    except UnidentifiedImageError:
        raise ImageError(f"not an image in a format the server reads ({', '.join(FORMATS)})") from None
    except Exception as e:  # Pillow's parsers raise many types on malformed input (OSError,
        # SyntaxError, TypeError, struct.error, ...): every one means this upload is not decodable
        raise ImageError(f"cannot decode image: {type(e).__name__}: {e}") from e
