"""Settings, environment variables, the serve command's flags, and startup checks."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from model.thinkingvit import create_model
from service.cli import build_parser, main, serve_settings
from service.settings import Settings
from service.runner import StageRunner


def test_environment_variables_are_read(monkeypatch, tiny_checkpoint):
    monkeypatch.setenv("THINKINGVIT_CHECKPOINT", str(tiny_checkpoint))
    monkeypatch.setenv("THINKINGVIT_MAX_QUEUE_SIZE", "7")
    monkeypatch.setenv("THINKINGVIT_MAX_BATCH_SIZE", "[16, 8]")
    monkeypatch.setenv("THINKINGVIT_DEFAULT_THRESHOLD", "0.6")
    settings = Settings()
    assert settings.checkpoint == tiny_checkpoint and settings.max_queue_size == 7
    assert settings.max_batch_size == [16, 8] and settings.default_threshold == 0.6


def test_flags_override_environment(monkeypatch, tiny_checkpoint):
    monkeypatch.setenv("THINKINGVIT_PORT", "9001")
    monkeypatch.setenv("THINKINGVIT_MAX_QUEUE_SIZE", "7")
    args = build_parser().parse_args(
        ["serve", "--checkpoint", str(tiny_checkpoint), "--port", "9002", "--max-wait-ms", "1", "5"]
    )
    settings = serve_settings(args)
    assert settings.port == 9002 and settings.max_wait_ms == [1.0, 5.0] and settings.max_queue_size == 7


@pytest.mark.parametrize(
    "overrides",
    [
        {"default_threshold": 1.5}, {"default_threshold": float("nan")}, {"max_batch_size": [0]},
        {"max_batch_size": []}, {"max_wait_ms": [-1.0]}, {"max_queue_size": 0}, {"autocast": "int8"},
        {"request_timeout_s": 0}, {"port": 70000},
    ],
)  # fmt: skip
def test_invalid_settings_are_refused(tiny_checkpoint, overrides):
    with pytest.raises(ValidationError):
        Settings(checkpoint=tiny_checkpoint, **overrides)


def test_per_stage_values(tiny_checkpoint):
    settings = Settings(checkpoint=tiny_checkpoint, max_batch_size=[8], max_wait_ms=[1.0, 4.0])
    assert settings.per_stage("max_batch_size", 2) == (8, 8)
    assert settings.per_stage("max_wait_ms", 2) == (1.0, 4.0)
    with pytest.raises(ValueError, match="3 stages"):
        settings.per_stage("max_wait_ms", 3)


def test_missing_checkpoint_names_it(tmp_path, capsys):
    missing = tmp_path / "absent.safetensors"
    with pytest.raises(ValidationError, match="no such file"):
        Settings(checkpoint=missing)
    assert main(["serve", "--checkpoint", str(missing)]) == 2
    assert "pass --checkpoint" not in capsys.readouterr().err


def test_process_plan():
    """auto: one API server per four cores on a CPU, the engine the rest, pinned apart."""
    from service.processes import plan_cpus

    plan = plan_cpus(None, None, pin=True, gpu=False)
    cores = len(__import__("os").sched_getaffinity(0))
    assert plan.api_servers == max(1, cores // 4)
    if cores > 1:
        assert plan.api_cpus.isdisjoint(plan.engine_cpus)
        assert plan.engine_threads == len(plan.engine_cpus)
    assert plan_cpus(3, 2, pin=False, gpu=False) == plan_cpus(3, 2, pin=False, gpu=True)


def test_api_servers_and_engine_threads_take_auto_or_a_count(tiny_checkpoint):
    assert Settings(checkpoint=tiny_checkpoint, api_servers="auto").auto_or("api_servers") is None
    assert Settings(checkpoint=tiny_checkpoint, engine_threads=3).auto_or("engine_threads") == 3
    with pytest.raises(ValidationError):
        Settings(checkpoint=tiny_checkpoint, api_servers=0)


def test_autocast_needs_cuda():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        StageRunner(create_model("tiny-test"), torch.device("cpu"), autocast="bfloat16")
