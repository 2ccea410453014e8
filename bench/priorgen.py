"""Prior generation: the service vs the plain diffusers pipeline batched as DreamBooth scripts do.

    .venv/bin/python bench/priorgen.py [--images 32] [--steps 20] [--batch-size 4] [--rounds 2] [--quick]

One process run, the tiny model at 64x64, the same prompt, steps, guidance and seeds on both
sides. Baseline: `StableDiffusionPipeline` called with batches of `--baseline-batch` prompts (4,
diffusers' `train_dreambooth.py --sample_batch_size` default), one seeded generator per image.
Service: a real PriorGenService on 127.0.0.1 (local-directory store), one GeneratePriors call for
the whole set, streaming progress. Then the same request again, answered from the cache (reported
apart). Both sides draw image i from the same seed; the benchmark compares the pixels and says
how far apart they are (a batched diffusers call is not batch-invariant on CPU: rows of a batch
can differ from the same image made alone by a grey level; the service's images equal the
single-image pipeline's). Model loading is left out of both sides. Rounds alternate baseline and
service (each round a new seed, so nothing is cached) and the best round of each counts, which
damps the noise of a shared machine. `--quick` is a smoke run (no figure to quote). The last line
is one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
from dreambooth.v1 import priorgen_pb2, priorgen_pb2_grpc
from dreambooth_client.vocabulary import image_seed
from PIL import Image

from services.common.background_loop import BackgroundLoop
from services.common.local_store import LocalObjectStore
from services.common.model_store import ModelStore
from services.common.pipelines import load_pipeline
from services.common.settings import ServerSettings, StoreSettings
from services.common.tiny_model import build_tiny_model
from services.priorgen.main import PriorGenServer
from services.priorgen.settings import PriorGenSettings

PROMPT = "a photo of dog"
GUIDANCE = 7.5
RESOLUTION = 64


class BackgroundServer:
    """The service serving from an event loop in a background thread of this process."""

    def __init__(self, settings: PriorGenSettings) -> None:
        self._loop = BackgroundLoop("bench-server-loop")
        self.server = PriorGenServer(settings)
        self._call(self.server.start())
        self.channel = grpc.insecure_channel(self.server.address)
        self.stub = priorgen_pb2_grpc.PriorGenServiceStub(self.channel)

    def _call(self, coro: Any) -> Any:
        return self._loop.call(coro, 300)

    def generate(self, count: int, steps: int, seed: int) -> priorgen_pb2.PriorSet:
        request = priorgen_pb2.GeneratePriorsRequest(
            base_model="models/tiny-sd",
            class_prompt=PROMPT,
            num_images=count,
            resolution=RESOLUTION,
            steps=steps,
            guidance_scale=GUIDANCE,
            seed=seed,
        )
        responses = list(self.stub.GeneratePriors(request, timeout=3600))
        return responses[-1].prior_set

    def stop(self) -> None:
        self.channel.close()
        self._call(self.server.stop(grace=0))
        self._loop.close()


def baseline_images(
    pipe: Any, count: int, steps: int, seed: int, batch: int
) -> tuple[float, list[np.ndarray]]:
    """(images/s, the images) of the plain pipeline called with `batch` prompts at a time."""
    images: list[np.ndarray] = []
    started = time.perf_counter()
    for first in range(0, count, batch):
        indices = range(first, min(first + batch, count))
        generators = [torch.Generator().manual_seed(image_seed(seed, i)) for i in indices]
        out = pipe(
            [PROMPT] * len(indices),
            height=RESOLUTION,
            width=RESOLUTION,
            num_inference_steps=steps,
            guidance_scale=GUIDANCE,
            generator=generators,
        ).images
        images.extend(np.asarray(image.convert("RGB"), dtype=np.int16) for image in out)
    return count / (time.perf_counter() - started), images


def service_images(store: LocalObjectStore, made: priorgen_pb2.PriorSet) -> list[np.ndarray]:
    keys = sorted(info.key for info in store.list(f"{made.prefix}images/"))
    return [
        np.asarray(Image.open(io.BytesIO(store.get_bytes(key))).convert("RGB"), dtype=np.int16)
        for key in keys
    ]


def compare(ours: list[np.ndarray], theirs: list[np.ndarray]) -> dict[str, Any]:
    """How far apart the two sides' images are, image for image."""
    assert len(ours) == len(theirs), (len(ours), len(theirs))
    worst = max(int(np.abs(a - b).max()) for a, b in zip(ours, theirs, strict=True))
    same = sum(bool(np.array_equal(a, b)) for a, b in zip(ours, theirs, strict=True))
    return {"identical_images": same, "max_pixel_difference": worst}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--baseline-batch", type=int, default=4, help="prompts per diffusers call")
    parser.add_argument("--quick", action="store_true", help="smoke run: 8 images, 4 steps, 1 round")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.steps, args.rounds = 8, 4, 1

    with tempfile.TemporaryDirectory(prefix="bench-priorgen-") as tmp_name:
        tmp = Path(tmp_name)
        model_dir = build_tiny_model(tmp / "tiny-sd")
        store = LocalObjectStore(tmp / "store")
        ModelStore(store, tmp / "cache").import_folder(model_dir, "tiny-sd")
        settings = PriorGenSettings(
            server=ServerSettings(port=0, metrics_port=0, grace_seconds=0),
            store=StoreSettings(store_dir=str(tmp / "store"), cache_dir=str(tmp / "cache")),
            batch_size=args.batch_size,
            compute_width=args.batch_size,
        )
        service = BackgroundServer(settings)
        pipe = load_pipeline(model_dir)  # the plain pipeline (its own scheduler: DDIM, as the service's)
        try:
            service.generate(args.batch_size, args.steps, seed=10_000)  # warm-up: loads the model
            baseline_images(pipe, args.baseline_batch, args.steps, 10_000, args.baseline_batch)
            baseline_rates, service_rates = [], []
            for round_index in range(args.rounds):
                seed = 1000 * (round_index + 1)
                rate, theirs = baseline_images(pipe, args.images, args.steps, seed, args.baseline_batch)
                baseline_rates.append(rate)
                started = time.perf_counter()
                made = service.generate(args.images, args.steps, seed)
                service_rates.append(args.images / (time.perf_counter() - started))
                assert not made.cached and made.generated == args.images, made
                agreement = compare(service_images(store, made), theirs)
                print(
                    f"round {round_index + 1}: baseline {baseline_rates[-1]:.2f} images/s, "
                    f"service {service_rates[-1]:.2f} images/s",
                    file=sys.stderr,
                )
            generation_seconds = args.images / service_rates[-1]
            started = time.perf_counter()
            cached = service.generate(args.images, args.steps, seed)
            cached_seconds = time.perf_counter() - started
            assert cached.cached and cached.generated == 0, cached
        finally:
            service.stop()

    baseline, served = max(baseline_rates), max(service_rates)
    result = {
        "baseline": f"diffusers, {args.baseline_batch} prompts per call",
        "baseline_images_per_s": round(baseline, 3),
        "service_images_per_s": round(served, 3),
        "ratio_vs_batched": round(served / baseline, 3),
        **agreement,
        "cached_seconds": round(cached_seconds, 4),
        "cached_speedup": round(generation_seconds / cached_seconds, 1),
    }
    print(
        f"tiny model {RESOLUTION}x{RESOLUTION}, {args.images} images, {args.steps} steps, "
        f"batch {args.batch_size}, torch threads {torch.get_num_threads()}; "
        f"{agreement['identical_images']}/{args.images} images identical to the baseline's, "
        f"largest pixel difference {agreement['max_pixel_difference']}",
        file=sys.stderr,
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
