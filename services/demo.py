"""`python -m services.demo` (`make demo`): the whole product on one machine, offline, in minutes.

1. Builds the tiny Stable Diffusion and imports it as base model "tiny-sd" into a local-directory
   store (`out/demo-store/`, wiped at the start unless --keep-store).
2. Draws a handful of deterministic photos of the subject (a red ball on varying backgrounds).
3. Starts the three services (`dreambooth-server priorgen|inference|trainer`) as subprocesses on
   free 127.0.0.1 ports, with Ray offline, and waits until their health checks say SERVING.
4. Through the SDK, like any user: uploads the photos, creates a DreamBooth job with prior
   preservation at 64x64, prints its events while it trains, then samples
   "a photo of sks ball on the moon" from the fine-tuned model (and, to compare, from the base).
5. Writes everything under `out/demo/` (subject photos, validation previews, generated PNGs,
   service logs), prints a summary, and stops the services it started (only those).

`out/demo/` is the demo's own folder and is emptied at each run; `--out`/`--store` move both.
Model caches and Ray's HOME (holding `ray_bootstrap_config.yaml` with a local provider, so Ray
never looks for a cloud) live in a temporary folder removed at the end. Defaults: 200 steps at
lr 1e-3, 1 Ray worker (`--workers 2` shows DDP), 12 class images, 4 generated images.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from dreambooth.v1 import trainer_pb2
from dreambooth_client import DreamBoothClient, DreamBoothError
from dreambooth_client.formatting import duration, event_line, size
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image, ImageDraw

BASE_MODEL = "tiny-sd"
TOKEN = "sks"
SUBJECT_CLASS = "ball"
SERVICES = ("priorgen", "inference", "trainer")
RESOLUTION = 64
PROGRESS_EVERY = 20  # print every 20th training step (the SDK sees them all)
LOSS_WINDOW = 20  # the per-step loss is noisy (random timesteps): compare means of this many steps

# Ray must never reach for a network it does not have (usage stats, cloud metadata, public IPs).
RAY_OFFLINE_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "AWS_EC2_METADATA_DISABLED": "true",
    "GLOO_SOCKET_IFNAME": "lo",
}


class DemoError(Exception):
    """Something the person running the demo should read (no traceback needed)."""


def say(text: str = "") -> None:
    print(text, flush=True)


# ---------------------------------------------------------------- 1. base model


def import_base_model(store_dir: Path, work_dir: Path) -> None:
    """Build the tiny model from seed 0 and publish it into the store as BASE_MODEL."""
    from services.common.local_store import LocalObjectStore
    from services.common.model_store import ModelStore
    from services.common.tiny_model import build_tiny_model

    models = ModelStore(LocalObjectStore(store_dir), work_dir / "import-cache")
    if models.exists(BASE_MODEL):
        say(f"  base model {BASE_MODEL} already in the store")
        return
    folder = build_tiny_model(work_dir / "tiny-model", seed=0)
    manifest = models.import_folder(folder, BASE_MODEL, kind="base", labels={"source": "demo"})
    say(f"  imported {BASE_MODEL}: {len(manifest.files)} files, {size(manifest.size_bytes)}")


# ---------------------------------------------------------------- 2. subject photos

BACKGROUNDS = [  # (top colour, bottom colour): sky, grass, sand, wall, dusk, night
    ((135, 190, 235), (70, 150, 60)),
    ((190, 225, 160), (60, 120, 40)),
    ((240, 220, 170), (200, 170, 110)),
    ((200, 200, 205), (150, 150, 160)),
    ((250, 170, 110), (90, 60, 110)),
    ((20, 30, 70), (60, 70, 110)),
]


def subject_photo(index: int, size_px: int = 128) -> Image.Image:
    """A red ball with a highlight and a shadow; background, position and size vary by index."""
    rng = random.Random(index)
    top, bottom = BACKGROUNDS[index % len(BACKGROUNDS)]
    image = Image.new("RGB", (size_px, size_px))
    draw = ImageDraw.Draw(image)
    for y in range(size_px):
        t = y / (size_px - 1)
        draw.line(
            [(0, y), (size_px, y)],
            fill=tuple(round(a + (b - a) * t) for a, b in zip(top, bottom, strict=True)),
        )
    radius = size_px * rng.uniform(0.22, 0.3)
    cx = size_px * rng.uniform(0.38, 0.62)
    cy = size_px * rng.uniform(0.4, 0.6)
    shadow = (cx - radius, cy + radius * 0.8, cx + radius * 1.1, cy + radius * 1.15)
    draw.ellipse(shadow, fill=(40, 40, 40))
    draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=(210, 35, 40))
    band = radius * 0.18  # a white stripe makes it one particular ball, not any red disc
    draw.rectangle((cx - radius * 0.95, cy - band, cx + radius * 0.95, cy + band), fill=(245, 245, 240))
    glint = radius * 0.25
    draw.ellipse(
        (cx - radius * 0.55, cy - radius * 0.6, cx - radius * 0.55 + glint, cy - radius * 0.6 + glint),
        fill=(255, 200, 200),
    )
    return image


def write_subject_photos(directory: Path, count: int) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = directory / f"ball-{index}.png"
        subject_photo(index).save(path, format="PNG")
        paths.append(path)
    return paths


# ---------------------------------------------------------------- 3. services


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Service:
    name: str
    port: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def service_env(
    services: dict[str, Service], store_dir: Path, cache_root: Path, ray_home: Path
) -> dict[str, dict[str, str]]:
    """The environment of each service: ports, the shared store, a private model cache, Ray offline."""
    common = {**os.environ, **RAY_OFFLINE_ENV, "DREAMBOOTH_STORE_DIR": str(store_dir)}
    common.pop("DREAMBOOTH_S3_ENDPOINT", None)  # the demo always uses the local-directory store
    common.pop("RAY_ADDRESS", None)  # and a private local Ray, never a cluster from the environment
    envs = {}
    for name, service in services.items():
        prefix = f"DREAMBOOTH_{name.upper()}_"
        env = {
            **common,
            "DREAMBOOTH_CACHE_DIR": str(cache_root / name),  # no two processes share a cache folder
            f"{prefix}PORT": str(service.port),
            f"{prefix}METRICS_PORT": "0",  # any free port
        }
        envs[name] = env
    envs["inference"]["DREAMBOOTH_INFERENCE_DEFAULT_MODEL"] = BASE_MODEL
    envs["trainer"]["DREAMBOOTH_TRAINER_PRIORGEN_ADDRESS"] = services["priorgen"].address
    envs["trainer"]["DREAMBOOTH_TRAINER_MAX_CONCURRENT_JOBS"] = "1"
    envs["trainer"]["HOME"] = str(ray_home)  # holds ray_bootstrap_config.yaml (local provider)
    return envs


def start_service(service: Service) -> None:
    service.log_path.parent.mkdir(parents=True, exist_ok=True)
    with service.log_path.open("wb") as log:
        # Its own session: at the end the whole group (the service and, for the trainer, the Ray
        # processes it spawned) can be stopped without touching anything else.
        service.process = subprocess.Popen(
            [sys.executable, "-m", "services.cli", service.name],
            env=service.env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_serving(services: list[Service], deadline: float) -> None:
    """Poll each service's grpc health ("" = the whole server) until SERVING, failing fast on exit."""
    pending = {s.name: s for s in services}
    channels = {s.name: grpc.insecure_channel(s.address) for s in services}
    try:
        while pending:
            for name, service in list(pending.items()):
                assert service.process is not None
                if service.process.poll() is not None:
                    raise DemoError(
                        f"{name} exited with code {service.process.returncode} while starting; "
                        f"its log ({service.log_path}) ends with:\n{service.log_tail()}"
                    )
                stub = health_pb2_grpc.HealthStub(channels[name])
                with contextlib.suppress(grpc.RpcError):
                    response = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                    if response.status == health_pb2.HealthCheckResponse.SERVING:
                        say(f"  {name:<9} SERVING on {service.address} (pid {service.process.pid})")
                        del pending[name]
            if pending and time.monotonic() > deadline:
                names = ", ".join(pending)
                raise DemoError(
                    f"not SERVING in time: {names}; see the logs under {services[0].log_path.parent}"
                )
            if pending:
                time.sleep(0.25)
    finally:
        for channel in channels.values():
            channel.close()


