"""Training data: subject and class-prior images from the store, their augmented views, the
cached VAE latents of those views, and the one-batch collate of DreamBooth.

Latents are computed once per job per worker, before the loop: the VAE is frozen, so encoding
the same pixels every step would only burn time. Augmentations change the pixels, so a single
cached view per image would silently turn them off. The choice here: a fixed pool of views per
image is encoded once — both orientations when `random_flip`, and `RANDOM_CROP_VIEWS` seeded
random crops when the image is larger than the resolution and `center_crop` is off — and every
step draws one view of each example from that pool. That keeps the VAE out of the loop at a
memory cost of (views x latents), a few MB per image even at 512 px. What is cached is the
posterior itself (mean and std), so every step still draws a fresh latent sample, as the
textbook loop does when it encodes per step.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from services.common.errors import FailedPrecondition, NotFound
from services.common.object_store import ObjectStore
from services.trainer.dataset_layout import dataset_name, read_dataset

RANDOM_CROP_VIEWS = 4  # seeded crops per image when random cropping applies
ENCODE_BATCH = 4  # images per VAE call while caching (x their views)
MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # stored images were normalised on upload; this is a backstop


def dataset_image_keys(store: ObjectStore, dataset_id: str) -> list[str]:
    """Keys of the dataset's images in upload order, as its manifest lists them."""
    keys = read_dataset(store, dataset_id).image_keys()
    if not keys:
        raise NotFound("dataset", f"dataset {dataset_name(dataset_id)!r} has no images")
    return keys


def prior_image_keys(store: ObjectStore, prior_prefix: str, limit: int | None = None) -> list[str]:
    """Keys of the class-prior images under `{prior_prefix}images/`, at most `limit` of them."""
    prefix = prior_prefix if prior_prefix.endswith("/") else prior_prefix + "/"
    keys = [info.key for info in store.list(f"{prefix}images/") if info.key.endswith(".png")]
    if not keys:
        raise FailedPrecondition(
            f"no class-prior images under {prefix!r}: generate the priors again (with_prior_preservation)"
        )
    return keys[:limit] if limit else keys


def load_images(store: ObjectStore, keys: Sequence[str]) -> list[Image.Image]:
    return list(iter_images(store, keys))


def iter_images(store: ObjectStore, keys: Iterable[str]) -> Iterator[Image.Image]:
    """Decoded RGB images, one at a time (a thousand class images never sit in memory at once)."""
    for key in keys:
        with Image.open(io.BytesIO(store.get_bytes(key))) as opened:
            if opened.width * opened.height > MAX_IMAGE_PIXELS:
                raise FailedPrecondition(f"{key} is {opened.width}x{opened.height}: too large to train on")
            yield opened.convert("RGB")


# Views: resize so the shorter side is the resolution, then crop, then maybe flip.


def resize_shorter_side(image: Image.Image, resolution: int) -> Image.Image:
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    return image if size == image.size else image.resize(size, Image.Resampling.BILINEAR)


def crop_boxes(
    size: tuple[int, int], resolution: int, center_crop: bool, generator: torch.Generator
) -> list[tuple[int, int, int, int]]:
    """The crops of one resized image: one centred, or RANDOM_CROP_VIEWS seeded random ones."""
    width, height = size
    spare_x, spare_y = width - resolution, height - resolution
    if center_crop or (spare_x == 0 and spare_y == 0):
        left, top = spare_x // 2, spare_y // 2
        return [(left, top, left + resolution, top + resolution)]
    boxes = []
    for _ in range(RANDOM_CROP_VIEWS):
        left = int(torch.randint(0, spare_x + 1, (1,), generator=generator))
        top = int(torch.randint(0, spare_y + 1, (1,), generator=generator))
        boxes.append((left, top, left + resolution, top + resolution))
    return boxes


def image_views(
    image: Image.Image, resolution: int, *, center_crop: bool, random_flip: bool, generator: torch.Generator
) -> torch.Tensor:
    """Every view of `image` to cache, as a float tensor [views, 3, res, res] in [-1, 1]."""
    resized = resize_shorter_side(image, resolution)
    views = []
    for box in crop_boxes(resized.size, resolution, center_crop, generator):
        crop = to_tensor(resized.crop(box))
        views.append(crop)
        if random_flip:
            views.append(torch.flip(crop, dims=[2]))
    return torch.stack(views)


def to_tensor(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


# Cached latents.


@dataclass
class LatentPool:
    """Posterior (mean, std) of every view of every image: lists indexed by image, [views, C, h, w]."""

    means: list[torch.Tensor]
    stds: list[torch.Tensor]

    def __len__(self) -> int:
        return len(self.means)

    def to(self, device: torch.device) -> LatentPool:
        return LatentPool([m.to(device) for m in self.means], [s.to(device) for s in self.stds])

    def sample(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """`count` unscaled latents: random images, a random view of each, a posterior sample."""
        picks = torch.randint(0, len(self), (count,), generator=generator).tolist()
        latents = []
        for index in picks:
            views = self.means[index].shape[0]
            view = int(torch.randint(0, views, (1,), generator=generator))
            mean, std = self.means[index][view], self.stds[index][view]
            noise = torch.randn(mean.shape, generator=generator).to(mean.device, mean.dtype)
            latents.append(mean + std * noise)
        return torch.stack(latents)


@torch.no_grad()
def encode_views(
    vae: torch.nn.Module,
    images: Iterable[Image.Image],
    resolution: int,
    *,
    center_crop: bool,
    random_flip: bool,
    seed: int,
    device: torch.device,
) -> LatentPool:
    """Encode every view of every image once with the (frozen, eval-mode) VAE, a few images at
    a time; only the latents (1/64 of the pixels) are kept."""
    generator = torch.Generator().manual_seed(seed)
    dtype = next(vae.parameters()).dtype
    means: list[torch.Tensor] = []
    stds: list[torch.Tensor] = []
    for chunk in _chunks(images, ENCODE_BATCH):
        per_image = [
            image_views(
                image, resolution, center_crop=center_crop, random_flip=random_flip, generator=generator
            )
            for image in chunk
        ]
        posterior = vae.encode(torch.cat(per_image).to(device, dtype)).latent_dist
        counts = [views.shape[0] for views in per_image]
        means.extend(posterior.mean.float().cpu().split(counts))
        stds.extend(posterior.std.float().cpu().split(counts))
    return LatentPool(means, stds)


def _chunks(items: Iterable[Image.Image], size: int) -> Iterator[list[Image.Image]]:
    chunk: list[Image.Image] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def tokenize(tokenizer: object, prompt: str) -> torch.Tensor:
    """Token ids [1, model_max_length], padded and truncated as SD's text encoder expects."""
    ids = tokenizer(  # type: ignore[operator]
        prompt,
        padding="max_length",
        max_length=tokenizer.model_max_length,  # type: ignore[attr-defined]
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return ids
