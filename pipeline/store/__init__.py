"""The activation store: versioned, manifest-committed Parquet shards of activations.

``Store`` is the entry point; see ``store.py`` for the layout and the commit
protocol, ``codec.py`` for how tensors become bytes.
"""

from pipeline.store.codec import Codec, codec_names, get_codec, register_codec
from pipeline.store.columns import META_COLUMNS, meta_schema
from pipeline.store.reader import Batch, VersionReader
from pipeline.store.store import Store
from pipeline.store.writer import VersionWriter

__all__ = [
    "Batch", "Codec", "META_COLUMNS", "Store", "VersionReader", "VersionWriter",
    "codec_names", "get_codec", "meta_schema", "register_codec",
]
