"""ExportModel over real gRPC (S3 store): models the trainer published (its loop, in this process)
load in stock diffusers and give the service's image for the same request and seed.

Stock diffusers computes the UNet's time embedding on every row of a batch, where the service
computes it on one row and broadcasts it (services/common/batch_invariance.py): on CPU that moves
a few pixels by one level. With that one patch applied to the stock pipeline's UNet, the bytes
are identical, which shows the exported weights are exactly the ones the service runs.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from dreambooth_client import DreamBoothClient, cli
from PIL import Image

from services.common.batch_invariance import share_time_embedding_rows
from services.common.model_store import ModelStore
from services.common.settings import StoreSettings
from services.trainer.dataset_layout import write_dataset
from services.trainer.job_spec import JobSpec
from services.trainer.worker.loop import train
from services.trainer.worker.publish import LORA_WEIGHTS_FILE
from services.trainer.worker.runtime import Runtime, WorkerJob
from tests.fixtures.inference_server import RunningInference
from tests.fixtures.trainer_server import make_png

DATASET = "d" * 64
PROMPT = "a photo of sks dog"
REQUEST = {"steps": 4, "seed": 7, "guidance_scale": 7.5}


def publish(settings: StoreSettings, model_id: str, **spec: object) -> None:
    """Fine-tune the tiny model for 2 steps with the trainer's own loop and publish it."""
    job_spec = JobSpec(
        base_model="tiny-sd",
        dataset=DATASET,
        instance_prompt=PROMPT,
        max_train_steps=2,
        resolution=64,
        checkpointing_steps=0,
        model_id=model_id,
        **spec,
    )
    train(WorkerJob(f"job-{model_id}", job_spec, settings), Runtime())


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def stock_image(pipe: object, patched: bool) -> np.ndarray:
    if patched:
        share_time_embedding_rows(pipe.unet)  # type: ignore[attr-defined]
    image = pipe(  # type: ignore[operator]
        PROMPT,
        num_inference_steps=REQUEST["steps"],
        guidance_scale=REQUEST["guidance_scale"],
        generator=torch.Generator().manual_seed(REQUEST["seed"]),
        output_type="np",
    ).images[0]
    return (image * 255).round().astype("uint8")


def assert_same_image(service: np.ndarray, stock: np.ndarray, patched: np.ndarray) -> None:
    assert np.array_equal(service, patched)  # the very same bytes
    difference = np.abs(service.astype(int) - stock.astype(int))
    assert difference.max() <= 1 and (difference == 0).mean() > 0.95  # stock: one level, a few pixels


def test_exported_models_load_in_stock_diffusers_and_give_the_services_image(
    start_inference: Callable[..., RunningInference],
    s3_store_settings: StoreSettings,
    model_store: ModelStore,
    tmp_path: Path,
) -> None:
    from diffusers import StableDiffusionPipeline

    settings = dataclasses.replace(s3_store_settings, cache_dir=str(tmp_path / "trainer-cache"))
    write_dataset(model_store.store, DATASET, [make_png(seed) for seed in range(2)])
    publish(settings, "tuned", learning_rate=1e-3)
    publish(settings, "tuned-lora", use_lora=True, train_text_encoder=True, learning_rate=5e-2)
    server = start_inference()
    with DreamBoothClient(trainer=None, inference=server.address, timeout=60) as client:
        served = {
            model: pixels(client.generate(model, PROMPT, **REQUEST)[0].data)
            for model in ("tiny-sd", "tuned", "tuned-lora")
        }
        assert client.export_model("tiny-sd", tmp_path / "base").name == "models/tiny-sd"
        lora = client.export_model("tuned-lora", tmp_path / "lora")
    code = cli.main(
        ["--inference", server.address, "models", "export", "tuned", "--out", str(tmp_path / "full")]
    )
    assert code == 0
    assert not np.array_equal(served["tuned-lora"], served["tiny-sd"])  # the adapter is applied
    assert sorted(p.name for p in (tmp_path / "lora").iterdir()) == [
        "dreambooth_lora.json",
        LORA_WEIGHTS_FILE,
    ]
    assert lora.size_bytes < model_store.get("tiny-sd").size_bytes / 20

    def load(folder: str, lora_folder: str | None = None) -> object:
        pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / folder))  # stock: nothing else
        pipe.set_progress_bar_config(disable=True)
        if lora_folder is not None:
            pipe.load_lora_weights(str(tmp_path / lora_folder))
        return pipe

    for model, folders in (("tuned", ("full",)), ("tuned-lora", ("base", "lora"))):
        assert_same_image(
            served[model],
            stock_image(load(*folders), patched=False),
            stock_image(load(*folders), patched=True),
        )
