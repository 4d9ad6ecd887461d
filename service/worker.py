"""The inference worker: one thread per device running stage batches, holding carried tokens.

Everything that touches torch at serving time happens on this thread, so the event loop never
blocks on compute and the carried-token store needs no lock. Jobs run in submission order; a
sentinel stops the thread. The thread is a daemon so a batch stuck past the drain grace period
cannot keep the process alive.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from model.thinkingvit import ThinkingViT, confidence, exits_early

log = logging.getLogger(__name__)

BeforeBatchHook = Callable[[int, Sequence[int]], None]
"""Called on the worker thread before each stage batch with (stage, request ids): fault injection
for tests (raise to fail the batch, block to hold the worker)."""

AUTOCAST_DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
_STOP = object()


@dataclass
class Carried:
    """What a request that goes on to the next stage keeps on the device."""

    embedded: torch.Tensor  # (N, D) image embedding, computed once at stage 0
    tokens: torch.Tensor  # (N, d_s) output tokens of the stage it just ran, recycled next


@dataclass(frozen=True)
class StageResult:
    exited: list[bool]  # per request: answered at this stage (always True at the last stage)
    confidence: list[float]  # per request, at this stage
    probabilities: list[list[float] | None]  # per request: softmax over classes if exited, else None
    compute_s: float  # wall time of the batch on the device


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Worker:
    def __init__(
        self,
        model: ThinkingViT,
        device: torch.device,
        autocast: str = "float32",
        before_batch: BeforeBatchHook | None = None,
    ):
        if AUTOCAST_DTYPES[autocast] is not None and device.type != "cuda":
            raise ValueError(f"autocast {autocast} needs a CUDA device, got {device}")
        self.model, self.device = model.to(device).eval(), device
        self.autocast_dtype = AUTOCAST_DTYPES[autocast]
        self.before_batch = before_batch
        self.carried: dict[int, Carried] = {}  # by request id; touched only on the worker thread
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=f"thinkingvit-{device}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ called from the event loop

    def submit(self, fn: Callable, *args) -> Future:
        """Run ``fn(*args)`` on the worker thread, after every job submitted before it."""
        future: Future = Future()
        self._jobs.put((future, fn, args))
        return future

    def close(self) -> None:
        self._jobs.put(_STOP)

    # ------------------------------------------------------------------ run on the worker thread

    def run_stage(
        self,
        stage: int,
        request_ids: Sequence[int],
        thresholds: Sequence[float],
        images: Sequence[torch.Tensor] | None = None,
    ) -> StageResult:
        """One stage on one batch: stage 0 takes CPU ``images`` (C, H, W), later stages the
        carried tokens of ``request_ids``. Requests that go on keep their tokens here. If the
        batch raises, the carried tokens it read stay, so the caller can retry or release them."""
        try:
            if self.before_batch is not None:
                self.before_batch(stage, request_ids)
            return self._run_stage(stage, request_ids, thresholds, images)
        except torch.OutOfMemoryError:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # give the caching allocator's blocks back before a retry
            raise

    def _run_stage(self, stage, request_ids, thresholds, images) -> StageResult:
        start = time.perf_counter()
        with torch.inference_mode(), self._autocast():
            embedded, recycled = self._stage_inputs(stage, request_ids, images)
            logits, tokens = self.model.forward_stage(stage, embedded, recycled)
            conf = confidence(logits)  # (B,)
            if stage == self.model.num_stages - 1:
                exited = torch.ones_like(conf, dtype=torch.bool)
            else:
                limits = torch.tensor(thresholds, dtype=conf.dtype, device=self.device)
                exited = exits_early(conf, limits)  # (B,)
            self._carry(request_ids, ~exited, embedded, tokens)
            probs = logits.float().softmax(-1)  # (B, classes)
            exited_list, conf_list, probs_list = exited.tolist(), conf.tolist(), probs.cpu().tolist()
        return StageResult(
            exited=exited_list,
            confidence=conf_list,
            probabilities=[p if e else None for p, e in zip(probs_list, exited_list)],
            compute_s=time.perf_counter() - start,
        )

    def release(self, request_ids: Sequence[int]) -> None:
        """Free the carried tokens of requests that will not run again (aborted, failed)."""
        for request_id in request_ids:
            self.carried.pop(request_id, None)

    def warm_up(self, max_batch_sizes: Sequence[int]) -> None:
        """Run every stage at batch 1 and at its max batch, so the first requests pay no setup."""
        cfg = self.model.config
        for batch in sorted({1, *max_batch_sizes}):
            images = [torch.zeros(cfg.in_chans, cfg.img_size, cfg.img_size)] * batch
            ids = [-1 - i for i in range(batch)]  # negative ids never clash with requests
            for stage in range(self.model.num_stages):
                self._run_stage(stage, ids, [1.0] * batch, images if stage == 0 else None)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------------ internals

    def _stage_inputs(self, stage, request_ids, images):
        if stage == 0:
            batch = torch.stack(list(images))  # (B, C, H, W) on the CPU
            if self.device.type == "cuda":
                batch = batch.pin_memory()
            batch = batch.to(self.device, non_blocking=True)
            return self.model.embed(batch), None  # (B, N, D)
        carried = [self.carried[r] for r in request_ids]  # kept until the batch succeeds (retries)
        embedded = torch.stack([c.embedded for c in carried])  # (B, N, D)
        return embedded, torch.stack([c.tokens for c in carried])  # (B, N, d_{s-1})

    def _carry(self, request_ids, goes_on: torch.Tensor, embedded, tokens) -> None:
        """Keep the survivors' tokens for the next stage; drop what the batch consumed."""
        self.release(request_ids)
        if not goes_on.any():
            return
        ids = [r for r, keep in zip(request_ids, goes_on.tolist()) if keep]
        kept = zip(embedded[goes_on].unbind(), tokens[goes_on].unbind())  # gathered survivors only
        for request_id, (e, t) in zip(ids, kept):
            self.carried[request_id] = Carried(e, t)

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not _STOP:
            future, fn, args = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # delivered to the caller, who fails the batch
                future.set_exception(e)