def stop_services(services: list[Service], grace: float = 30.0) -> None:
    """SIGTERM each service (graceful stop), then SIGKILL whatever is left of its process group."""
    running = [s for s in services if s.process is not None and s.process.poll() is None]
    for service in running:
        assert service.process is not None
        with contextlib.suppress(ProcessLookupError):
            service.process.send_signal(signal.SIGTERM)
    for service in running:
        assert service.process is not None
        try:
            service.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            say(f"  {service.name} did not stop within {grace:.0f} s: killing it")
    for service in services:
        if service.process is None:
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(service.process.pid, signal.SIGKILL)  # its group: only processes it started
        with contextlib.suppress(subprocess.TimeoutExpired):
            service.process.wait(timeout=10)


@contextlib.contextmanager
def running_services(
    store_dir: Path, work_dir: Path, log_dir: Path, deadline: float
) -> Iterator[dict[str, Service]]:
    ray_home = work_dir / "ray-home"
    ray_home.mkdir(parents=True, exist_ok=True)
    (ray_home / "ray_bootstrap_config.yaml").write_text("provider:\n  type: local\n")
    services = {name: Service(name, free_port(), log_dir / f"{name}.log") for name in SERVICES}
    for name, env in service_env(services, store_dir, work_dir / "cache", ray_home).items():
        services[name].env = env
    try:
        for service in services.values():
            start_service(service)
        wait_serving(list(services.values()), deadline)
        yield services
    finally:
        say("stopping the services")
        stop_services(list(services.values()))


