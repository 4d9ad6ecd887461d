"""The stage runner in the server's thread and in its own process give the same answers."""

import httpx
import pytest
import torch

from model.thinkingvit import create_model
from service.worker import RunnerProcess, StageRunner, Worker


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("tiny-test").eval()


def run_two_stages(runner, images, thresholds):
    ids = list(range(len(images)))
    first = runner.run_stage(0, ids, thresholds, images)
    on = [r for r, e in zip(ids, first.exited) if not e]
    carried = runner.carried_ids()
    second = runner.run_stage(1, on, [thresholds[r] for r in on]) if on else None
    return first, carried, second, runner.carried_ids()


def test_process_runner_matches_thread_runner(model):
    images = torch.randn(8, 1, 16, 16)
    thresholds = [0.0, 1.0] * 4  # half exit at stage 0, half go on
    local = StageRunner(create_model("tiny-test").eval(), torch.device("cpu"))
    local.model.load_state_dict(model.state_dict())
    remote = RunnerProcess(model, torch.device("cpu"))
    try:
        want, got = run_two_stages(local, images, thresholds), run_two_stages(remote, images, thresholds)
        assert got[0].exited == want[0].exited == [True, False] * 4
        assert got[1] == want[1] == {1, 3, 5, 7}  # the mirror of the child's carried tokens
        assert got[3] == want[3] == set()
        for w, g in ((want[0], got[0]), (want[2], got[2])):
            assert g.confidence == pytest.approx(w.confidence, abs=1e-6)
            for pw, pg in zip(w.probabilities, g.probabilities):
                assert (pw is None) == (pg is None) and (pw is None or pg == pytest.approx(pw, abs=1e-6))
    finally:
        remote.close()


def test_process_runner_errors_come_back(model):
    remote = RunnerProcess(model, torch.device("cpu"))
    try:
        remote.run_stage(0, [7], [1.0], torch.randn(1, 1, 16, 16))
        with pytest.raises(KeyError):  # stage 1 of a request that never ran stage 0
            remote.run_stage(1, [8], [1.0])
        assert remote.carried_ids() == {7}  # a failed batch changes nothing
        remote.release([7])
        assert remote.carried_ids() == set()
        remote._process.kill()
        remote._process.join()
        with pytest.raises(RuntimeError, match="model process is gone"):
            remote.run_stage(0, [9], [1.0], torch.randn(1, 1, 16, 16))
    finally:
        remote.close()


def test_worker_stops_its_process(model):
    worker = Worker(model, torch.device("cpu"), isolate=True)
    process = worker.runner._process
    worker.submit(worker.warm_up, [4]).result(60)
    worker.close()
    worker._thread.join(60)
    assert not process.is_alive() and process.exitcode == 0


@pytest.mark.parametrize("model_process", [False, True])
def test_served_in_either_mode(start_server, test_images, model_process):
    server = start_server(model_process=model_process)
    files = [("files", (f"{i}.png", image, "image/png")) for i, image in enumerate(test_images[:8])]
    response = httpx.post(f"{server.url}/classify/batch", params={"threshold": 0.5}, files=files, timeout=60)
    assert response.status_code == 200
    assert len(response.json()["results"]) == 8
    assert server.app.state.runtime.engine.worker.carried == set()


def test_a_dead_model_process_fails_liveness(start_server, test_images):
    server = start_server(model_process=True)
    process = server.app.state.runtime.engine.worker.runner._process
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "alive"}
    process.kill()
    process.join()
    response = httpx.post(f"{server.url}/classify", files={"file": ("a.png", test_images[0], "image/png")}, timeout=60)
    assert response.status_code == 500 and "model process is gone" in response.json()["error"]["message"]
    assert httpx.get(f"{server.url}/healthz").status_code == 503
    assert httpx.get(f"{server.url}/readyz").json() == {"status": "dead"}
    assert httpx.get(f"{server.url}/v2/health/ready").status_code == 503
