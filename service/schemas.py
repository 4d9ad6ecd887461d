"""Response bodies of the HTTP API (pydantic models, so the OpenAPI docs show them)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class TopClass(BaseModel):
    label: str
    class_index: int
    probability: float


class Timings(BaseModel):
    queue_ms: float = Field(description="time spent waiting in the stage queues")
    compute_ms: float = Field(description="wall time of the stage batches this image ran in")
    total_ms: float = Field(description="from request arrival to answer, decoding included")


class Classification(BaseModel):
    label: str = Field(description="class name of the top class")
    class_index: int
    confidence: float = Field(description="the exit rule's confidence at the exit stage, in [0, 1]")
    top_k: list[TopClass]
    exit_stage: int = Field(description="0-based stage that answered")
    stages_run: int
    heads_used: int = Field(description="attention heads per layer at the exit stage")
    gmacs: float = Field(description="compute spent on this image")
    threshold: float = Field(description="exit threshold applied")
    timings: Timings


class ErrorDetail(BaseModel):
    status: int
    reason: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


class BatchItem(BaseModel):
    index: int = Field(description="position of the file part in the request")
    filename: str | None = None
    result: Classification | None = None
    error: ErrorDetail | None = None


class BatchResponse(BaseModel):
    results: list[BatchItem]
