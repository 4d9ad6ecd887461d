"""Messages between the API servers and the engine core: msgspec headers, tensors as raw frames.

One ZeroMQ ROUTER socket in the engine core, one DEALER per API server process. A ROUTER knows
which peer sent each message, so answers go back to the API server that asked. Every message is a
multipart ZeroMQ message: a msgpack header and, for a new request, the preprocessed image as its
raw float32 bytes (no pickle, no copy into a Python list).

The engine never speaks HTTP: failures travel as a ``FailureKind`` and the API server chooses the
status.
"""

from __future__ import annotations

import enum

import msgspec


class FailureKind(enum.Enum):
    QUEUE_FULL = "queue_full"  # the global queue bound: the engine refused the request
    TIMEOUT = "timeout"  # its deadline passed while it waited
    BATCH_FAILED = "batch_failed"  # the batch it ran in raised
    OUT_OF_MEMORY = "out_of_memory"  # it did not fit on the device even alone
    BAD_INPUT = "bad_input"  # the image frame does not have the model's input shape
    ENGINE_GONE = "engine_gone"  # set by the API server itself: the engine process died


# ----------------------------------------------------------------------- API server -> engine


class Explain(enum.Enum):
    """What a request asks the engine to report besides its answer (the ``explain`` parameter)."""

    NONE = "none"  # the answer only
    STAGES = "stages"  # also the softmax of every stage that ran
    ALL = "all"  # run every stage whatever the threshold (the full model's cost) and report each


class Submit(msgspec.Struct, tag="submit", array_like=True):
    """A new request; the image follows as a second frame, float32 (C, H, W) in C order."""

    request_id: int  # unique within the sending API server
    threshold: float
    timeout_s: float  # the engine drops it once this has passed since arrival
    min_threshold: float | None = None  # the floor a latency SLO may lower it to; None: never lowered
    waited_s: float = 0.0  # spent in the API server before it was sent: a latency SLO counts it
    explain: Explain = Explain.NONE


class Abort(msgspec.Struct, tag="abort", array_like=True):
    """The client went away or timed out: never compute it, or stop after the running stage."""

    request_id: int


class Shutdown(msgspec.Struct, tag="shutdown", array_like=True):
    """From the launcher, once every API server has drained: finish the loop and exit."""


Inbound = Submit | Abort | Shutdown


# ----------------------------------------------------------------------- engine -> API server


class Answer(msgspec.Struct, tag="answer", array_like=True):
    request_id: int
    exit_stage: int  # 0-based stage that answered
    confidences: list[float]  # the exit rule's confidence at every stage that ran, in order
    probabilities: bytes  # float32 softmax over the classes at the exit stage
    queue_s: float  # summed over the stage queues it waited in
    compute_s: float  # summed over the batches it ran in
    threshold: float | None = None  # effective threshold at its exit (lowered under a latency SLO)
    degraded: bool = False  # load made it leave earlier than its requested threshold would have
    stage_probabilities: list[bytes] = []  # with explain only: float32 softmax at every stage that ran


class Failure(msgspec.Struct, tag="failure", array_like=True):
    request_id: int
    kind: FailureKind
    message: str


Outbound = Answer | Failure

_encoder = msgspec.msgpack.Encoder()
encode = _encoder.encode
decode_inbound = msgspec.msgpack.Decoder(Inbound).decode
decode_outbound = msgspec.msgpack.Decoder(Outbound).decode
