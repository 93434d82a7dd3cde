"""Experience buffer: Arrow rows, replay with eviction and staleness, Parquet snapshots,
offline datasets and an optional sharded router. See ``docs/buffer.md``."""

from buffer.offline import OfflineDataset, OfflineDatasetError, load_offline
from buffer.replay import AddResult, ExperienceBuffer
from buffer.sharded import LocalShardClient, RayShardClient, ShardClient, ShardedBuffer, route
from buffer.storage import (
    BufferStorage,
    ParquetStorage,
    SnapshotStore,
    make_storage,
    register_storage,
)
from embr_rl.core.experience import (
    SAMPLE_SCHEMA,
    PairBatch,
    SchemaError,
    rows_from_dicts,
    token_matrix,
    validate,
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
