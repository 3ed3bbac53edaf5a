"""The manifest of one committed version of a stage (``store/<stage>/v<NNNN>/_MANIFEST.json``).

Writing it is the commit: a version whose manifest is absent does not exist.
Readers read manifests only, never list the shard files.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ShardEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(..., description="Shard file, relative to the version directory (part-<uuid>.parquet).")
    rows: int = Field(..., ge=0, description="Rows in the shard.")
    bytes: int = Field(..., ge=0, description="Size of the shard file in bytes.")
    sha256: str = Field(..., pattern=r"^[0-9a-f]{64}$", description="sha256 of the shard file's bytes (hex).")


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: int = Field(1, description="Version of this manifest layout; readers refuse newer ones.")
    stage: str = Field(..., description="Stage the version belongs to: 'input' or a module name ('m1', ...).")
    version: int = Field(..., ge=1, description="Version number (directory v<NNNN>); ascending in commit order.")
    final: bool = Field(..., description="True for the stage's finished output (the module's last epoch, or the ingested input).")
    created_at: str = Field(..., description="When the version was committed, ISO 8601 with time zone.")
    codec: str = Field(..., description="Tensor codec of the 'x' column ('float16', 'float32', 'uint8', ...).")
    dtype: str = Field(..., description="What the codec's bytes hold ('float16', 'uint8', ...).")
    shape: list[int] = Field(..., description="Shape of one row's tensor, e.g. [C, H, W].")
    rows: int = Field(..., ge=0, description="Rows over all shards.")
    shards: list[ShardEntry] = Field(..., description="Shard files in row order.")
    splits: dict[str, int] = Field(..., description="Rows per split value ('train', 'test').")
    sample_fraction: float = Field(..., gt=0, le=1, description="Fraction of the stage's samples this version holds (1 = all).")
    producer: dict[str, Any] = Field(default_factory=dict, description="Who wrote it: module, epoch, checkpoint path (free-form).")
    upstream: dict[str, Any] | None = Field(None, description="The version it was computed from: {'stage': ..., 'version': ...}; null for input.")
    arrow_schema: str = Field(..., description="The shards' Arrow schema as pyarrow's Schema.to_string() prints it "
                              "(per-shard codec params left out).")
    codec_stats: dict[str, Any] = Field(
        default_factory=dict, description="What the codec reports, summed over shards (int8: values, clipped, "
        "clipped_fraction, max_abs_error, calibration); {} for plain codecs.")

    @model_validator(mode="after")
    def _rows_add_up(self) -> "Manifest":
        if sum(s.rows for s in self.shards) != self.rows:
            raise ValueError(f"shards hold {sum(s.rows for s in self.shards)} rows, manifest says {self.rows}")
        if sum(self.splits.values()) != self.rows:
            raise ValueError(f"splits count {sum(self.splits.values())} rows, manifest says {self.rows}")
        return self
