"""The stream of a KV bucket used as a cache (the embedder's vectors, the edge's answers).

nats-py's `create_key_value` makes a bucket that refuses writes when full; a cache should drop its
oldest entries instead and forget each after its TTL, so its stream is configured here, with
`discard: old`, and opened like any bucket.
"""

from __future__ import annotations

from nats.js.api import DiscardPolicy, StorageType, StreamConfig


def cache_stream(bucket: str, *, ttl_s: float, max_bytes: int, replicas: int) -> StreamConfig:
    return StreamConfig(
        name=f"KV_{bucket}",
        subjects=[f"$KV.{bucket}.>"],
        allow_direct=True,
        allow_rollup_hdrs=True,
        deny_delete=True,
        discard=DiscardPolicy.OLD,
        duplicate_window=min(120.0, ttl_s),
        max_age=ttl_s,
        max_bytes=max_bytes,
        max_msgs_per_subject=1,
        num_replicas=replicas,
        storage=StorageType.FILE,
    )
