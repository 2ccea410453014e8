"""Settings of the inference service, from `DREAMBOOTH_INFERENCE_*` (store: `DREAMBOOTH_S3_*`)."""

from __future__ import annotations

import dataclasses

from services.common.settings import AuthSettings, ServerSettings, StoreSettings

ENV_PREFIX = "DREAMBOOTH_INFERENCE_"
GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class InferenceSettings:
    server: ServerSettings = dataclasses.field(
        default_factory=lambda: ServerSettings(port=50053, metrics_port=9183)
    )
    store: StoreSettings = dataclasses.field(default_factory=StoreSettings)
    auth: AuthSettings = dataclasses.field(default_factory=AuthSettings)
    # Loaded and warmed up before health says SERVING; "" = serve at once, load on demand.
    default_model: str = "tiny-sd"
    device: str = "cpu"  # "cuda" on a GPU node
    dtype: str = "float32"  # float32 | float16 | bfloat16 (half precision only on a GPU)
    torch_threads: int = 0  # intra-op threads; 0 = torch's default (one per core)
    # Request limits (the proto fixes 1..8 images and 1..150 steps).
    max_width: int = 1024
    max_height: int = 1024
    max_prompt_chars: int = 4096  # refused before tokenizing: bounds the work of a hostile prompt
    # Dynamic batching and admission.
    max_batch: int = 8  # images per UNet call (x2 rows with guidance)
    max_wait_ms: float = 5.0  # how long an idle worker waits for companions of a request
    max_queue: int = 64  # requests admitted but not yet sampling; past it RESOURCE_EXHAUSTED
    # Cost in megapixel-steps (services.common.cost). One request: 8 images of 512x512, 50 steps,
    # with guidance. The queue: what 8 such requests cost.
    max_request_cost: float = 210.0
    max_queued_cost: float = 1680.0
    workers: int = 1  # sampling threads; one per accelerator (one uses every CPU core)
    # Loaded models (LRU); components shared with another loaded model count once.
    cache_max_models: int = 4
    cache_max_bytes: int = 8 * GIB
    # LoRA adapters (LRU, beside the models): applied at run time on their resident base.
    adapter_cache_max_bytes: int = 1 * GIB
    preview_max_size: int = 256  # longest side of preview JPEGs, in pixels
    warmup_retry_seconds: float = 5.0  # retry period while the default model cannot be loaded
    usage_flush_seconds: float = 10.0  # how often per-tenant image counts reach the store (GetUsage)
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        for name in (
            "max_batch",
            "max_queue",
            "workers",
            "cache_max_models",
            "cache_max_bytes",
            "adapter_cache_max_bytes",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_width", "max_height"):
            value = getattr(self, name)
            if value < 64 or value % 8:
                raise ValueError(f"{name} must be a multiple of 8 and >= 64, got {value}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
