"""ToyBench's evaluation net: our DINO (an instance embedding) and our CLIP-T (attribute heads).

One small CNN over 64x64 photos. Its trunk feeds:
- an embedding (unit vectors): trained to tell instances apart (object x colour x pattern x
  pattern colour, whatever the background, position, size or light), so the cosine similarity
  of two photos' embeddings says "same subject" as DINO's does on DreamBench;
- one classifier head per attribute: object, colour, background, pattern, pattern colour.

Saved as safetensors + a JSON config + a manifest (digests, command, seed, versions, world
fingerprint). `load_evalnet` verifies the digests and refuses a net of another world version.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

import toyworld
from toyworld import BACKGROUNDS, COLOURS, OBJECTS, PATTERN_COLOURS, PATTERNS

INPUT_SIZE = 64
WEIGHTS_FILE = "evalnet.safetensors"
CONFIG_FILE = "evalnet.json"
MANIFEST_FILE = "manifest.json"
DEFAULT_DIR = Path(__file__).resolve().parent / "weights"

# Attribute -> class names, in the order of the head's logits.
HEADS: dict[str, tuple[str, ...]] = {
    "object": OBJECTS,
    "colour": tuple(COLOURS),
    "background": BACKGROUNDS,
    "pattern": PATTERNS,
    "pattern_colour": ("none", *PATTERN_COLOURS),
}


class WrongWorld(ValueError):
    """The model was made for another version of the toy world."""


class EvalNet(nn.Module):
    def __init__(self, widths: Sequence[int], embed_dim: int, identities: Sequence[str]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = 3
        for index, width in enumerate(widths):
            layers += [nn.Conv2d(previous, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            if index > 0:  # the 32x32 stage gets one conv only: it is most of the cost
                layers += [nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            previous = width
        self.trunk = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.heads = nn.ModuleDict({name: nn.Linear(previous, len(names)) for name, names in HEADS.items()})
        self.embed = nn.Linear(previous, embed_dim)
        # Cosine classifier over instances: what shapes the embedding in training.
        self.identity_weight = nn.Parameter(torch.randn(len(identities), embed_dim) * 0.1)
        self.identities = tuple(identities)
        self.widths, self.embed_dim = tuple(widths), embed_dim

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images: (N, 3, 64, 64) in [-1, 1] -> {"embedding": unit vectors, head: logits...}"""
        features = self.trunk(images)
        out = {name: head(features) for name, head in self.heads.items()}
        out["embedding"] = nn.functional.normalize(self.embed(features), dim=1)
        return out

    def identity_cosines(self, embedding: torch.Tensor) -> torch.Tensor:
        return embedding @ nn.functional.normalize(self.identity_weight, dim=1).T

    def config(self) -> dict[str, Any]:
        return {
            "architecture": "toybench.EvalNet",
            "input_size": INPUT_SIZE,
            "widths": list(self.widths),
            "embed_dim": self.embed_dim,
            "heads": {name: list(names) for name, names in HEADS.items()},
            "identities": list(self.identities),
            "world_version": toyworld.WORLD_VERSION,
        }


# ---------------------------------------------------------------- inputs


def to_tensor(images: Sequence[Image.Image | np.ndarray] | np.ndarray) -> torch.Tensor:
    """Photos (PIL images or HxWx3 uint8 arrays, any square size) -> (N, 3, 64, 64) in [-1, 1].

    Larger photos are box-averaged down to 64x64, which is how the world draws them.
    """
    if isinstance(images, np.ndarray) and images.ndim == 4:
        batch = images
    else:
        batch = np.stack([_as_array(image) for image in images])
    if batch.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3):
        raise ValueError(f"expected 64x64 RGB photos, got {batch.shape[1:]}")
    tensor = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float()
    return tensor / 127.5 - 1.0


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image = image.convert("RGB")
    if image.size != (INPUT_SIZE, INPUT_SIZE):
        if image.width != image.height:
            raise ValueError(f"photos must be square, got {image.size}")
        image = image.resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BOX)
    return np.asarray(image, dtype=np.uint8)


@torch.no_grad()
def embed(net: EvalNet, images: Sequence[Image.Image | np.ndarray] | np.ndarray) -> torch.Tensor:
    """Unit embeddings (N, D) of photos."""
    return net(to_tensor(images))["embedding"]


@torch.no_grad()
def predict(net: EvalNet, images: Sequence[Image.Image | np.ndarray] | np.ndarray) -> list[dict[str, str]]:
    """Each photo's most likely attributes, {"object": "ball", "colour": "red", ...}."""
    out = net(to_tensor(images))
    labels = {name: out[name].argmax(dim=1).tolist() for name in HEADS}
    return [{name: HEADS[name][labels[name][row]] for name in HEADS} for row in range(len(out["object"]))]


# ---------------------------------------------------------------- files


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_evalnet(net: EvalNet, folder: Path, provenance: dict[str, Any]) -> Path:
    """Write weights, config and manifest (file digests + provenance) into `folder`."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().contiguous() for name, tensor in net.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"world_version": toyworld.WORLD_VERSION})
    (folder / CONFIG_FILE).write_text(json.dumps(net.config(), indent=2) + "\n")
    manifest = {
        "world_version": toyworld.WORLD_VERSION,
        "world_fingerprint": toyworld.world_fingerprint(),
        "files": {name: file_sha256(folder / name) for name in (WEIGHTS_FILE, CONFIG_FILE)},
        **provenance,
    }
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return folder


def load_evalnet(folder: Path | None = None) -> EvalNet:
    """The committed (or given) evaluation net, in eval mode; digests and world version checked."""
    from safetensors.torch import load_file

    folder = Path(folder) if folder is not None else DEFAULT_DIR
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.is_file():
        raise FileNotFoundError(f"no evaluation net in {folder} (no {MANIFEST_FILE})")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("world_version") != toyworld.WORLD_VERSION:
        raise WrongWorld(
            f"the evaluation net in {folder} was trained on toy world version "
            f"{manifest.get('world_version')!r}, this is version {toyworld.WORLD_VERSION!r}: retrain it"
        )
    for name, digest in manifest["files"].items():
        if file_sha256(folder / name) != digest:
            raise ValueError(f"{folder / name} does not match its digest in {MANIFEST_FILE}")
    config = json.loads((folder / CONFIG_FILE).read_text())
    if config["heads"] != {name: list(names) for name, names in HEADS.items()}:
        raise WrongWorld(f"the evaluation net in {folder} names other attributes than this world")
    net = EvalNet(config["widths"], config["embed_dim"], config["identities"])
    net.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    return net.eval()
