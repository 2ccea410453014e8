"""Inference: the service (sequential and 8 concurrent clients) vs the plain diffusers pipeline.

    .venv/bin/python bench/inference.py [--images 16] [--clients 8] [--steps 20] [--rounds 3]

One process run, the tiny model at 64x64, 20 steps, guidance 7.5, one image per request, the same
prompt on every side. Baseline: `StableDiffusionPipeline` called in-process once per image, PNG
bytes out. Service: a real InferenceService on 127.0.0.1 (local-directory store, its event loop
in a thread of this process) called over gRPC, first by one client request after request, then
by `--clients` clients at once (dynamic batching shares their UNet calls). Model loading is left
out (both sides are warmed up). Baseline and sequential requests alternate image by image, so
both see the same load on a shared machine; each round then runs the concurrent block. Rates are
totals over all rounds. The last line is one JSON object.
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
import torch
from dreambooth.v1 import inference_pb2, inference_pb2_grpc

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


def timed(call: Any, *args: Any) -> float:
    started = time.perf_counter()
    call(*args)
    return time.perf_counter() - started


def concurrent_seconds(
    service: BackgroundServer, clients: int, per_client: int, steps: int, seed: int
) -> float:
    def client(index: int) -> None:
        for k in range(per_client):
            service.generate(steps, seed + index * per_client + k)

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16, help="images per side per round")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-wait-ms", type=float, default=None, help="batching window (default: settings)")
    args = parser.parse_args(argv)
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
            seconds = {"baseline": 0.0, "sequential": 0.0, "concurrent": 0.0}
            counts = {"baseline": 0, "sequential": 0, "concurrent": 0}
            batch_runs, batched_images = 0.0, 0.0  # of the concurrent blocks
            for round_index in range(args.rounds):
                seed = 1000 * round_index
                for index in range(args.images):
                    seconds["baseline"] += timed(baseline.generate, args.steps, seed + index)
                    seconds["sequential"] += timed(service.generate, args.steps, seed + index)
                counts["baseline"] += args.images
                counts["sequential"] += args.images
                runs_before, images_before = service.batch_sizes()
                seconds["concurrent"] += concurrent_seconds(
                    service, args.clients, per_client, args.steps, seed
                )
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
        "sequential_ratio": round(rate["sequential"] / rate["baseline"], 3),
        "concurrent_ratio": round(rate["concurrent"] / rate["baseline"], 3),
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
