from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LookupRequest(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, keys: _Optional[_Iterable[str]] = ...) -> None: ...

class LookupReply(_message.Message):
    __slots__ = ("count", "tiers")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    count: int
    tiers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, count: _Optional[int] = ..., tiers: _Optional[_Iterable[str]] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("header", "payload", "block_hash")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASH_FIELD_NUMBER: _ClassVar[int]
    header: bytes
    payload: bytes
    block_hash: bytes
    def __init__(self, header: _Optional[bytes] = ..., payload: _Optional[bytes] = ..., block_hash: _Optional[bytes] = ...) -> None: ...

class PutRequest(_message.Message):
    __slots__ = ("fingerprint", "chunks")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    fingerprint: bytes
    chunks: _containers.RepeatedCompositeFieldContainer[Chunk]
    def __init__(self, fingerprint: _Optional[bytes] = ..., chunks: _Optional[_Iterable[_Union[Chunk, _Mapping]]] = ...) -> None: ...

class PutReply(_message.Message):
    __slots__ = ("stored",)
    STORED_FIELD_NUMBER: _ClassVar[int]
    stored: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, stored: _Optional[_Iterable[bool]] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("keys", "fingerprint")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    fingerprint: bytes
    def __init__(self, keys: _Optional[_Iterable[str]] = ..., fingerprint: _Optional[bytes] = ...) -> None: ...

class GetReply(_message.Message):
    __slots__ = ("index", "chunk")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    index: int
    chunk: Chunk
    def __init__(self, index: _Optional[int] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, keys: _Optional[_Iterable[str]] = ...) -> None: ...

class DeleteReply(_message.Message):
    __slots__ = ("removed",)
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    removed: int
    def __init__(self, removed: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TierStats(_message.Message):
    __slots__ = ("tier", "hits", "misses", "bytes_read", "bytes_written", "put_failures", "checksum_failures", "evictions", "items", "bytes_used", "bytes_capacity")
    TIER_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    BYTES_READ_FIELD_NUMBER: _ClassVar[int]
    BYTES_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    PUT_FAILURES_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FAILURES_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    BYTES_USED_FIELD_NUMBER: _ClassVar[int]
    BYTES_CAPACITY_FIELD_NUMBER: _ClassVar[int]
    tier: str
    hits: int
    misses: int
    bytes_read: int
    bytes_written: int
    put_failures: int
    checksum_failures: int
    evictions: int
    items: int
    bytes_used: int
    bytes_capacity: int
    def __init__(self, tier: _Optional[str] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., bytes_read: _Optional[int] = ..., bytes_written: _Optional[int] = ..., put_failures: _Optional[int] = ..., checksum_failures: _Optional[int] = ..., evictions: _Optional[int] = ..., items: _Optional[int] = ..., bytes_used: _Optional[int] = ..., bytes_capacity: _Optional[int] = ...) -> None: ...

class StatsReply(_message.Message):
    __slots__ = ("tiers", "uptime_seconds", "requests", "in_flight")
    TIERS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    tiers: _containers.RepeatedCompositeFieldContainer[TierStats]
    uptime_seconds: float
    requests: int
    in_flight: int
    def __init__(self, tiers: _Optional[_Iterable[_Union[TierStats, _Mapping]]] = ..., uptime_seconds: _Optional[float] = ..., requests: _Optional[int] = ..., in_flight: _Optional[int] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthReply(_message.Message):
    __slots__ = ("status", "version", "stream_port", "tiers", "max_chunk_bytes", "max_batch", "max_request_bytes")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STREAM_PORT_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_BYTES_FIELD_NUMBER: _ClassVar[int]
    status: str
    version: str
    stream_port: int
    tiers: _containers.RepeatedScalarFieldContainer[str]
    max_chunk_bytes: int
    max_batch: int
    max_request_bytes: int
    def __init__(self, status: _Optional[str] = ..., version: _Optional[str] = ..., stream_port: _Optional[int] = ..., tiers: _Optional[_Iterable[str]] = ..., max_chunk_bytes: _Optional[int] = ..., max_batch: _Optional[int] = ..., max_request_bytes: _Optional[int] = ...) -> None: ...

class LeaseRequest(_message.Message):
    __slots__ = ("keys", "ttl_seconds")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    ttl_seconds: float
    def __init__(self, keys: _Optional[_Iterable[str]] = ..., ttl_seconds: _Optional[float] = ...) -> None: ...

class LeaseReply(_message.Message):
    __slots__ = ("lease_id", "count", "expires_at", "active")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    count: int
    expires_at: float
    active: int
    def __init__(self, lease_id: _Optional[str] = ..., count: _Optional[int] = ..., expires_at: _Optional[float] = ..., active: _Optional[int] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("lease_id",)
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    def __init__(self, lease_id: _Optional[str] = ...) -> None: ...

class ReleaseReply(_message.Message):
    __slots__ = ("released", "active")
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    released: bool
    active: int
    def __init__(self, released: _Optional[bool] = ..., active: _Optional[int] = ...) -> None: ...
