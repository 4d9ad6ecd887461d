"""Coverage-guided fuzzing of the image path with atheris (libFuzzer); a manual run, not CI.

    pip install atheris
    python tests/fuzz_images_atheris.py -max_total_time=600 -rss_limit_mb=3072 -timeout=20

Pillow's format parsers (pure Python) and ``service.images`` are instrumented, so libFuzzer
steers mutations toward new branches in them. The seeds are valid images of every format and
mode the Hypothesis tests use, plus ``tests/corpus/images/``. The property is the Hypothesis
tests' ``check_decode``: a valid tensor or ``ImageError``. A failing input is written by libFuzzer
as ``crash-<sha1>`` (an exception), ``oom-*`` (over -rss_limit_mb) or ``timeout-*``; keep it in
``tests/corpus/images/`` once fixed, so CI replays it.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy
import torch

with atheris.instrument_imports(include=["PIL", "service", "model"]):
    import PIL.Image

    PIL.Image.init()  # every format plugin now, so they are instrumented too (Pillow imports them lazily)
    from service.images import decode_image

from tests.test_fuzz_images import CORPUS, MODES, check_decode, encode, random_image


def write_seeds(folder: Path) -> None:
    for fmt, modes in MODES.items():
        for mode in modes:
            for i, (w, h) in enumerate([(1, 1), (7, 5), (24, 17)]):
                (folder / f"{fmt}-{mode.replace(';', '')}-{i}").write_bytes(encode(random_image(mode, w, h, i), fmt))
    for path in CORPUS.glob("*"):
        (folder / f"corpus-{path.name}").write_bytes(path.read_bytes())


def one_input(data: bytes) -> None:
    check_decode(data)


def main() -> None:
    seeds = Path(tempfile.mkdtemp(prefix="thinkingvit-fuzz-seeds-"))
    write_seeds(seeds)
    extra = [a for a in sys.argv[1:] if not a.startswith("-")]
    args = [sys.argv[0], *[a for a in sys.argv[1:] if a.startswith("-")], *extra, str(seeds)]
    print(f"seeds: {len(list(seeds.iterdir()))} files in {seeds}", file=sys.stderr)
    atheris.Setup(args, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
