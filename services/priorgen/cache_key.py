"""Content addressing of prior sets: the key, and where a set's objects live in the store.

priors/{key}/images/{i:05d}.png    one object per image, each written atomically
priors/{key}/manifest.json         written LAST: a set is complete iff its manifest exists
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from dreambooth_client import vocabulary

from services.priorgen.request import PriorSpec

# Bump when the way images are computed changes (so old sets are not mistaken for new ones).
KEY_FORMAT = 1
PRIORS_ROOT = "priors"
_IMAGE_NAME = re.compile(r"^(\d{5,})\.png$")


def prior_key(model_digest: str, spec: PriorSpec, compute_width: int) -> str:
    """sha256 over the base model's manifest digest, every normalised input and the compute
    width (the tensor batch of every pipeline call: float results depend on it, see render.py).

    The model id is left out on purpose: two ids with the same manifest digest are the same
    model, and the digest changes whenever a weight does. The batch size is left out: it does
    not change the images.
    """
    inputs = spec.to_json()
    inputs.pop("model_id")
    payload: dict[str, Any] = {
        "format": KEY_FORMAT,
        "model_digest": model_digest,
        "compute_width": compute_width,
        "inputs": inputs,
    }
    if spec.seed + spec.num_images > vocabulary.SEED_MODULUS:
        # Image seeds wrap at 2**32 now; they went on past it when key format 1 was defined. Only
        # the sets whose seeds wrap changed their images: they alone get new keys.
        payload["seed_modulus"] = vocabulary.SEED_MODULUS
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def set_prefix(key: str) -> str:
    return f"{PRIORS_ROOT}/{key}/"


def images_prefix(key: str) -> str:
    return f"{set_prefix(key)}images/"


def image_key(key: str, index: int) -> str:
    return f"{images_prefix(key)}{index:05d}.png"


def manifest_key(key: str) -> str:
    return f"{set_prefix(key)}manifest.json"


def parse_image_index(key: str, object_key: str) -> int | None:
    """The index of an image object of set `key`, or None for anything else."""
    name = object_key.removeprefix(images_prefix(key))
    if name == object_key:
        return None
    match = _IMAGE_NAME.match(name)
    return int(match.group(1)) if match else None
