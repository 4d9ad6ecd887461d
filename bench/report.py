"""The benchmark's outputs: goals of issue #7, the JSON, the Markdown tables and two PNG plots."""
from __future__ import annotations

import json
import math
from pathlib import Path

GOALS = {  # name: (target, what)
    "elastic_gain": (2.0, "peak throughput at the within-0.3-pp threshold / at threshold 1"),
    "served_over_limit": (0.85, "served / analytic limit at the within-0.3-pp threshold"),
    "vs_litserve": (2.0, "our peak at the within-0.3-pp threshold / LitServe's peak (full model)"),
    "vs_fastapi": (5.0, "our peak at the within-0.3-pp threshold / per-request FastAPI's peak"),
    "p99_over_p50": (3.0, "p99 / p50 at 70 % of peak (open loop), our server at the within-0.3-pp threshold"),
}


def ratio(a: float, b: float) -> float:
    """a / b, NaN when b is zero or missing (a run with no answers)."""
    return a / b if b else math.nan


def elastic_name(result: dict) -> str:
    return f"ours@{result['elastic_threshold']['threshold']:g}"


def row_at(rows: list[dict], threshold: float) -> dict:
    return next(r for r in rows if r["threshold"] == threshold)


def goals(result: dict) -> list[dict]:
    systems, t = result["systems"], result["elastic_threshold"]["threshold"]
    peak = {name: s["peak"]["images_per_s"] for name, s in systems.items()}
    ours = peak[elastic_name(result)]
    single, batch = row_at(result["thresholds"], t), row_at(result["batch_endpoint"], t)
    values = {
        "elastic_gain": ratio(ours, peak["ours@1"]),
        "served_over_limit": single["limit"]["served_over_limit"],
        "vs_litserve": ratio(ours, peak["litserve"]) if "litserve" in peak else None,
        "vs_fastapi": ratio(ours, peak["fastapi"]),
        "p99_over_p50": systems[elastic_name(result)]["open_loop"]["p99_over_p50"],
    }
    out = []
    for name, (target, what) in GOALS.items():
        value = values[name]
        met = None if value is None or math.isnan(value) else (value <= target if name == "p99_over_p50" else value >= target)
        out.append({"goal": name, "what": what, "target": target, "value": value, "met": met})
    out.append({  # the same two ratios through the batch endpoint, for the record
        "goal": "batch_endpoint", "what": "batch endpoint: elastic gain and served / limit",
        "target": None, "met": None,
        "value": {"elastic_gain": ratio(batch["images_per_s"], row_at(result["batch_endpoint"], 1.0)["images_per_s"]),
                  "served_over_limit": batch["limit"]["served_over_limit"]},
    })  # fmt: skip
    return out


# ------------------------------------------------------------------------------------ files


