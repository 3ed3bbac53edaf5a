"""The ``feed`` section of the run config: how a trainer streams its upstream version from the store."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class FeedConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    buffer_samples: int | None = Field(
        None, ge=1, description="Rows a trainer holds in its shuffle buffer: its upstream version is read row group by "
        "row group into windows of this many rows, shuffled within. More: better mixing and fewer partner reads "
        "outside the window; fewer: less host memory (a row group larger than this is read whole). null = as many "
        "rows as fit in a quarter of resources.memory_per_module, between 4 batches and 8192.")
    readahead: int = Field(
        2, ge=0, description="Row groups read in the background ahead of the one being batched (hides store latency; "
        "each costs one row group of host memory).")
    checkpoint_every_steps: int = Field(
        0, ge=0, description="Also checkpoint every N training steps inside an epoch, with the feed's position, so a "
        "killed module resumes mid-epoch in the same order; 0 = at epoch ends only.")
