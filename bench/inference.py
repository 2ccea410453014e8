"""Inference: the service (sequential and 8 concurrent clients) vs the plain diffusers pipeline.

    .venv/bin/python bench/inference.py [--images 16] [--clients 8] [--steps 20] [--rounds 3] [--quick]

One process run, the tiny model at 64x64, 20 steps, guidance 7.5, one image per request, the same
prompt on every side. Baseline: `StableDiffusionPipeline` called in-process once per image, PNG
bytes out. Service: a real InferenceService on 127.0.0.1 (local-directory store, its event loop
in a thread of this process) called over gRPC, first by one client request after request, then
by `--clients` clients at once (dynamic batching shares their UNet calls). The concurrent block is
held against its ideal: ONE diffusers call that makes the same `--clients` images (a list of
prompts and one seeded generator per image) — the upper bound of what batching can give
(`concurrent_vs_ideal`). Model loading is left out (both sides are warmed up). Baseline and
sequential requests alternate image by image, so both see the same load on a shared machine; each
round then runs the concurrent block and the ideal call. Both sides draw each image from the same
seed and the benchmark compares their pixels (the service's batches are batch-invariant, a batched
diffusers call on CPU is not quite: rows can differ by a grey level). Rates are totals over all
rounds. `--quick` is a smoke run. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
from dreambooth.v1 import inference_pb2, inference_pb2_grpc
from PIL import Image

from services.common.background_loop import BackgroundLoop
from services.common.local_store import LocalObjectStore
from services.common.model_store import ModelStore
from services.common.settings import ServerSettings, StoreSettings
from services.common.tiny_model import build_tiny_model
from services.inference.main import InferenceServer
from services.inference.settings import InferenceSettings

PROMPT = "a photo of a dog"
GUIDANCE = 7.5
RESOLUTION = 64


class BackgroundServer:
    """The service serving from an event loop in a background thread of this process."""

    def __init__(self, settings: InferenceSettings) -> None:
        self._loop = BackgroundLoop("bench-server-loop")
        self.server = InferenceServer(settings)
        self._call(self.server.start())
        self._call(self.server.wait_ready())
        self.channel = grpc.insecure_channel(self.server.address)
        self.stub = inference_pb2_grpc.InferenceServiceStub(self.channel)

    def _call(self, coro: Any) -> Any:
        return self._loop.call(coro, 600)

    def generate(self, steps: int, seed: int) -> bytes:
        request = inference_pb2.GenerateRequest(
            model="models/tiny-sd",
            prompt=PROMPT,
            width=RESOLUTION,
            height=RESOLUTION,
            steps=steps,
            guidance_scale=GUIDANCE,
            seed=seed,
        )
        images = [
            r.image for r in self.stub.Generate(request, timeout=600) if r.WhichOneof("event") == "image"
        ]
        assert len(images) == 1, images
        return images[0].image.data

    def batch_sizes(self) -> tuple[float, float]:
        """(batches run, images in them) so far."""
        registry = self.server.app.registry
        count = registry.get_sample_value("dreambooth_inference_batch_size_images_count") or 0.0
        total = registry.get_sample_value("dreambooth_inference_batch_size_images_sum") or 0.0
        return count, total

    def stop(self) -> None:
        self.channel.close()
        self._call(self.server.stop(grace=0))
        self._loop.close()


class Baseline:
    """The plain diffusers pipeline, as a script would use it: one call per image."""

    def __init__(self, model_dir: Path) -> None:
        from diffusers import StableDiffusionPipeline

        self.pipe = StableDiffusionPipeline.from_pretrained(
            str(model_dir), safety_checker=None, requires_safety_checker=False, local_files_only=True
        )
        self.pipe.set_progress_bar_config(disable=True)

    def generate_many(self, steps: int, seeds: list[int]) -> list[Any]:
        """One call for all the images (the ideal batch)."""
        return self.pipe(
            [PROMPT] * len(seeds),
            height=RESOLUTION,
            width=RESOLUTION,
            num_inference_steps=steps,
            guidance_scale=GUIDANCE,
            generator=[torch.Generator().manual_seed(seed) for seed in seeds],
        ).images

    def generate(self, steps: int, seed: int) -> bytes:
        image = self.pipe(
            PROMPT,
            height=RESOLUTION,
            width=RESOLUTION,
            num_inference_steps=steps,
            guidance_scale=GUIDANCE,
            generator=torch.Generator().manual_seed(seed),
        ).images[0]
        out = io.BytesIO()
        image.save(out, format="PNG")
        return out.getvalue()


def concurrent_seconds(
    service: BackgroundServer, clients: int, per_client: int, steps: int, seed: int
) -> tuple[float, list[bytes]]:
    """Seconds for the block, and each client's first image (seed + index * per_client)."""

    def client(index: int) -> bytes:
        images = [service.generate(steps, seed + index * per_client + k) for k in range(per_client)]
        return images[0]

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        firsts = list(pool.map(client, range(clients)))
    return time.perf_counter() - started, firsts


