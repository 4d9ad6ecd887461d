"""The stage runner: the model on its device and the carried tokens of requests between stages.

Torch only: no transport, no scheduling, no exit rule. The engine core calls it from its one loop,
so the carried-token store needs no lock. ``run_stage`` measures each request's confidence; the
scheduler decides who leaves; ``carry`` then keeps the tokens of those who go on.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from model.thinkingvit import ThinkingViT, confidence

AUTOCAST_DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Carried:
    """What a request that goes on to the next stage keeps on the device."""

    embedded: torch.Tensor  # (N, D) image embedding, computed once at stage 0
    tokens: torch.Tensor  # (N, d_s) output tokens of the stage it just ran, recycled next


@dataclass(frozen=True)
class StageResult:
    confidence: list[float]  # per request, the exit rule's confidence at this stage
    probabilities: np.ndarray  # (B, classes) float32 softmax at this stage
    compute_s: float  # wall time of the batch on the device


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class StageRunner:
    def __init__(self, model: ThinkingViT, device: torch.device, autocast: str = "float32"):
        if AUTOCAST_DTYPES[autocast] is not None and device.type != "cuda":
            raise ValueError(f"autocast {autocast} needs a CUDA device, got {device}")
        self.model, self.device = model.to(device).eval(), device
        self.autocast_dtype = AUTOCAST_DTYPES[autocast]
        self.carried: dict[int, Carried] = {}  # by request id
        self._outputs: tuple[Sequence[int], torch.Tensor, torch.Tensor] | None = None  # last batch
        cfg = model.config
        self.image_shape = (cfg.in_chans, cfg.img_size, cfg.img_size)  # (C, H, W)

    def run_stage(self, stage: int, request_ids: Sequence[int], images: np.ndarray | None = None) -> StageResult:
        """One stage on one batch: stage 0 takes ``images`` (B, C, H, W) float32 on the CPU, later
        stages the carried tokens of ``request_ids``. The batch's outputs wait for ``carry()``; if
        the batch raises, the carried tokens it read stay, so the caller can retry or release them.
        """
        try:
            return self._run_stage(stage, request_ids, images)
        except torch.OutOfMemoryError:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # give the caching allocator's blocks back before a retry
            raise

    def carry(self, moved_on: Sequence[int]) -> None:
        """After the scheduler's decision on the last batch: keep the tokens of the requests that go
        on to the next stage; the rest of what the batch read or made is dropped."""
        assert self._outputs is not None, "carry() without a batch"
        request_ids, embedded, tokens = self._outputs
        self._outputs = None
        self.release(request_ids)
        if not moved_on:
            return
        position = {r: i for i, r in enumerate(request_ids)}
        rows = torch.tensor([position[r] for r in moved_on], device=embedded.device)
        kept = zip(embedded[rows].unbind(), tokens[rows].unbind())  # gathered survivors only
        for request_id, (e, t) in zip(moved_on, kept):
            self.carried[request_id] = Carried(e, t)

    def release(self, request_ids: Sequence[int]) -> None:
        """Free the carried tokens of requests that will not run again (aborted, failed, expired)."""
        for request_id in request_ids:
            self.carried.pop(request_id, None)

    def warm_up(self, max_batch_sizes: Sequence[int]) -> None:
        """Run every stage at batch 1 and at its max batch, so the first requests pay no setup."""
        for batch in sorted({1, *max_batch_sizes}):
            images = np.zeros((batch, *self.image_shape), dtype=np.float32)
            ids = [-1 - i for i in range(batch)]  # negative ids never clash with requests
            for stage in range(self.model.num_stages):
                self._run_stage(stage, ids, images if stage == 0 else None)
                last = stage == self.model.num_stages - 1
                self.carry([] if last else ids)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------------ internals

    def _run_stage(self, stage, request_ids, images) -> StageResult:
        start = time.perf_counter()
        with torch.inference_mode(), self._autocast():
            embedded, recycled = self._stage_inputs(stage, request_ids, images)
            logits, tokens = self.model.forward_stage(stage, embedded, recycled)
            conf = confidence(logits)  # (B,)
            probs = logits.float().softmax(-1)  # (B, classes)
            conf_list, probs_array = conf.tolist(), probs.cpu().numpy()
        self._outputs = (list(request_ids), embedded, tokens)
        return StageResult(conf_list, probs_array, time.perf_counter() - start)

    def _stage_inputs(self, stage, request_ids, images):
        if stage == 0:
            batch = torch.from_numpy(images)  # (B, C, H, W) on the CPU
            if self.device.type == "cuda":
                batch = batch.pin_memory()  # page-locked, so the copy below runs asynchronously
            batch = batch.to(self.device, non_blocking=True)
            return self.model.embed(batch), None  # (B, N, D)
        carried = [self.carried[r] for r in request_ids]  # kept until the batch succeeds (retries)
        embedded = torch.stack([c.embedded for c in carried])  # (B, N, D)
        return embedded, torch.stack([c.tokens for c in carried])  # (B, N, d_{s-1})

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)
