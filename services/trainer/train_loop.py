"""The DreamBooth training loop that runs inside every Ray Train worker (DESIGN §7).

`train(job, runtime)` reads like the steps of a pipeline:

    1. Context: the job (from the driver's config) and the runtime (rank, device, channel)
    2. Base model from the model store; the trainable part (full UNet, or LoRA adapters)
    3. Resume from the job's newest checkpoint in the store, if any
    4. Data: subject and class-prior latents, text embeddings — computed once, before the loop
    5. Optimizer, LR schedule, DDP
    6. The loop: instance + class examples in one batch, noise MSE + w x prior MSE, gradient
       accumulation, clipping, mixed precision; every N steps a checkpoint; previews
    7. Rank 0 publishes the model

Everything the worker needs arrives in `config` (never globals). Every worker runs the same
collectives and `ray.train.report` calls at the same points; only rank 0 writes to the store
and talks to the driver. Randomness comes from generators seeded by (seed, rank, step,
micro-step), so a resumed run draws exactly what the uninterrupted run would have drawn.

`Runtime` is the loop's only view of its surroundings: `RayRuntime` inside Ray Train, the base
class in a single process (unit tests).
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from services.common.errors import FailedPrecondition
from services.common.model_store import ModelStore
from services.common.settings import StoreSettings
from services.common.store_factory import open_store
from services.trainer import checkpoints, data
from services.trainer.job_spec import JobSpec
from services.trainer.train_outputs import (
    load_lora_pipeline,
    publish,
    send_previews,
    unwrap,
)

log = logging.getLogger(__name__)

ADAM_WEIGHT_DECAY = 1e-2  # diffusers' train_dreambooth.py defaults
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
LORA_UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
LORA_TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
# Rank 0 talks to the driver at most this often (the driver drains every 0.25 s anyway): a remote
# call per step would cost a few % of a small model's step time on a busy CPU.
TALK_INTERVAL_S = 0.25


# 1. Context: what a worker is told, and how it talks to the rest of the run


@dataclass(frozen=True)
class WorkerJob:
    """Everything a worker needs, passed in (never read from globals)."""

    job_id: str
    spec: JobSpec
    store_settings: StoreSettings
    prior_prefix: str | None = None
    fail_once_at_step: int | None = None  # test hook: the last rank raises once at this step


class Runtime:
    """How the loop talks to its surroundings: the driver (progress out, cancel in), the other
    workers (collectives) and Ray Train (model preparation, reports). This base class is the
    single-process runtime; RayRuntime is the one used in production."""

    def __init__(self, device: torch.device | None = None, rank: int = 0, world_size: int = 1) -> None:
        self.device = device or torch.device("cpu")
        self.rank = rank
        self.world_size = world_size
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self.reports: list[dict[str, Any]] = []
        self.cancelled = threading.Event()  # set from any thread to stop the run
        self._fault_taken = False

    @property
    def is_chief(self) -> bool:
        return self.rank == 0

    def send(self, kind: str, payload: dict[str, Any]) -> None:
        if self.is_chief:
            self.messages.append((kind, payload))

    def flush(self) -> None:
        """Deliver messages held back so far (called when the run ends, however it ends)."""

    def poll_cancel(self) -> bool:
        """Rank 0's look at the cancel flag; must never block a step."""
        return self.cancelled.is_set()

    def cancel_requested(self) -> bool:
        """Rank 0's blocking look at the cancel flag (between setup phases)."""
        return self.poll_cancel()

    def take_fault(self) -> bool:
        taken, self._fault_taken = self._fault_taken, True
        return not taken

    def prepare_model(self, module: torch.nn.Module) -> torch.nn.Module:
        return module.to(self.device)

    def report(self, metrics: dict[str, Any], pointer: dict[str, Any] | None) -> None:
        self.reports.append({**metrics, "pointer": pointer})

    # Collectives: every rank calls them at the same points.

    def agree(self, flag: bool) -> bool:
        """Rank 0's flag, on every rank: ranks must leave together or a collective hangs."""
        if self.world_size == 1:
            return flag
        import torch.distributed as dist

        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.broadcast(value, src=0)
        return bool(value.item() > 0)

    def reduce_step(self, loss: torch.Tensor, cancel: bool) -> tuple[float, bool]:
        """Mean loss over workers and rank 0's cancel decision, in one collective."""
        if self.world_size == 1:
            return float(loss.item()), cancel
        import torch.distributed as dist

        stats = torch.stack([loss.float(), torch.tensor(1.0 if cancel else 0.0, device=loss.device)])
        dist.all_reduce(stats)
        return float(stats[0].item()) / self.world_size, bool(stats[1].item() > 0)


