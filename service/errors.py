"""The service's failures as one exception type: HTTP status, metric labels and a clear message."""

from __future__ import annotations

from service.transport import FailureKind


class ServiceError(Exception):
    """A classification that cannot be answered.

    ``outcome`` labels ``thinkingvit_requests_total``; ``reason`` (refusals before any queue only)
    labels ``thinkingvit_rejections_total``. Both come from the fixed tuples in ``metrics``.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        outcome: str,
        reason: str | None = None,
        retry_after_s: int | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message = status, message
        self.outcome, self.reason = outcome, reason
        self.code = code or reason or outcome  # the JSON body's "reason"
        self.headers = dict(headers or {})
        if retry_after_s is not None:
            self.headers["Retry-After"] = str(retry_after_s)

    def to_json(self) -> dict:
        return {"error": {"status": self.status, "reason": self.code, "message": self.message}}


def invalid(status: int, reason: str, message: str) -> ServiceError:
    """Bad client input (413, 415, 422): refused before reaching a queue."""
    return ServiceError(status, message, outcome="invalid", reason=reason)


def unauthorized() -> ServiceError:
    """No or a wrong bearer token, while the server requires one (RFC 6750)."""
    message = "this route needs the header 'Authorization: Bearer <token>' with the server's token"
    return ServiceError(
        401, message, outcome="invalid", reason="unauthorized",
        headers={"WWW-Authenticate": 'Bearer realm="thinkingvit"'},
    )  # fmt: skip


def refused(status: int, reason: str, message: str, retry_after_s: int) -> ServiceError:
    """No capacity or shutting down (429, 503): the client may retry later."""
    return ServiceError(status, message, outcome="rejected", reason=reason, retry_after_s=retry_after_s)


def from_engine(error, retry_after_s: int) -> ServiceError:
    """The status for an ``EngineError``: the engine says what happened, the edge what it means."""
    kind, message = error.kind, error.message
    if kind is FailureKind.QUEUE_FULL:
        return refused(429, "queue_full", message, retry_after_s)
    if kind is FailureKind.TIMEOUT:
        return ServiceError(504, message, outcome="timeout")
    if kind is FailureKind.OUT_OF_MEMORY:
        return ServiceError(503, message, outcome="error", retry_after_s=retry_after_s, code="out_of_memory")
    if kind is FailureKind.ENGINE_GONE:
        return ServiceError(503, message, outcome="error", retry_after_s=retry_after_s, code="engine_gone")
    return ServiceError(500, message, outcome="error")  # BATCH_FAILED, BAD_INPUT


def client_gone() -> ServiceError:
    """The client disconnected; nothing will read the answer (nginx's 499)."""
    return ServiceError(499, "client closed the request", outcome="cancelled")
