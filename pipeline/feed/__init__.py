"""Feeding trainers and the final stage from the store.

``source`` opens a version as metadata plus row-group reads; ``epoch`` decides an epoch's order,
windows and partners from metadata alone; ``streaming`` turns that into train batches with a
bounded buffer and readahead; ``memory`` is the in-memory baseline the benchmarks compare with.
"""

from pipeline.feed.epoch import EpochPlan, plan_epoch
from pipeline.feed.memory import PairedBatches, Upstream, concat_upstreams, inference_chunks, load_source, load_upstream
from pipeline.feed.source import Source, open_source, open_versions, to_float
from pipeline.feed.streaming import StreamingBatches, TrainBatch

__all__ = ["EpochPlan", "PairedBatches", "Source", "StreamingBatches", "TrainBatch", "Upstream", "concat_upstreams",
           "inference_chunks", "load_source", "load_upstream", "open_source", "open_versions", "plan_epoch", "to_float"]
