"""Prior generation: the service vs a naive loop over the plain diffusers pipeline.

    .venv/bin/python bench/priorgen.py [--images 32] [--steps 20] [--batch-size 4] [--rounds 2]

One process run, the tiny model at 64x64, the same prompt, steps, guidance and seeds on both
sides. Baseline: `StableDiffusionPipeline` called once per image (as DreamBooth scripts do).
Service: a real PriorGenService on 127.0.0.1 (local-directory store), one GeneratePriors call
for the whole set. Then the same request again, answered from the cache. Model loading is left
out of both sides (each is warmed up first). Rounds alternate baseline and service (each service
round a new seed, so nothing is cached) and the best round of each counts, which damps the noise
of a shared machine. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import torch
from dreambooth.v1 import priorgen_pb2, priorgen_pb2_grpc

from services.common.background_loop import BackgroundLoop
from services.common.local_store import LocalObjectStore
from services.common.model_store import ModelStore
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


def baseline_images_per_s(model_dir: Path, count: int, steps: int, seed: int) -> float:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        str(model_dir), safety_checker=None, requires_safety_checker=False, local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)

    def one(index: int) -> None:
        generator = torch.Generator().manual_seed(seed + index)
        pipe(
            PROMPT,
            height=RESOLUTION,
            width=RESOLUTION,
            num_inference_steps=steps,
            guidance_scale=GUIDANCE,
            generator=generator,
        ).images[0].save(Path(tempfile.gettempdir()) / "bench-priorgen-baseline.png")

    one(-1)  # warm-up
    started = time.perf_counter()
    for index in range(count):
        one(index)
    return count / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)

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
        try:
            service.generate(args.batch_size, args.steps, seed=10_000)  # warm-up: loads the model
            baseline_rates, service_rates = [], []
            seed = 0
            for round_index in range(args.rounds):
                baseline_rates.append(baseline_images_per_s(model_dir, args.images, args.steps, seed=0))
                seed = 1000 * (round_index + 1)
                started = time.perf_counter()
                made = service.generate(args.images, args.steps, seed)
                service_rates.append(args.images / (time.perf_counter() - started))
                assert not made.cached and made.generated == args.images, made
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
        "baseline_images_per_s": round(baseline, 3),
        "service_images_per_s": round(served, 3),
        "ratio": round(served / baseline, 3),
        "cached_seconds": round(cached_seconds, 4),
        "cached_speedup": round(generation_seconds / cached_seconds, 1),
    }
    print(
        f"tiny model {RESOLUTION}x{RESOLUTION}, {args.images} images, {args.steps} steps, "
        f"batch {args.batch_size}, torch threads {torch.get_num_threads()}",
        file=sys.stderr,
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