# ---------------------------------------------------------------- 4. the user's journey


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


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m services.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="out/demo", help="images, previews and logs (default out/demo)")
    parser.add_argument(
        "--store", default="out/demo-store", help="the local object store (default out/demo-store)"
    )
    parser.add_argument(
        "--keep-store", action="store_true", help="reuse the store of an earlier run (cached priors)"
    )
    parser.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    parser.add_argument(
        "--lr", type=float, default=1e-3, help="learning rate (default 1e-3: the tiny model learns fast)"
    )
    # 1 by default: on 2 shared cores, 2 DDP workers (1 core each) measured ~2.5x slower per step.
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers (default 1; 2 shows DDP)")
    parser.add_argument("--photos", type=int, default=6, help="subject photos (default 6)")
    parser.add_argument("--class-images", type=int, default=12, help="prior images (default 12)")
    parser.add_argument("--images", type=int, default=4, help="images to generate (default 4)")
    parser.add_argument("--deadline", type=float, default=1200.0, help="give up after this many seconds")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    args.deadline = started + args.deadline
    out_dir, store_dir = Path(args.out).resolve(), Path(args.store).resolve()
    log_dir = out_dir / "logs"
    if out_dir.exists():
        shutil.rmtree(out_dir)  # the demo's own output folder: every run starts clean
    if store_dir.exists() and not args.keep_store:
        shutil.rmtree(store_dir)
    out_dir.mkdir(parents=True)
    work_dir = Path(tempfile.mkdtemp(prefix="dreambooth-demo-"))
    try:
        say(f"DreamBooth demo: store {store_dir}, output {out_dir}")
        say("\nbuilding the tiny base model")
        import_base_model(store_dir, work_dir)
        photos = write_subject_photos(out_dir / "subject", args.photos)
        say(f"drew {len(photos)} photos of the subject in {photos[0].parent}")
        say("\nstarting the services")
        with running_services(store_dir, work_dir, log_dir, deadline=time.monotonic() + 300) as services:
            trainer, inference = services["trainer"].address, services["inference"].address
            with DreamBoothClient(trainer=trainer, inference=inference, timeout=60) as client:
                result = train_and_generate(client, photos, out_dir, args)
        print_summary(result, photos, log_dir, time.monotonic() - started)
        return 0
    except (DemoError, DreamBoothError) as err:
        print(f"demo failed: {err}\n(service logs: {log_dir})", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
