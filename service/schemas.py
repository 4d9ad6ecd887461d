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


class StageExplanation(BaseModel):
    stage: int = Field(description="0-based")
    heads: int = Field(description="attention heads per layer at this stage")
    confidence: float = Field(description="the exit rule's confidence after this stage")
    top_k: list[TopClass]
    exit: bool = Field(description="the stage the image left at under its threshold")
    exit_gmacs: float = Field(description="compute of an image that exits at this stage")


class Explanation(BaseModel):
    mode: str = Field(description="stages: the stages that ran; all: every stage, run whatever the threshold")
    stages: list[StageExplanation]
    full_gmacs: float = Field(description="compute of the full model, every stage")


class Classification(BaseModel):
    label: str = Field(description="class name of the top class")
    class_index: int
    confidence: float = Field(description="the exit rule's confidence at the exit stage, in [0, 1]")
    stage_confidences: list[float] = Field(
        description="the confidence after every stage that ran, in order: why the image went on"
    )
    top_k: list[TopClass]
    exit_stage: int = Field(description="0-based stage that answered")
    stages_run: int = Field(description="stages computed: exit_stage + 1, or all of them with explain=all")
    heads_used: int = Field(description="attention heads per layer at the exit stage")
    gmacs: float = Field(description="compute spent on this image (the full model's with explain=all)")
    threshold: float = Field(
        description="exit threshold applied: the requested one, or lower under load with latency_slo_ms"
    )
    requested_threshold: float = Field(description="the threshold asked for (or picked by target_accuracy)")
    degraded: bool = Field(
        description="load made this image leave earlier than requested_threshold would have: a lowered "
        "threshold, or answered from an earlier stage to hold the latency SLO"
    )
    timings: Timings
    explain: Explanation | None = Field(None, description="only with ?explain=stages|all")


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


class StageInfo(BaseModel):
    stage: int = Field(description="0-based")
    heads: int = Field(description="attention heads per layer")
    width: int = Field(description="embedding width the stage uses")
    gmacs: float = Field(description="compute of this stage alone")
    exit_gmacs: float = Field(description="compute of a request that exits at this stage")


class ModelInfo(BaseModel):
    checkpoint: str = Field(description="file name of the served checkpoint")
    preset: str | None
    domain: str = Field(
        description="what images the model was trained on; others still get one of its labels "
        "(the exit confidence is not an out-of-distribution detector)"
    )
    stages: list[StageInfo]
    num_classes: int
    class_names: list[str]
    img_size: int
    in_chans: int
    config: dict = Field(description="the model config, as stored in the checkpoint")
    preprocess: dict = Field(description="resize, crop and normalisation applied to uploads")
    calibration: dict | None = Field(
        description="the checkpoint's threshold sweep, if any; accuracies are fractions in [0, 1]"
    )
    default_threshold: float
    device: str
    autocast: str
    recommended: dict | None = Field(
        None, description="with ?target_accuracy: the cheapest calibration row reaching it"
    )