class RayRuntime(Runtime):
    """Inside a Ray Train worker: the driver's JobChannel actor and ray.train's API."""

    def __init__(self, channel: Any) -> None:
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        super().__init__(ray.train.torch.get_device(), context.get_world_rank(), context.get_world_size())
        self.channel = channel
        self._outbox: list[tuple[str, dict[str, Any]]] = []
        self._last_flush = 0.0
        self._pending_cancel: Any = None
        self._last_cancel_poll = 0.0

    def send(self, kind: str, payload: dict[str, Any]) -> None:
        """Progress is batched (at most one call per TALK_INTERVAL_S); anything else goes at once,
        after the progress before it."""
        if not self.is_chief:
            return
        self._outbox.append((kind, payload))
        if kind != "progress" or time.monotonic() - self._last_flush >= TALK_INTERVAL_S:
            self.flush()

    def flush(self) -> None:
        if self._outbox:  # fire and forget; a plain actor runs one caller's calls in order
            self.channel.push_many.remote(self._outbox)
            self._outbox = []
        self._last_flush = time.monotonic()

    def poll_cancel(self) -> bool:
        import ray

        if not self.is_chief:
            return False
        if self._pending_cancel is None:  # one request in flight; its answer is read later
            if time.monotonic() - self._last_cancel_poll >= TALK_INTERVAL_S:
                self._pending_cancel = self.channel.cancelled.remote()
                self._last_cancel_poll = time.monotonic()
            return False
        ready, _ = ray.wait([self._pending_cancel], timeout=0)
        if not ready:
            return False
        flag, self._pending_cancel = bool(ray.get(self._pending_cancel)), None
        return flag

    def cancel_requested(self) -> bool:
        import ray

        return bool(ray.get(self.channel.cancelled.remote())) if self.is_chief else False

    def take_fault(self) -> bool:
        import ray

        return bool(ray.get(self.channel.take_fault.remote()))  # once per run, across retries

    def prepare_model(self, module: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(module)  # to the device; DDP when world_size > 1

    def report(self, metrics: dict[str, Any], pointer: dict[str, Any] | None) -> None:
        """Every rank reports at the same points (Ray synchronises on it). Rank 0's checkpoint is
        a pointer to the store folder, so Ray's record and the store agree."""
        import ray.train

        if pointer is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="dreambooth-pointer-") as tmp:
            (Path(tmp) / "pointer.json").write_text(json.dumps(pointer))
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=f"step-{pointer['step']:08d}",
                delete_local_checkpoint_after_upload=False,
            )


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry point: everything comes from `config` (built by ray_runner)."""
    job = WorkerJob(
        job_id=config["job_id"],
        spec=JobSpec.from_json(config["spec"]),
        store_settings=config["store_settings"],
        prior_prefix=config.get("prior_prefix"),
        fail_once_at_step=config.get("fail_once_at_step"),
    )
    runtime = RayRuntime(config["channel"])
    if runtime.device.type == "cpu":
        torch.set_num_threads(max(1, int(config.get("cpus_per_worker", 1))))
    try:
        train(job, runtime)
    finally:
        runtime.flush()


# The run


def train(job: WorkerJob, runtime: Runtime) -> None:
    """One worker's whole run: resume, train, checkpoint, and (rank 0) publish."""
    from services.common.pipelines import disable_progress_bars

    disable_progress_bars()
    spec, device = job.spec, runtime.device
    if runtime.agree(runtime.cancel_requested()):
        return
    use_amp = device.type == "cuda" and spec.mixed_precision in ("bf16", "fp16")
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[spec.mixed_precision] if use_amp else None

    # 2. Base model and its trainable part.
    store = open_store(job.store_settings)
    model_store = ModelStore(store, Path(job.store_settings.cache_dir))
    models = load_base_model(model_store.materialize(spec.base_model))
    configure_trainable(models, spec, device, weight_dtype or torch.float32)
    modules = trained_modules(models, spec)

    # 3. Resume: the store is the source of truth (covers Ray retries and trainer restarts).
    start_step = checkpoints.newest_step(store, job.job_id) or 0
    resumed = checkpoints.load(store, job.job_id, start_step) if start_step else None
    if resumed is not None:
        load_trainable_state(modules, resumed.trainable, spec.use_lora)
    runtime.send("started", {"step": start_step, "world_size": runtime.world_size})
    if runtime.agree(runtime.cancel_requested()):
        return

    # 4. Data: latents and (frozen text encoder) embeddings, once.
    batch_data = prepare_data(job, models, store, device)
    if runtime.agree(runtime.cancel_requested()):
        return

    # 5. Optimizer, schedule, DDP.
    for name in list(modules):
        modules[name] = runtime.prepare_model(modules[name])
    optimizer, lr_scheduler = make_optimizer(modules, spec)
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp and spec.mixed_precision == "fp16")
    if resumed is not None:
        optimizer.load_state_dict(resumed.optimizer)
        lr_scheduler.load_state_dict(resumed.lr_scheduler)
        if resumed.grad_scaler:
            scaler.load_state_dict(resumed.grad_scaler)
        restore_rng(resumed.rng)
    unet = modules["unet"]
    text_encoder = modules.get("text_encoder", models.text_encoder)
    params = [p for group in optimizer.param_groups for p in group["params"]]

    # 6. The loop.
    accumulation = spec.gradient_accumulation_steps
    examples_per_step = spec.train_batch_size * accumulation * runtime.world_size
    examples_per_step *= 2 if spec.with_prior_preservation else 1
    throughput = None
    for step in range(start_step, spec.max_train_steps):
        started = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        for micro in range(accumulation):
            generator = step_generator(spec.seed, runtime.rank, step, micro)
            with (
                no_sync(modules.values(), enabled=micro < accumulation - 1),
                torch.autocast(device.type, dtype=weight_dtype, enabled=use_amp),
            ):
                loss, _ = dreambooth_loss(unet, text_encoder, models, batch_data, spec, generator, device)
            scaler.scale(loss / accumulation).backward()
            loss_sum += loss.detach()
        scaler.unscale_(optimizer)
        if spec.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm)
        learning_rate = optimizer.param_groups[0]["lr"]  # the UNet's rate this step used
        scaler.step(optimizer)
        scaler.update()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1

        mean_loss, cancelled = runtime.reduce_step(loss_sum / accumulation, runtime.poll_cancel())
        rate = examples_per_step / max(time.perf_counter() - started, 1e-9)
        throughput = rate if throughput is None else 0.8 * throughput + 0.2 * rate
        runtime.send(
            "progress",
            {
                "step": done,
                "total_steps": spec.max_train_steps,
                "loss": mean_loss,
                "learning_rate": learning_rate,
                "samples_per_second": throughput,
                "time": time.time(),
            },
        )
        if cancelled:
            return
        if job.fail_once_at_step == done and runtime.rank == runtime.world_size - 1 and runtime.take_fault():
            raise RuntimeError(f"injected worker failure at step {done} (fail_once_at_step)")
        if done % spec.checkpointing_steps == 0 and done < spec.max_train_steps:
            pointer = None
            if runtime.is_chief:
                pointer = save_checkpoint(job, store, done, modules, optimizer, lr_scheduler, scaler, runtime)
            runtime.report({"step": done, "loss": mean_loss}, pointer)
        previews_due = spec.validation_steps > 0 and done % spec.validation_steps == 0
        if spec.validation_prompts and previews_due and done < spec.max_train_steps and runtime.is_chief:
            send_previews(job, models, done, runtime, weight_dtype)

    # 7. Publish (rank 0); every rank reports the end, so Ray sees one consistent last result.
    final_step = max(start_step, spec.max_train_steps)
    if runtime.is_chief:
        if spec.validation_prompts:
            send_previews(job, models, final_step, runtime, weight_dtype)
        runtime.send("publishing", {"step": final_step})
        publish(job, model_store, models, modules)
        runtime.send("published", {"step": final_step, "model_id": spec.model_id})
    runtime.report({"step": final_step, "published": True, "model_id": spec.model_id}, None)


