import datetime

from dreambooth.v1 import common_pb2 as _common_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TrainingJobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRAINING_JOB_STATE_UNSPECIFIED: _ClassVar[TrainingJobState]
    TRAINING_JOB_STATE_QUEUED: _ClassVar[TrainingJobState]
    TRAINING_JOB_STATE_GENERATING_PRIORS: _ClassVar[TrainingJobState]
    TRAINING_JOB_STATE_TRAINING: _ClassVar[TrainingJobState]
    TRAINING_JOB_STATE_PUBLISHING: _ClassVar[TrainingJobState]
    TRAINING_JOB_STATE_SUCCEEDED: _ClassVar[TrainingJobState]
    TRAINING_JOB_STATE_FAILED: _ClassVar[TrainingJobState]
    TRAINING_JOB_STATE_CANCELLED: _ClassVar[TrainingJobState]

class LrSchedule(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LR_SCHEDULE_UNSPECIFIED: _ClassVar[LrSchedule]
    LR_SCHEDULE_CONSTANT: _ClassVar[LrSchedule]
    LR_SCHEDULE_CONSTANT_WITH_WARMUP: _ClassVar[LrSchedule]
    LR_SCHEDULE_COSINE: _ClassVar[LrSchedule]
    LR_SCHEDULE_LINEAR: _ClassVar[LrSchedule]

class Optimizer(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OPTIMIZER_UNSPECIFIED: _ClassVar[Optimizer]
    OPTIMIZER_ADAMW: _ClassVar[Optimizer]
    OPTIMIZER_ADAMW_8BIT: _ClassVar[Optimizer]
    OPTIMIZER_PRODIGY: _ClassVar[Optimizer]

class MixedPrecision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MIXED_PRECISION_UNSPECIFIED: _ClassVar[MixedPrecision]
    MIXED_PRECISION_NO: _ClassVar[MixedPrecision]
    MIXED_PRECISION_BF16: _ClassVar[MixedPrecision]
    MIXED_PRECISION_FP16: _ClassVar[MixedPrecision]
TRAINING_JOB_STATE_UNSPECIFIED: TrainingJobState
TRAINING_JOB_STATE_QUEUED: TrainingJobState
TRAINING_JOB_STATE_GENERATING_PRIORS: TrainingJobState
TRAINING_JOB_STATE_TRAINING: TrainingJobState
TRAINING_JOB_STATE_PUBLISHING: TrainingJobState
TRAINING_JOB_STATE_SUCCEEDED: TrainingJobState
TRAINING_JOB_STATE_FAILED: TrainingJobState
TRAINING_JOB_STATE_CANCELLED: TrainingJobState
LR_SCHEDULE_UNSPECIFIED: LrSchedule
LR_SCHEDULE_CONSTANT: LrSchedule
LR_SCHEDULE_CONSTANT_WITH_WARMUP: LrSchedule
LR_SCHEDULE_COSINE: LrSchedule
LR_SCHEDULE_LINEAR: LrSchedule
OPTIMIZER_UNSPECIFIED: Optimizer
OPTIMIZER_ADAMW: Optimizer
OPTIMIZER_ADAMW_8BIT: Optimizer
OPTIMIZER_PRODIGY: Optimizer
MIXED_PRECISION_UNSPECIFIED: MixedPrecision
MIXED_PRECISION_NO: MixedPrecision
MIXED_PRECISION_BF16: MixedPrecision
MIXED_PRECISION_FP16: MixedPrecision

class UploadImagesRequest(_message.Message):
    __slots__ = ("image_header", "chunk")
    IMAGE_HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    image_header: ImageHeader
    chunk: bytes
    def __init__(self, image_header: _Optional[_Union[ImageHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class ImageHeader(_message.Message):
    __slots__ = ("filename", "size_bytes")
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    filename: str
    size_bytes: int
    def __init__(self, filename: _Optional[str] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class UploadImagesResponse(_message.Message):
    __slots__ = ("dataset",)
    DATASET_FIELD_NUMBER: _ClassVar[int]
    dataset: Dataset
    def __init__(self, dataset: _Optional[_Union[Dataset, _Mapping]] = ...) -> None: ...

class Dataset(_message.Message):
    __slots__ = ("name", "image_count", "size_bytes", "create_time")
    NAME_FIELD_NUMBER: _ClassVar[int]
    IMAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    name: str
    image_count: int
    size_bytes: int
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., image_count: _Optional[int] = ..., size_bytes: _Optional[int] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class TrainingJobSpec(_message.Message):
    __slots__ = ("base_model", "dataset", "instance_prompt", "identifier_token", "class_prompt", "with_prior_preservation", "prior_loss_weight", "num_class_images", "max_train_steps", "learning_rate", "train_text_encoder", "text_encoder_learning_rate", "lr_schedule", "lr_warmup_steps", "resolution", "train_batch_size", "gradient_accumulation_steps", "max_grad_norm", "mixed_precision", "gradient_checkpointing", "seed", "checkpointing_steps", "validation_prompts", "validation_steps", "center_crop", "random_flip", "use_lora", "lora_rank", "num_workers", "use_gpu", "model_id", "class_negative_prompt", "prior_steps", "snr_gamma", "noise_offset", "ema_decay", "optimizer", "use_dora", "additional_concepts")
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    IDENTIFIER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CLASS_PROMPT_FIELD_NUMBER: _ClassVar[int]
    WITH_PRIOR_PRESERVATION_FIELD_NUMBER: _ClassVar[int]
    PRIOR_LOSS_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASS_IMAGES_FIELD_NUMBER: _ClassVar[int]
    MAX_TRAIN_STEPS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    TRAIN_TEXT_ENCODER_FIELD_NUMBER: _ClassVar[int]
    TEXT_ENCODER_LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    LR_SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    LR_WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    TRAIN_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_ACCUMULATION_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    MIXED_PRECISION_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_CHECKPOINTING_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINTING_STEPS_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_STEPS_FIELD_NUMBER: _ClassVar[int]
    CENTER_CROP_FIELD_NUMBER: _ClassVar[int]
    RANDOM_FLIP_FIELD_NUMBER: _ClassVar[int]
    USE_LORA_FIELD_NUMBER: _ClassVar[int]
    LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    NUM_WORKERS_FIELD_NUMBER: _ClassVar[int]
    USE_GPU_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    CLASS_NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    PRIOR_STEPS_FIELD_NUMBER: _ClassVar[int]
    SNR_GAMMA_FIELD_NUMBER: _ClassVar[int]
    NOISE_OFFSET_FIELD_NUMBER: _ClassVar[int]
    EMA_DECAY_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    USE_DORA_FIELD_NUMBER: _ClassVar[int]
    ADDITIONAL_CONCEPTS_FIELD_NUMBER: _ClassVar[int]
    base_model: str
    dataset: str
    instance_prompt: str
    identifier_token: str
    class_prompt: str
    with_prior_preservation: bool
    prior_loss_weight: float
    num_class_images: int
    max_train_steps: int
    learning_rate: float
    train_text_encoder: bool
    text_encoder_learning_rate: float
    lr_schedule: LrSchedule
    lr_warmup_steps: int
    resolution: int
    train_batch_size: int
    gradient_accumulation_steps: int
    max_grad_norm: float
    mixed_precision: MixedPrecision
    gradient_checkpointing: bool
    seed: int
    checkpointing_steps: int
    validation_prompts: _containers.RepeatedScalarFieldContainer[str]
    validation_steps: int
    center_crop: bool
    random_flip: bool
    use_lora: bool
    lora_rank: int
    num_workers: int
    use_gpu: bool
    model_id: str
    class_negative_prompt: str
    prior_steps: int
    snr_gamma: float
    noise_offset: float
    ema_decay: float
    optimizer: Optimizer
    use_dora: bool
    additional_concepts: _containers.RepeatedCompositeFieldContainer[TrainingConcept]
    def __init__(self, base_model: _Optional[str] = ..., dataset: _Optional[str] = ..., instance_prompt: _Optional[str] = ..., identifier_token: _Optional[str] = ..., class_prompt: _Optional[str] = ..., with_prior_preservation: _Optional[bool] = ..., prior_loss_weight: _Optional[float] = ..., num_class_images: _Optional[int] = ..., max_train_steps: _Optional[int] = ..., learning_rate: _Optional[float] = ..., train_text_encoder: _Optional[bool] = ..., text_encoder_learning_rate: _Optional[float] = ..., lr_schedule: _Optional[_Union[LrSchedule, str]] = ..., lr_warmup_steps: _Optional[int] = ..., resolution: _Optional[int] = ..., train_batch_size: _Optional[int] = ..., gradient_accumulation_steps: _Optional[int] = ..., max_grad_norm: _Optional[float] = ..., mixed_precision: _Optional[_Union[MixedPrecision, str]] = ..., gradient_checkpointing: _Optional[bool] = ..., seed: _Optional[int] = ..., checkpointing_steps: _Optional[int] = ..., validation_prompts: _Optional[_Iterable[str]] = ..., validation_steps: _Optional[int] = ..., center_crop: _Optional[bool] = ..., random_flip: _Optional[bool] = ..., use_lora: _Optional[bool] = ..., lora_rank: _Optional[int] = ..., num_workers: _Optional[int] = ..., use_gpu: _Optional[bool] = ..., model_id: _Optional[str] = ..., class_negative_prompt: _Optional[str] = ..., prior_steps: _Optional[int] = ..., snr_gamma: _Optional[float] = ..., noise_offset: _Optional[float] = ..., ema_decay: _Optional[float] = ..., optimizer: _Optional[_Union[Optimizer, str]] = ..., use_dora: _Optional[bool] = ..., additional_concepts: _Optional[_Iterable[_Union[TrainingConcept, _Mapping]]] = ...) -> None: ...

class TrainingConcept(_message.Message):
    __slots__ = ("dataset", "instance_prompt", "identifier_token", "class_prompt")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    IDENTIFIER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CLASS_PROMPT_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    instance_prompt: str
    identifier_token: str
    class_prompt: str
    def __init__(self, dataset: _Optional[str] = ..., instance_prompt: _Optional[str] = ..., identifier_token: _Optional[str] = ..., class_prompt: _Optional[str] = ...) -> None: ...

class TrainingProgress(_message.Message):
    __slots__ = ("step", "total_steps", "loss", "learning_rate", "eta_seconds", "samples_per_second")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    ETA_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    step: int
    total_steps: int
    loss: float
    learning_rate: float
    eta_seconds: float
    samples_per_second: float
    def __init__(self, step: _Optional[int] = ..., total_steps: _Optional[int] = ..., loss: _Optional[float] = ..., learning_rate: _Optional[float] = ..., eta_seconds: _Optional[float] = ..., samples_per_second: _Optional[float] = ...) -> None: ...

class TrainingJob(_message.Message):
    __slots__ = ("name", "spec", "state", "progress", "model", "error_message", "request_id", "create_time", "start_time", "end_time", "update_time", "checkpoint_step")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_STEP_FIELD_NUMBER: _ClassVar[int]
    name: str
    spec: TrainingJobSpec
    state: TrainingJobState
    progress: TrainingProgress
    model: str
    error_message: str
    request_id: str
    create_time: _timestamp_pb2.Timestamp
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    checkpoint_step: int
    def __init__(self, name: _Optional[str] = ..., spec: _Optional[_Union[TrainingJobSpec, _Mapping]] = ..., state: _Optional[_Union[TrainingJobState, str]] = ..., progress: _Optional[_Union[TrainingProgress, _Mapping]] = ..., model: _Optional[str] = ..., error_message: _Optional[str] = ..., request_id: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., checkpoint_step: _Optional[int] = ...) -> None: ...

class CreateTrainingJobRequest(_message.Message):
    __slots__ = ("spec", "request_id")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    spec: TrainingJobSpec
    request_id: str
    def __init__(self, spec: _Optional[_Union[TrainingJobSpec, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class CreateTrainingJobResponse(_message.Message):
    __slots__ = ("training_job",)
    TRAINING_JOB_FIELD_NUMBER: _ClassVar[int]
    training_job: TrainingJob
    def __init__(self, training_job: _Optional[_Union[TrainingJob, _Mapping]] = ...) -> None: ...

class GetTrainingJobRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GetTrainingJobResponse(_message.Message):
    __slots__ = ("training_job",)
    TRAINING_JOB_FIELD_NUMBER: _ClassVar[int]
    training_job: TrainingJob
    def __init__(self, training_job: _Optional[_Union[TrainingJob, _Mapping]] = ...) -> None: ...

class ListTrainingJobsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "state")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    state: TrainingJobState
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., state: _Optional[_Union[TrainingJobState, str]] = ...) -> None: ...

class ListTrainingJobsResponse(_message.Message):
    __slots__ = ("training_jobs", "next_page_token")
    TRAINING_JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    training_jobs: _containers.RepeatedCompositeFieldContainer[TrainingJob]
    next_page_token: str
    def __init__(self, training_jobs: _Optional[_Iterable[_Union[TrainingJob, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelTrainingJobRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class CancelTrainingJobResponse(_message.Message):
    __slots__ = ("training_job",)
    TRAINING_JOB_FIELD_NUMBER: _ClassVar[int]
    training_job: TrainingJob
    def __init__(self, training_job: _Optional[_Union[TrainingJob, _Mapping]] = ...) -> None: ...

class WatchTrainingJobRequest(_message.Message):
    __slots__ = ("name", "after_sequence")
    NAME_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    after_sequence: int
    def __init__(self, name: _Optional[str] = ..., after_sequence: _Optional[int] = ...) -> None: ...

class WatchTrainingJobResponse(_message.Message):
    __slots__ = ("sequence", "event_time", "state_change", "progress", "prior_progress", "preview")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    EVENT_TIME_FIELD_NUMBER: _ClassVar[int]
    STATE_CHANGE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    PRIOR_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    event_time: _timestamp_pb2.Timestamp
    state_change: TrainingJob
    progress: TrainingProgress
    prior_progress: _common_pb2.PriorProgress
    preview: ValidationPreview
    def __init__(self, sequence: _Optional[int] = ..., event_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., state_change: _Optional[_Union[TrainingJob, _Mapping]] = ..., progress: _Optional[_Union[TrainingProgress, _Mapping]] = ..., prior_progress: _Optional[_Union[_common_pb2.PriorProgress, _Mapping]] = ..., preview: _Optional[_Union[ValidationPreview, _Mapping]] = ...) -> None: ...

class ValidationPreview(_message.Message):
    __slots__ = ("step", "prompt", "image")
    STEP_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    step: int
    prompt: str
    image: _common_pb2.Image
    def __init__(self, step: _Optional[int] = ..., prompt: _Optional[str] = ..., image: _Optional[_Union[_common_pb2.Image, _Mapping]] = ...) -> None: ...

class GetUsageRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetUsageResponse(_message.Message):
    __slots__ = ("tenant", "training_step_seconds", "images_generated", "stored_bytes", "active_training_jobs", "quotas")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    TRAINING_STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    IMAGES_GENERATED_FIELD_NUMBER: _ClassVar[int]
    STORED_BYTES_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_TRAINING_JOBS_FIELD_NUMBER: _ClassVar[int]
    QUOTAS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    training_step_seconds: float
    images_generated: int
    stored_bytes: int
    active_training_jobs: int
    quotas: TenantQuotas
    def __init__(self, tenant: _Optional[str] = ..., training_step_seconds: _Optional[float] = ..., images_generated: _Optional[int] = ..., stored_bytes: _Optional[int] = ..., active_training_jobs: _Optional[int] = ..., quotas: _Optional[_Union[TenantQuotas, _Mapping]] = ...) -> None: ...

class TenantQuotas(_message.Message):
    __slots__ = ("max_concurrent_jobs", "max_generate_streams", "max_stored_bytes")
    MAX_CONCURRENT_JOBS_FIELD_NUMBER: _ClassVar[int]
    MAX_GENERATE_STREAMS_FIELD_NUMBER: _ClassVar[int]
    MAX_STORED_BYTES_FIELD_NUMBER: _ClassVar[int]
    max_concurrent_jobs: int
    max_generate_streams: int
    max_stored_bytes: int
    def __init__(self, max_concurrent_jobs: _Optional[int] = ..., max_generate_streams: _Optional[int] = ..., max_stored_bytes: _Optional[int] = ...) -> None: ...

class DeleteTrainingJobRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteTrainingJobResponse(_message.Message):
    __slots__ = ("training_job",)
    TRAINING_JOB_FIELD_NUMBER: _ClassVar[int]
    training_job: TrainingJob
    def __init__(self, training_job: _Optional[_Union[TrainingJob, _Mapping]] = ...) -> None: ...

class DeleteDatasetRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteDatasetResponse(_message.Message):
    __slots__ = ("dataset",)
    DATASET_FIELD_NUMBER: _ClassVar[int]
    dataset: Dataset
    def __init__(self, dataset: _Optional[_Union[Dataset, _Mapping]] = ...) -> None: ...

class DeleteModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.Model
    def __init__(self, model: _Optional[_Union[_common_pb2.Model, _Mapping]] = ...) -> None: ...

class DownloadTrainingJobLogsRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DownloadTrainingJobLogsResponse(_message.Message):
    __slots__ = ("manifest", "file", "chunk")
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    manifest: TrainingJobLogs
    file: TrainingJobLogFile
    chunk: bytes
    def __init__(self, manifest: _Optional[_Union[TrainingJobLogs, _Mapping]] = ..., file: _Optional[_Union[TrainingJobLogFile, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class TrainingJobLogs(_message.Message):
    __slots__ = ("name", "files")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    name: str
    files: _containers.RepeatedCompositeFieldContainer[TrainingJobLogFile]
    def __init__(self, name: _Optional[str] = ..., files: _Optional[_Iterable[_Union[TrainingJobLogFile, _Mapping]]] = ...) -> None: ...

class TrainingJobLogFile(_message.Message):
    __slots__ = ("path", "sha256", "size_bytes")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    path: str
    sha256: str
    size_bytes: int
    def __init__(self, path: _Optional[str] = ..., sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ...) -> None: ...
