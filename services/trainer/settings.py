"""Settings of the trainer service, from `DREAMBOOTH_TRAINER_*` (store: `DREAMBOOTH_S3_*`)."""

from __future__ import annotations

import dataclasses

from services.common.settings import AuthSettings, ServerSettings, StoreSettings, from_env

ENV_PREFIX = "DREAMBOOTH_TRAINER_"

MIB = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class UploadLimits:
    """Bounds of one UploadImages stream; everything past them is refused before it is stored."""

    max_images: int = 50
    max_image_bytes: int = 20 * MIB  # one encoded image as uploaded
    max_total_bytes: int = 200 * MIB  # the whole upload
    max_chunk_bytes: int = 1 * MIB
    max_image_pixels: int = 40_000_000  # decoded width * height; larger is treated as a bomb
    max_stream_pixels: int = 400_000_000  # decoded pixels of one whole upload (e.g. 33 photos of 12 MP)
    min_image_side: int = 64  # the smallest training resolution: smaller would only be upscaled
    max_aspect_ratio: float = 4.0  # longer side / shorter side; resized by the shorter side, a
    # 1x40000 strip would become a 64x2.56M-pixel training image
    max_concurrent_uploads: int = 8  # UploadImages streams at once (each holds up to max_total_bytes)
    idle_seconds: float = 30.0  # an upload stream silent this long is ended
    decode_workers: int = 1  # threads that decode uploads, apart from the RPC threads


@dataclasses.dataclass(frozen=True)
class SpecLimits:
    """Bounds CreateTrainingJob enforces on a spec (DESIGN §9: limits on steps, resolution...)."""

    max_steps: int = 20_000
    max_workers: int = 8
    min_resolution: int = 64
    max_resolution: int = 1024
    max_prompt_chars: int = 1000
    max_validation_prompts: int = 8
    max_class_images: int = 1000
    max_prior_steps: int = 150
    max_batch_size: int = 64
    max_gradient_accumulation_steps: int = 128
    max_lora_rank: int = 256
    max_additional_concepts: int = 7  # subjects besides the spec's own (TrainerSettings.max_concepts - 1)
    # A job's cost in megapixel-steps (services.common.cost): 20,000 steps at 512x512 with prior
    # preservation fit; a batch of 64 at 1024x1024 for 20,000 steps (x250) does not.
    max_job_cost: float = 50_000.0


@dataclasses.dataclass(frozen=True)
class TrackingSettings:
    """Where rank 0 logs a run besides the TensorBoard files it always writes to the store
    (DREAMBOOTH_TRAINER_MLFLOW_*). MLflow is an optional extra: `pip install dreambooth-service[mlflow]`
    wherever the Ray workers run."""

    mlflow_tracking_uri: str = ""  # "" = no MLflow; e.g. http://mlflow:5000 or file:/data/mlruns
    mlflow_experiment: str = "dreambooth"  # the experiment every job's run goes into


@dataclasses.dataclass(frozen=True)
class TrainerSettings:
    server: ServerSettings = dataclasses.field(
        default_factory=lambda: ServerSettings(port=50051, metrics_port=9181)
    )
    store: StoreSettings = dataclasses.field(default_factory=StoreSettings)
    auth: AuthSettings = dataclasses.field(default_factory=AuthSettings)
    tracking: TrackingSettings = dataclasses.field(default_factory=TrackingSettings)
    priorgen_address: str = "127.0.0.1:50052"
    # The trainer's service identity towards priorgen: a key of an internal tenant (secret: set it
    # from a Secret), and/or TLS with a client certificate when priorgen requires mTLS.
    priorgen_api_key: str = ""
    priorgen_tls: bool = False
    priorgen_ca_cert_file: str = ""  # PEM of the CA that signed priorgen's certificate ("" = system's)
    priorgen_client_cert_file: str = ""
    priorgen_client_key_file: str = ""
    ray_address: str = ""  # "" = local Ray in this process; else a cluster (ray://host:10001 or auto)
    ray_storage_path: str = ""  # Ray Train's run storage; "" = the trainer-core default
    max_concurrent_jobs: int = 1  # jobs past this wait QUEUED
    max_failures: int = 1  # worker failures Ray Train retries from the newest checkpoint
    priorgen_attempts: int = 3  # tries of GeneratePriors while the service is unavailable
    priorgen_retry_seconds: float = 2.0  # first back-off between those tries (doubles)
    progress_persist_seconds: float = 5.0  # how often progress reaches job.json / events.jsonl
    log_level: str = "INFO"
    # Upload limits.
    max_upload_images: int = 50
    max_image_bytes: int = 20 * MIB
    max_upload_bytes: int = 200 * MIB
    max_image_pixels: int = 40_000_000
    max_upload_pixels: int = 400_000_000
    min_image_side: int = 64
    max_aspect_ratio: float = 4.0
    max_concurrent_uploads: int = 8
    upload_idle_seconds: float = 30.0
    upload_decode_workers: int = 1
    # Spec limits.
    max_workers: int = 8
    max_steps: int = 20_000
    max_resolution: int = 1024
    max_prompt_chars: int = 1000
    max_concepts: int = 8  # subjects one job may train (the spec's own and its additional concepts)

    def __post_init__(self) -> None:
        for name in (
            "max_concurrent_jobs",
            "max_upload_images",
            "max_concurrent_uploads",
            "upload_decode_workers",
            "max_workers",
            "max_steps",
            "priorgen_attempts",
            "max_concepts",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.tracking.mlflow_tracking_uri and not self.tracking.mlflow_experiment:
            raise ValueError("mlflow_experiment must not be empty when mlflow_tracking_uri is set")
        if self.max_resolution < 64 or self.max_resolution % 8:
            raise ValueError(f"max_resolution must be a multiple of 8 and >= 64, got {self.max_resolution}")

    @property
    def upload_limits(self) -> UploadLimits:
        return UploadLimits(
            max_images=self.max_upload_images,
            max_image_bytes=self.max_image_bytes,
            max_total_bytes=self.max_upload_bytes,
            max_image_pixels=self.max_image_pixels,
            max_stream_pixels=self.max_upload_pixels,
            min_image_side=self.min_image_side,
            max_aspect_ratio=self.max_aspect_ratio,
            max_concurrent_uploads=self.max_concurrent_uploads,
            idle_seconds=self.upload_idle_seconds,
            decode_workers=self.upload_decode_workers,
        )

    @property
    def spec_limits(self) -> SpecLimits:
        return SpecLimits(
            max_steps=self.max_steps,
            max_workers=self.max_workers,
            max_resolution=self.max_resolution,
            max_prompt_chars=self.max_prompt_chars,
            max_additional_concepts=self.max_concepts - 1,
        )


def load_settings() -> TrainerSettings:
    return from_env(TrainerSettings, ENV_PREFIX)