# 2. Models


@dataclass
class Models:
    folder: Path
    tokenizer: Any
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: Any


def load_base_model(folder: Path) -> Models:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0
    from transformers import CLIPTextModel, CLIPTokenizer

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", use_safetensors=True)
    unet.set_attn_processor(AttnProcessor2_0())  # SDPA: flash / memory-efficient kernels on GPU
    return Models(
        folder=folder,
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        text_encoder=CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", use_safetensors=True),
        vae=AutoencoderKL.from_pretrained(folder, subfolder="vae", use_safetensors=True),
        unet=unet,
        noise_scheduler=DDPMScheduler.from_pretrained(folder, subfolder="scheduler"),
    )


def configure_trainable(
    models: Models, spec: JobSpec, device: torch.device, weight_dtype: torch.dtype
) -> None:
    """Freeze what is not trained and add LoRA adapters in LoRA mode. Frozen weights go to
    `weight_dtype` (half precision on GPU); trained ones stay fp32 (the optimizer's master copy)."""
    models.vae.requires_grad_(False).eval().to(device)  # fp32: it encodes once per job anyway
    models.text_encoder.requires_grad_(spec.train_text_encoder and not spec.use_lora)
    models.unet.requires_grad_(not spec.use_lora)
    if spec.use_lora:
        models.unet.to(device, weight_dtype)
        models.unet.add_adapter(_lora_config(spec.lora_rank, LORA_UNET_TARGETS))
        if spec.train_text_encoder:
            models.text_encoder.to(device, weight_dtype)
            models.text_encoder.add_adapter(_lora_config(spec.lora_rank, LORA_TEXT_TARGETS))
        for module in (models.unet, models.text_encoder):
            for param in module.parameters():
                if param.requires_grad:
                    param.data = param.data.float()
    if not spec.train_text_encoder:
        models.text_encoder.eval().to(device, weight_dtype)
    if spec.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
        if spec.train_text_encoder:
            enable = getattr(
                models.text_encoder, "activation_checkpointing_enable", None
            )  # transformers>=5.x
            (enable or models.text_encoder.gradient_checkpointing_enable)()
    models.unet.train()
    if spec.train_text_encoder:
        models.text_encoder.train()


