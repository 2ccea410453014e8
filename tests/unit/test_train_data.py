"""Training data: views of the images (crops, flips), cached latent pools, store lookups."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from services.common.errors import FailedPrecondition, NotFound
from services.common.local_store import LocalObjectStore
from services.trainer.dataset_layout import write_dataset
from services.trainer.worker import data
from services.trainer.worker.training_data import step_generator
from tests.fixtures.trainer_server import make_image, make_png


def test_a_square_image_at_the_resolution_has_one_crop() -> None:
    boxes = data.crop_boxes((64, 64), 64, center_crop=False, generator=torch.Generator().manual_seed(0))
    assert boxes == [(0, 0, 64, 64)]


def test_center_crop_is_one_centred_box() -> None:
    boxes = data.crop_boxes((96, 64), 64, center_crop=True, generator=torch.Generator().manual_seed(0))
    assert boxes == [(16, 0, 80, 64)]


def test_random_crops_are_a_seeded_pool_inside_the_image() -> None:
    def boxes(seed: int) -> list[tuple[int, int, int, int]]:
        return data.crop_boxes((96, 64), 64, center_crop=False, generator=torch.Generator().manual_seed(seed))

    assert len(boxes(0)) == data.RANDOM_CROP_VIEWS
    assert boxes(0) == boxes(0)
    for left, top, right, bottom in boxes(0):
        assert left >= 0 and right <= 96 and top == 0 and bottom == 64 and right - left == 64


def test_views_are_resized_cropped_and_flipped() -> None:
    image = make_image(3, size=(128, 96))  # shorter side 96 -> resized to 85x64 for resolution 64
    views = data.image_views(
        image, 64, center_crop=True, random_flip=True, generator=torch.Generator().manual_seed(0)
    )
    assert views.shape == (2, 3, 64, 64)
    assert torch.equal(views[1], torch.flip(views[0], dims=[2]))
    assert views.min() >= -1.0 and views.max() <= 1.0


def test_to_tensor_maps_pixels_to_minus_one_one() -> None:
    image = Image.new("RGB", (2, 1))
    image.putpixel((0, 0), (0, 0, 0))
    image.putpixel((1, 0), (255, 255, 255))
    tensor = data.to_tensor(image)
    assert tensor.shape == (3, 1, 2)
    assert tensor[:, 0, 0].tolist() == [-1.0, -1.0, -1.0]
    assert tensor[:, 0, 1].tolist() == [1.0, 1.0, 1.0]


def test_latent_pool_samples_are_reproducible_from_the_generator() -> None:
    pool = data.LatentPool(
        means=[torch.zeros(1, 4, 8, 8), torch.ones(2, 4, 8, 8)],
        stds=[torch.full((1, 4, 8, 8), 0.1), torch.full((2, 4, 8, 8), 0.1)],
    )
    first = pool.sample(3, step_generator(seed=0, rank=0, step=7, micro=0))
    again = pool.sample(3, step_generator(seed=0, rank=0, step=7, micro=0))
    other_rank = pool.sample(3, step_generator(seed=0, rank=1, step=7, micro=0))
    assert first.shape == (3, 4, 8, 8)
    assert torch.equal(first, again)
    assert not torch.equal(first, other_rank)


def test_step_generators_differ_by_every_coordinate() -> None:
    draws = {
        tuple(torch.rand(4, generator=step_generator(*coords)).tolist())
        for coords in [(0, 0, 0, 0), (1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1)]
    }
    assert len(draws) == 5


def test_dataset_and_prior_keys_come_from_the_store(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "store")
    dataset = "d" * 64
    write_dataset(store, dataset, [make_png(0), make_png(1)])
    store.put_bytes("priors/key/images/00000.png", make_png(7))

    keys = data.dataset_image_keys(store, dataset)
    assert keys == [f"datasets/{dataset}/images/000.png", f"datasets/{dataset}/images/001.png"]
    assert [image.size for image in data.load_images(store, keys)] == [(64, 64), (64, 64)]
    assert data.prior_image_keys(store, "priors/key/") == ["priors/key/images/00000.png"]
    with pytest.raises(NotFound, match="dataset"):
        data.dataset_image_keys(store, "e" * 64)
    with pytest.raises(FailedPrecondition, match="priors/none/"):
        data.prior_image_keys(store, "priors/none/")
