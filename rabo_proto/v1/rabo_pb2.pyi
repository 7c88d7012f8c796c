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
    FLOAT64: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    INT64: _ClassVar[DType]
    INT32: _ClassVar[DType]
    INT8: _ClassVar[DType]

class Part(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PART_UNSPECIFIED: _ClassVar[Part]
    X: _ClassVar[Part]
    Y: _ClassVar[Part]
    V: _ClassVar[Part]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT64: DType
FLOAT16: DType
BFLOAT16: DType
INT64: DType
INT32: DType
INT8: DType
PART_UNSPECIFIED: Part
X: Part
Y: Part
V: Part

class TensorMeta(_message.Message):
    __slots__ = ("part", "name", "dtype", "shape")
    PART_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    part: Part
    name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, part: _Optional[_Union[Part, str]] = ..., name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class PayloadHeader(_message.Message):
    __slots__ = ("round", "worker_id", "tensors", "total_bytes")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    round: int
    worker_id: str
    tensors: _containers.RepeatedCompositeFieldContainer[TensorMeta]
    total_bytes: int
    def __init__(self, round: _Optional[int] = ..., worker_id: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[TensorMeta, _Mapping]]] = ..., total_bytes: _Optional[int] = ...) -> None: ...

class PayloadTrailer(_message.Message):
    __slots__ = ("crc32c",)
    CRC32C_FIELD_NUMBER: _ClassVar[int]
    crc32c: int
    def __init__(self, crc32c: _Optional[int] = ...) -> None: ...

