from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ChunkRef(_message.Message):
    __slots__ = ("key", "offsets", "sizes", "dtype", "buffer_offset")
    KEY_FIELD_NUMBER: _ClassVar[int]
    OFFSETS_FIELD_NUMBER: _ClassVar[int]
    SIZES_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    BUFFER_OFFSET_FIELD_NUMBER: _ClassVar[int]
    key: str
    offsets: _containers.RepeatedScalarFieldContainer[int]
    sizes: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    buffer_offset: int
    def __init__(self, key: _Optional[str] = ..., offsets: _Optional[_Iterable[int]] = ..., sizes: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., buffer_offset: _Optional[int] = ...) -> None: ...

class PersistRequest(_message.Message):
    __slots__ = ("uri", "storage_options_json", "save_id", "rank", "world_size", "shm_path", "buffer_bytes", "chunks", "block_bytes", "head_json", "commit_timeout_s", "client_pid")
    URI_FIELD_NUMBER: _ClassVar[int]
    STORAGE_OPTIONS_JSON_FIELD_NUMBER: _ClassVar[int]
    SAVE_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    SHM_PATH_FIELD_NUMBER: _ClassVar[int]
    BUFFER_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_BYTES_FIELD_NUMBER: _ClassVar[int]
    HEAD_JSON_FIELD_NUMBER: _ClassVar[int]
    COMMIT_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    CLIENT_PID_FIELD_NUMBER: _ClassVar[int]
    uri: str
    storage_options_json: str
    save_id: str
    rank: int
    world_size: int
    shm_path: str
    buffer_bytes: int
    chunks: _containers.RepeatedCompositeFieldContainer[ChunkRef]
    block_bytes: int
    head_json: str
    commit_timeout_s: float
    client_pid: int
    def __init__(self, uri: _Optional[str] = ..., storage_options_json: _Optional[str] = ..., save_id: _Optional[str] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., shm_path: _Optional[str] = ..., buffer_bytes: _Optional[int] = ..., chunks: _Optional[_Iterable[_Union[ChunkRef, _Mapping]]] = ..., block_bytes: _Optional[int] = ..., head_json: _Optional[str] = ..., commit_timeout_s: _Optional[float] = ..., client_pid: _Optional[int] = ...) -> None: ...

class PersistPart(_message.Message):
    __slots__ = ("request", "data", "head")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    request: PersistRequest
    data: bytes
    head: bytes
    def __init__(self, request: _Optional[_Union[PersistRequest, _Mapping]] = ..., data: _Optional[bytes] = ..., head: _Optional[bytes] = ...) -> None: ...

class PersistReply(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class WaitRequest(_message.Message):
    __slots__ = ("job_id", "timeout_s")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    timeout_s: float
    def __init__(self, job_id: _Optional[str] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class WaitReply(_message.Message):
    __slots__ = ("done", "ok", "error", "timings")
    class TimingsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    DONE_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    done: bool
    ok: bool
    error: str
    timings: _containers.ScalarMap[str, float]
    def __init__(self, done: _Optional[bool] = ..., ok: _Optional[bool] = ..., error: _Optional[str] = ..., timings: _Optional[_Mapping[str, float]] = ...) -> None: ...

class MetricsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MetricsReply(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: _Optional[str] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("uri",)
    URI_FIELD_NUMBER: _ClassVar[int]
    uri: str
    def __init__(self, uri: _Optional[str] = ...) -> None: ...

class LookupReply(_message.Message):
    __slots__ = ("found", "save_id", "directory", "objects")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    SAVE_ID_FIELD_NUMBER: _ClassVar[int]
    DIRECTORY_FIELD_NUMBER: _ClassVar[int]
    OBJECTS_FIELD_NUMBER: _ClassVar[int]
    found: bool
    save_id: str
    directory: str
    objects: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, found: _Optional[bool] = ..., save_id: _Optional[str] = ..., directory: _Optional[str] = ..., objects: _Optional[_Iterable[str]] = ...) -> None: ...

class ClearRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ClearReply(_message.Message):
    __slots__ = ("bytes_freed",)
    BYTES_FREED_FIELD_NUMBER: _ClassVar[int]
    bytes_freed: int
    def __init__(self, bytes_freed: _Optional[int] = ...) -> None: ...
