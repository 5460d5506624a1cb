"""The kvstore daemon's client (gRPC control, bulk data over stream, shared memory or UCX)."""

from store.client.client import IN_POOL, WINDOW_START, KVStoreClient, parse_url

__all__ = ["IN_POOL", "WINDOW_START", "KVStoreClient", "parse_url"]
