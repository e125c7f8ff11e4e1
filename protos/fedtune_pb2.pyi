from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("name", "dtype", "shape", "data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Scalar(_message.Message):
    __slots__ = ("bool_value", "int_value", "float_value", "string_value")
    BOOL_VALUE_FIELD_NUMBER: _ClassVar[int]
    INT_VALUE_FIELD_NUMBER: _ClassVar[int]
    FLOAT_VALUE_FIELD_NUMBER: _ClassVar[int]
    STRING_VALUE_FIELD_NUMBER: _ClassVar[int]
    bool_value: bool
    int_value: int
    float_value: float
    string_value: str
    def __init__(self, bool_value: _Optional[bool] = ..., int_value: _Optional[int] = ..., float_value: _Optional[float] = ..., string_value: _Optional[str] = ...) -> None: ...

class Instruction(_message.Message):
    __slots__ = ("round", "tensors", "settings", "reply")
    class SettingsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Scalar
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Scalar, _Mapping]] = ...) -> None: ...
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    REPLY_FIELD_NUMBER: _ClassVar[int]
    round: int
    tensors: _containers.RepeatedCompositeFieldContainer[Tensor]
    settings: _containers.MessageMap[str, Scalar]
    reply: ReplyContract
    def __init__(self, round: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., settings: _Optional[_Mapping[str, Scalar]] = ..., reply: _Optional[_Union[ReplyContract, _Mapping]] = ...) -> None: ...

