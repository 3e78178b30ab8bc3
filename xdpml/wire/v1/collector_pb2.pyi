from xdpml.wire.v1 import feature_batch_pb2 as _feature_batch_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Action(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACTION_UNSPECIFIED: _ClassVar[Action]
    ACTION_ALLOW: _ClassVar[Action]
    ACTION_ALERT: _ClassVar[Action]
    ACTION_RATE_LIMIT: _ClassVar[Action]
    ACTION_DROP: _ClassVar[Action]
ACTION_UNSPECIFIED: Action
ACTION_ALLOW: Action
ACTION_ALERT: Action
ACTION_RATE_LIMIT: Action
ACTION_DROP: Action

class ExportRequest(_message.Message):
    __slots__ = ("batch",)
    BATCH_FIELD_NUMBER: _ClassVar[int]
    batch: _feature_batch_pb2.FeatureBatch
    def __init__(self, batch: _Optional[_Union[_feature_batch_pb2.FeatureBatch, _Mapping]] = ...) -> None: ...

class ExportResponse(_message.Message):
    __slots__ = ("ack", "verdicts", "model")
    ACK_FIELD_NUMBER: _ClassVar[int]
    VERDICTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ack: Ack
    verdicts: VerdictBatch
    model: ModelUpdate
    def __init__(self, ack: _Optional[_Union[Ack, _Mapping]] = ..., verdicts: _Optional[_Union[VerdictBatch, _Mapping]] = ..., model: _Optional[_Union[ModelUpdate, _Mapping]] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("sequence", "rows_accepted", "error", "error_code")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    ROWS_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    rows_accepted: int
    error: str
    error_code: int
    def __init__(self, sequence: _Optional[int] = ..., rows_accepted: _Optional[int] = ..., error: _Optional[str] = ..., error_code: _Optional[int] = ...) -> None: ...

class FlowKey(_message.Message):
    __slots__ = ("src_ip", "dst_ip", "src_port", "dst_port", "protocol", "vlan_id")
    SRC_IP_FIELD_NUMBER: _ClassVar[int]
    DST_IP_FIELD_NUMBER: _ClassVar[int]
    SRC_PORT_FIELD_NUMBER: _ClassVar[int]
    DST_PORT_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    VLAN_ID_FIELD_NUMBER: _ClassVar[int]
    src_ip: bytes
    dst_ip: bytes
    src_port: int
    dst_port: int
    protocol: int
    vlan_id: int
    def __init__(self, src_ip: _Optional[bytes] = ..., dst_ip: _Optional[bytes] = ..., src_port: _Optional[int] = ..., dst_port: _Optional[int] = ..., protocol: _Optional[int] = ..., vlan_id: _Optional[int] = ...) -> None: ...

class Verdict(_message.Message):
    __slots__ = ("key", "row", "score", "label", "action", "ttl_seconds", "policy_action")
    KEY_FIELD_NUMBER: _ClassVar[int]
    ROW_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    POLICY_ACTION_FIELD_NUMBER: _ClassVar[int]
    key: FlowKey
    row: int
    score: float
    label: str
    action: Action
    ttl_seconds: int
    policy_action: Action
    def __init__(self, key: _Optional[_Union[FlowKey, _Mapping]] = ..., row: _Optional[int] = ..., score: _Optional[float] = ..., label: _Optional[str] = ..., action: _Optional[_Union[Action, str]] = ..., ttl_seconds: _Optional[int] = ..., policy_action: _Optional[_Union[Action, str]] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class VerdictBatch(_message.Message):
    __slots__ = ("sequence", "model", "threshold", "verdicts", "dry_run")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    VERDICTS_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    model: ModelInfo
    threshold: float
    verdicts: _containers.RepeatedCompositeFieldContainer[Verdict]
    dry_run: bool
    def __init__(self, sequence: _Optional[int] = ..., model: _Optional[_Union[ModelInfo, _Mapping]] = ..., threshold: _Optional[float] = ..., verdicts: _Optional[_Iterable[_Union[Verdict, _Mapping]]] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class ModelUpdate(_message.Message):
    __slots__ = ("signed", "name", "version")
    SIGNED_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    signed: bytes
    name: str
    version: int
    def __init__(self, signed: _Optional[bytes] = ..., name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...
