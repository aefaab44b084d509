"""The moemesh wire: shard.proto and its generated code (`protocol.shard_pb2`), the tensor codec,
versions, errors.

Imports nothing of moemesh's own; only protobuf and grpc.
"""

from protocol.errors import InvalidTensorError, MoemeshError, ProtocolError, VersionMismatchError
from protocol.options import DEFAULT_MAX_MESSAGE_BYTES, grpc_options
from protocol.tensors import DTYPE_NAMES, ITEMSIZE, TensorMeta, check_tensor, make_tensor
from protocol.version import PROTOCOL_VERSION, software_version

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DTYPE_NAMES",
    "ITEMSIZE",
    "PROTOCOL_VERSION",
    "InvalidTensorError",
    "MoemeshError",
    "ProtocolError",
    "TensorMeta",
    "VersionMismatchError",
    "check_tensor",
    "grpc_options",
    "make_tensor",
    "software_version",
]
