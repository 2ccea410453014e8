from dreambooth.v1 import common_pb2 as _common_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GeneratePriorsRequest(_message.Message):
    __slots__ = ("base_model", "class_prompt", "negative_prompt", "num_images", "resolution", "steps", "guidance_scale", "scheduler", "seed", "tenant")
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    CLASS_PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGES_FIELD_NUMBER: _ClassVar[int]
    RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    base_model: str
    class_prompt: str
    negative_prompt: str
    num_images: int
    resolution: int
    steps: int
    guidance_scale: float
    scheduler: _common_pb2.Scheduler
    seed: int
    tenant: str
    def __init__(self, base_model: _Optional[str] = ..., class_prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., num_images: _Optional[int] = ..., resolution: _Optional[int] = ..., steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., scheduler: _Optional[_Union[_common_pb2.Scheduler, str]] = ..., seed: _Optional[int] = ..., tenant: _Optional[str] = ...) -> None: ...

class GeneratePriorsResponse(_message.Message):
    __slots__ = ("progress", "prior_set")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    PRIOR_SET_FIELD_NUMBER: _ClassVar[int]
    progress: _common_pb2.PriorProgress
    prior_set: PriorSet
    def __init__(self, progress: _Optional[_Union[_common_pb2.PriorProgress, _Mapping]] = ..., prior_set: _Optional[_Union[PriorSet, _Mapping]] = ...) -> None: ...

class PriorSet(_message.Message):
    __slots__ = ("key", "prefix", "count", "cached", "generated")
    KEY_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    GENERATED_FIELD_NUMBER: _ClassVar[int]
    key: str
    prefix: str
    count: int
    cached: bool
    generated: int
    def __init__(self, key: _Optional[str] = ..., prefix: _Optional[str] = ..., count: _Optional[int] = ..., cached: _Optional[bool] = ..., generated: _Optional[int] = ...) -> None: ...
