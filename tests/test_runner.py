"""The stage runner on its own: staged images, launched batches, carried tokens.

The served-equals-offline tests in test_service*.py check the runner through real processes; these
check what they cannot see: what the runner holds after each step, and a failed batch's inputs.
The CUDA tests (skipped without a GPU) check the page-locked staging and the copy stream.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.thinkingvit import confidence, create_model
from service.runner import STAGING_BUFFERS, StageRunner

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("tiny-test").eval()


def images(n: int, seed: int = 0) -> list[np.ndarray]:
    """n (C, H, W) float32 images of the tiny model, each its own array, as the engine receives them."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((1, 16, 16), dtype=np.float32) for _ in range(n)]


def offline(model, batch: list[np.ndarray]) -> list[tuple[list[float], np.ndarray]]:
    """Every stage on the whole batch, in one plain forward: (confidences, probabilities) per stage."""
    with torch.inference_mode():
        logits = model(torch.from_numpy(np.stack(batch)))
    return [(confidence(x).tolist(), x.softmax(-1).numpy()) for x in logits]


def test_staged_images_run_stage_0_and_carried_tokens_run_stage_1_as_the_plain_forward(model):
    runner = StageRunner(model, torch.device("cpu"))
    batch = images(5)
    runner.stage_images(list(range(5)), batch)
    assert set(runner.staged) == set(range(5)) and not runner.carried
    expected = offline(model, batch)

    first = runner.launch(0, list(range(5))).result()
    np.testing.assert_allclose(first.confidence, expected[0][0], rtol=1e-5, atol=1e-6)
    runner.carry([1, 3])
    assert not runner.staged, "stage 0 ran: no image is kept"
    assert set(runner.carried) == {1, 3}, "only the requests that go on keep tokens"

    second = runner.run_stage(1, [3, 1])
    np.testing.assert_allclose(second.probabilities, expected[1][1][[3, 1]], rtol=1e-5, atol=1e-6)
    runner.carry([])
    assert not runner.carried and not runner.staged


def test_a_batch_that_raises_keeps_its_staged_images_for_the_retry_and_release_frees_them(model, monkeypatch):
    runner = StageRunner(model, torch.device("cpu"))
    batch = images(4, seed=1)
    runner.stage_images([10, 11, 12, 13], batch)
    forward = model.forward_stage

    def fail_once(*args, **kwargs):
        monkeypatch.setattr(model, "forward_stage", forward)
        raise RuntimeError("injected")

    monkeypatch.setattr(model, "forward_stage", fail_once)
    with pytest.raises(RuntimeError, match="injected"):
        runner.launch(0, [10, 11])
    assert set(runner.staged) == {10, 11, 12, 13}

    retried = runner.run_stage(0, [11, 10])
    np.testing.assert_allclose(retried.confidence, [offline(model, batch)[0][0][i] for i in (1, 0)], rtol=1e-5)
    runner.carry([])
    runner.release([12, 13, 99])  # 99: never staged
    assert not runner.staged and not runner.carried


def test_stage_0_reads_each_image_as_it_was_when_admitted(model):
    """On a CPU the runner keeps the arrays it was given, without a copy, until the batch stacks
    them: the engine's arrays are read-only views of the received frames, which nothing rewrites."""
    runner = StageRunner(model, torch.device("cpu"))
    frames = [image.tobytes() for image in images(3, seed=2)]
    views = [np.frombuffer(f, dtype=np.float32).reshape(1, 16, 16) for f in frames]
    runner.stage_images([0, 1, 2], views)
    assert all(runner.staged[i].image is views[i] for i in range(3))
    result = runner.run_stage(0, [0, 1, 2])
    np.testing.assert_allclose(result.confidence, offline(model, views)[0][0], rtol=1e-5, atol=1e-6)


@CUDA
def test_on_a_gpu_images_are_on_the_device_once_staged_and_answers_match_the_cpu(model):
    """Staged images upload at admission, before any batch is planned; more images than one staging
    buffer holds, and more uploads than there are buffers, give the CPU's answers."""
    device = torch.device("cuda")
    gpu = StageRunner(create_model("tiny-test").eval(), device, staging_batch=4)
    gpu.model.load_state_dict(model.state_dict())
    batch = images(4 * (STAGING_BUFFERS + 1) + 3, seed=3)
    ids = list(range(len(batch)))
    gpu.stage_images(ids[:7], batch[:7])  # two pieces of one buffer each
    for start in range(7, len(batch), 3):  # then uploads of 3 until the buffers have all been reused
        gpu.stage_images(ids[start : start + 3], batch[start : start + 3])
    assert all(gpu.staged[r].image.device.type == "cuda" for r in ids)
    assert len({id(gpu.staged[r].uploaded) for r in ids}) > STAGING_BUFFERS

    pending = gpu.launch(0, ids[:8])
    gpu.stage_images([100], images(1, seed=4))  # while the batch computes, as the engine does
    result = pending.result()
    expected = offline(model, batch[:8])[0]
    np.testing.assert_allclose(result.confidence, expected[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(result.probabilities, expected[1], rtol=1e-4, atol=1e-5)
    assert result.compute_s > 0
    gpu.carry(ids[:8])
    rest = gpu.run_stage(0, ids[8:])
    np.testing.assert_allclose(rest.confidence, offline(model, batch[8:])[0][0], rtol=1e-4, atol=1e-5)
    gpu.carry([])
    gpu.release([100])
    assert set(gpu.staged) == set() and set(gpu.carried) == set(ids[:8])