def write(result: dict, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = result["meta"]
    stem = out_dir / f"{meta['date'][:10]}-{meta['machine']}{'-smoke' if meta['smoke'] else ''}"
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    curves, bars = Path(f"{stem}-curves.png"), Path(f"{stem}-thresholds.png")
    json_path.write_text(json.dumps(finite(result), indent=2, allow_nan=False) + "\n")
    plot_curves(result, curves)
    plot_thresholds(result, bars)
    md_path.write_text(markdown(result, curves.name, bars.name))
    return [json_path, md_path, curves, bars]


def finite(value):
    """NaN and infinities (e.g. a latency with no samples) become null: strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def _f(x, spec: str = ".0f") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return format(x, spec)


def _met(met: bool | None) -> str:
    return {True: "met", False: "not met", None: "–"}[met]


def headline(result: dict) -> str:
    """The table the README shows: per threshold, then peers, then goals."""
    return "\n".join([threshold_table(result["thresholds"], "single-image `/classify`"),
                      "", peers_table(result), "", goals_table(result)])


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table: the header row, its separator, one line per row of cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows])


def threshold_table(rows: list[dict], title: str) -> str:
    header = [f"threshold ({title})", "accuracy % (calibration)", "exit share s0 / s1", "GMACs / image", "images/s",
              "p50 / p95 / p99 ms", "analytic limit images/s", "served / limit"]  # fmt: skip
    cells = []
    for r in rows:
        lat, share = r["latency_ms"], r["check"].get("exit_share", [math.nan, math.nan])
        cells.append([
            f"{r['threshold']:g}", f"{_f(r['check']['accuracy'], '.2f')} ({_f(r.get('calibrated_accuracy'), '.2f')})",
            f"{_f(share[0], '.2f')} / {_f(share[1], '.2f')}", _f(r["check"].get("gmacs_per_image"), ".4f"),
            _f(r["images_per_s"]), f"{_f(lat['p50'], '.1f')} / {_f(lat['p95'], '.1f')} / {_f(lat['p99'], '.1f')}",
            _f(r["limit"]["images_per_s"]), _f(r["limit"]["served_over_limit"], ".2f"),
        ])  # fmt: skip
    return table(header, cells)


def peers_table(result: dict) -> str:
    ours = result["systems"][elastic_name(result)]["peak"]["images_per_s"]
    header = ["system (single-image requests)", "accuracy % (checking client)", "peak images/s, wrk (connections)",
              "p50 / p99 ms at peak", f"{elastic_name(result)} / system"]  # fmt: skip
    cells = [
        [name, _f(s["check"]["accuracy"], ".2f"), f"{_f(p['images_per_s'])} ({p['concurrency']})",
         f"{_f(p['latency_ms']['p50'], '.1f')} / {_f(p['latency_ms']['p99'], '.1f')}",
         _f(ratio(ours, p["images_per_s"]), ".2f")]
        for name, s, p in ((name, s, s["peak"]) for name, s in result["systems"].items())
    ]  # fmt: skip
    return table(header, cells)


def goals_table(result: dict) -> str:
    cells = [
        [g["what"], f"{'<=' if g['goal'] == 'p99_over_p50' else '>='} {g['target']:g}", _f(g["value"], ".2f"), _met(g["met"])]
        for g in result["goals"] if g["target"] is not None
    ]  # fmt: skip
    return table(["goal (issue #7)", "target", "measured", ""], cells)


def sweep_table(result: dict) -> str:
    concurrencies = sorted({p["concurrency"] for s in result["systems"].values() for p in s["sweep"]})
    cells = []
    for name, s in result["systems"].items():
        by_c = {p["concurrency"]: p for p in s["sweep"]}
        cells.append([name] + [
            f"{_f(by_c[c]['images_per_s'])} / {_f(by_c[c]['latency_ms']['p50'], '.1f')} / "
            f"{_f(by_c[c]['latency_ms']['p99'], '.1f')}" if c in by_c else "–"
            for c in concurrencies
        ])  # fmt: skip
    return table(["system"] + [f"c={c}" for c in concurrencies], cells)


def open_loop_table(result: dict) -> str:
    header = ["system", "offered req/s", "served images/s", "p50 ms", "p99 ms", "p99 / p50", "errors",
              "client CPU (cores)"]  # fmt: skip
    cells = [
        [name, _f(o["offered_rate"]), _f(o["images_per_s"]), _f(o["latency_ms"]["p50"], ".1f"),
         _f(o["latency_ms"]["p99"], ".1f"), _f(o["p99_over_p50"], ".2f"), str(sum(o["errors"].values()) + o["dropped"]),
         _f(o["client_cpu_cores"], ".2f")]
        for name, o in ((name, s["open_loop"]) for name, s in result["systems"].items())
    ]  # fmt: skip
    return table(header, cells)


def server_table(rows: list[dict]) -> str:
    header = ["threshold", "mean batch s0 / s1", "r", "in-server compute ms/image s0 / s1",
              "offline t1 / t2 ms/image (threads)", "CPU cores: client / server / other processes"]  # fmt: skip
    cells = []
    for r in rows:
        (s0, s1), lim = r["server"]["stages"], r["limit"]
        cells.append([
            f"{r['threshold']:g}", f"{_f(s0['mean_batch'], '.1f')} / {_f(s1['mean_batch'], '.1f')}",
            _f(r["server"]["r"], ".3f"), f"{_f(s0['compute_ms_per_image'], '.3f')} / {_f(s1['compute_ms_per_image'], '.3f')}",
            f"{_f(lim['t1_ms'], '.3f')} / {_f(lim['t2_ms'], '.3f')} ({lim['torch_threads']})",
            f"{_f(r['client_cpu_cores'], '.2f')} / {_f(r['server_cpu_cores'], '.2f')} / {_f(r.get('other_cpu_cores'), '.2f')}",
        ])  # fmt: skip
    return table(header, cells)


def settings_section(result: dict) -> str:
    lines = []
    for name, settings in result["systems_settings"].items():
        shown = ", ".join(f"{k}={v}" for k, v in settings.items())
        lines.append(f"- **{name}**: {shown}")
    top = max(result["meta"]["plan"]["sweep"])
    lines += ["", f"Tuning (full model, wrk with {top} connections, images/s; the best of each system ran everything):", ""]
    for name, rows in result.get("tuning", {}).items():
        if rows:
            lines.append(f"- {name}: " + "; ".join(f"{r['name']} {_f(r['images_per_s'])}" for r in rows))
    return "\n".join(lines)


def markdown(result: dict, curves_png: str, bars_png: str) -> str:
    m, plan = result["meta"], result["meta"]["plan"]
    e = result["elastic_threshold"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    return f"""# Serving benchmark: {m['machine']}, {m['date']}{' (smoke run: numbers mean nothing)' if m['smoke'] else ''}

Machine: {m['cpu']}, {m['cores']} cores, device {m['device']}; torch's default thread count
{m['default_torch_threads']}, each system's own count tuned (settings below). Python {m['python']}; {versions}.
Event loop and HTTP parser: {m['uvicorn_loop_http']}. Most CPU used by other processes during any
measured window: {_f(m['max_other_cpu_cores'], '.2f')} cores (anything above ~0.1 disturbs the figures).
Model: `{m['checkpoint']}` (preset {m['preset']}); images: {m['image_count']} {m['images']} as PNG.
Clients (each shares the machine with the servers; its CPU use is in the tables):
- images/s and closed-loop latency: {m['clients']['throughput']};
- accuracy, exit shares and GMACs: {m['clients']['checking']};
- open loop: {m['clients']['open_loop']}.

Whole run: {m['wall_s']} s.

Within-0.3-pp threshold: **{e['threshold']:g}** ({e['why']}).

## Goals

{goals_table(result)}

## Our server per threshold, single-image requests (wrk, {plan['concurrency']} connections, {plan['measure_s']:g} s each; accuracy, exit shares, GMACs: the checking client, {plan['check_images']} images)

{threshold_table(result['thresholds'], 'single')}

## The batch endpoint ({plan['batch_images']} images per request, wrk with {plan['batch_concurrency']} connections)

{threshold_table(result['batch_endpoint'], 'batch')}

Server side of the runs above (single-image first, then batch endpoint), from `/metrics`:

{server_table(result['thresholds'])}

{server_table(result['batch_endpoint'])}

## Peers at equal accuracy budget (peak of the concurrency sweep)

{peers_table(result)}

## Closed-loop concurrency sweep, wrk connections (images/s / p50 ms / p99 ms)

{sweep_table(result)}

![throughput vs latency]({curves_png})

## Open loop: Poisson arrivals at 70 % of each system's peak (the aiohttp client)

{open_loop_table(result)}

![per threshold]({bars_png})

## Settings of every system

{settings_section(result)}
"""


# ------------------------------------------------------------------------------------ plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(result: dict, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.6))
    for i, (name, s) in enumerate(result["systems"].items()):
        points = sorted(s["sweep"], key=lambda p: p["concurrency"])
        x = [p["images_per_s"] for p in points]
        color = f"C{i}"
        ax.plot(x, [p["latency_ms"]["p50"] for p in points], "o-", color=color, ms=4, label=f"{name} p50")
        ax.plot(x, [p["latency_ms"]["p99"] for p in points], "x--", color=color, ms=4, label=f"{name} p99")
        o = s["open_loop"]
        ax.plot([o["images_per_s"]] * 2, [o["latency_ms"]["p50"], o["latency_ms"]["p99"]], "s", color=color, ms=6,
                mfc="none")
    ax.set_yscale("log")
    ax.set_xlabel("throughput (images/s), wrk closed loop 1..64 connections; squares: open loop at 70 % (aiohttp)")
    ax.set_ylabel("latency (ms)")
    ax.set_title(f"Throughput vs latency, {result['meta']['machine']}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_thresholds(result: dict, path: Path) -> None:
    plt = _pyplot()
    single, batch = result["thresholds"], result["batch_endpoint"]
    labels = [f"{r['threshold']:g}" for r in single]
    series = {
        "single-image served": [r["images_per_s"] for r in single],
        "single-image limit": [r["limit"]["images_per_s"] for r in single],
        "batch endpoint served": [r["images_per_s"] for r in batch],
        "batch endpoint limit": [r["limit"]["images_per_s"] for r in batch],
    }
    fig, ax = plt.subplots(figsize=(7, 4.2))
    width = 0.2
    for i, (name, values) in enumerate(series.items()):
        ax.bar([k + (i - 1.5) * width for k in range(len(labels))], values, width, label=name,
               hatch="//" if "limit" in name else None, alpha=0.6 if "limit" in name else 1.0, color=f"C{i // 2}")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel("exit threshold")
    ax.set_yscale("log")
    ax.set_ylabel("images/s (log)")
    ax.set_title("Our server per threshold vs the analytic limit 1 / (t1 + r t2)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y", which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