def _lora_config(rank: int, targets: list[str]) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=targets)


def trained_modules(models: Models, spec: JobSpec) -> dict[str, torch.nn.Module]:
    modules: dict[str, torch.nn.Module] = {"unet": models.unet}
    if spec.train_text_encoder:
        modules["text_encoder"] = models.text_encoder
    return modules


def trainable_state(modules: dict[str, torch.nn.Module], use_lora: bool) -> dict[str, torch.Tensor]:
    """What a checkpoint must hold: the LoRA adapters, or the full weights of trained modules."""
    from peft.utils import get_peft_model_state_dict

    state = {}
    for name, module in modules.items():
        weights = get_peft_model_state_dict(unwrap(module)) if use_lora else unwrap(module).state_dict()
        state.update({f"{name}.{key}": value.detach().cpu() for key, value in weights.items()})
    return state


def load_trainable_state(
    modules: dict[str, torch.nn.Module], state: dict[str, torch.Tensor], use_lora: bool
) -> None:
    from peft.utils import set_peft_model_state_dict

    for name, module in modules.items():
        prefix = f"{name}."
        weights = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
        if not weights:
            raise FailedPrecondition(f"the checkpoint has no weights for {name}: was the job's spec changed?")
        if use_lora:
            result = set_peft_model_state_dict(unwrap(module), weights)
            if getattr(result, "unexpected_keys", None):
                raise FailedPrecondition(f"the checkpoint's {name} adapters do not match the job's LoRA rank")
        else:
            unwrap(module).load_state_dict(weights, strict=True)


