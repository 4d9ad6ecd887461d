"""The ``thinkingvit`` command line: light help, documented options, one-line user errors."""
from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys

import pytest
import torch

from service.cli import build_parser, main

COMMANDS_WITH_DEFAULTS = ("info", "train", "eval", "classify")


def subcommands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["eval", "--help"], ["classify", "--help"]])
def test_help_imports_no_torch(argv):
    code = (
        "import sys\nfrom service.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "usage: thinkingvit" in done.stdout


def test_top_level_help_is_for_users():
    text = build_parser().format_help()
    assert "import" not in text and "classify" in text


@pytest.mark.parametrize("name", COMMANDS_WITH_DEFAULTS)
def test_every_option_has_help_and_shows_its_default(name):
    parser = subcommands()[name]
    for action in parser._actions:
        assert action.help, f"{name} {action.dest} has no help"
    text = " ".join(parser.format_help().split())  # unwrapped
    if name == "train":
        assert "(default: 22)" in text and "(default: fmnist-3-6)" in text
    if name == "eval":
        assert "(default: runs/eval)" in text
    assert "(default: None)" not in text


def run_main(capsys, argv: list[str]) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def assert_one_line_error(err: str, *expected: str) -> None:
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and "weights_only" not in err
    for text in expected:
        assert text in err


def test_info_on_a_missing_file(tmp_path, capsys):
    code, err = run_main(capsys, ["info", str(tmp_path / "nope.safetensors")])
    assert code == 2
    assert_one_line_error(err, "thinkingvit info:", "no such checkpoint file")


@pytest.mark.parametrize("name", ["notes.txt", "notes.pth", "notes.safetensors"])
def test_info_on_a_file_that_is_not_a_checkpoint(tmp_path, capsys, name):
    path = tmp_path / name
    path.write_text("hello, not a checkpoint\n")
    code, err = run_main(capsys, ["info", str(path)])
    assert code == 2
    assert_one_line_error(err, "thinkingvit info:", str(path))


def test_info_on_a_pickle_with_code_never_advises_unsafe_loading(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    # argparse.Namespace is allowed (the authors' training checkpoints hold one); a Path is not
    torch.save({"state_dict": {"x": torch.zeros(1)}, "args": pathlib.PurePosixPath("/x")}, path)
    code, err = run_main(capsys, ["info", str(path)])
    assert code == 2
    assert_one_line_error(err, "refused", "PurePosixPath", "weights-only")


def test_serve_with_a_missing_checkpoint_names_it(tmp_path, capsys):
    missing = tmp_path / "absent.safetensors"
    code, err = run_main(capsys, ["serve", "--checkpoint", str(missing)])
    assert code == 2
    assert_one_line_error(err, str(missing), "no such file")
    assert "pass --checkpoint" not in err


def test_eval_with_a_missing_checkpoint(tmp_path, capsys):
    code, err = run_main(capsys, ["eval", str(tmp_path / "absent.safetensors")])
    assert code == 2
    assert_one_line_error(err, "thinkingvit eval:", "no such checkpoint file")


def test_bugs_keep_their_traceback(monkeypatch):
    import service.cli

    def broken(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(service.cli, "cmd_info", broken)
    with pytest.raises(ZeroDivisionError):
        main(["info", "anything"])
