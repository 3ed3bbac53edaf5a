"""The ``feed`` section of the run config: how a trainer streams its upstream version from the store."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class FeedConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    buffer_samples: int = Field(
        8192, ge=1, description="Rows a trainer holds in its shuffle buffer: its upstream version is read row group by "
        "row group into windows of this many rows, shuffled within. More: better mixing and fewer partner reads "
        "outside the window; fewer: less host memory (a row group larger than this is read whole).")
    readahead: int = Field(
        2, ge=0, description="Row groups read in the background ahead of the one being batched (hides store latency; "
        "each costs one row group of host memory).")
    checkpoint_every_steps: int = Field(
        0, ge=0, description="Also checkpoint every N training steps inside an epoch, with the feed's position, so a "
        "killed module resumes mid-epoch in the same order; 0 = at epoch ends only.")
