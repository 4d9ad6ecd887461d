"""The analytic limit: per-stage offline time measured in-process, combined as 1 / (t1 + r * t2).

t1 is the time per image of stage 0 (embedding, stage 0, the exit rule) at the mean stage-0 batch
the server ran, t2 the time per image of the last stage at the server's mean last-stage batch, r
the share of images the server sent on. This is the paper's throughput model: perfect re-batching,
no HTTP, no decoding, no queueing. Only two-stage models get a limit (every preset served here).
"""
from __future__ import annotations

import statistics
import time

import torch
from prometheus_client.parser import text_string_to_metric_families

from model.thinkingvit import ThinkingViT, confidence

MIN_REPEATS = 5


class StageTimer:
    """Median per-image seconds of each stage at a batch size, cached per (stage, batch)."""

    def __init__(self, model: ThinkingViT, images: torch.Tensor, device: torch.device, min_s: float = 0.25):
        self.model, self.device, self.min_s = model.eval(), device, min_s  # min_s: timed per point
        self.images = images.to(device)  # (n, C, H, W) normalised, n >= the largest batch timed
        self.cache: dict[tuple[int, int], float] = {}

    def per_image_s(self, stage: int, batch: float) -> float:
        batch = max(1, min(round(batch), len(self.images)))
        if (stage, batch) not in self.cache:
            self.cache[(stage, batch)] = self._time(stage, batch) / batch
        return self.cache[(stage, batch)]

    @torch.inference_mode()
    def _time(self, stage: int, batch: int) -> float:
        images = self.images[:batch]
        model = self.model
        if stage == 0:
            def step():
                confidence(model.forward_stage(0, model.embed(images)).logits)
        else:
            embedded = model.embed(images)  # (B, N, D)
            tokens = None
            for s in range(stage):
                tokens = model.forward_stage(s, embedded, tokens).tokens  # (B, N, d_s)

            def step():
                confidence(model.forward_stage(stage, embedded, tokens).logits)
        step()  # warm-up
        times = []
        while len(times) < MIN_REPEATS or sum(times) < self.min_s:
            self._sync()
            start = time.perf_counter()
            step()
            self._sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def table(self) -> list[dict]:
        return [
            {"stage": s, "batch": b, "ms_per_image": 1000 * t, "images_per_s": 1 / t}
            for (s, b), t in sorted(self.cache.items())
        ]


def analytic_limit(t1: float, t2: float, r: float) -> float:
    """Images per second of perfect two-stage re-batching: 1 / (t1 + r * t2)."""
    return 1.0 / (t1 + r * t2)


# ------------------------------------------------------------------------------------ server metrics


def scrape(text: str) -> dict[str, float]:
    """The samples the harness needs from our server's /metrics, keyed 'name{stage}'."""
    wanted = (
        "thinkingvit_batch_size_sum", "thinkingvit_batch_size_count",
        "thinkingvit_stage_compute_seconds_sum", "thinkingvit_exits_total",
    )  # fmt: skip
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                out[f"{sample.name}{{{sample.labels.get('stage', '')}}}"] = sample.value
    return out


def server_stats(before: dict[str, float], after: dict[str, float], num_stages: int) -> dict:
    """Mean batch size, batches and in-server compute per stage between two scrapes, and r."""
    def delta(name: str, stage: int) -> float:
        key = f"{name}{{{stage}}}"
        return after.get(key, 0.0) - before.get(key, 0.0)

    stages = []
    for s in range(num_stages):
        batches = delta("thinkingvit_batch_size_count", s)
        images = delta("thinkingvit_batch_size_sum", s)
        compute = delta("thinkingvit_stage_compute_seconds_sum", s)
        stages.append({
            "stage": s, "batches": int(batches), "images": int(images),
            "mean_batch": images / batches if batches else 0.0,
            "compute_ms_per_image": 1000 * compute / images if images else 0.0,
        })  # fmt: skip
    # r: the share of answered images that ran the last stage (exits_total, not the batches), so a
    # request its client gave up on after stage 0 (wrk's in-flight ones when it stops) is not
    # counted as kept at stage 0.
    exits = [delta("thinkingvit_exits_total", s) for s in range(num_stages)]
    r = exits[-1] / sum(exits) if sum(exits) else 0.0
    return {"stages": stages, "answered": int(sum(exits)), "r": r}
