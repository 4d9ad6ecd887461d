"""The stage runner: the model on its device, the staged images of admitted requests, and the
carried tokens of requests between stages.

Torch only: no transport, no scheduling, no exit rule. The engine core calls it from its one loop,
so its stores need no lock. ``stage_images`` takes admitted requests' images towards the device;
``launch`` starts a batch and ``PendingStage.result`` waits for it and measures each request's
confidence; the scheduler decides who leaves; ``carry`` then keeps the tokens of those who go on.

On a GPU the engine takes input between ``launch`` and ``result``, while the device computes: the
images admitted then are copied into page-locked staging buffers (allocated once) and uploaded on a
copy stream of their own, so batch N+1's inputs reach the device during batch N's compute.
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
STAGING_BUFFERS = 4  # page-locked host buffers per GPU engine, used in turn: an upload from one
# overlaps the filling of the next, and a buffer is refilled only once its last upload has left it


@dataclass
class Carried:
    """What a request that goes on to the next stage keeps on the device."""

    embedded: torch.Tensor  # (N, D) image embedding, computed once at stage 0
    tokens: torch.Tensor  # (N, d_s) output tokens of the stage it just ran, recycled next


@dataclass(frozen=True)
class Staged:
    """An admitted request's image, waiting for its stage-0 batch."""

    image: np.ndarray | torch.Tensor  # (C, H, W): on a CPU the arrived array, on a GPU a device view
    uploaded: torch.cuda.Event | None = None  # GPU: recorded on the copy stream after its upload


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
    def __init__(self, model: ThinkingViT, device: torch.device, autocast: str = "float32", staging_batch: int = 32):
        """``staging_batch``: images per page-locked staging buffer on a GPU (the stage-0 max batch);
        more images admitted at once are uploaded in several pieces."""
        if AUTOCAST_DTYPES[autocast] is not None and device.type != "cuda":
            raise ValueError(f"autocast {autocast} needs a CUDA device, got {device}")
        self.model, self.device = model.to(device).eval(), device
        self.autocast_dtype = AUTOCAST_DTYPES[autocast]
        self.carried: dict[int, Carried] = {}  # by request id
        self.staged: dict[int, Staged] = {}  # by request id, until its stage-0 batch succeeds
        self._outputs: tuple[Sequence[int], torch.Tensor, torch.Tensor] | None = None  # last batch
        cfg = model.config
        self.image_shape = (cfg.in_chans, cfg.img_size, cfg.img_size)  # (C, H, W)
        self._staging: StagingBuffers | None = None
        if device.type == "cuda":
            self._staging = StagingBuffers(self.image_shape, staging_batch, device)

    def stage_images(self, request_ids: Sequence[int], images: Sequence[np.ndarray]) -> None:
        """Keep admitted requests' (C, H, W) float32 images until their stage-0 batch.

        On a CPU they stay the arrays they arrived as (no copy: the batch stacks them). On a GPU
        they are copied into a page-locked staging buffer and uploaded on the copy stream now, so
        the upload overlaps whatever batch the device is computing.
        """
        if self._staging is None:
            self.staged.update((r, Staged(image)) for r, image in zip(request_ids, images))
            return
        for start in range(0, len(request_ids), self._staging.batch):
            ids = request_ids[start : start + self._staging.batch]
            on_device, uploaded = self._staging.upload(images[start : start + self._staging.batch])
            self.staged.update((r, Staged(on_device[i], uploaded)) for i, r in enumerate(ids))

    def launch(self, stage: int, request_ids: Sequence[int]) -> PendingStage:
        """Start one stage on one batch: stage 0 reads the staged images of ``request_ids``, later
        stages their carried tokens. On a GPU this returns once the work is queued on the device;
        ``PendingStage.result`` waits for it. The batch's outputs then wait for ``carry()``; if the
        batch raises, the staged images and carried tokens it read stay, so the caller can retry or
        release them.
        """
        with _out_of_memory_frees_the_cache(self.device):
            return self._launch(stage, request_ids)

    def run_stage(self, stage: int, request_ids: Sequence[int], images: np.ndarray | None = None) -> StageResult:
        """One stage on one batch, nothing overlapped: ``images`` (B, C, H, W), if given, staged
        first, then ``launch`` and its result (warm-up, tests)."""
        if images is not None:
            self.stage_images(request_ids, list(images))
        return self.launch(stage, request_ids).result()

    def carry(self, moved_on: Sequence[int]) -> None:
        """After the scheduler's decision on the last batch: keep the tokens of the requests that go
        on to the next stage; the rest of what the batch read or made is dropped."""
        assert self._outputs is not None, "carry() without a batch"
        request_ids, embedded, tokens = self._outputs
        self._outputs = None
        self.release(request_ids)  # their staged images too: stage 0 has run
        if not moved_on:
            return
        position = {r: i for i, r in enumerate(request_ids)}
        rows = torch.tensor([position[r] for r in moved_on], device=embedded.device)
        kept = zip(embedded[rows].unbind(), tokens[rows].unbind())  # gathered survivors only
        for request_id, (e, t) in zip(moved_on, kept):
            self.carried[request_id] = Carried(e, t)

    def release(self, request_ids: Sequence[int]) -> None:
        """Free the staged images and carried tokens of requests that will not run again (aborted,
        failed, expired)."""
        for request_id in request_ids:
            self.carried.pop(request_id, None)
            self.staged.pop(request_id, None)

    def warm_up(self, max_batch_sizes: Sequence[int]) -> None:
        """Run every stage at batch 1 and at its max batch, so the first requests pay no setup."""
        for batch in sorted({1, *max_batch_sizes}):
            images = np.zeros((batch, *self.image_shape), dtype=np.float32)
            ids = [-1 - i for i in range(batch)]  # negative ids never clash with requests
            for stage in range(self.model.num_stages):
                self.run_stage(stage, ids, images if stage == 0 else None)
                last = stage == self.model.num_stages - 1
                self.carry([] if last else ids)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------------ internals

    def _launch(self, stage, request_ids) -> PendingStage:
        timer = _Timer(self.device)
        with torch.inference_mode(), self._autocast():
            embedded, recycled = self._stage_inputs(stage, request_ids)
            logits, tokens = self.model.forward_stage(stage, embedded, recycled)
            conf = confidence(logits)  # (B,)
            probs = logits.float().softmax(-1)  # (B, classes)
        timer.stop()
        self._outputs = (list(request_ids), embedded, tokens)
        return PendingStage(self.device, conf, probs, timer)

    def _stage_inputs(self, stage, request_ids):
        if stage == 0:
            staged = [self.staged[r] for r in request_ids]  # kept until the batch succeeds (retries)
            if self._staging is None:
                batch = torch.from_numpy(np.stack([s.image for s in staged]))  # (B, C, H, W)
            else:
                compute = torch.cuda.current_stream(self.device)
                for event in {id(s.uploaded): s.uploaded for s in staged}.values():
                    compute.wait_event(event)  # the batch reads its uploads only once they are done
                batch = torch.stack([s.image for s in staged])  # (B, C, H, W), on the device
            return self.model.embed(batch), None  # (B, N, D)
        carried = [self.carried[r] for r in request_ids]  # kept until the batch succeeds (retries)
        embedded = torch.stack([c.embedded for c in carried])  # (B, N, D)
        return embedded, torch.stack([c.tokens for c in carried])  # (B, N, d_{s-1})

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


