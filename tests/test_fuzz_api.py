"""Schemathesis fuzzes every route of our own OpenAPI schema against a real server.

Every operation in the schema gets generated requests, schema-valid and not (Hypothesis through
schemathesis): no response may be a 5xx, and every response must match the schema (status code
declared, content type declared, body valid). Bounded for CI by ``MAX_EXAMPLES`` per operation;
``THINKINGVIT_FUZZ_EXAMPLES`` raises it for a longer run.
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings
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
CAMPAIGN_BODY_BYTES = 512  # the explicit examples fit; some generated bodies of both routes do not


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
    """Small limits (422 for too many pixels or files). One request at a time never fills the
    queue and generated bodies stay small: 413 and 429 are the limits campaign's below."""
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
    case.call_and_validate(checks=CHECKS, timeout=30)


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
    case.call_and_validate(
        headers={"Authorization": f"Bearer {TOKEN}"}, checks=[*CHECKS, ignored_auth], timeout=30
    )


# The limits campaign: its own generated requests, sent several at a time to a server with small
# limits, so that it reaches the body limit (413) and the queue limit (429) as well as the model;
# it depends on no other test of this module and on no test order.
CAMPAIGN_LIMITS = dict(
    max_body_bytes=CAMPAIGN_BODY_BYTES, max_image_pixels=256 * 256, max_batch_images=4, max_queue_size=1,
    request_timeout_s=10,
)  # fmt: skip
CAMPAIGN_CONCURRENCY = 8


def generated_cases(schema, examples: int) -> list:
    """Hypothesis draws (explicit examples first, then generated) for every operation, unsent."""
    cases = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(operation.as_strategy())
        @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck),
                  phases=[Phase.explicit, Phase.generate], derandomize=True, database=None)  # fmt: skip
        def collect(case):
            cases.append(case)

        collect()
    return cases


def answer_statuses(case, response) -> list[int]:
    """The HTTP status, and for a batch answer each item's status too (they ride in a 200)."""
    statuses = [response.status_code]
    if response.status_code == 200 and case.operation.path == "/classify/batch":
        statuses += [item["error"]["status"] if item["error"] else 200 for item in response.json()["results"]]
    return statuses


@pytest.fixture(scope="module")
def limits_campaign(tiny_checkpoint):
    server = launch_server(checkpoint=tiny_checkpoint, **CAMPAIGN_LIMITS)
    try:
        schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json", wait_for_schema=60)
        cases = generated_cases(schema, MAX_EXAMPLES)
        answers: Counter = Counter()
        failures: list[str] = []

        def send(case):
            response = case.call(timeout=30)
            try:
                case.validate_response(response, checks=CHECKS)
            except Exception as e:  # schemathesis' FailureGroup: every failed check of this case
                failures.append(f"{case.operation.label}: {e}")
            for status in answer_statuses(case, response):
                answers[case.operation.label, status] += 1

        with ThreadPoolExecutor(CAMPAIGN_CONCURRENCY) as pool:  # every case twice, side by side
            list(pool.map(send, [case for case in cases for _ in range(2)]))
        return answers, failures
    finally:
        server.stop()


def test_the_fuzzer_reached_the_model_and_the_limits(limits_campaign):
    """The campaign's answers, all schema-conformant: valid images were classified, invalid
    parameters and bodies refused (422), oversized bodies refused (413) and a full queue
    answered 429 (a batch's items meet the queue limit only by chance, so 429 is required of
    ``/classify`` alone), through both classify routes."""
    answers, failures = limits_campaign
    print(f"\nlimits campaign answers by (operation, status): {dict(sorted(answers.items()))}")
    assert failures == []
    for answer in [("POST /classify", 200), ("POST /classify", 422), ("POST /classify", 413),
                   ("POST /classify", 429), ("POST /classify/batch", 200), ("POST /classify/batch", 422),
                   ("POST /classify/batch", 413), ("GET /v1/model", 200), ("GET /metrics", 200)]:  # fmt: skip
        assert answers[answer] > 0, f"the fuzzer never got {answer}"
