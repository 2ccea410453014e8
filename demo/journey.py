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
from demo.subject import SUBJECT
from toybench.dreambooth import class_prompt as toybench_class_prompt
from toybench.dreambooth import instance_prompt as toybench_instance_prompt
from toybench.recipes import DREAMBOOTH

BASE_MODEL = "toy-world"  # the committed toy-world base (`up` imports it into an empty store)
TOKEN = "sks"
RESOLUTION = 64
PROGRESS_EVERY = 20  # print every 20th training step (the SDK sees them all)
LOSS_WINDOW = 20  # the per-step loss is noisy (random timesteps): compare means of this many steps
BACKGROUNDS = ("beach", "snow", "night", "studio")
SAMPLING = {"steps": 20, "seed": 0}  # the services' default guidance and scheduler


@dataclass
class DemoResult:
    dataset: str = ""
    job: str = ""
    model: str = ""
    losses: list[float] = field(default_factory=list)
    previews: list[Path] = field(default_factory=list)
    class_before: list[bytes] = field(default_factory=list)  # the base model's "a photo of a ball"
    composed: dict[str, list[bytes]] = field(default_factory=dict)  # background -> fine-tune's images
    class_after: list[bytes] = field(default_factory=list)  # the fine-tune's "a photo of a ball"
    generated: list[Path] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)


def train_and_generate(
    client: DreamBoothClient, photos: list[Path], out_dir: Path, args: argparse.Namespace
) -> DemoResult:
    result = DemoResult()
    started = time.monotonic()
    recipe = DREAMBOOTH

    say(f"\nuploading {len(photos)} photos of the subject ({SUBJECT.description})")
    dataset = client.upload_images(photos)
    result.dataset = dataset.name
    say(f"  {dataset.name} ({dataset.image_count} images, {size(dataset.size_bytes)})")

    class_prompt = toybench_class_prompt(SUBJECT)
    say(f"\nthe base model before training: {args.images} images of {class_prompt!r}")
    before = client.generate(BASE_MODEL, class_prompt, num_images=args.images, **SAMPLING)
    result.class_before = [image.data for image in before]
    result.generated += save_images(before, out_dir, "base-class")

    instance_prompt = f"a photo of {TOKEN} {SUBJECT.object}"
    job = client.create_training_job(
        base_model=BASE_MODEL,
        dataset=dataset,
        instance_prompt=instance_prompt,
        class_prompt=class_prompt,
        with_prior_preservation=True,
        num_class_images=args.class_images,
        prior_steps=recipe.prior_steps,
        max_train_steps=args.steps,
        learning_rate=args.lr,
        train_batch_size=recipe.train_batch_size,
        resolution=RESOLUTION,
        num_workers=args.workers,
        seed=0,
        checkpointing_steps=max(1, args.steps // 2),
        validation_prompts=[f"{instance_prompt} on the beach"],
        validation_steps=max(1, args.steps // 2),
        random_flip=True,
    )
    result.job = job.name
    say(
        f"\ntraining {job.name}: {args.steps} steps at {RESOLUTION}x{RESOLUTION}, lr {args.lr:g}, "
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
    result.phases["upload and base samples"] = upload_done - started
    final = client.wait(
        job, on_event=on_event, check=True, timeout=max(60.0, args.deadline - time.monotonic())
    )
    result.model = final.model
    result.phases["training job (priors + train + publish)"] = time.monotonic() - upload_done

    generate_started = time.monotonic()
    for background in BACKGROUNDS:
        prompt = toybench_instance_prompt(SUBJECT, background)
        say(f"generating {args.images} images of {prompt!r}")
        images = client.generate(final.model, prompt, num_images=args.images, **SAMPLING)
        result.composed[background] = [image.data for image in images]
        result.generated += save_images(images, out_dir, f"sks-{background}")
    say(f"generating {args.images} images of {class_prompt!r} after training")
    after = client.generate(final.model, class_prompt, num_images=args.images, **SAMPLING)
    result.class_after = [image.data for image in after]
    result.generated += save_images(after, out_dir, "tuned-class")
    result.phases["generate"] = time.monotonic() - generate_started
    return result


def save_images(images: list, out_dir: Path, label: str) -> list[Path]:
    paths = []
    for index, image in enumerate(images):
        path = out_dir / f"{label}-{index}-seed{image.seed}.{image.extension}"
        path.write_bytes(image.data)
        paths.append(path)
    return paths


def print_summary(result: DemoResult, photos: list[Path], log_dir: Path, wall: float, sheet: Path) -> None:
    say("\n=== DreamBooth demo: done ===")
    say(f"subject photos:  {photos[0].parent}/ ({len(photos)} images of {SUBJECT.description})")
    say(f"dataset:         {result.dataset}")
    say(f"training job:    {result.job}")
    say(f"model:           {result.model}")
    if len(result.losses) >= 2 * LOSS_WINDOW:
        first = sum(result.losses[:LOSS_WINDOW]) / LOSS_WINDOW
        last = sum(result.losses[-LOSS_WINDOW:]) / LOSS_WINDOW
        window = f"means of {LOSS_WINDOW} steps"
        say(f"training loss:   {first:.3f} at the start -> {last:.3f} at the end ({window})")
    for path in result.previews:
        say(f"preview:         {path}")
    say(f"images:          {len(result.generated)} in {result.generated[0].parent}/")
    say(f"contact sheet:   {sheet}")
    say(f"service logs:    {log_dir}/")
    for phase, seconds in result.phases.items():
        say(f"time, {phase}: {duration(seconds)}")
    say(f"wall time:       {duration(wall)}")