# 4. Data


@dataclass
class TrainingData:
    instance: data.LatentPool
    prior: data.LatentPool | None
    instance_ids: torch.Tensor  # [1, 77] token ids
    class_ids: torch.Tensor | None
    instance_embeds: torch.Tensor | None  # cached when the text encoder is frozen
    class_embeds: torch.Tensor | None


def prepare_data(job: WorkerJob, models: Models, store: Any, device: torch.device) -> TrainingData:
    spec = job.spec
    views = {"center_crop": spec.center_crop, "random_flip": spec.random_flip, "device": device}
    instance_images = data.load_images(store, data.dataset_image_keys(store, spec.dataset))
    instance = data.encode_views(models.vae, instance_images, spec.resolution, seed=spec.seed, **views)
    prior = class_ids = None
    if spec.with_prior_preservation:
        if not job.prior_prefix:
            raise FailedPrecondition("with_prior_preservation is on but no class-prior images were given")
        keys = data.prior_image_keys(store, job.prior_prefix, spec.num_class_images)
        prior_images = data.iter_images(store, keys)
        prior = data.encode_views(models.vae, prior_images, spec.resolution, seed=spec.seed + 1, **views)
        prior = prior.to(device)
        class_ids = data.tokenize(models.tokenizer, spec.class_prompt)
    instance_ids = data.tokenize(models.tokenizer, spec.instance_prompt)
    instance_embeds = class_embeds = None
    if not spec.train_text_encoder:
        with torch.no_grad():
            instance_embeds = models.text_encoder(instance_ids.to(device))[0]
            if class_ids is not None:
                class_embeds = models.text_encoder(class_ids.to(device))[0]
    return TrainingData(
        instance=instance.to(device),
        prior=prior,
        instance_ids=instance_ids,
        class_ids=class_ids,
        instance_embeds=instance_embeds,
        class_embeds=class_embeds,
    )


def step_generator(seed: int, rank: int, step: int, micro: int) -> torch.Generator:
    """The random stream of one micro-step: a pure function of where it is (so resumable)."""
    mixed = (seed * 0x9E3779B1 + rank * 0x85EBCA77 + step * 0xC2B2AE3D + micro * 0x27D4EB2F) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


# 5. Optimizer


def make_optimizer(modules: dict[str, torch.nn.Module], spec: JobSpec) -> tuple[Any, Any]:
    """AdamW (one parameter group per trained module, each with its learning rate) and the
    LR schedule (diffusers' get_scheduler: constant, constant_with_warmup, cosine, linear)."""
    from diffusers.optimization import get_scheduler

    rates = {"unet": spec.learning_rate, "text_encoder": spec.text_encoder_learning_rate}
    groups = [
        {"params": [p for p in module.parameters() if p.requires_grad], "lr": rates[name]}
        for name, module in modules.items()
    ]
    optimizer = torch.optim.AdamW(groups, betas=ADAM_BETAS, weight_decay=ADAM_WEIGHT_DECAY, eps=ADAM_EPS)
    scheduler = get_scheduler(
        spec.lr_schedule,
        optimizer=optimizer,
        num_warmup_steps=spec.lr_warmup_steps,
        num_training_steps=spec.max_train_steps,
    )
    return optimizer, scheduler


@contextlib.contextmanager
def no_sync(modules: Iterable[torch.nn.Module], enabled: bool) -> Iterator[None]:
    """Skip DDP's gradient all-reduce on all but the last micro-batch of an accumulated step."""
    with contextlib.ExitStack() as stack:
        if enabled:
            for module in modules:
                if isinstance(module, torch.nn.parallel.DistributedDataParallel):
                    stack.enter_context(module.no_sync())
        yield


# 6. The loss