@contextlib.contextmanager
def _out_of_memory_frees_the_cache(device: torch.device):
    """Re-raise a ``torch.OutOfMemoryError`` after giving CUDA's cached blocks back, so the
    engine's retry in halves starts from an emptied cache."""
    try:
        yield
    except torch.OutOfMemoryError:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        raise


class PendingStage:
    """A launched batch: ``result()`` waits for the device, once."""

    def __init__(self, device: torch.device, conf: torch.Tensor, probs: torch.Tensor, timer: _Timer):
        self._device, self._conf, self._probs, self._timer = device, conf, probs, timer

    def result(self) -> StageResult:
        with _out_of_memory_frees_the_cache(self._device):
            conf_list, probs_array = self._conf.tolist(), self._probs.cpu().numpy()  # waits for the device
        return StageResult(conf_list, probs_array, self._timer.seconds())


class _Timer:
    """A batch's compute time: CUDA events around its kernels on a GPU (the host meanwhile takes
    input, which a wall clock would count), the wall clock on a CPU, where launching is computing."""

    def __init__(self, device: torch.device):
        self._cuda = device.type == "cuda"
        if self._cuda:
            self._start, self._end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start_s = time.perf_counter()

    def stop(self) -> None:
        if self._cuda:
            self._end.record()
        else:
            self._elapsed_s = time.perf_counter() - self._start_s

    def seconds(self) -> float:
        """After the batch's results were read (on a GPU the end event is then complete)."""
        if not self._cuda:
            return self._elapsed_s
        self._end.synchronize()  # already passed: the results were copied after it on the same stream
        return self._start.elapsed_time(self._end) / 1000


class StagingBuffers:
    """Page-locked host buffers, allocated once and used in turn, and the copy stream that uploads
    from them: a pageable source makes a host-to-device copy synchronous and staged through the
    driver's own buffer, and pinning each batch anew costs a page-locked allocation or copy of its own."""

    def __init__(self, image_shape: tuple[int, int, int], batch: int, device: torch.device):
        self.batch, self.device = batch, device
        self._host = [torch.empty((batch, *image_shape), dtype=torch.float32).pin_memory() for _ in range(STAGING_BUFFERS)]
        self._last_upload: list[torch.cuda.Event | None] = [None] * STAGING_BUFFERS
        self._next = 0
        self._copy_stream = torch.cuda.Stream(device)
        self._compute_stream = torch.cuda.current_stream(device)

    def upload(self, images: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.cuda.Event]:
        """Up to ``batch`` (C, H, W) images -> (n, C, H, W) on the device, and the event after
        which it may be read; the copy is queued on the copy stream, not waited for."""
        i, n = self._next, len(images)
        self._next = (i + 1) % STAGING_BUFFERS
        if self._last_upload[i] is not None:
            self._last_upload[i].synchronize()  # its previous upload has left the buffer
        host = self._host[i][:n]
        np.stack(images, out=host.numpy())  # the one host copy, straight into page-locked memory
        with torch.cuda.stream(self._copy_stream):
            on_device = host.to(self.device, non_blocking=True)
            uploaded = torch.cuda.Event()
            uploaded.record(self._copy_stream)
        on_device.record_stream(self._compute_stream)  # allocated on the copy stream, read on this one
        self._last_upload[i] = uploaded
        return on_device, uploaded
