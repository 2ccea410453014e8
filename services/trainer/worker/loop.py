"""The DreamBooth training loop that runs inside every Ray Train worker (DESIGN §7).

`train(job, runtime)` reads like the steps of a pipeline:

    1. Context: the job (from the driver's config) and the runtime (rank, device, channel)
    2. Base model from the model store; the trainable part (full UNet, or LoRA adapters)
    3. Resume from the job's newest checkpoint in the store, if any
    4. Data: every subject's and class-prior set's latents, text embeddings — once, before the loop
    5. Optimizer, LR schedule, DDP; rank 0's average of the weights (ema_decay)
    6. The loop: instance + class examples in one batch (several subjects: in turn), noise MSE
       + w x prior MSE, gradient accumulation, clipping, mixed precision; every N steps a
       checkpoint; previews
    7. Rank 0 publishes the model (the averaged weights when there is an average)

Everything the worker needs arrives in `config` (never globals). Every worker runs the same
collectives and `ray.train.report` calls at the same points; only rank 0 writes to the store
and talks to the driver. Randomness comes from generators seeded by (seed, rank, step,
micro-step), so a resumed run draws exactly what the uninterrupted run would have drawn.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from services.common.model_store import ModelStore
from services.common.store_factory import open_store
from services.trainer.job_spec import JobSpec
from services.trainer.settings import TrackingSettings
from services.trainer.training_events import (
    CheckpointEvent,
    ProgressEvent,
    PublishedEvent,
    PublishingEvent,
    StartedEvent,
)
from services.trainer.worker import checkpoints
from services.trainer.worker.ema import WeightAverage, make_average, maybe_applied
from services.trainer.worker.loss import dreambooth_loss
from services.trainer.worker.models import (
    configure_trainable,
    load_base_model,
    load_trainable_state,
    trainable_state,
    trained_modules,
)
from services.trainer.worker.optim import make_optimizer, no_sync, step_sizes
from services.trainer.worker.previews import send_previews
from services.trainer.worker.publish import publish
from services.trainer.worker.runtime import RayRuntime, Runtime, WorkerJob
from services.trainer.worker.tracking import gradient_norm, open_tracker
from services.trainer.worker.training_data import SubjectSchedule, prepare_data, step_generator


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry point: everything comes from `config` (built by driver.run)."""
    job = WorkerJob(
        job_id=config["job_id"],
        spec=JobSpec.from_json(config["spec"]),
        store_settings=config["store_settings"],
        prior_prefix=config.get("prior_prefix"),
        step_callbacks=tuple(config.get("step_callbacks", ())),
        tracking=config.get("tracking", TrackingSettings()),
        additional_prior_prefixes=tuple(config.get("additional_prior_prefixes", ())),
    )
    runtime = RayRuntime(config["channel"])
    if runtime.device.type == "cpu":
        torch.set_num_threads(max(1, int(config.get("cpus_per_worker", 1))))
    error: BaseException | None = None
    try:
        train(job, runtime)
    except BaseException as err:
        error = err
        raise
    finally:
        runtime.close(error)


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
    runtime.send(StartedEvent(step=start_step, world_size=runtime.world_size))
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
    average = make_average(modules, spec, resumed) if runtime.is_chief else None
    unet = modules["unet"]
    text_encoder = modules.get("text_encoder", models.text_encoder)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    tracker = open_tracker(job, store, runtime, start_step, group_names=list(modules))

    # 6. The loop.
    accumulation = spec.gradient_accumulation_steps
    schedule = SubjectSchedule(
        batch_data.subject_count, spec.seed, runtime.world_size, accumulation, spec.train_batch_size
    )
    examples_per_step = spec.train_batch_size * accumulation * runtime.world_size
    examples_per_step *= 2 if spec.with_prior_preservation else 1
    throughput = None
    for step in range(start_step, spec.max_train_steps):
        started = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        for micro in range(accumulation):
            generator = step_generator(spec.seed, runtime.rank, step, micro)
            subjects = schedule.batch(runtime.rank, step, micro)
            with (
                no_sync(modules.values(), enabled=micro < accumulation - 1),
                torch.autocast(device.type, dtype=weight_dtype, enabled=use_amp),
            ):
                loss, _ = dreambooth_loss(
                    unet, text_encoder, models, batch_data, spec, generator, device, subjects
                )
            scaler.scale(loss / accumulation).backward()
            loss_sum += loss.detach()
        scaler.unscale_(optimizer)
        if spec.max_grad_norm > 0:
            grad_norm: torch.Tensor | None = torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm)
        else:
            grad_norm = gradient_norm(params) if runtime.is_chief else None
        scaler.step(optimizer)
        scaler.update()
        learning_rates = step_sizes(optimizer)  # the rates this step used, the UNet's first
        learning_rate = learning_rates[0]
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if average is not None:
            average.update()
        done = step + 1

        mean_loss, cancelled = runtime.reduce_step(loss_sum / accumulation, runtime.poll_cancel())
        rate = examples_per_step / max(time.perf_counter() - started, 1e-9)
        throughput = rate if throughput is None else 0.8 * throughput + 0.2 * rate
        runtime.send(
            ProgressEvent(
                step=done,
                total_steps=spec.max_train_steps,
                loss=mean_loss,
                learning_rate=learning_rate,
                samples_per_second=throughput,
                time=time.time(),
            )
        )
        tracker.step(done, mean_loss, learning_rates, grad_norm, rate)
        if cancelled:
            return
        for callback in job.step_callbacks:
            callback(done, runtime)
        checkpoint_due = spec.checkpointing_steps and done % spec.checkpointing_steps == 0
        if checkpoint_due and done < spec.max_train_steps:
            pointer = None
            if runtime.is_chief:
                pointer = save_checkpoint(
                    job, store, done, modules, optimizer, lr_scheduler, scaler, average, runtime
                )
                tracker.upload()
            runtime.report({"step": done, "loss": mean_loss}, pointer)
        previews_due = spec.validation_steps > 0 and done % spec.validation_steps == 0
        if spec.validation_prompts and previews_due and done < spec.max_train_steps and runtime.is_chief:
            with maybe_applied(average):
                tracker.previews(done, send_previews(job, models, done, runtime, weight_dtype))

    # 7. Publish (rank 0); every rank reports the end, so Ray sees one consistent last result.
    final_step = max(start_step, spec.max_train_steps)
    if runtime.is_chief:
        with maybe_applied(average):  # what is previewed and published: the average, if any
            if spec.validation_prompts:
                tracker.previews(final_step, send_previews(job, models, final_step, runtime, weight_dtype))
            tracker.finish(final_step)
            runtime.send(PublishingEvent(step=final_step))
            publish(job, model_store, models, modules)
        runtime.send(PublishedEvent(step=final_step, model_id=spec.model_id))
    runtime.report({"step": final_step, "published": True, "model_id": spec.model_id}, None)


# Checkpoints (rank 0)


def save_checkpoint(
    job: WorkerJob,
    store: Any,
    step: int,
    modules: dict[str, torch.nn.Module],
    optimizer: Any,
    lr_scheduler: Any,
    scaler: Any,
    average: WeightAverage | None,
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
        ema=average.state_dict() if average is not None else {},
        ema_updates=average.updates if average is not None else 0,
    )
    seconds = checkpoints.save(store, job.job_id, state)
    runtime.send(CheckpointEvent(step=step, duration_seconds=seconds))
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
