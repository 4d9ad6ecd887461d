"""Fuzzing the image path (bytes -> model input) with Hypothesis.

Whatever the bytes, ``decode_image`` returns a (C, size, size) float tensor with finite values,
or raises ``ImageError`` (the server's 422); never anything else, never a huge allocation.
Inputs: arbitrary bytes; valid PNG/JPEG/GIF/WebP/TIFF/BMP images in every mode each format
writes (palette, 16-bit, CMYK, ...), then truncated or corrupted; headers declaring huge
dimensions; EXIF orientations; animated images. Every input that ever broke it is kept in
``tests/corpus/images/`` and replayed, through ``decode_image`` and over HTTP.
``THINKINGVIT_FUZZ_EXAMPLES`` raises the number of examples for a longer run;
``tests/fuzz_images_atheris.py`` runs a coverage-guided fuzzer on the same function.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model.preprocess import Preprocess
from service.images import FORMATS, ImageError, decode_image

REPO = Path(__file__).resolve().parents[1]
CORPUS = Path(__file__).parent / "corpus" / "images"
MAX_EXAMPLES = int(os.environ.get("THINKINGVIT_FUZZ_EXAMPLES", "150"))
MAX_PIXELS = 256 * 256  # the fuzzed server's cap: large images are refused from the header
GRAY = Preprocess(size=16, resize=16, crop_pct=1.0, interpolation="bilinear", mean=(0.5,), std=(0.5,), channels=1)
RGB = Preprocess(
    size=8, resize=9, crop_pct=0.875, interpolation="bicubic", mean=(0.5,) * 3, std=(0.25,) * 3, channels=3
)
# Modes each format can write (Pillow 10+); every one must decode to a valid result.
MODES = {
    "PNG": ["1", "L", "P", "RGB", "RGBA", "LA", "I;16", "I;16B"],
    "JPEG": ["1", "L", "RGB", "CMYK", "YCbCr"],
    "GIF": ["1", "L", "P", "RGB", "RGBA"],
    "WEBP": ["L", "P", "RGB", "RGBA", "LA"],
    "TIFF": ["1", "L", "P", "RGB", "RGBA", "LA", "I;16", "I;16B", "I", "F", "CMYK", "YCbCr", "PA"],
    "BMP": ["1", "L", "P", "RGB", "RGBA"],
}
FUZZ = settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def check_decode(data: bytes, cfg: Preprocess = GRAY, max_pixels: int = MAX_PIXELS) -> np.ndarray | None:
    """The property: a valid array, or ImageError (422). Returns the array, or None if refused."""
    try:
        array = decode_image(data, cfg, max_pixels)
    except ImageError as e:
        assert str(e), "an ImageError needs a message for the client"
        return None
    assert array.shape == (cfg.channels, cfg.size, cfg.size) and array.dtype == np.float32
    assert array.flags.c_contiguous, "the transport sends the array's buffer as it is"
    assert np.isfinite(array).all()
    return array


# ---------------------------------------------------------------------------------- generators


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def random_image(mode: str, width: int, height: int, seed: int) -> Image.Image:
    """Random pixels in ``mode`` (through an RGB or 16-bit source, so every mode gets real data)."""
    rng = np.random.default_rng(seed)
    if mode in ("I;16", "I;16B", "I"):
        return Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16)).convert(mode)
    if mode == "F":
        return Image.fromarray(rng.normal(0, 1000, (height, width)).astype(np.float32))
    rgb = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    return rgb.quantize(16) if mode == "P" else rgb.convert(mode)


@st.composite
def valid_images(draw) -> bytes:
    fmt = draw(st.sampled_from(sorted(MODES)))
    mode = draw(st.sampled_from(MODES[fmt]))
    width, height = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    image = random_image(mode, width, height, draw(st.integers(0, 2**16)))
    return encode(image, fmt)


@st.composite
def corrupted_images(draw) -> bytes:
    """A valid image, then truncated, bit-flipped, overwritten or with bytes inserted."""
    data = bytearray(draw(valid_images()))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["truncate", "flip", "overwrite", "insert"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "truncate":
            del data[at:]
        elif kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=8))
            data[at : at + len(chunk)] = chunk
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
    return bytes(data)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def huge_png(width: int, height: int, bit_depth: int = 8, color_type: int = 0) -> bytes:
    """A PNG whose header declares width x height, with a few bytes of (bomb-like) data."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    idat = zlib.compress(b"\0" * 65536, 9)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def huge_gif(width: int, height: int) -> bytes:
    small = bytearray(encode(Image.new("P", (1, 1)), "GIF"))
    small[6:10] = struct.pack("<HH", width, height)  # logical screen
    at = small.index(b"\x2c")  # image descriptor: left, top, width, height
    small[at + 5 : at + 9] = struct.pack("<HH", width, height)
    return bytes(small)


