from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Reachability(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REACHABILITY_UNKNOWN: _ClassVar[Reachability]
    REACHABILITY_PUBLIC: _ClassVar[Reachability]
    REACHABILITY_PRIVATE: _ClassVar[Reachability]
REACHABILITY_UNKNOWN: Reachability
REACHABILITY_PUBLIC: Reachability
REACHABILITY_PRIVATE: Reachability

class ShardAd(_message.Message):
    __slots__ = ("model_id", "model_name", "start", "end", "num_layers", "throughput", "quantization", "device", "block_bytes")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_BYTES_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    model_name: str
    start: int
    end: int
    num_layers: int
    throughput: float
    quantization: str
    device: str
    block_bytes: int
    def __init__(self, model_id: _Optional[str] = ..., model_name: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., num_layers: _Optional[int] = ..., throughput: _Optional[float] = ..., quantization: _Optional[str] = ..., device: _Optional[str] = ..., block_bytes: _Optional[int] = ...) -> None: ...

class PeerRecord(_message.Message):
    __slots__ = ("peer_id", "public_key", "grpc_addresses", "p2p_addresses", "shards", "protocol_version", "software_version", "seq", "issued_at_ms", "expires_at_ms", "withdrawn", "reachability", "circuit_addresses", "relay", "tls_fingerprint")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    GRPC_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    P2P_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_MS_FIELD_NUMBER: _ClassVar[int]
    WITHDRAWN_FIELD_NUMBER: _ClassVar[int]
    REACHABILITY_FIELD_NUMBER: _ClassVar[int]
    CIRCUIT_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    RELAY_FIELD_NUMBER: _ClassVar[int]
    TLS_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    peer_id: bytes
    public_key: bytes
    grpc_addresses: _containers.RepeatedScalarFieldContainer[str]
    p2p_addresses: _containers.RepeatedScalarFieldContainer[str]
    shards: _containers.RepeatedCompositeFieldContainer[ShardAd]
    protocol_version: int
    software_version: str
    seq: int
    issued_at_ms: int
    expires_at_ms: int
    withdrawn: bool
    reachability: Reachability
    circuit_addresses: _containers.RepeatedScalarFieldContainer[str]
    relay: bool
    tls_fingerprint: str
    def __init__(self, peer_id: _Optional[bytes] = ..., public_key: _Optional[bytes] = ..., grpc_addresses: _Optional[_Iterable[str]] = ..., p2p_addresses: _Optional[_Iterable[str]] = ..., shards: _Optional[_Iterable[_Union[ShardAd, _Mapping]]] = ..., protocol_version: _Optional[int] = ..., software_version: _Optional[str] = ..., seq: _Optional[int] = ..., issued_at_ms: _Optional[int] = ..., expires_at_ms: _Optional[int] = ..., withdrawn: _Optional[bool] = ..., reachability: _Optional[_Union[Reachability, str]] = ..., circuit_addresses: _Optional[_Iterable[str]] = ..., relay: _Optional[bool] = ..., tls_fingerprint: _Optional[str] = ...) -> None: ...

class SignedPeerRecord(_message.Message):
    __slots__ = ("record", "signature")
    RECORD_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    record: bytes
    signature: bytes
    def __init__(self, record: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...