def dreambooth_loss(
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module,
    models: Models,
    batch_data: TrainingData,
    spec: JobSpec,
    generator: torch.Generator,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(total, instance) loss of one micro-batch: instance and class examples in ONE forward."""
    size = spec.train_batch_size
    latents = batch_data.instance.sample(size, generator)
    if batch_data.prior is not None:
        latents = torch.cat([latents, batch_data.prior.sample(size, generator)])
    latents = latents * models.vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=generator).to(device)
    timesteps = torch.randint(
        0, models.noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator
    ).to(device)
    noisy = models.noise_scheduler.add_noise(latents, noise, timesteps)

    if batch_data.instance_embeds is not None:
        embeds = [batch_data.instance_embeds.expand(size, -1, -1)]
        if batch_data.class_embeds is not None:
            embeds.append(batch_data.class_embeds.expand(size, -1, -1))
        encoder_states = torch.cat(embeds)
    else:
        ids = [batch_data.instance_ids.expand(size, -1)]
        if batch_data.class_ids is not None:
            ids.append(batch_data.class_ids.expand(size, -1))
        encoder_states = text_encoder(torch.cat(ids).to(device))[0]

    prediction = unet(noisy, timesteps, encoder_states).sample
    if models.noise_scheduler.config.prediction_type == "v_prediction":
        target = models.noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    if batch_data.prior is None:
        loss = F.mse_loss(prediction.float(), target.float())
        return loss, loss
    # Prior preservation (Ray's template, diffusers): the batch is [instance; class] -> chunk(2).
    prediction, prior_prediction = prediction.chunk(2)
    target, prior_target = target.chunk(2)
    instance_loss = F.mse_loss(prediction.float(), target.float())
    prior_loss = F.mse_loss(prior_prediction.float(), prior_target.float())
    return instance_loss + spec.prior_loss_weight * prior_loss, instance_loss


# Checkpoints (rank 0)


def save_checkpoint(
    job: WorkerJob,
    store: Any,
    step: int,
    modules: dict[str, torch.nn.Module],
    optimizer: Any,
    lr_scheduler: Any,
    scaler: Any,
    runtime: Runtime,
) -> dict[str, Any]:
    """Upload the full state to the store; returns the pointer Ray records as its checkpoint."""
    state = checkpoints.TrainingState(
        step=step,
        trainable=trainable_state(modules, job.spec.use_lora),
        optimizer=optimizer.state_dict(),
        lr_scheduler=lr_scheduler.state_dict(),
        grad_scaler=scaler.state_dict() if scaler.is_enabled() else {},
        rng=rng_state(),
        info={"job_id": job.job_id, "world_size": runtime.world_size, "use_lora": job.spec.use_lora},
    )
    seconds = checkpoints.save(store, job.job_id, state)
    runtime.send("checkpoint", {"step": step, "duration_seconds": seconds})
    return {"store_prefix": checkpoints.checkpoint_prefix(job.job_id, step), "step": step}


def rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, torch.Tensor]) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# Measuring what was learned (tests, benchmarks)


@torch.no_grad()
def subject_loss(
    folder: Path,
    images: list[Any],
    prompt: str,
    *,
    resolution: int,
    seed: int = 1234,
    samples: int = 8,
    lora_folder: Path | None = None,
) -> float:
    """Mean noise-prediction MSE of a model on the subject images, at fixed timesteps and noise.

    Every model sees the same (image, timestep, noise) draws, so comparing the base model with a
    fine-tuned one measures what training taught it about the subject under `prompt`.
    """
    from diffusers import DDPMScheduler

    from services.common.pipelines import load_pipeline

    pipe = load_lora_pipeline(folder, lora_folder) if lora_folder else load_pipeline(folder)
    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    pool = data.encode_views(
        pipe.vae,
        images,
        resolution,
        center_crop=True,
        random_flip=False,
        seed=seed,
        device=torch.device("cpu"),
    )
    embeds = pipe.text_encoder(data.tokenize(pipe.tokenizer, prompt))[0]
    generator = torch.Generator().manual_seed(seed)
    timesteps = torch.linspace(50, scheduler.config.num_train_timesteps - 50, samples).long()
    losses = []
    for mean in pool.means:
        latents = mean[:1].expand(samples, -1, -1, -1) * pipe.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prediction = pipe.unet(noisy, timesteps, embeds.expand(samples, -1, -1)).sample
        losses.append(F.mse_loss(prediction, noise).item())
    return sum(losses) / len(losses)