class ReplyContract(_message.Message):
    __slots__ = ("tensors", "values", "doc", "codec")
    class Values(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        VALUES_UNSPECIFIED: _ClassVar[ReplyContract.Values]
        TRAINED: _ClassVar[ReplyContract.Values]
        DELTA: _ClassVar[ReplyContract.Values]
        OTHER: _ClassVar[ReplyContract.Values]
        NONE: _ClassVar[ReplyContract.Values]
    VALUES_UNSPECIFIED: ReplyContract.Values
    TRAINED: ReplyContract.Values
    DELTA: ReplyContract.Values
    OTHER: ReplyContract.Values
    NONE: ReplyContract.Values
    class TensorShape(_message.Message):
        __slots__ = ("name", "dtype", "shape")
        NAME_FIELD_NUMBER: _ClassVar[int]
        DTYPE_FIELD_NUMBER: _ClassVar[int]
        SHAPE_FIELD_NUMBER: _ClassVar[int]
        name: str
        dtype: str
        shape: _containers.RepeatedScalarFieldContainer[int]
        def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    DOC_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[ReplyContract.TensorShape]
    values: ReplyContract.Values
    doc: str
    codec: str
    def __init__(self, tensors: _Optional[_Iterable[_Union[ReplyContract.TensorShape, _Mapping]]] = ..., values: _Optional[_Union[ReplyContract.Values, str]] = ..., doc: _Optional[str] = ..., codec: _Optional[str] = ...) -> None: ...

class ClientUpdate(_message.Message):
    __slots__ = ("client_id", "round", "num_examples", "tensors", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    round: int
    num_examples: int
    tensors: _containers.RepeatedCompositeFieldContainer[Tensor]
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, client_id: _Optional[str] = ..., round: _Optional[int] = ..., num_examples: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class DeviceProfile(_message.Message):
    __slots__ = ("memory_mb", "compute_class", "codecs", "threads", "accelerator", "step_ms")
    MEMORY_MB_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_CLASS_FIELD_NUMBER: _ClassVar[int]
    CODECS_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    ACCELERATOR_FIELD_NUMBER: _ClassVar[int]
    STEP_MS_FIELD_NUMBER: _ClassVar[int]
    memory_mb: int
    compute_class: str
    codecs: _containers.RepeatedScalarFieldContainer[str]
    threads: int
    accelerator: str
    step_ms: float
    def __init__(self, memory_mb: _Optional[int] = ..., compute_class: _Optional[str] = ..., codecs: _Optional[_Iterable[str]] = ..., threads: _Optional[int] = ..., accelerator: _Optional[str] = ..., step_ms: _Optional[float] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("protocol_version", "name", "profile")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    name: str
    profile: DeviceProfile
    def __init__(self, protocol_version: _Optional[int] = ..., name: _Optional[str] = ..., profile: _Optional[_Union[DeviceProfile, _Mapping]] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("chunk_bytes", "max_message_bytes", "max_update_bytes", "max_tensors", "max_metrics", "max_name_bytes", "max_num_examples", "max_uploads_per_client", "upload_idle_ms")
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_UPDATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_TENSORS_FIELD_NUMBER: _ClassVar[int]
    MAX_METRICS_FIELD_NUMBER: _ClassVar[int]
    MAX_NAME_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    MAX_UPLOADS_PER_CLIENT_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_IDLE_MS_FIELD_NUMBER: _ClassVar[int]
    chunk_bytes: int
    max_message_bytes: int
    max_update_bytes: int
    max_tensors: int
    max_metrics: int
    max_name_bytes: int
    max_num_examples: int
    max_uploads_per_client: int
    upload_idle_ms: int
    def __init__(self, chunk_bytes: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_update_bytes: _Optional[int] = ..., max_tensors: _Optional[int] = ..., max_metrics: _Optional[int] = ..., max_name_bytes: _Optional[int] = ..., max_num_examples: _Optional[int] = ..., max_uploads_per_client: _Optional[int] = ..., upload_idle_ms: _Optional[int] = ...) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = ("client_id", "run_id", "run_spec_json", "limits", "heartbeat_interval_ms", "long_poll_ms", "current_round", "client_timeout_ms")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    LONG_POLL_MS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_ROUND_FIELD_NUMBER: _ClassVar[int]
    CLIENT_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    run_id: str
    run_spec_json: str
    limits: Limits
    heartbeat_interval_ms: int
    long_poll_ms: int
    current_round: int
    client_timeout_ms: int
    def __init__(self, client_id: _Optional[str] = ..., run_id: _Optional[str] = ..., run_spec_json: _Optional[str] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., heartbeat_interval_ms: _Optional[int] = ..., long_poll_ms: _Optional[int] = ..., current_round: _Optional[int] = ..., client_timeout_ms: _Optional[int] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("wait_ms",)
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    wait_ms: int
    def __init__(self, wait_ms: _Optional[int] = ...) -> None: ...

class PullStatus(_message.Message):
    __slots__ = ("kind", "round", "rounds", "deadline_unix_ms", "retry_after_ms", "sits_out", "reason")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[PullStatus.Kind]
        INSTRUCTION: _ClassVar[PullStatus.Kind]
        WAIT: _ClassVar[PullStatus.Kind]
        DONE: _ClassVar[PullStatus.Kind]
    KIND_UNSPECIFIED: PullStatus.Kind
    INSTRUCTION: PullStatus.Kind
    WAIT: PullStatus.Kind
    DONE: PullStatus.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    SITS_OUT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    kind: PullStatus.Kind
    round: int
    rounds: int
    deadline_unix_ms: int
    retry_after_ms: int
    sits_out: bool
    reason: str
    def __init__(self, kind: _Optional[_Union[PullStatus.Kind, str]] = ..., round: _Optional[int] = ..., rounds: _Optional[int] = ..., deadline_unix_ms: _Optional[int] = ..., retry_after_ms: _Optional[int] = ..., sits_out: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class InstructionMessage(_message.Message):
    __slots__ = ("status", "header", "data", "sha256")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    status: PullStatus
    header: Instruction
    data: bytes
    sha256: bytes
    def __init__(self, status: _Optional[_Union[PullStatus, _Mapping]] = ..., header: _Optional[_Union[Instruction, _Mapping]] = ..., data: _Optional[bytes] = ..., sha256: _Optional[bytes] = ...) -> None: ...

class UpdateMessage(_message.Message):
    __slots__ = ("header", "data", "sha256")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    header: ClientUpdate
    data: bytes
    sha256: bytes
    def __init__(self, header: _Optional[_Union[ClientUpdate, _Mapping]] = ..., data: _Optional[bytes] = ..., sha256: _Optional[bytes] = ...) -> None: ...

class PushReply(_message.Message):
    __slots__ = ("round", "payload_bytes")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    round: int
    payload_bytes: int
    def __init__(self, round: _Optional[int] = ..., payload_bytes: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("activity", "round", "progress")
    ACTIVITY_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    activity: str
    round: int
    progress: float
    def __init__(self, activity: _Optional[str] = ..., round: _Optional[int] = ..., progress: _Optional[float] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("current_round", "done")
    CURRENT_ROUND_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    current_round: int
    done: bool
    def __init__(self, current_round: _Optional[int] = ..., done: _Optional[bool] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class LeaveReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
