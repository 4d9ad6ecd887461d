"""The serving benchmark's harness: a smoke run against live servers must produce a well-formed report.

Speed is never asserted; only that every part ran, every throughput point came from wrk, every
system's answers were scored by the checking client, and every figure the report is built from is
a finite number.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SMOKE_LIMIT_S = 240  # a safety net for a hung run, not a timing assertion
STAGES = 2


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict, Path]:
    """``python -m bench --smoke`` in its own process: tiny random model, our server and the peers."""
    out, tmp = tmp_path_factory.mktemp("bench"), tmp_path_factory.mktemp("tmpdir")
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=SMOKE_LIMIT_S, check=False,
        env={**os.environ, "TMPDIR": str(tmp)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert not list(tmp.glob("thinkingvit-bench-*")), "the run left its server-log folder behind"
    (json_path,) = out.glob("*-smoke.json")
    return json.loads(json_path.read_text()), out


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def check_run(run: dict) -> None:
    """One load run's summary: throughput, latency percentiles and CPU shares."""
    assert run["requests"] > 0 and run["images"] >= run["requests"]
    assert finite(run["images_per_s"]) and run["images_per_s"] > 0
    for q in ("p50", "p90", "p95", "p99", "mean"):
        assert finite(run["latency_ms"][q]) and run["latency_ms"][q] > 0, q
    assert run["latency_ms"]["p50"] <= run["latency_ms"]["p99"]
    assert finite(run["client_cpu_cores"]) and finite(run["server_cpu_cores"])
    assert not run["errors"], run["errors"]


def check_point(point: dict) -> None:
    """A closed-loop throughput point: measured by wrk (wrk's own CPU time is the client's)."""
    assert point["client"] == "wrk"
    assert finite(point["steal_cpu_cores"]) and point["steal_cpu_cores"] >= 0
    check_run(point)


def check_scored(scored: dict) -> None:
    """The checking client's pass: every answer read and scored against its label."""
    assert scored["client"] == "aiohttp" and scored["images"] > 0
    assert finite(scored["accuracy"]) and 0 <= scored["accuracy"] <= 100
    assert not scored["errors"], scored["errors"]


def test_litserve_is_installed():
    """CI installs LitServe; without it the benchmark would silently leave its peer out."""
    assert importlib.util.find_spec("litserve") is not None, "litserve is not importable: pip install litserve"


def test_thresholds_cover_the_issue_list(smoke):
    result, _ = smoke
    elastic = result["elastic_threshold"]["threshold"]
    expected = sorted({0.0, 0.5, 0.8, 0.9, 1.0, elastic})
    assert [r["threshold"] for r in result["thresholds"]] == expected
    assert [r["threshold"] for r in result["batch_endpoint"]] == expected


@pytest.mark.parametrize("part", ["thresholds", "batch_endpoint"])
def test_threshold_rows_are_complete(smoke, part):
    result, _ = smoke
    for row in result[part]:
        check_point(row)
        check_scored(row["check"])
        share = row["check"]["exit_share"]
        assert len(share) == STAGES and math.isclose(sum(share), 1.0)
        assert finite(row["check"]["gmacs_per_image"]) and row["check"]["gmacs_per_image"] > 0
        stats = row["server"]
        assert 0 <= stats["r"] <= 1 and stats["stages"][0]["mean_batch"] >= 1
        limit = row["limit"]
        for key in ("t1_ms", "t2_ms", "images_per_s", "served_over_limit"):
            assert finite(limit[key]) and limit[key] > 0, key


def test_exit_rule_extremes(smoke):
    """Threshold 0 answers everything at stage 0, threshold 1 sends everything on."""
    result, _ = smoke
    for part in ("thresholds", "batch_endpoint"):
        rows = {r["threshold"]: r for r in result[part]}
        assert rows[0.0]["check"]["exit_share"] == [1.0, 0.0] and rows[0.0]["server"]["r"] == 0
        assert rows[1.0]["check"]["exit_share"] == [0.0, 1.0] and rows[1.0]["server"]["r"] == 1


def test_every_system_has_a_sweep_and_an_open_loop_run(smoke):
    result, _ = smoke
    systems = result["systems"]
    elastic = f"ours@{result['elastic_threshold']['threshold']:g}"
    assert {elastic, "ours@1", "fastapi", "litserve"} <= set(systems)  # no peer may drop out
    for name, system in systems.items():
        assert [p["concurrency"] for p in system["sweep"]] == result["meta"]["plan"]["sweep"], name
        for point in system["sweep"]:
            check_point(point)
        assert system["peak"] in system["sweep"]
        check_scored(system["check"])
        loop = system["open_loop"]
        assert loop["client"] == "aiohttp" and finite(loop["offered_rate"]) and loop["offered_rate"] > 0
        assert loop["requests"] > 0 and finite(loop["p99_over_p50"]) and loop["p99_over_p50"] >= 1
    check_point(systems["fastapi"]["batch_endpoint"])
    check_scored(systems["fastapi"]["batch_endpoint"]["check"])
    assert set(result["systems_settings"]) >= {"ours", "fastapi", "litserve"}


