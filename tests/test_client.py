"""``thinkingvit classify`` against a live ``thinkingvit serve`` process on loopback."""
from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest

from service.cli import main
from tests.conftest import png_bytes


@pytest.fixture(scope="module")
def server_url(module_server) -> str:
    """The real ``thinkingvit serve`` on a socket the test binds and hands over (conftest), so no
    port can be taken meanwhile and readiness needs no polling."""
    return module_server.url


@pytest.fixture
def image_folder(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    (folder / "more").mkdir(parents=True)
    for i, name in enumerate(["a.png", "b.png", "more/c.png"]):
        (folder / name).write_bytes(png_bytes(rng.integers(0, 256, (16 + i, 16), dtype=np.uint8)))
    (folder / "notes.txt").write_text("not an image, skipped")
    return folder


def test_folder_as_a_table(server_url, image_folder, capsys):
    code = main(["classify", str(image_folder), "--url", server_url, "--concurrency", "2", "--threshold", "1"])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out[0].split() == ["file", "label", "confidence", "exit", "stage", "GMACs", "ms"]
    assert [line.split()[0] for line in out[1:]] == [str(image_folder / n) for n in ("a.png", "b.png", "more/c.png")]
    for line in out[1:]:
        cells = line.split()
        assert cells[1].startswith("class-") and 0 <= float(cells[2]) <= 1 and cells[3] == "1"  # threshold 1: last stage


def test_json_lines(server_url, image_folder, capsys):
    code = main(["classify", str(image_folder / "a.png"), "--url", server_url, "--json", "--top-k", "2", "--threshold", "0"])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0 and len(lines) == 1
    answer = json.loads(lines[0])
    assert answer["file"].endswith("a.png") and answer["exit_stage"] == 0 and len(answer["top_k"]) == 2


def test_an_image_the_server_refuses(server_url, image_folder, capsys):
    broken = image_folder / "broken.png"
    broken.write_bytes(b"not a png")
    code = main(["classify", str(broken), str(image_folder / "a.png"), "--url", server_url])
    captured = capsys.readouterr()
    assert code == 1
    assert "error 422" in captured.out and "class-" in captured.out
    assert "refused 1 of 2 images" in captured.err


def test_unreachable_server_is_one_line_and_exit_2(image_folder, capsys):
    with socket.socket() as closed:  # bound but never listening: every connection is refused
        closed.bind(("127.0.0.1", 0))
        code = main(["classify", str(image_folder), "--url", f"http://127.0.0.1:{closed.getsockname()[1]}"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("thinkingvit classify: cannot reach the server at http://127.0.0.1:")


def test_missing_path_is_one_line_and_exit_2(tmp_path, capsys):
    code = main(["classify", str(tmp_path / "absent.png")])
    assert code == 2 and "no such file or folder" in capsys.readouterr().err
