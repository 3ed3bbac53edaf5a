"""What a module actor reports: its state and progress, as data (the scheduler decides)."""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, ConfigDict, Field


class ModuleState(str, Enum):
    created = "created"
    waiting_upstream = "waiting_upstream"
    training = "training"
    publishing = "publishing"
    final = "final"
    failed = "failed"
    stopped = "stopped"

    @property
    def done(self) -> bool:
        return self in (ModuleState.final, ModuleState.failed, ModuleState.stopped)


class ModuleStatus(BaseModel):
    model_config = ConfigDict(extra="forbid")

    module: str = Field(description="Module name.")
    state: ModuleState = Field(ModuleState.created, description="Where the module is in its lifecycle.")
    epoch: int = Field(0, description="Epochs completed (settle epochs included).")
    target_epochs: int = Field(0, description="Epochs planned before settling on the final upstream.")
    step: int = Field(0, description="Optimizer steps completed.")
    loss: float | None = Field(None, description="Mean training loss of the last epoch.")
    upstream_version: int | None = Field(None, description="Upstream version the current epoch trains on.")
    upstream_final: bool = Field(False, description="Whether that upstream version is final.")
    published: list[int] = Field(default_factory=list, description="Versions this module committed, oldest first.")
    final_version: int | None = Field(None, description="The module's final version, once committed.")
    samples_per_second: float | None = Field(None, description="Training throughput of the last epoch.")
    train_seconds: float = Field(0.0, description="Seconds spent in training steps.")
    publish_rows: int | None = Field(None, description="Rows of the last version this module committed.")
    publish_seconds: float | None = Field(None, description="Seconds its publish took (inference, writes, commit).")
    peak_memory_bytes: int | None = Field(None, description="Peak process RSS (CPU) or CUDA max allocated (GPU).")
    started_at: str | None = Field(None, description="When training began (ISO 8601).")
    finished_at: str | None = Field(None, description="When the final version was committed (ISO 8601).")
    node: str | None = Field(None, description="Host name / Ray node id the actor runs on.")
    pid: int | None = Field(None, description="Process id of the actor (one process per module).")
    device: str | None = Field(None, description="torch device used (cpu, cuda:0).")
    error: str | None = Field(None, description="The failure's message, when failed.")
    restarts: int = Field(0, description="How often this module resumed from a checkpoint.")
