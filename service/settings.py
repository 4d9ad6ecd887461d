"""Every server setting in one place; each is also read from a ``THINKINGVIT_<NAME>`` variable."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_CHECKPOINT = Path(__file__).parent / "default_model" / "fmnist-3-6.safetensors"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="THINKINGVIT_", frozen=True)

    checkpoint: Path = Field(
        DEFAULT_CHECKPOINT, validate_default=True, description="model checkpoint to serve"
    )
    preset: str | None = Field(None, description="config for checkpoints without metadata")
    host: str = Field("127.0.0.1", description="interface to listen on (0.0.0.0 in containers)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0: any free port, logged at startup)")
    fd: int | None = Field(
        None, ge=0, description="serve on this inherited listening socket instead of host:port "
        "(socket activation; tests hand over a bound socket so no port can be taken meanwhile)",
    )
    device: str = Field("auto", description="'auto' (CUDA when present, else CPU), 'cpu', 'cuda:0', ...")
    autocast: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="compute dtype on CUDA; other than float32 needs a CUDA device"
    )
    api_servers: int | Literal["auto"] = Field(
        "auto", description="HTTP processes sharing the listening socket; auto: one per four cores "
        "on a CPU (at least one), all cores but one on a GPU",
    )
    engine_threads: int | Literal["auto"] = Field(
        "auto", description="torch threads of the engine core process; auto: one per core it owns "
        "on a CPU, 1 on a GPU",
    )
    cpu_affinity: bool = Field(
        True, description="pin the API servers to the first cores and the engine core to the rest, "
        "so the model's threads and HTTP handling never preempt each other",
    )
    attention_backend: Literal["auto", "triton", "sdpa"] = Field(
        "auto", description="attention implementation (see kernels.attention)"
    )
    default_threshold: float = Field(
        0.8, ge=0.0, le=1.0, allow_inf_nan=False, description="exit threshold when a request gives none"
    )
    latency_slo_ms: float | None = Field(
        None, gt=0, allow_inf_nan=False, description="latency objective, arrival to answer; under load "
        "the engine lowers thresholds (to each request's min_threshold) and answers requests waiting for "
        "a later stage from the stage they ran, instead of queueing or refusing. Unset: off, thresholds "
        "are never lowered",
    )
    min_threshold: float = Field(
        0.0, ge=0.0, le=1.0, allow_inf_nan=False, description="with latency_slo_ms: the lowest threshold "
        "load may lower a request to when it gives no min_threshold (0: as far as stage-1 answers)",
    )
    default_top_k: int = Field(5, ge=1, description="top-k classes returned when a request gives none")
    max_batch_size: list[int] = Field(
        [32], description="max batch per stage: one value for all stages, or one per stage"
    )
    max_wait_ms: list[float] = Field(
        [2.0], description="max wait of a partial batch per stage: one value, or one per stage"
    )
    max_queue_size: int = Field(256, ge=1, description="waiting requests before 429")
    request_timeout_s: float = Field(
        30.0, gt=0, allow_inf_nan=False, description="per-request deadline (504 after it)"
    )
    retry_after_s: int = Field(1, ge=0, description="Retry-After header sent with 429 and 503")
    max_body_bytes: int = Field(10 * 2**20, ge=1, description="request body limit (413 above)")
    max_image_pixels: int = Field(
        25_000_000, ge=1, description="decoded image size cap, width * height (decompression bombs)"
    )
    max_batch_images: int = Field(64, ge=1, description="images per POST /classify/batch")
    drain_grace_s: float = Field(
        30.0,
        ge=0,
        allow_inf_nan=False,
        description="on SIGTERM, how long in-flight requests may take before exit",
    )
    keep_alive_s: float = Field(
        75.0, gt=0, allow_inf_nan=False, description="how long an idle keep-alive connection stays open "
        "(uvicorn's timeout_keep_alive); above every balancer's idle timeout in front of the server "
        "(ALB 60 s, nginx 60 s, docker/haproxy 60 s), so a balancer never reuses a connection the "
        "server is closing at that moment",
    )
    engine_stall_s: float = Field(
        30.0, gt=0, allow_inf_nan=False, description="readiness fails while requests wait on an engine "
        "core that has finished no loop turn for this long (wedged: a balancer then stops sending here)",
    )
    api_token: SecretStr | None = Field(
        None,
        description="bearer token that /classify and /classify/batch require; unset: no authentication",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="server log level"
    )
    engine_hooks: str | None = Field(
        None, description="tests only: 'module:factory' returning EngineHooks, run inside the engine core"
    )

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint_exists(cls, path: Path) -> Path:
        if path == DEFAULT_CHECKPOINT and not path.is_file():
            raise ValueError(
                f"the shipped model {path} is missing from this install; "
                "serve another with --checkpoint PATH (or THINKINGVIT_CHECKPOINT)"
            )
        if not path.is_file():
            raise ValueError(f"checkpoint {path}: no such file")
        return path

    @field_validator("api_token")
    @classmethod
    def _token_not_blank(cls, token: SecretStr | None) -> SecretStr | None:
        if token is not None and not token.get_secret_value().strip():
            raise ValueError("api_token is empty; unset it to turn authentication off")
        return token

    @field_validator("api_servers", "engine_threads")
    @classmethod
    def _positive_or_auto(cls, value: int | str) -> int | str:
        if value != "auto" and value < 1:
            raise ValueError(f"must be >= 1 or 'auto', got {value}")
        return value

    @field_validator("max_batch_size")
    @classmethod
    def _positive_batches(cls, sizes: list[int]) -> list[int]:
        if not sizes or min(sizes) < 1:
            raise ValueError(f"max_batch_size needs values >= 1, got {sizes}")
        return sizes

    @field_validator("max_wait_ms")
    @classmethod
    def _non_negative_waits(cls, waits: list[float]) -> list[float]:
        if not waits or not all(math.isfinite(w) and w >= 0 for w in waits):
            raise ValueError(f"max_wait_ms needs finite values >= 0, got {waits}")
        return waits

    def auto_or(self, name: str) -> int | None:
        """An int-or-'auto' setting as an int, or None for auto."""
        value = getattr(self, name)
        return None if value == "auto" else value

    def per_stage(self, name: str, num_stages: int) -> tuple:
        """A per-stage list setting expanded to one value per stage."""
        values = getattr(self, name)
        if len(values) == 1:
            return tuple(values) * num_stages
        if len(values) != num_stages:
            raise ValueError(f"{name} has {len(values)} values; the model has {num_stages} stages")
        return tuple(values)
