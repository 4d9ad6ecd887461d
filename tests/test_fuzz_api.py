"""Schemathesis fuzzes every route of our own OpenAPI schema against a real server.

Every operation in the schema gets generated requests, schema-valid and not (Hypothesis through
schemathesis): no response may be a 5xx, and every response must match the schema (status code
declared, content type declared, body valid). Bounded for CI by ``MAX_EXAMPLES`` per operation;
``THINKINGVIT_FUZZ_EXAMPLES`` raises it for a longer run.
"""

from __future__ import annotations

import os
from collections import Counter

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import launch_server

MAX_EXAMPLES = int(os.environ.get("THINKINGVIT_FUZZ_EXAMPLES", "30"))
ANSWERS: Counter = Counter()  # (operation, status) over the whole run


@schemathesis.check
def no_server_error(ctx, response, case):
    """No 5xx, except the 504 that answers a deadline the client set itself (``timeout_ms``)."""
    if response.status_code == 504 and "timeout_ms" in (case.query or {}):
        return None
    return not_a_server_error(ctx, response, case)


CHECKS = [
    no_server_error, status_code_conformance, content_type_conformance,
    response_headers_conformance, response_schema_conformance,
]  # fmt: skip


@pytest.fixture(scope="module")
def fuzz_server(tiny_checkpoint):
    """Small limits, so the fuzzer reaches them: 413, 422 (pixels, batch size), 429."""
    server = launch_server(
        checkpoint=tiny_checkpoint, max_body_bytes=64 * 1024, max_image_pixels=256 * 256,
        max_batch_images=4, max_queue_size=8, request_timeout_s=10,
    )  # fmt: skip
    yield server
    server.stop()


@pytest.fixture
def api_schema(fuzz_server):
    return schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json", wait_for_schema=60)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    phases=[Phase.explicit, Phase.generate],
    derandomize=True,
)
def test_api_conforms_to_its_schema(case):
    response = case.call_and_validate(checks=CHECKS, timeout=30)
    ANSWERS[case.operation.label, response.status_code] += 1


TOKEN = "fuzz-token"


@pytest.fixture(scope="module")
def token_server(tiny_checkpoint):
    server = launch_server(checkpoint=tiny_checkpoint, api_token=TOKEN, max_batch_images=4)
    yield server
    server.stop()


@pytest.fixture
def api_schema_with_token(token_server):
    return schemathesis.openapi.from_url(f"{token_server.url}/openapi.json", wait_for_schema=60)


schema_with_token = schemathesis.pytest.from_fixture("api_schema_with_token")


@schema_with_token.parametrize()
@settings(
    max_examples=max(5, MAX_EXAMPLES // 3),
    deadline=None,
    suppress_health_check=list(HealthCheck),
    phases=[Phase.explicit, Phase.generate],
    derandomize=True,
)
def test_api_with_a_token_conforms_and_enforces_it(case):
    """With a token set: the same checks with the token sent, and ``ignored_auth``: the routes
    the schema marks as secured answer 401 without it (the others stay open)."""
    response = case.call_and_validate(
        headers={"Authorization": f"Bearer {TOKEN}"}, checks=[*CHECKS, ignored_auth], timeout=30
    )
    ANSWERS[f"token {case.operation.label}", response.status_code] += 1


def test_the_fuzzer_reached_the_model_and_the_limits():
    """Runs after the fuzzing above (same module): valid images were classified, and invalid
    parameters and bodies were refused, through both classify routes."""
    print(f"\nfuzzed requests by (operation, status): {dict(sorted(ANSWERS.items()))}")
    for answer in [("POST /classify", 200), ("POST /classify", 422), ("POST /classify/batch", 200),
                   ("POST /classify/batch", 422), ("GET /v1/model", 200), ("GET /metrics", 200),
                   ("token POST /classify", 200), ("token POST /classify/batch", 200)]:  # fmt: skip
        assert ANSWERS[answer] > 0, f"the fuzzer never got {answer}"