def gif_dispose_bomb(width: int, height: int) -> bytes:
    """43 bytes: a frame of width x height with disposal method 2 and transparency. Pillow
    allocates the frame's dispose buffer while *opening* it (162 MB for 13000x13000)."""
    screen = b"GIF89a" + struct.pack("<HH", width, height) + bytes([0x80, 0, 0]) + b"\0\0\0\xff\xff\xff"
    control = b"\x21\xf9\x04" + bytes([(2 << 2) | 1]) + b"\0\0\0\0"  # dispose to background, transparent
    frame = b"\x2c" + struct.pack("<HHHH", 0, 0, width, height) + b"\0" + b"\x02\x02\x44\x01\0"
    return screen + control + frame + b"\x3b"


def huge_bmp(width: int, height: int) -> bytes:
    small = bytearray(encode(Image.new("RGB", (1, 1)), "BMP"))
    small[18:26] = struct.pack("<ii", width, height)
    return bytes(small)


def huge_jpeg(width: int, height: int) -> bytes:
    small = bytearray(encode(Image.new("L", (8, 8)), "JPEG"))
    at = small.index(b"\xff\xc0")  # SOF0: length, precision, height, width
    small[at + 5 : at + 9] = struct.pack(">HH", height, width)
    return bytes(small)


def huge_tiff(width: int, height: int) -> bytes:
    """A little-endian TIFF with one strip of 16 bytes, declaring width x height."""
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, 1, 8 + 2 + 12 * 8 + 4), (277, 3, 1, 1), (278, 4, 1, height), (279, 4, 1, 16)]  # fmt: skip
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + b"\0" * 4
    return b"II*\0" + struct.pack("<I", 8) + ifd + b"\0" * 16


def huge_webp(width: int, height: int) -> bytes:
    """A VP8X header declaring a width x height canvas (24-bit sizes), no image data."""
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\0" * 4 + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    return b"RIFF" + struct.pack("<I", 4 + len(vp8x)) + b"WEBP" + vp8x


HUGE = {
    "png-65535x65535": lambda: huge_png(65535, 65535),
    "png-16bit-2^31": lambda: huge_png(2**31 - 1, 2**31 - 1, bit_depth=16, color_type=2),
    "png-palette-100000x100000": lambda: huge_png(100000, 100000, color_type=3),
    "gif-65535x65535": lambda: huge_gif(65535, 65535),
    "gif-dispose-13000x13000": lambda: gif_dispose_bomb(13000, 13000),
    "bmp-2^30x2^30": lambda: huge_bmp(2**30, 2**30),
    "bmp-negative-height": lambda: huge_bmp(50000, -50000),
    "jpeg-65535x65535": lambda: huge_jpeg(65535, 65535),
    "tiff-2^31x2^31": lambda: huge_tiff(2**31 - 1, 2**31 - 1),
    "webp-16777216x16777216": lambda: huge_webp(2**24, 2**24),
    "png-just-over-the-cap": lambda: huge_png(257, 256),
}  # fmt: skip


# ---------------------------------------------------------------------------------- properties


@FUZZ
@given(st.binary(max_size=2048))
def test_arbitrary_bytes(data):
    check_decode(data)


@FUZZ
@given(st.sampled_from([f.encode() for f in ("\x89PNG\r\n\x1a\n", "\xff\xd8\xff", "GIF89a", "II*\0", "MM\0*", "BM")]),
       st.binary(max_size=512))  # fmt: skip
def test_bytes_behind_a_real_magic_number(magic, rest):
    """Past the magic number, so the format's own parser gets the garbage."""
    check_decode(magic + rest)


@FUZZ
@given(valid_images(), st.sampled_from([GRAY, RGB]))
def test_every_format_and_mode_decodes(data, cfg):
    assert check_decode(data, cfg) is not None


@FUZZ
@given(corrupted_images(), st.sampled_from([GRAY, RGB]))
def test_truncated_and_corrupted_images(data, cfg):
    check_decode(data, cfg)


@pytest.mark.parametrize("name", sorted(HUGE))
def test_huge_declared_dimensions_are_refused_from_the_header(name):
    with pytest.raises(ImageError) as refused:
        decode_image(HUGE[name](), GRAY, MAX_PIXELS)
    if name.startswith("png"):  # a well-formed header: refused by a pixel cap (ours or Pillow's)
        assert "limit" in str(refused.value)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(orientation):
    """A 12x6 photo with an EXIF orientation decodes as the upright image a browser shows."""
    rng = np.random.default_rng(orientation)
    upright = Image.fromarray(rng.integers(0, 256, (6, 12), dtype=np.uint8))
    # The stored pixels are the upright image transformed by the inverse of the orientation.
    inverse = {2: [Image.Transpose.FLIP_LEFT_RIGHT], 3: [Image.Transpose.ROTATE_180],
               4: [Image.Transpose.FLIP_TOP_BOTTOM], 5: [Image.Transpose.TRANSPOSE],
               6: [Image.Transpose.ROTATE_90], 7: [Image.Transpose.TRANSVERSE],
               8: [Image.Transpose.ROTATE_270]}.get(orientation, [])  # fmt: skip
    stored = upright
    for op in inverse:
        stored = stored.transpose(op)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(stored, "PNG", exif=exif.tobytes())
    assert np.array_equal(check_decode(data), check_decode(encode(upright, "PNG")))


