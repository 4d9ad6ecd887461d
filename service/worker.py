"""The inference worker: one thread per device running stage batches, holding carried tokens.

Everything that touches torch at serving time happens on this thread, so the event loop never
blocks on compute and the carried-token store needs no lock. Jobs run in submission order; a
sentinel stops the thread. The thread is a daemon so a batch stuck past the drain grace period
cannot keep the process alive.

The compute itself (:class:`StageRunner`: the model and the carried tokens) runs on that thread, or,
with ``isolate=True``, in a child process (:class:`RunnerProcess`) that the thread drives over a
pipe. A child has its own interpreter lock: the eager model's hundreds of small op dispatches per
batch then no longer queue behind HTTP parsing and image decoding for the one lock of the server
process (on 2 CPU cores that contention made stage 0 four to six times slower than offline).
"""

from __future__ import annotations

import contextlib
import multiprocessing
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


class StageRunner:
    """The model on its device and the carried tokens of requests between stages."""

    def __init__(self, model: ThinkingViT, device: torch.device, autocast: str = "float32"):
        if AUTOCAST_DTYPES[autocast] is not None and device.type != "cuda":
            raise ValueError(f"autocast {autocast} needs a CUDA device, got {device}")
        self.model, self.device = model.to(device).eval(), device
        self.autocast_dtype = AUTOCAST_DTYPES[autocast]
        self.carried: dict[int, Carried] = {}  # by request id

    def carried_ids(self) -> set[int]:
        return set(self.carried)

    def run_stage(self, stage, request_ids, thresholds, images=None) -> StageResult:
        """One stage on one batch: stage 0 takes CPU ``images`` (B, C, H, W), later stages the
        carried tokens of ``request_ids``. Requests that go on keep their tokens here. If the
        batch raises, the carried tokens it read stay, so the caller can retry or release them."""
        try:
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
            images = torch.zeros(batch, cfg.in_chans, cfg.img_size, cfg.img_size)
            ids = [-1 - i for i in range(batch)]  # negative ids never clash with requests
            for stage in range(self.model.num_stages):
                self._run_stage(stage, ids, [1.0] * batch, images if stage == 0 else None)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def alive(self) -> bool:
        return True

    def close(self) -> None:
        pass

    def _stage_inputs(self, stage, request_ids, images):
        if stage == 0:
            batch = images  # (B, C, H, W) on the CPU
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


class RunnerProcess:
    """A :class:`StageRunner` in a spawned child process, driven over a pipe by one thread.

    Same methods as the runner; calls are strictly one at a time. Images cross as numpy arrays
    (plain pickled bytes), results as lists. The carried ids are mirrored here from the results, so
    counting them needs no round trip. Exceptions raised in the child are re-raised here; a child
    that died turns every later call into a ``RuntimeError``.
    """

    def __init__(self, model: ThinkingViT, device: torch.device, autocast: str = "float32"):
        if AUTOCAST_DTYPES[autocast] is not None and device.type != "cuda":
            raise ValueError(f"autocast {autocast} needs a CUDA device, got {device}")
        self.device = device
        self._carried: set[int] = set()
        context = multiprocessing.get_context("spawn")  # fork is unsafe with CUDA and threads
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(
            target=_serve_runner,
            args=(child_conn, model.config, model.cpu().state_dict(), str(device), autocast,
                  torch.get_num_threads()),
            name=f"thinkingvit-model-{device}",
            daemon=True,
        )  # fmt: skip
        self._process.start()
        child_conn.close()
        self._call("ping")  # raises here if the child cannot build the model

    def carried_ids(self) -> set[int]:
        return set(self._carried)

    def run_stage(self, stage, request_ids, thresholds, images=None) -> StageResult:
        array = None if images is None else images.numpy()
        result: StageResult = self._call("run_stage", stage, list(request_ids), list(thresholds), array)
        self._carried.difference_update(request_ids)
        self._carried.update(r for r, e in zip(request_ids, result.exited) if not e)
        return result

    def release(self, request_ids: Sequence[int]) -> None:
        self._call("release", list(request_ids))
        self._carried.difference_update(request_ids)

    def warm_up(self, max_batch_sizes: Sequence[int]) -> None:
        self._call("warm_up", list(max_batch_sizes))

    def alive(self) -> bool:
        return self._process.is_alive()

    def close(self) -> None:
        if self._process.is_alive():
            with contextlib.suppress(OSError):
                self._conn.send(None)
            self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.kill()
        self._conn.close()

    def _call(self, method: str, *args):
        try:
            self._conn.send((method, args))
            ok, value = self._conn.recv()
        except (EOFError, OSError) as e:
            raise RuntimeError(f"the model process is gone (exit code {self._process.exitcode})") from e
        if not ok:
            raise value
        return value


def _serve_runner(conn, config, state_dict, device: str, autocast: str, threads: int) -> None:
    """The child's loop: build the runner, then answer calls until ``None`` or a closed pipe."""
    from model.thinkingvit import create_model

    torch.set_num_threads(threads)
    try:
        model = create_model(config)
        model.load_state_dict(state_dict)
        runner = StageRunner(model, torch.device(device), autocast)
    except Exception as e:
        conn.send((False, RuntimeError(f"the model process could not start: {e!r}")))
        return
    while True:
        try:
            call = conn.recv()
        except EOFError:  # the server is gone
            return
        if call is None:
            return
        method, args = call
        try:
            if method == "run_stage":
                stage, ids, thresholds, array = args
                images = None if array is None else torch.from_numpy(array)
                value = runner.run_stage(stage, ids, thresholds, images)
            elif method == "ping":
                value = None
            else:
                value = getattr(runner, method)(*args)
            reply = (True, value)
        except Exception as e:
            reply = (False, e)
        try:
            conn.send(reply)
        except Exception as e:  # an exception that does not pickle
            conn.send((False, RuntimeError(f"{type(reply[1]).__name__}: {reply[1]} ({e})")))


class Worker:
    def __init__(
        self,
        model: ThinkingViT,
        device: torch.device,
        autocast: str = "float32",
        before_batch: BeforeBatchHook | None = None,
        isolate: bool = False,
    ):
        runner_class = RunnerProcess if isolate else StageRunner
        self.runner: StageRunner | RunnerProcess = runner_class(model, device, autocast)
        self.device = device
        self.before_batch = before_batch
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=f"thinkingvit-{device}", daemon=True)
        self._thread.start()

    @property
    def carried(self) -> set[int]:
        """Ids of requests whose tokens wait for their next stage."""
        return self.runner.carried_ids()

    def alive(self) -> bool:
        """False once the thread or the model process has died: the server can no longer answer."""
        return self._thread.is_alive() and self.runner.alive()

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
        carried tokens of ``request_ids`` (see :meth:`StageRunner.run_stage`)."""
        if self.before_batch is not None:
            self.before_batch(stage, request_ids)
        batch = None if images is None else torch.stack(list(images))  # (B, C, H, W)
        return self.runner.run_stage(stage, request_ids, thresholds, batch)

    def release(self, request_ids: Sequence[int]) -> None:
        self.runner.release(request_ids)

    def warm_up(self, max_batch_sizes: Sequence[int]) -> None:
        self.runner.warm_up(max_batch_sizes)

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not _STOP:
            future, fn, args = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # delivered to the caller, who fails the batch
                future.set_exception(e)
        self.runner.close()
