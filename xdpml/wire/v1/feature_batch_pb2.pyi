from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DataType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DATA_TYPE_UNSPECIFIED: _ClassVar[DataType]
    DATA_TYPE_BOOL: _ClassVar[DataType]
    DATA_TYPE_UINT8: _ClassVar[DataType]
    DATA_TYPE_UINT16: _ClassVar[DataType]
    DATA_TYPE_UINT32: _ClassVar[DataType]
    DATA_TYPE_UINT64: _ClassVar[DataType]
    DATA_TYPE_INT8: _ClassVar[DataType]
    DATA_TYPE_INT16: _ClassVar[DataType]
    DATA_TYPE_INT32: _ClassVar[DataType]
    DATA_TYPE_INT64: _ClassVar[DataType]
    DATA_TYPE_FP32: _ClassVar[DataType]
    DATA_TYPE_FP64: _ClassVar[DataType]
    DATA_TYPE_BYTES: _ClassVar[DataType]
    DATA_TYPE_STRING: _ClassVar[DataType]

class RecordKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RECORD_KIND_UNSPECIFIED: _ClassVar[RecordKind]
    RECORD_KIND_FLOW: _ClassVar[RecordKind]
    RECORD_KIND_WINDOW: _ClassVar[RecordKind]
    RECORD_KIND_PACKET: _ClassVar[RecordKind]
    RECORD_KIND_DECISION: _ClassVar[RecordKind]
DATA_TYPE_UNSPECIFIED: DataType
DATA_TYPE_BOOL: DataType
DATA_TYPE_UINT8: DataType
DATA_TYPE_UINT16: DataType
DATA_TYPE_UINT32: DataType
DATA_TYPE_UINT64: DataType
DATA_TYPE_INT8: DataType
DATA_TYPE_INT16: DataType
DATA_TYPE_INT32: DataType
DATA_TYPE_INT64: DataType
DATA_TYPE_FP32: DataType
DATA_TYPE_FP64: DataType
DATA_TYPE_BYTES: DataType
DATA_TYPE_STRING: DataType
RECORD_KIND_UNSPECIFIED: RecordKind
RECORD_KIND_FLOW: RecordKind
RECORD_KIND_WINDOW: RecordKind
RECORD_KIND_PACKET: RecordKind
RECORD_KIND_DECISION: RecordKind

class Column(_message.Message):
    __slots__ = ("name", "dtype", "shape", "data", "width", "dictionary")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    DICTIONARY_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DataType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    width: int
    dictionary: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DataType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., width: _Optional[int] = ..., dictionary: _Optional[_Iterable[str]] = ...) -> None: ...

class ColumnSchema(_message.Message):
    __slots__ = ("name", "dtype", "unit", "doc", "role", "fill")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    DOC_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    FILL_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DataType
    unit: str
    doc: str
    role: str
    fill: float
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DataType, str]] = ..., unit: _Optional[str] = ..., doc: _Optional[str] = ..., role: _Optional[str] = ..., fill: _Optional[float] = ...) -> None: ...

class NodeIdentity(_message.Message):
    __slots__ = ("node_name", "agent_id", "agent_version")
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    node_name: str
    agent_id: str
    agent_version: str
    def __init__(self, node_name: _Optional[str] = ..., agent_id: _Optional[str] = ..., agent_version: _Optional[str] = ...) -> None: ...

class FeatureBatch(_message.Message):
    __slots__ = ("sequence", "kind", "node", "rows", "columns", "schema", "loss_counters", "created_unix_ns", "start_unix_ms", "end_unix_ms")
    class LossCountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_FIELD_NUMBER: _ClassVar[int]
    LOSS_COUNTERS_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    START_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    END_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    kind: RecordKind
    node: NodeIdentity
    rows: int
    columns: _containers.RepeatedCompositeFieldContainer[Column]
    schema: _containers.RepeatedCompositeFieldContainer[ColumnSchema]
    loss_counters: _containers.ScalarMap[str, int]
    created_unix_ns: int
    start_unix_ms: int
    end_unix_ms: int
    def __init__(self, sequence: _Optional[int] = ..., kind: _Optional[_Union[RecordKind, str]] = ..., node: _Optional[_Union[NodeIdentity, _Mapping]] = ..., rows: _Optional[int] = ..., columns: _Optional[_Iterable[_Union[Column, _Mapping]]] = ..., schema: _Optional[_Iterable[_Union[ColumnSchema, _Mapping]]] = ..., loss_counters: _Optional[_Mapping[str, int]] = ..., created_unix_ns: _Optional[int] = ..., start_unix_ms: _Optional[int] = ..., end_unix_ms: _Optional[int] = ...) -> None: ...
