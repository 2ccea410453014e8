"""The user's journey, through the SDK only: upload, train with priors, watch, generate; the summary."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path

from dreambooth.v1 import trainer_pb2
from dreambooth_client import DreamBoothClient
from dreambooth_client.formatting import duration, event_line, size

from demo.console import say

BASE_MODEL = "tiny-sd"
TOKEN = "sks"
SUBJECT_CLASS = "ball"
RESOLUTION = 64
PROGRESS_EVERY = 20  # print every 20th training step (the SDK sees them all)
LOSS_WINDOW = 20  # the per-step loss is noisy (random timesteps): compare means of this many steps


@dataclass
class DemoResult:
    dataset: str = ""
    job: str = ""
    model: str = ""
    losses: list[float] = field(default_factory=list)
    previews: list[Path] = field(default_factory=list)
    generated: list[Path] = field(default_factory=list)
    base_images: list[Path] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)


def train_and_generate(
    client: DreamBoothClient, photos: list[Path], out_dir: Path, args: argparse.Namespace
) -> DemoResult:
    result = DemoResult()
    started = time.monotonic()

    say(f"\nuploading {len(photos)} subject photos")
    dataset = client.upload_images(photos)
    result.dataset = dataset.name
    say(f"  {dataset.name} ({dataset.image_count} images, {size(dataset.size_bytes)})")

    instance_prompt = f"a photo of {TOKEN} {SUBJECT_CLASS}"
    job = client.create_training_job(
        base_model=BASE_MODEL,
        dataset=dataset,
        instance_prompt=instance_prompt,
        class_prompt=f"a photo of {SUBJECT_CLASS}",
        with_prior_preservation=True,
        num_class_images=args.class_images,
        prior_steps=20,
        max_train_steps=args.steps,
        learning_rate=args.lr,
        resolution=RESOLUTION,
        num_workers=args.workers,
        seed=0,
        checkpointing_steps=max(1, args.steps // 2),
        validation_prompts=[f"{instance_prompt} on the moon"],
        validation_steps=max(1, args.steps // 2),
        random_flip=True,
    )
    result.job = job.name
    say(
        f"\ntraining {job.name}: {args.steps} steps at {RESOLUTION}x{RESOLUTION}, "
        f"{args.workers} Ray worker(s), prior preservation with {args.class_images} class images"
    )
    preview_dir = out_dir / "previews"

    def on_event(event: trainer_pb2.WatchTrainingJobResponse) -> None:
        kind = event.WhichOneof("event")
        if kind == "progress":
            result.losses.append(event.progress.loss)
            step, total = event.progress.step, event.progress.total_steps
            if step % PROGRESS_EVERY and step not in (1, total):
                return  # every event is one line in `dreambooth jobs watch`; here a sample is enough
        if kind == "preview":
            preview_dir.mkdir(parents=True, exist_ok=True)
            path = preview_dir / f"step-{event.preview.step:05d}.jpg"
            path.write_bytes(event.preview.image.data)
            result.previews.append(path)
        say("  " + event_line(event))

    upload_done = time.monotonic()
    result.phases["upload"] = upload_done - started
    final = client.wait(
        job, on_event=on_event, check=True, timeout=max(60.0, args.deadline - time.monotonic())
    )
    result.model = final.model
    result.phases["training job (priors + train + publish)"] = time.monotonic() - upload_done

    prompt = f"a photo of {TOKEN} {SUBJECT_CLASS} on the moon"
    say(f"\ngenerating {args.images} images of {prompt!r} from {final.model}")
    generate_started = time.monotonic()
    options = {"num_images": args.images, "steps": 20, "guidance_scale": 7.5, "seed": 0}
    images = client.generate(final.model, prompt, **options)
    result.generated = save_images(images, out_dir, "finetuned")
    base_images = client.generate(BASE_MODEL, prompt, **options)  # same seeds: a side-by-side
    result.base_images = save_images(base_images, out_dir, "base")
    result.phases["generate"] = time.monotonic() - generate_started
    return result


def save_images(images: list, out_dir: Path, label: str) -> list[Path]:
    paths = []
    for index, image in enumerate(images):
        path = out_dir / f"{label}-{index}-seed{image.seed}.{image.extension}"
        path.write_bytes(image.data)
        paths.append(path)
    return paths


def print_summary(result: DemoResult, photos: list[Path], log_dir: Path, wall: float) -> None:
    say("\n=== DreamBooth demo: done ===")
    say(f"subject photos:  {photos[0].parent}/ ({len(photos)} images)")
    say(f"dataset:         {result.dataset}")
    say(f"training job:    {result.job}")
    say(f"model:           {result.model}")
    if len(result.losses) >= 2 * LOSS_WINDOW:
        first = sum(result.losses[:LOSS_WINDOW]) / LOSS_WINDOW
        last = sum(result.losses[-LOSS_WINDOW:]) / LOSS_WINDOW
        window = f"means of {LOSS_WINDOW} steps"
        say(f"training loss:   {first:.3f} at the start -> {last:.3f} at the end ({window})")
    for label, paths in (
        ("previews", result.previews),
        ("fine-tuned", result.generated),
        ("base model", result.base_images),
    ):
        for path in paths:
            say(f"{label + ':':<17}{path}")
    say(f"service logs:    {log_dir}/")
    for phase, seconds in result.phases.items():
        say(f"time, {phase}: {duration(seconds)}")
    say(f"wall time:       {duration(wall)}")
    say(
        "\nnote: the tiny base model has random weights, so every image it or its fine-tune makes is\n"
        "coloured noise. The demo proves the path (upload, priors, Ray Train, publish, inference),\n"
        "not image quality: import a real Stable Diffusion checkpoint for that."
    )
