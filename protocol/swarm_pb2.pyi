from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SyncFrame(_message.Message):
    __slots__ = ("kind", "epoch", "epoch_owner", "update", "state_vector", "full")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        PUSH: _ClassVar[SyncFrame.Kind]
        PULL: _ClassVar[SyncFrame.Kind]
        ANSWER: _ClassVar[SyncFrame.Kind]
    PUSH: SyncFrame.Kind
    PULL: SyncFrame.Kind
    ANSWER: SyncFrame.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    EPOCH_OWNER_FIELD_NUMBER: _ClassVar[int]
    UPDATE_FIELD_NUMBER: _ClassVar[int]
    STATE_VECTOR_FIELD_NUMBER: _ClassVar[int]
    FULL_FIELD_NUMBER: _ClassVar[int]
    kind: SyncFrame.Kind
    epoch: int
    epoch_owner: str
    update: bytes
    state_vector: bytes
    full: bool
    def __init__(self, kind: _Optional[_Union[SyncFrame.Kind, str]] = ..., epoch: _Optional[int] = ..., epoch_owner: _Optional[str] = ..., update: _Optional[bytes] = ..., state_vector: _Optional[bytes] = ..., full: _Optional[bool] = ...) -> None: ...
