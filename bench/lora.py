"""LoRA serving: adapters hot-swapped on a resident base, mixed-adapter batches, run-time adapters.

    .venv/bin/python bench/lora.py [--quick] [--loras 8] [--clients 8] [--steps 20] [--rounds 3]

One process run on the tiny model at 64x64, guidance 7.5, one image per request, every request
over gRPC to a real InferenceService on 127.0.0.1 (local-directory store, its event loop in a
thread of this process). LoRA models are deterministic random adapters on the UNet and text
encoder (services/common/tiny_lora.py); a "merged" model is the same LoRA fused into the base's
weights with diffusers (`fuse_lora`) and published as a full fine-tune. Four figures, each
against the strongest alternative:

- switch_ms vs full_load_ms: the service's own load timings (its load-duration histograms) for
  the first request on a LoRA whose adapter is not loaded (its base resident) and for the first
  request on a full fine-tune not in cache (components shared with the base stay loaded). Target:
  switch <= 10 % of a full load. The first requests' whole latencies are reported beside them.
- adapter_bytes vs full_model_bytes: what a LoRA model and a full fine-tune hold in the store
  (full_model_new_bytes: the part of the latter not shared with its base).
- mixed_ratio: images/s of `--clients` concurrent clients each on a different LoRA, divided by
  images/s of as many clients all on one LoRA (both batch; the two alternate round by round).
  Target >= 0.8. Checked first: each image of a mixed batch equals its request run alone.
- fused_ratio: images/s of sequential requests on a LoRA applied at run time, divided by the same
  LoRA merged into the weights (requests alternate image by image). Target >= 0.9.

The last line is one JSON object. `--quick` runs every step at toy sizes (a smoke test).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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

from services.common.background_loop import BackgroundLoop
from services.common.local_store import LocalObjectStore
from services.common.model_store import ModelStore
from services.common.settings import ServerSettings, StoreSettings
from services.common.tiny_lora import build_tiny_lora
from services.common.tiny_model import build_tiny_model
from services.inference.main import InferenceServer
from services.inference.settings import InferenceSettings

PROMPT = "a photo of sks dog"
GUIDANCE = 7.5
RESOLUTION = 64


class BackgroundServer:
    """The service serving from an event loop in a background thread of this process."""

    def __init__(self, settings: InferenceSettings) -> None:
        self._loop = BackgroundLoop("bench-server-loop")
        self.server = InferenceServer(settings)
        self._loop.call(self.server.start(), 600)
        self._loop.call(self.server.wait_ready(), 600)
        self.channel = grpc.insecure_channel(self.server.address)
        self.stub = inference_pb2_grpc.InferenceServiceStub(self.channel)

    def generate(self, model: str, steps: int, seed: int) -> bytes:
        request = inference_pb2.GenerateRequest(
            model=f"models/{model}",
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

    def metric(self, name: str) -> float:
        return self.server.app.registry.get_sample_value(f"dreambooth_inference_{name}") or 0.0

    def stop(self) -> None:
        self.channel.close()
        self._loop.call(self.server.stop(grace=0), 600)
        self._loop.close()


def merged_folder(base_dir: Path, lora_dir: Path, out: Path) -> Path:
    """The LoRA fused into the base's UNet and text encoder, the other files the base's own: a
    full fine-tune as the trainer writes one (services/trainer/worker/publish.py)."""
    from services.common.pipelines import load_pipeline

    pipe = load_pipeline(base_dir)
    pipe.load_lora_weights(str(lora_dir), weight_name="pytorch_lora_weights.safetensors")
    pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=1.0)
    pipe.unload_lora_weights()
    trained = ("unet", "text_encoder")
    shutil.copytree(base_dir, out, ignore=lambda folder, names: [n for n in names if n in trained])
    for name in trained:
        getattr(pipe, name).save_pretrained(str(out / name), safe_serialization=True)
    return out


def timed(call: Any, *args: Any) -> float:
    started = time.perf_counter()
    call(*args)
    return time.perf_counter() - started


def measure_loads(service: BackgroundServer, models: list[tuple[str, str]], steps: int) -> dict[str, float]:
    """Mean load and first-request seconds of each kind: adapters and full models, interleaved."""
    sums = {"adapter": 0.0, "full": 0.0, "adapter_request": 0.0, "full_request": 0.0}
    for lora, full in models:
        before = service.metric("adapter_load_duration_seconds_sum")
        sums["adapter_request"] += timed(service.generate, lora, steps, 1)
        sums["adapter"] += service.metric("adapter_load_duration_seconds_sum") - before
        before = service.metric("model_load_duration_seconds_sum")
        sums["full_request"] += timed(service.generate, full, steps, 1)
        sums["full"] += service.metric("model_load_duration_seconds_sum") - before
    loads = service.metric("adapter_loads_total"), service.metric("model_loads_total")
    assert loads == (len(models), len(models) + 1), f"unexpected loads {loads}"  # +1: the warm base
    return {name: total / len(models) for name, total in sums.items()}


def concurrent_rate(
    service: BackgroundServer, models: list[str], per_client: int, steps: int, seed: int
) -> tuple[float, float]:
    """(images/s, mean batch size) of one client per entry of `models`, each `per_client` requests."""
    runs_before = service.metric("batch_size_images_count")
    images_before = service.metric("batch_size_images_sum")

    def client(index: int) -> None:
        for k in range(per_client):
            service.generate(models[index], steps, seed + index * per_client + k)

    started = time.perf_counter()
    with ThreadPoolExecutor(len(models)) as pool:
        list(pool.map(client, range(len(models))))
    seconds = time.perf_counter() - started
    runs = service.metric("batch_size_images_count") - runs_before
    batched = service.metric("batch_size_images_sum") - images_before
    return len(models) * per_client / seconds, batched / max(runs, 1)


def check_mixed_batches(service: BackgroundServer, loras: list[str], steps: int) -> None:
    """Each image of a mixed-adapter batch is byte-identical to its request run alone."""
    with ThreadPoolExecutor(len(loras)) as pool:
        together = list(pool.map(lambda i: service.generate(loras[i], steps, 500 + i), range(len(loras))))
    alone = [service.generate(lora, steps, 500 + i) for i, lora in enumerate(loras)]
    assert together == alone, "a mixed-adapter batch changed a request's image"
    assert len(set(together)) == len(loras), "two LoRA models gave the same image"


def pixels(data: bytes) -> np.ndarray:
    from io import BytesIO

    from PIL import Image

    return np.asarray(Image.open(BytesIO(data)).convert("RGB")).astype(int)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="toy sizes: a smoke test of every step")
    parser.add_argument("--loras", type=int, default=8, help="LoRA models of the base (>= clients)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=8, help="sequential images per side per round")
    parser.add_argument("--loads", type=int, default=3, help="cold adapter and full-model loads measured")
    args = parser.parse_args(argv)
    if args.quick:
        args.loras, args.clients, args.steps, args.rounds, args.images, args.loads = 2, 2, 3, 1, 2, 1
    if args.loras < args.clients or args.loads > args.loras:
        parser.error("--loras must be at least --clients and --loads")
    per_client = 2

    with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp_name:
        tmp = Path(tmp_name)
        models = ModelStore(LocalObjectStore(tmp / "store"), tmp / "cache")
        base_dir = build_tiny_model(tmp / "tiny-sd")
        models.import_folder(base_dir, "tiny-sd")
        loras = [f"lora-{i}" for i in range(args.loras)]
        for seed, lora in enumerate(loras):
            models.import_folder(
                build_tiny_lora(base_dir, tmp / lora, seed), lora, kind="lora", base_model="tiny-sd"
            )
        merged = [f"merged-{i}" for i in range(args.loads)]
        for lora, full in zip(loras, merged, strict=False):
            folder = merged_folder(base_dir, tmp / lora, tmp / full)
            models.import_folder(folder, full, kind="fine_tuned", base_model="tiny-sd")
        adapter_bytes = models.get(loras[0]).size_bytes
        full_model_bytes = models.get(merged[0]).size_bytes
        base_blobs = {entry.sha256 for entry in models.get("tiny-sd").files.values()}
        full_new_bytes = sum(
            e.size for e in models.get(merged[0]).files.values() if e.sha256 not in base_blobs
        )

        settings = InferenceSettings(
            server=ServerSettings(port=0, metrics_port=0, grace_seconds=0),
            store=StoreSettings(store_dir=str(tmp / "store"), cache_dir=str(tmp / "serving-cache")),
            default_model="tiny-sd",
            cache_max_models=args.loads + 2,
        )
        service = BackgroundServer(settings)
        try:
            loads = measure_loads(service, list(zip(loras, merged, strict=False)), args.steps)
            for lora in loras[args.loads :]:  # every adapter loaded: the rates measure sampling only
                service.generate(lora, args.steps, 1)
            check_mixed_batches(service, loras[: args.clients], args.steps)

            seconds = {"runtime": 0.0, "merged": 0.0}
            rates: dict[str, list[float]] = {"mixed": [], "single": []}
            batch_sizes: dict[str, list[float]] = {"mixed": [], "single": []}
            differences = []
            for round_index in range(args.rounds):
                seed = 1000 * (round_index + 1)
                for index in range(args.images):
                    started = time.perf_counter()
                    runtime_image = service.generate(loras[0], args.steps, seed + index)
                    seconds["runtime"] += time.perf_counter() - started
                    started = time.perf_counter()
                    merged_image = service.generate(merged[0], args.steps, seed + index)
                    seconds["merged"] += time.perf_counter() - started
                    differences.append(np.abs(pixels(runtime_image) - pixels(merged_image)).max())
                sides = {"mixed": loras[: args.clients], "single": [loras[0]] * args.clients}
                for side in sorted(sides, key=lambda s: (s == "mixed") == (round_index % 2 == 0)):
                    rate, batch = concurrent_rate(service, sides[side], per_client, args.steps, seed)
                    rates[side].append(rate)
                    batch_sizes[side].append(batch)
                done = args.images * (round_index + 1)
                print(
                    f"round {round_index + 1}: run-time {done / seconds['runtime']:.2f} vs merged "
                    f"{done / seconds['merged']:.2f} images/s (cumulative); "
                    f"mixed {rates['mixed'][-1]:.2f} vs single {rates['single'][-1]:.2f} images/s",
                    file=sys.stderr,
                )
        finally:
            service.stop()

    mixed, single = float(np.mean(rates["mixed"])), float(np.mean(rates["single"]))
    runtime_rate = args.images * args.rounds / seconds["runtime"]
    merged_rate = args.images * args.rounds / seconds["merged"]
    result = {
        "switch_ms": round(loads["adapter"] * 1000, 2),
        "full_load_ms": round(loads["full"] * 1000, 2),
        "switch_fraction": round(loads["adapter"] / loads["full"], 4),
        "adapter_bytes": adapter_bytes,
        "full_model_bytes": full_model_bytes,
        "full_model_new_bytes": full_new_bytes,  # what it does not share with its base
        "mixed_images_per_s": round(mixed, 3),
        "single_lora_images_per_s": round(single, 3),
        "mixed_ratio": round(mixed / single, 3),
        "runtime_images_per_s": round(runtime_rate, 3),
        "merged_images_per_s": round(merged_rate, 3),
        "fused_ratio": round(runtime_rate / merged_rate, 3),
    }
    first_requests = {name: round(loads[f"{name}_request"] * 1000) for name in ("adapter", "full")}
    batches = {side: round(float(np.mean(sizes)), 2) for side, sizes in batch_sizes.items()}
    print(
        f"tiny model {RESOLUTION}x{RESOLUTION}, {args.steps} steps, guidance {GUIDANCE}; {args.loras} LoRA "
        f"models (rank 4, UNet + text encoder); first request ms on a cold adapter / full model "
        f"{first_requests['adapter']} / {first_requests['full']}; mean batch images {batches}; "
        f"run-time vs merged images differ by at most {max(differences)} levels; "
        f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}",
        file=sys.stderr,
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
