"""bench.profile's sorting of py-spy samples into components (no server, no py-spy)."""

from bench.profile import COMPONENTS, breakdown, read_raw

RAW = """\
run;Runner.run (asyncio/runners.py:118) 40
run;Runner.run (asyncio/runners.py:118);RequestResponseCycle.run_asgi (uvicorn/x.py:1);until_disconnect (service/routes.py:9);answer (service/routes.py:1);decode_image (service/images.py:2);open (PIL/Image.py:3) 30
run;Runner.run (asyncio/runners.py:118);RequestResponseCycle.run_asgi (uvicorn/x.py:1);until_disconnect (service/routes.py:9);answer (service/routes.py:1);classify_image (service/routes.py:3);record_success (service/metrics.py:4);inc (prometheus_client/metrics.py:5) 5
run;Runner.run (asyncio/runners.py:118);RequestResponseCycle.run_asgi (uvicorn/x.py:1);until_disconnect (service/routes.py:9);answer (service/routes.py:1);to_response (service/routes.py:6);readable (service/routes.py:7) 10
run;Runner.run (asyncio/runners.py:118);RequestResponseCycle.run_asgi (uvicorn/x.py:1);until_disconnect (service/routes.py:9);create_task (asyncio/tasks.py:1) 5
run;Thread._bootstrap (threading.py:1);WorkerThread.run (anyio/x.py:2);Condition.wait (threading.py:3) 100
"""


def test_samples_go_to_the_innermost_marked_component_and_waiting_is_left_out(tmp_path):
    raw = tmp_path / "api.txt"
    raw.write_text(RAW)
    result = breakdown(read_raw(raw), COMPONENTS["api_server"])
    assert result["busy_samples"] == 50  # the loop's poll and the idle worker thread are left out
    shares = {name: share * 50 for name, share in result["shares"].items() if share}
    assert shares == {
        "decode and preprocess (Pillow, numpy)": 30,
        "metrics": 5,  # inside the route and the disconnect watch, yet counted where it is spent
        "response body (top-k, JSON)": 10,  # readable lives in routes.py, but inside to_response
        "disconnect watch": 5,
    }
    assert result["top_own"][0] == {"function": "open (PIL/Image.py:3)", "share": 0.6}
