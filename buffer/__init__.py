"""Experience buffer: Arrow rows, replay with eviction and staleness, Parquet snapshots,
offline datasets and an optional sharded router. See ``docs/buffer.md``."""

from buffer.offline import OfflineDataset, OfflineDatasetError, load_offline
from buffer.replay import AddResult, ExperienceBuffer, PairBatch
from buffer.schema import SAMPLE_SCHEMA, SchemaError, rows_from_dicts, token_matrix, validate
from buffer.sharded import LocalShardClient, RayShardClient, ShardClient, ShardedBuffer, route
from buffer.storage import (
    BufferStorage,
    ParquetStorage,
    SnapshotStore,
    make_storage,
    register_storage,
)

__all__ = [
    "SAMPLE_SCHEMA",
    "AddResult",
    "BufferStorage",
    "ExperienceBuffer",
    "LocalShardClient",
    "OfflineDataset",
    "OfflineDatasetError",
    "PairBatch",
    "ParquetStorage",
    "RayShardClient",
    "SchemaError",
    "ShardClient",
    "ShardedBuffer",
    "SnapshotStore",
    "load_offline",
    "make_storage",
    "register_storage",
    "route",
    "rows_from_dicts",
    "token_matrix",
    "validate",
]