def test_corrupted_exif_still_decodes_or_is_refused():
    image = Image.new("L", (8, 8), 128)
    for exif in (b"Exif\0\0garbage", b"Exif\0\0II*\0\xff\xff\xff\xff", b"MM\0*\0\0\0\x08\xff\xff"):
        for fmt in ("JPEG", "PNG", "WEBP"):
            check_decode(encode(image, fmt, exif=exif))


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG", "TIFF"])
def test_animated_images_give_their_first_frame(fmt):
    frames = [Image.new("L", (16, 16), value) for value in (0, 255, 128)]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], **({"lossless": True} if fmt == "WEBP" else {}))
    assert Image.open(io.BytesIO(data)).n_frames == 3
    assert np.array_equal(check_decode(data), check_decode(encode(frames[0], "PNG")))


# ---------------------------------------------------------------------------------- corpus


def corpus() -> list[Path]:
    return sorted(CORPUS.glob("*")) if CORPUS.is_dir() else []


def test_the_corpus_is_replayed():
    assert corpus(), "tests/corpus/images/ holds the inputs that ever broke decoding"
    for path in corpus():
        check_decode(path.read_bytes())
        check_decode(path.read_bytes(), RGB)


def test_the_corpus_over_http(start_server):
    """Each corpus input over real HTTP: 200 or 422, never a 5xx, and the server keeps serving."""
    server = start_server(max_image_pixels=MAX_PIXELS)
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for path in corpus():
            response = client.post("/classify", files={"file": (path.name, path.read_bytes())})
            assert response.status_code in (200, 422), (path.name, response.text)
            if response.status_code == 422:
                assert response.json()["error"]["reason"] == "invalid_image"
        assert client.get("/readyz").status_code == 200


# ---------------------------------------------------------------------------------- memory


MEMORY_BUDGET_MB = 64
BOUNDED = """
import resource, sys
from service.images import pillow_pixel_limit
from tests.test_fuzz_images import HUGE, corpus, check_decode
cases = [f() for f in HUGE.values()] + [p.read_bytes() for p in corpus()]
for cap in (256 * 256, 25_000_000):  # the fuzzed server's cap, and the default
    with pillow_pixel_limit(cap):  # as the server sets it
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for data in cases:
            check_decode(data, max_pixels=cap)
        grew_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        print(cap, len(cases), grew_mb)
        assert grew_mb < {budget}, f"decoding grew the peak RSS by {{grew_mb:.0f}} MB"
"""


def test_decoding_stays_within_a_memory_budget():
    """Huge headers and every corpus input decode (or are refused) without the peak resident
    memory growing by more than MEMORY_BUDGET_MB: nothing allocates for a declared size, not
    even what Pillow allocates while opening (see ``pillow_pixel_limit``)."""
    run = subprocess.run(
        [sys.executable, "-c", BOUNDED.format(budget=MEMORY_BUDGET_MB)],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]


def test_formats_are_the_documented_ones():
    assert FORMATS == ("PNG", "JPEG", "GIF", "WEBP", "TIFF", "BMP")


ATHERIS_SECONDS = int(os.environ.get("THINKINGVIT_ATHERIS_SECONDS", "10"))


def test_a_short_atheris_run_finds_nothing(tmp_path):
    """CI's coverage-guided run: ``tests/fuzz_images_atheris.py`` for ``ATHERIS_SECONDS`` (10 s;
    the long runs in docs/reliability.md are manual). CI installs atheris (the test extra), so its
    absence fails. libFuzzer exits non-zero and writes ``crash-*``, ``oom-*`` or ``timeout-*`` for
    an input that breaks ``check_decode``."""
    import importlib.util

    assert importlib.util.find_spec("atheris") is not None, "atheris is not importable: pip install atheris"
    (tmp_path / "corpus").mkdir()  # libFuzzer adds the inputs that reach new coverage here
    proc = subprocess.run(
        [sys.executable, "tests/fuzz_images_atheris.py", f"-max_total_time={ATHERIS_SECONDS}",
         "-rss_limit_mb=2048", "-timeout=20", f"-artifact_prefix={tmp_path}/", str(tmp_path / "corpus")],
        cwd=REPO, capture_output=True, text=True, timeout=ATHERIS_SECONDS + 120, check=False,
    )  # fmt: skip
    log = proc.stderr[-3000:]
    assert proc.returncode == 0, log
    assert [p.name for p in tmp_path.iterdir() if p.name != "corpus"] == [], log
    runs = [int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("Done ")]
    assert runs and runs[0] >= 100, f"libFuzzer did not run: {log}"