def test_goals_and_metadata(smoke):
    result, _ = smoke
    goals = {g["goal"]: g for g in result["goals"]}
    assert {"elastic_gain", "served_over_limit", "vs_fastapi", "vs_litserve", "p99_over_p50"} <= set(goals)
    for name in ("elastic_gain", "served_over_limit", "vs_fastapi", "vs_litserve", "p99_over_p50"):
        assert finite(goals[name]["value"]) and isinstance(goals[name]["met"], bool), name
    meta = result["meta"]
    assert meta["cores"] >= 1 and meta["default_torch_threads"] >= 1 and meta["smoke"] is True
    assert all(s["torch_threads"] >= 1 for s in result["systems_settings"].values())
    assert meta["versions"]["torch"] != "not installed"
    assert meta["versions"]["litserve"] != "not installed"
    assert meta["versions"]["wrk"] != "not installed"
    assert all(result["offline"]["stage_timings_by_threads"].values())


def test_markdown_and_plots_are_written(smoke):
    _, out = smoke
    (md,) = out.glob("*-smoke.md")
    text = md.read_text()
    for heading in ("## Goals", "## Our server per threshold", "## The batch endpoint", "## Peers",
                    "## Closed-loop concurrency sweep", "## Open loop", "## Settings of every system"):
        assert heading in text, heading
    for png in ("*-smoke-curves.png", "*-smoke-thresholds.png"):
        (path,) = out.glob(png)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gpu_run_smoke_reports_every_threshold_against_its_limit(tmp_path):
    """``python -m bench.gpu --smoke``: the GPU run's steps on the CPU with a tiny model. JPEG uploads
    over wrk, each threshold's batches from /metrics, and served / limit from offline timings."""
    proc = subprocess.run([sys.executable, "-m", "bench.gpu", "--smoke", "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=SMOKE_LIMIT_S, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    (path,) = tmp_path.glob("*-gpu-serving.json")
    result = json.loads(path.read_text())
    assert result["server"]["device"] == "cpu" and result["server"]["api_servers"] >= 1
    assert result["jpeg"]["mean_kb"] > 0
    rows = result["thresholds"]
    assert {"ours@0", "ours@1"} <= set(rows)
    for row in rows.values():
        assert row["images_per_s"] > 0 and row["non_2xx"] == 0 and not row["socket_errors"]
        assert finite(row["limit_images_per_s"]) and finite(row["served_over_limit"]) and row["served_over_limit"] > 0
    assert rows["ours@0"]["sent_on"] == 0 and rows["ours@1"]["sent_on"] == 1


def test_engine_core_run_smoke_reports_every_goal_per_round(tmp_path):
    """``python -m bench.engine_core`` at tiny counts (one round, one-second points, no warm-up): ours, the floor,
    LitServe and plain FastAPI all measured, and each goal, the open loop's p99 / p50 included, taken
    per round."""
    proc = subprocess.run([sys.executable, "-m", "bench.engine_core", "--seconds", "1", "--warmup-s", "0", "--repeats",
                           "1", "--images", "16", "--connections", "8", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=SMOKE_LIMIT_S, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    (path,) = tmp_path.glob("*-engine-core.json")
    result = json.loads(path.read_text())
    elastic = result["elastic_threshold"]
    for system in ("ours@0", f"ours@{elastic:g}", "ours@1", "floor", "litserve", "fastapi"):
        assert result[system]["images_per_s"] > 0 and result[system]["non_2xx"] == 0, system
        assert finite(result[system]["steal_cores"])
    (round_,) = result["rounds"]
    loop = round_["open_loop_70"]
    assert loop["rate"] > 0 and not loop["errors"] and finite(loop["p99_over_p50"]) and loop["p99_over_p50"] >= 1
    assert loop["busy_cores"] > 0 and loop["client_cores"] > 0 and loop["steal_cores"] >= 0
    assert set(result["goals_per_round"]) <= set(result["goals"])
    for name, value in result["goals"].items():
        assert finite(value), name  # the front-end figures are differences: any sign at tiny counts
    for name in ("ours_at_elastic_over_litserve", "ours_at_elastic_over_fastapi", "elastic_gain", "analytic_ratio"):
        assert result["goals"][name] > 0, name
    assert result["goals"]["p99_over_p50_at_70_percent_open_loop"] == loop["p99_over_p50"]
