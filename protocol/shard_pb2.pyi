from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    INT64: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
BFLOAT16: DType
FLOAT16: DType
INT64: DType

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("model_id", "start", "end", "input", "last_only")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    LAST_ONLY_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    start: int
    end: int
    input: Tensor
    last_only: bool
    def __init__(self, model_id: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., input: _Optional[_Union[Tensor, _Mapping]] = ..., last_only: _Optional[bool] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("output",)
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    output: Tensor
    def __init__(self, output: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class OpenSession(_message.Message):
    __slots__ = ("model_id", "start", "end", "max_length", "push", "compact_logits")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    PUSH_FIELD_NUMBER: _ClassVar[int]
    COMPACT_LOGITS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    start: int
    end: int
    max_length: int
    push: bool
    compact_logits: bool
    def __init__(self, model_id: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., max_length: _Optional[int] = ..., push: _Optional[bool] = ..., compact_logits: _Optional[bool] = ...) -> None: ...

class PushTarget(_message.Message):
    __slots__ = ("address", "session_id", "token")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    address: str
    session_id: str
    token: bytes
    def __init__(self, address: _Optional[str] = ..., session_id: _Optional[str] = ..., token: _Optional[bytes] = ...) -> None: ...

class Sample(_message.Message):
    __slots__ = ("temperature", "top_p", "seed", "index")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    seed: int
    index: int
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., index: _Optional[int] = ...) -> None: ...

class Step(_message.Message):
    __slots__ = ("step_id", "position", "input", "last_only", "route", "sample")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    LAST_ONLY_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    position: int
    input: Tensor
    last_only: bool
    route: _containers.RepeatedCompositeFieldContainer[PushTarget]
    sample: Sample
    def __init__(self, step_id: _Optional[int] = ..., position: _Optional[int] = ..., input: _Optional[_Union[Tensor, _Mapping]] = ..., last_only: _Optional[bool] = ..., route: _Optional[_Iterable[_Union[PushTarget, _Mapping]]] = ..., sample: _Optional[_Union[Sample, _Mapping]] = ...) -> None: ...

class CloseSession(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SessionRequest(_message.Message):
    __slots__ = ("open", "step", "close")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    open: OpenSession
    step: Step
    close: CloseSession
    def __init__(self, open: _Optional[_Union[OpenSession, _Mapping]] = ..., step: _Optional[_Union[Step, _Mapping]] = ..., close: _Optional[_Union[CloseSession, _Mapping]] = ...) -> None: ...

class SessionOpened(_message.Message):
    __slots__ = ("session_id", "max_length", "push_token")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    PUSH_TOKEN_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    max_length: int
    push_token: bytes
    def __init__(self, session_id: _Optional[str] = ..., max_length: _Optional[int] = ..., push_token: _Optional[bytes] = ...) -> None: ...

class StepResult(_message.Message):
    __slots__ = ("step_id", "output", "length", "push_error")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    PUSH_ERROR_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    output: Tensor
    length: int
    push_error: str
    def __init__(self, step_id: _Optional[int] = ..., output: _Optional[_Union[Tensor, _Mapping]] = ..., length: _Optional[int] = ..., push_error: _Optional[str] = ...) -> None: ...

class SessionClosed(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SessionResponse(_message.Message):
    __slots__ = ("opened", "result", "closed")
    OPENED_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    CLOSED_FIELD_NUMBER: _ClassVar[int]
    opened: SessionOpened
    result: StepResult
    closed: SessionClosed
    def __init__(self, opened: _Optional[_Union[SessionOpened, _Mapping]] = ..., result: _Optional[_Union[StepResult, _Mapping]] = ..., closed: _Optional[_Union[SessionClosed, _Mapping]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Capacity(_message.Message):
    __slots__ = ("max_sessions", "active_sessions", "max_length", "max_message_bytes", "draining", "kv_budget_bytes", "kv_free_bytes", "queued_steps", "batched_steps", "pushed_steps", "decode_ms")
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    KV_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    QUEUED_STEPS_FIELD_NUMBER: _ClassVar[int]
    BATCHED_STEPS_FIELD_NUMBER: _ClassVar[int]
    PUSHED_STEPS_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    max_sessions: int
    active_sessions: int
    max_length: int
    max_message_bytes: int
    draining: bool
    kv_budget_bytes: int
    kv_free_bytes: int
    queued_steps: int
    batched_steps: int
    pushed_steps: int
    decode_ms: float
    def __init__(self, max_sessions: _Optional[int] = ..., active_sessions: _Optional[int] = ..., max_length: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., draining: _Optional[bool] = ..., kv_budget_bytes: _Optional[int] = ..., kv_free_bytes: _Optional[int] = ..., queued_steps: _Optional[int] = ..., batched_steps: _Optional[int] = ..., pushed_steps: _Optional[int] = ..., decode_ms: _Optional[float] = ...) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("model_id", "model_name", "start", "end", "num_layers", "hidden_size", "vocab_size", "dtype", "version", "protocol_version", "capacity", "quantization", "device", "block_bytes")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_BYTES_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    model_name: str
    start: int
    end: int
    num_layers: int
    hidden_size: int
    vocab_size: int
    dtype: DType
    version: str
    protocol_version: int
    capacity: Capacity
    quantization: str
    device: str
    block_bytes: int
    def __init__(self, model_id: _Optional[str] = ..., model_name: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., num_layers: _Optional[int] = ..., hidden_size: _Optional[int] = ..., vocab_size: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., version: _Optional[str] = ..., protocol_version: _Optional[int] = ..., capacity: _Optional[_Union[Capacity, _Mapping]] = ..., quantization: _Optional[str] = ..., device: _Optional[str] = ..., block_bytes: _Optional[int] = ...) -> None: ...

class TokenizerRequest(_message.Message):
    __slots__ = ("model_id",)
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    def __init__(self, model_id: _Optional[str] = ...) -> None: ...

class TokenizerResponse(_message.Message):
    __slots__ = ("model_id", "files", "chat_template", "manifest")
    class FilesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    files: _containers.ScalarMap[str, bytes]
    chat_template: str
    manifest: bytes
    def __init__(self, model_id: _Optional[str] = ..., files: _Optional[_Mapping[str, bytes]] = ..., chat_template: _Optional[str] = ..., manifest: _Optional[bytes] = ...) -> None: ...

class PushedStep(_message.Message):
    __slots__ = ("session_id", "token", "step")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    token: bytes
    step: Step
    def __init__(self, session_id: _Optional[str] = ..., token: _Optional[bytes] = ..., step: _Optional[_Union[Step, _Mapping]] = ...) -> None: ...

class PushSummary(_message.Message):
    __slots__ = ("accepted", "dropped")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    dropped: int
    def __init__(self, accepted: _Optional[int] = ..., dropped: _Optional[int] = ...) -> None: ...
