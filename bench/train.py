"""Training throughput: the project's DreamBooth loop under Ray Train vs a plain PyTorch loop.

    .venv/bin/python bench/train.py [--rounds 3] [--windows 10] [--window-steps 20] [--job-steps 200]

On the tiny model at 64x64, 1 instance + 1 class image per step, prior loss, AdamW, fp32:

- plain: the textbook single-process loop written here (same model, batch, prior loss,
  optimizer, clipping, schedule, the loss read every step). It caches the VAE latents and text
  embeddings exactly as the project does, so the ratio measures what the project adds: Ray
  Train (its controller and helper actors), the worker runtime (progress messages, cancel
  polling, reports) and the loop's own bookkeeping.
- ray: `run_training` with 1 Ray Train worker holding all CPUs (the plain loop uses them all
  too). Ray start-up and `warmup` steps are excluded; step times are rank 0's own clock
  (ProgressEvent.time), so they include everything the project does per step.

The two alternate for `rounds` rounds (order swapped every round) and each loop's rate is the
best of all its windows of `window-steps` steps (medians printed too): on a shared machine the
best window is the least disturbed one, for both loops alike.

job_wall_s: a whole job of --job-steps steps through the trainer gRPC service (with the prior-generation
service making the class images): CreateTrainingJob -> SUCCEEDED, with Ray already running.

The last line is one JSON object: plain_steps_per_s, ray_steps_per_s, ratio, job_wall_s, job_steps.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from services.common.local_store import LocalObjectStore
from services.common.model_store import ModelStore
from services.common.pipelines import disable_progress_bars
from services.common.settings import StoreSettings
from services.common.tiny_model import build_tiny_model
from services.trainer.dataset_layout import write_dataset
from services.trainer.driver.cluster import connect_ray, disconnect_ray
from services.trainer.job_spec import JobSpec

MODEL_ID = "tiny-sd"
DATASET = "b" * 64
PRIORS = "priors/bench/"
RESOLUTION = 64
LEARNING_RATE = 1e-4
INSTANCE_PROMPT = "a photo of sks dog"
CLASS_PROMPT = "a photo of dog"
SUBJECT_IMAGES = 4
CLASS_IMAGES = 8
SEED = 0


def subject_image(seed: int) -> Image.Image:
    """A deterministic picture: a coloured square on a gradient, different for each seed."""
    ramp = np.linspace(0, 255, RESOLUTION, dtype=np.float32)
    rgb = np.empty((RESOLUTION, RESOLUTION, 3), dtype=np.float32)
    rgb[..., 0] = (ramp[None, :] + seed * 37) % 256
    rgb[..., 1] = (ramp[:, None] + seed * 11) % 256
    rgb[..., 2] = seed * 53 % 256
    quarter = RESOLUTION // 4
    rgb[quarter : 3 * quarter, quarter : 3 * quarter] = (seed * 91 % 256, 255 - seed * 29 % 256, 128)
    return Image.fromarray(rgb.astype(np.uint8))


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def prepare_store(root: Path) -> StoreSettings:
    settings = StoreSettings(store_dir=str(root / "store"), cache_dir=str(root / "cache"))
    store = LocalObjectStore(root / "store")
    ModelStore(store, root / "cache").import_folder(build_tiny_model(root / "tiny"), MODEL_ID)
    write_dataset(store, DATASET, [png(subject_image(index)) for index in range(SUBJECT_IMAGES)])
    for index in range(CLASS_IMAGES):
        store.put_bytes(f"{PRIORS}images/{index:05d}.png", png(subject_image(100 + index)))
    return settings


# 1. The plain loop


def plain_step_times(folder: Path, steps: int) -> list[float]:
    """The textbook DreamBooth loop in this process; the perf_counter time at the end of each step."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(SEED)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    text_encoder = (
        CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").eval().requires_grad_(False)
    )
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").eval().requires_grad_(False)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").train()
    noise_scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")

    def pixels(images: list[Image.Image]) -> torch.Tensor:
        array = np.stack([np.asarray(image, dtype=np.float32) for image in images])
        return torch.from_numpy(array / 127.5 - 1).permute(0, 3, 1, 2)

    def embed(prompt: str) -> torch.Tensor:
        ids = tokenizer(
            prompt,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return text_encoder(ids)[0]

    with torch.no_grad():  # cached once, as the project does
        instance = vae.encode(pixels([subject_image(i) for i in range(SUBJECT_IMAGES)])).latent_dist
        prior = vae.encode(pixels([subject_image(100 + i) for i in range(CLASS_IMAGES)])).latent_dist
        instance_embeds, class_embeds = embed(INSTANCE_PROMPT), embed(CLASS_PROMPT)
    encoder_states = torch.cat([instance_embeds, class_embeds])
    optimizer = torch.optim.AdamW(unet.parameters(), lr=LEARNING_RATE, betas=(0.9, 0.999), weight_decay=1e-2)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer)
    generator = torch.Generator().manual_seed(SEED)

    ends = []
    for _ in range(steps):
        i = int(torch.randint(0, SUBJECT_IMAGES, (1,), generator=generator))
        j = int(torch.randint(0, CLASS_IMAGES, (1,), generator=generator))
        mean = torch.cat([instance.mean[i : i + 1], prior.mean[j : j + 1]])
        std = torch.cat([instance.std[i : i + 1], prior.std[j : j + 1]])
        latents = (mean + std * torch.randn(mean.shape, generator=generator)) * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (2,), generator=generator)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        prediction = unet(noisy, timesteps, encoder_states).sample
        prediction, prior_prediction = prediction.chunk(2)
        target, prior_target = noise.chunk(2)
        loss = F.mse_loss(prediction, target) + 1.0 * F.mse_loss(prior_prediction, prior_target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss.detach().item()  # logged every step, as the textbook loop does
        ends.append(time.perf_counter())
    return ends


# 2. The project's loop under Ray Train


def ray_step_times(settings: StoreSettings, steps: int, cpus: int) -> list[float]:
    """The project's loop on 1 Ray Train worker; rank 0's clock at the end of each step."""
    from services.trainer.driver.run import run_training
    from services.trainer.training_events import ProgressEvent

    spec = JobSpec(
        base_model=MODEL_ID,
        dataset=DATASET,
        instance_prompt=INSTANCE_PROMPT,
        class_prompt=CLASS_PROMPT,
        with_prior_preservation=True,
        num_class_images=CLASS_IMAGES,
        max_train_steps=steps,
        learning_rate=LEARNING_RATE,
        resolution=RESOLUTION,
        checkpointing_steps=10 * steps,  # none while measuring
        model_id=f"bench-{int(time.time())}",
        seed=SEED,
    )
    ends: dict[int, float] = {}

    def on_event(event: object) -> None:
        if isinstance(event, ProgressEvent):
            ends[event.step] = event.time

    run_training(
        "bench-ray",
        spec,
        store_settings=settings,
        prior_prefix=PRIORS,
        on_event=on_event,
        cancel=threading.Event(),
        cpus_per_worker=cpus,
    )
    return [ends[step] for step in range(1, steps + 1)]


def window_rates(ends: list[float], warmup: int, windows: int, window_steps: int) -> list[float]:
    """Steps/s of consecutive windows after `warmup` steps, from step end times."""
    rates = []
    for index in range(windows):
        first = warmup + index * window_steps - 1  # end of the step before the window
        last = first + window_steps
        rates.append(window_steps / (ends[last] - ends[first]))
    return rates


# 4. A whole job through the services


def job_wall_seconds(settings: StoreSettings, steps: int) -> float:
    return asyncio.run(_job_wall_seconds(settings, steps))


async def _job_wall_seconds(settings: StoreSettings, steps: int) -> float:
    import grpc
    from dreambooth.v1 import trainer_pb2, trainer_pb2_grpc

    from services.common.settings import ServerSettings
    from services.priorgen.main import PriorGenServer
    from services.priorgen.settings import PriorGenSettings
    from services.trainer.main import TrainerServer
    from services.trainer.settings import TrainerSettings

    loopback = ServerSettings(port=0, metrics_port=0)
    priorgen = PriorGenServer(PriorGenSettings(server=loopback, store=settings))
    await priorgen.start()
    trainer = TrainerServer(
        TrainerSettings(server=loopback, store=settings, priorgen_address=priorgen.address)
    )
    await trainer.start()
    try:
        async with grpc.aio.insecure_channel(trainer.address) as channel:
            stub = trainer_pb2_grpc.TrainerServiceStub(channel)

            async def upload():  # type: ignore[no-untyped-def]
                for index in range(SUBJECT_IMAGES):
                    data = png(subject_image(index))
                    yield trainer_pb2.UploadImagesRequest(
                        image_header=trainer_pb2.ImageHeader(filename=f"{index}.png", size_bytes=len(data))
                    )
                    yield trainer_pb2.UploadImagesRequest(chunk=data)

            dataset = (await stub.UploadImages(upload())).dataset.name
            spec = trainer_pb2.TrainingJobSpec(
                base_model=f"models/{MODEL_ID}",
                dataset=dataset,
                instance_prompt=INSTANCE_PROMPT,
                class_prompt=CLASS_PROMPT,
                with_prior_preservation=True,
                num_class_images=CLASS_IMAGES,
                prior_steps=20,
                max_train_steps=steps,
                learning_rate=LEARNING_RATE,
                resolution=RESOLUTION,
                checkpointing_steps=100,
                model_id="bench-job-model",
            )
            started = time.perf_counter()
            job = (await stub.CreateTrainingJob(trainer_pb2.CreateTrainingJobRequest(spec=spec))).training_job
            final = {
                trainer_pb2.TRAINING_JOB_STATE_SUCCEEDED,
                trainer_pb2.TRAINING_JOB_STATE_FAILED,
                trainer_pb2.TRAINING_JOB_STATE_CANCELLED,
            }
            async for event in stub.WatchTrainingJob(trainer_pb2.WatchTrainingJobRequest(name=job.name)):
                if event.HasField("state_change") and event.state_change.state in final:
                    state = event.state_change
                    break
            seconds = time.perf_counter() - started
            if state.state != trainer_pb2.TRAINING_JOB_STATE_SUCCEEDED:
                raise RuntimeError(f"the benchmark job ended {state.state}: {state.error_message}")
            return seconds
    finally:
        await trainer.stop(0)
        await priorgen.stop(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3, help="alternating plain / Ray runs of each loop")
    parser.add_argument("--windows", type=int, default=10, help="measured windows per run")
    parser.add_argument("--window-steps", type=int, default=20, help="steps per measured window")
    parser.add_argument("--warmup", type=int, default=20, help="steps run before measuring")
    parser.add_argument("--job-steps", type=int, default=200, help="steps of the whole-job measurement")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round of a few steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.windows, args.window_steps, args.warmup, args.job_steps = 1, 2, 3, 2, 4
    logging.basicConfig(level=logging.WARNING)
    disable_progress_bars()
    cpus = torch.get_num_threads()
    steps = args.warmup + args.windows * args.window_steps

    def rates(ends: list[float]) -> list[float]:
        return window_rates(ends, args.warmup, args.windows, args.window_steps)

    plain_rates: list[float] = []
    ray_rates: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        settings = prepare_store(Path(tmp))
        store = LocalObjectStore(Path(settings.store_dir))
        folder = ModelStore(store, Path(settings.cache_dir)).materialize(MODEL_ID)
        connect_ray("local", num_cpus=cpus)
        try:
            for round_index in range(args.rounds):
                # Alternate the order, so a change of machine load does not favour one loop.
                runs = [
                    lambda: plain_rates.extend(rates(plain_step_times(folder, steps))),
                    lambda: ray_rates.extend(rates(ray_step_times(settings, steps, cpus))),
                ]
                for run in runs if round_index % 2 == 0 else runs[::-1]:
                    run()
            try:
                job_wall: float | None = round(job_wall_seconds(settings, args.job_steps), 1)
                job_source = "trainer gRPC service: CreateTrainingJob -> SUCCEEDED, priors by priorgen"
            except ImportError as err:  # the services are not there: say so
                job_wall, job_source = None, f"not measured: {err}"
        finally:
            disconnect_ray()

    plain, ray_rate = max(plain_rates), max(ray_rates)
    plain_median, ray_median = statistics.median(plain_rates), statistics.median(ray_rates)
    print(f"machine: {cpus} torch threads, torch {torch.__version__}, {sys.platform}")
    print(f"model: tiny SD, {RESOLUTION}x{RESOLUTION}, 1 instance + 1 class image per step, AdamW, fp32")
    print(f"windows: {args.rounds} runs x {args.windows} windows x {args.window_steps} steps per loop")
    print(f"plain PyTorch loop:         best {plain:7.2f}  median {plain_median:7.2f} steps/s")
    print(f"project loop, Ray Train x1: best {ray_rate:7.2f}  median {ray_median:7.2f} steps/s ({cpus} CPUs)")
    print(
        f"ratio ray / plain:          best {ray_rate / plain:7.3f}  median {ray_median / plain_median:7.3f}"
    )
    print(f"job wall time, {args.job_steps} steps:  {job_wall} s ({job_source})")
    result = {
        "plain_steps_per_s": round(plain, 3),
        "ray_steps_per_s": round(ray_rate, 3),
        "ratio": round(ray_rate / plain, 3),
        "job_wall_s": job_wall,
        "job_steps": args.job_steps,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
