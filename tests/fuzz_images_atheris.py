"""Coverage-guided fuzzing of the image path with atheris (libFuzzer).

CI runs it for 20 s (``tests/test_fuzz_images.py::test_a_short_atheris_run_finds_nothing``);
longer sessions are manual:

    pip install atheris
    python tests/fuzz_images_atheris.py -max_total_time=600 -rss_limit_mb=1024 -timeout=20

Pillow's format parsers (pure Python) and ``service.images`` are instrumented, so libFuzzer
steers mutations toward new branches in them. The seeds are valid images of every format and
mode the Hypothesis tests use, plus ``tests/corpus/images/``. The property is the Hypothesis
tests' ``check_decode``: a valid tensor or ``ImageError``. A failing input is written by libFuzzer
as ``crash-<sha1>`` (an exception), ``oom-*`` (over -rss_limit_mb) or ``timeout-*``; keep it in
``tests/corpus/images/`` once fixed, so CI replays it.

With ``THINKINGVIT_FUZZ_COLLECT=1`` it also keeps, in ``$THINKINGVIT_FUZZ_FINDINGS``
(default ``fuzz-findings/``), one input per exception type and Pillow source line outside
``OSError``, ``SyntaxError``, ``ValueError`` and ``EOFError``: the inputs that were 500s before
``decode_image`` treated every decoder exception as a 422.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import traceback
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy  # noqa: F401  (heavy, uninstrumented imports first)
import torch  # noqa: F401

with atheris.instrument_imports(include=["PIL", "service", "model"]):
    import PIL.Image

    PIL.Image.init()  # every format plugin now, so they are instrumented too (Pillow imports them lazily)
    from service.images import ImageError, decode_image, pillow_pixel_limit

from tests.test_fuzz_images import CORPUS, GRAY, MAX_PIXELS, MODES, check_decode, encode, random_image

COLLECT = os.environ.get("THINKINGVIT_FUZZ_COLLECT") == "1"
FINDINGS = Path(os.environ.get("THINKINGVIT_FUZZ_FINDINGS", "fuzz-findings"))
# Caught before the fuzzing; any other exception type was a 500.
NARROW = (OSError, SyntaxError, ValueError, EOFError, PIL.Image.DecompressionBombError)
_seen: set[tuple[str, str]] = set()


def write_seeds(folder: Path) -> None:
    for fmt, modes in MODES.items():
        for mode in modes:
            for i, (w, h) in enumerate([(1, 1), (7, 5), (24, 17)]):
                (folder / f"{fmt}-{mode.replace(';', '')}-{i}").write_bytes(encode(random_image(mode, w, h, i), fmt))
    for path in CORPUS.glob("*"):
        (folder / f"corpus-{path.name}").write_bytes(path.read_bytes())


def one_input(data: bytes) -> None:
    check_decode(data)
    if COLLECT:
        collect(data)


def collect(data: bytes) -> None:
    """Keep one input per (exception type, raising line) outside ``NARROW``."""
    try:
        decode_image(data, GRAY, MAX_PIXELS)
    except ImageError as e:
        cause = e.__cause__
        if cause is None or isinstance(cause, NARROW):
            return
        frame = traceback.extract_tb(cause.__traceback__)[-1]
        key = (type(cause).__name__, f"{Path(frame.filename).name}:{frame.lineno}")
        if key not in _seen:
            _seen.add(key)
            FINDINGS.mkdir(exist_ok=True)
            name = f"{key[0]}-{key[1].replace(':', '-')}-{hashlib.sha1(data).hexdigest()[:8]}"
            (FINDINGS / name).write_bytes(data)
            print(f"NEW {key}: {cause}", file=sys.stderr, flush=True)


def main() -> None:
    seeds = Path(tempfile.mkdtemp(prefix="thinkingvit-fuzz-seeds-"))
    write_seeds(seeds)
    extra = [a for a in sys.argv[1:] if not a.startswith("-")]
    args = [sys.argv[0], *[a for a in sys.argv[1:] if a.startswith("-")], *extra, str(seeds)]
    print(f"seeds: {len(list(seeds.iterdir()))} files in {seeds}", file=sys.stderr)
    atheris.Setup(args, one_input)
    with pillow_pixel_limit(MAX_PIXELS):  # as the server sets it while it runs
        atheris.Fuzz()


if __name__ == "__main__":
    main()