class ResourceProfile(_message.Message):
    __slots__ = ("hostname", "logical_cpus", "usable_cpus", "memory_total_bytes", "memory_available_bytes", "memory_limit_bytes", "memory_budget_bytes", "device", "gpu_name", "gpu_total_bytes", "gpu_free_bytes", "flops_per_s", "threads", "budget_source", "loading")
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    LOGICAL_CPUS_FIELD_NUMBER: _ClassVar[int]
    USABLE_CPUS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_LIMIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    GPU_NAME_FIELD_NUMBER: _ClassVar[int]
    GPU_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    GPU_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    FLOPS_PER_S_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_SOURCE_FIELD_NUMBER: _ClassVar[int]
    LOADING_FIELD_NUMBER: _ClassVar[int]
    hostname: str
    logical_cpus: int
    usable_cpus: float
    memory_total_bytes: int
    memory_available_bytes: int
    memory_limit_bytes: int
    memory_budget_bytes: int
    device: str
    gpu_name: str
    gpu_total_bytes: int
    gpu_free_bytes: int
    flops_per_s: float
    threads: int
    budget_source: str
    loading: bool
    def __init__(self, hostname: _Optional[str] = ..., logical_cpus: _Optional[int] = ..., usable_cpus: _Optional[float] = ..., memory_total_bytes: _Optional[int] = ..., memory_available_bytes: _Optional[int] = ..., memory_limit_bytes: _Optional[int] = ..., memory_budget_bytes: _Optional[int] = ..., device: _Optional[str] = ..., gpu_name: _Optional[str] = ..., gpu_total_bytes: _Optional[int] = ..., gpu_free_bytes: _Optional[int] = ..., flops_per_s: _Optional[float] = ..., threads: _Optional[int] = ..., budget_source: _Optional[str] = ..., loading: _Optional[bool] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("name", "profile", "client_id", "protocol", "instance")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    profile: ResourceProfile
    client_id: int
    protocol: int
    instance: str
    def __init__(self, name: _Optional[str] = ..., profile: _Optional[_Union[ResourceProfile, _Mapping]] = ..., client_id: _Optional[int] = ..., protocol: _Optional[int] = ..., instance: _Optional[str] = ...) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = ("worker_id", "credential", "client_id", "config_json", "heartbeat_s", "chunk_bytes")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_S_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    credential: str
    client_id: int
    config_json: str
    heartbeat_s: float
    chunk_bytes: int
    def __init__(self, worker_id: _Optional[str] = ..., credential: _Optional[str] = ..., client_id: _Optional[int] = ..., config_json: _Optional[str] = ..., heartbeat_s: _Optional[float] = ..., chunk_bytes: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("worker_id", "credential", "profile")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    credential: str
    profile: ResourceProfile
    def __init__(self, worker_id: _Optional[str] = ..., credential: _Optional[str] = ..., profile: _Optional[_Union[ResourceProfile, _Mapping]] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("round", "finished")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    round: int
    finished: bool
    def __init__(self, round: _Optional[int] = ..., finished: _Optional[bool] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("worker_id", "credential", "after_round", "wait_s")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    AFTER_ROUND_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    credential: str
    after_round: int
    wait_s: float
    def __init__(self, worker_id: _Optional[str] = ..., credential: _Optional[str] = ..., after_round: _Optional[int] = ..., wait_s: _Optional[float] = ...) -> None: ...

class MaskSpec(_message.Message):
    __slots__ = ("policy", "ratio", "round", "seed", "stride", "sweep_rounds", "layer_shift")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    RATIO_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    SWEEP_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    LAYER_SHIFT_FIELD_NUMBER: _ClassVar[int]
    policy: str
    ratio: float
    round: int
    seed: int
    stride: int
    sweep_rounds: int
    layer_shift: bool
    def __init__(self, policy: _Optional[str] = ..., ratio: _Optional[float] = ..., round: _Optional[int] = ..., seed: _Optional[int] = ..., stride: _Optional[int] = ..., sweep_rounds: _Optional[int] = ..., layer_shift: _Optional[bool] = ...) -> None: ...

class Assignment(_message.Message):
    __slots__ = ("round", "client_id", "mask", "payload", "deadline_s", "reason")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_S_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    round: int
    client_id: int
    mask: MaskSpec
    payload: PayloadHeader
    deadline_s: float
    reason: str
    def __init__(self, round: _Optional[int] = ..., client_id: _Optional[int] = ..., mask: _Optional[_Union[MaskSpec, _Mapping]] = ..., payload: _Optional[_Union[PayloadHeader, _Mapping]] = ..., deadline_s: _Optional[float] = ..., reason: _Optional[str] = ...) -> None: ...

class Wait(_message.Message):
    __slots__ = ("reason", "retry_after_s", "kind")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[Wait.Kind]
        NO_ROUND: _ClassVar[Wait.Kind]
        NOT_ASSIGNED: _ClassVar[Wait.Kind]
    KIND_UNSPECIFIED: Wait.Kind
    NO_ROUND: Wait.Kind
    NOT_ASSIGNED: Wait.Kind
    REASON_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_S_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    reason: str
    retry_after_s: float
    kind: Wait.Kind
    def __init__(self, reason: _Optional[str] = ..., retry_after_s: _Optional[float] = ..., kind: _Optional[_Union[Wait.Kind, str]] = ...) -> None: ...

class Finished(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class AssignmentMessage(_message.Message):
    __slots__ = ("assignment", "wait", "finished", "trailer")
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    TRAILER_FIELD_NUMBER: _ClassVar[int]
    assignment: Assignment
    wait: Wait
    finished: Finished
    trailer: PayloadTrailer
    def __init__(self, assignment: _Optional[_Union[Assignment, _Mapping]] = ..., wait: _Optional[_Union[Wait, _Mapping]] = ..., finished: _Optional[_Union[Finished, _Mapping]] = ..., trailer: _Optional[_Union[PayloadTrailer, _Mapping]] = ...) -> None: ...

class Measurements(_message.Message):
    __slots__ = ("compute_s", "peak_mem_bytes", "samples", "upper_loss", "receive_s")
    COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    PEAK_MEM_BYTES_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    UPPER_LOSS_FIELD_NUMBER: _ClassVar[int]
    RECEIVE_S_FIELD_NUMBER: _ClassVar[int]
    compute_s: float
    peak_mem_bytes: int
    samples: int
    upper_loss: float
    receive_s: float
    def __init__(self, compute_s: _Optional[float] = ..., peak_mem_bytes: _Optional[int] = ..., samples: _Optional[int] = ..., upper_loss: _Optional[float] = ..., receive_s: _Optional[float] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("worker_id", "credential", "round", "client_id", "measurements", "payload")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    MEASUREMENTS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    credential: str
    round: int
    client_id: int
    measurements: Measurements
    payload: PayloadHeader
    def __init__(self, worker_id: _Optional[str] = ..., credential: _Optional[str] = ..., round: _Optional[int] = ..., client_id: _Optional[int] = ..., measurements: _Optional[_Union[Measurements, _Mapping]] = ..., payload: _Optional[_Union[PayloadHeader, _Mapping]] = ...) -> None: ...

class UpdateMessage(_message.Message):
    __slots__ = ("header", "trailer")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    TRAILER_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    trailer: PayloadTrailer
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., trailer: _Optional[_Union[PayloadTrailer, _Mapping]] = ...) -> None: ...

class SubmitReply(_message.Message):
    __slots__ = ("accepted", "message")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    message: str
    def __init__(self, accepted: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("worker_id", "credential", "reason")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    credential: str
    reason: str
    def __init__(self, worker_id: _Optional[str] = ..., credential: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class LeaveReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
