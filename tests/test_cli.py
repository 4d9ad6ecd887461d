"""The ``thinkingvit`` command line: light help, documented options, one-line user errors."""
from __future__ import annotations

import argparse
import ast
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


# ------------------------------------------------------------------------------ bench, not a dependency

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOT_INSTALLED = ("bench", "tools")  # run from a checkout; the serving package must not need them


def test_no_service_module_imports_the_benchmark_or_the_tools():
    """Read, not run: lazy imports inside functions count too."""
    for path in sorted((ROOT / "service").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not [n for n in names if n.split(".")[0] in NOT_INSTALLED], f"{path}:{node.lineno}"


def test_the_serving_package_loads_no_benchmark_module():
    """Every service module imported and the CLI's parser built, in a fresh process (no other
    test's imports count): no module of bench/ or tools/ is loaded."""
    code = (
        "import importlib, pkgutil, sys\nimport service\n"
        "for m in pkgutil.walk_packages(service.__path__, 'service.'):\n    importlib.import_module(m.name)\n"
        "from service.cli import build_parser\nbuild_parser()\n"
        f"loaded = sorted(m for m in sys.modules if m.split('.')[0] in {NOT_INSTALLED!r})\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_bench_hands_its_arguments_to_the_harness():
    """``thinkingvit bench`` is ``python -m bench``: the harness's own parser answers, --help included."""
    done = subprocess.run([sys.executable, "-m", "service.cli", "bench", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "usage: python -m bench" in done.stdout
    assert "--smoke" in done.stdout and "--serve-args" in done.stdout


def test_bench_outside_a_checkout_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a folder with no bench/, and no checkout on sys.path
    monkeypatch.setattr(sys, "path", [p for p in sys.path if not (pathlib.Path(p or ".").resolve() / "bench").is_dir()])
    code, err = run_main(capsys, ["bench", "--smoke"])
    assert code == 2
    assert_one_line_error(err, "thinkingvit bench:", "source checkout")


def test_other_commands_still_refuse_unknown_arguments(capsys):
    with pytest.raises(SystemExit) as raised:
        main(["classify", "x.png", "--bogus"])
    assert raised.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