def pixels(image: Any) -> np.ndarray:
    if isinstance(image, bytes):
        image = Image.open(io.BytesIO(image))
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def agreement(ours: list[Any], theirs: list[Any]) -> tuple[int, int]:
    """(images identical pixel for pixel, largest pixel difference)."""
    pairs = [(pixels(a), pixels(b)) for a, b in zip(ours, theirs, strict=True)]
    return sum(bool(np.array_equal(a, b)) for a, b in pairs), max(int(np.abs(a - b).max()) for a, b in pairs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16, help="images per side per round")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-wait-ms", type=float, default=None, help="batching window (default: settings)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 images, 2 clients, 4 steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.clients, args.steps, args.rounds = 2, 2, 4, 1
    per_client = max(1, -(-args.images * 2 // args.clients))  # about 2x the sequential images in total

    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp_name:
        tmp = Path(tmp_name)
        model_dir = build_tiny_model(tmp / "tiny-sd")
        ModelStore(LocalObjectStore(tmp / "store"), tmp / "cache").import_folder(model_dir, "tiny-sd")
        settings = InferenceSettings(
            server=ServerSettings(port=0, metrics_port=0, grace_seconds=0),
            store=StoreSettings(store_dir=str(tmp / "store"), cache_dir=str(tmp / "cache")),
            default_model="tiny-sd",
        )
        if args.max_wait_ms is not None:
            settings = dataclasses.replace(settings, max_wait_ms=args.max_wait_ms)
        baseline = Baseline(model_dir)
        service = BackgroundServer(settings)
        try:
            baseline.generate(args.steps, seed=999_999)  # warm-up
            service.generate(args.steps, seed=999_999)
            # Baseline and sequential requests alternate image by image, so both see the same load
            # on a shared machine; the concurrent block follows in each round.
            seconds = {"baseline": 0.0, "sequential": 0.0, "concurrent": 0.0, "ideal": 0.0}
            counts = {"baseline": 0, "sequential": 0, "concurrent": 0, "ideal": 0}
            same = {"sequential": [0, 0], "concurrent": [0, 0]}  # [identical, largest difference]
            batch_runs, batched_images = 0.0, 0.0  # of the concurrent blocks
            for round_index in range(args.rounds):
                seed = 1000 * round_index
                for index in range(args.images):
                    started = time.perf_counter()
                    theirs = baseline.generate(args.steps, seed + index)
                    seconds["baseline"] += time.perf_counter() - started
                    started = time.perf_counter()
                    ours = service.generate(args.steps, seed + index)
                    seconds["sequential"] += time.perf_counter() - started
                    identical, worst = agreement([ours], [theirs])
                    same["sequential"] = [
                        same["sequential"][0] + identical,
                        max(same["sequential"][1], worst),
                    ]
                counts["baseline"] += args.images
                counts["sequential"] += args.images
                runs_before, images_before = service.batch_sizes()
                block_seconds, firsts = concurrent_seconds(
                    service, args.clients, per_client, args.steps, seed
                )
                seconds["concurrent"] += block_seconds
                first_seeds = [seed + index * per_client for index in range(args.clients)]
                started = time.perf_counter()
                ideal = baseline.generate_many(args.steps, first_seeds)
                seconds["ideal"] += time.perf_counter() - started
                counts["ideal"] += args.clients
                identical, worst = agreement(firsts, ideal)
                same["concurrent"] = [same["concurrent"][0] + identical, max(same["concurrent"][1], worst)]
                runs_after, images_after = service.batch_sizes()
                batch_runs += runs_after - runs_before
                batched_images += images_after - images_before
                counts["concurrent"] += args.clients * per_client
                print(
                    f"round {round_index + 1}: "
                    + ", ".join(f"{name} {counts[name] / seconds[name]:.2f} images/s" for name in seconds)
                    + " (cumulative)",
                    file=sys.stderr,
                )
        finally:
            service.stop()

    rate = {name: counts[name] / seconds[name] for name in seconds}
    result = {
        "baseline_images_per_s": round(rate["baseline"], 3),
        "sequential_images_per_s": round(rate["sequential"], 3),
        "concurrent_images_per_s": round(rate["concurrent"], 3),
        "ideal_batched_images_per_s": round(rate["ideal"], 3),
        "sequential_ratio": round(rate["sequential"] / rate["baseline"], 3),
        "concurrent_vs_ideal": round(rate["concurrent"] / rate["ideal"], 3),
        "concurrent_ratio": round(rate["concurrent"] / rate["baseline"], 3),
        "sequential_identical_images": same["sequential"][0],
        "sequential_max_pixel_difference": same["sequential"][1],
        "concurrent_identical_images": same["concurrent"][0],
        "concurrent_max_pixel_difference": same["concurrent"][1],
    }
    print(
        f"tiny model {RESOLUTION}x{RESOLUTION}, {args.steps} steps, guidance {GUIDANCE}; "
        f"{args.images} images per side per round, {args.clients} clients x {per_client} requests; "
        f"concurrent batches of {batched_images / max(batch_runs, 1):.2f} images on average; "
        f"torch threads {torch.get_num_threads()}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, "
        f"load average {os.getloadavg()[0]:.1f}",
        file=sys.stderr,
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
