"""Train ToyBench's evaluation net on the world's ground truth:
`python -m toybench.train_evalnet --out toybench/weights --seed 0`.

Half the photos are the pretraining world (plain objects), half are patterned instances of every
identity the world can draw, on random backgrounds; 1 in 10 is drawn at 128x128 and box-averaged
down, as uploaded photos are. Augmentations (flip, blur, down-and-up sampling, brightness,
noise) stand in for what a generator does to a photo, so the net also reads generated images.
Loss: cross-entropy per attribute head + a cosine-margin (CosFace) loss over instances, which
shapes the embedding. Same seed and thread count => the same weights.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import toyworld
from toybench.evalnet import HEADS, EvalNet, embed, save_evalnet, to_tensor
from toyworld import HELD_OUT_SUBJECTS, PLAIN, Scene, all_identities, draw_array, identity
from toyworld.scene import jittered_scene, rng_for
from toyworld.vocabulary import BACKGROUNDS

COSFACE_SCALE, COSFACE_MARGIN = 16.0, 0.25


def training_scenes(seed: int, count: int, start: int = 0) -> list[tuple[Scene, int]]:
    """(scene, size to draw it at): even indices plain, odd ones patterned identities."""
    identities = all_identities()
    plain = [entry for entry in identities if entry[2] == PLAIN]
    patterned = [entry for entry in identities if entry[2] != PLAIN]
    chosen = []
    for index in range(start, start + count):
        rng = rng_for(seed, index)
        pool = plain if index % 2 == 0 else patterned
        obj, colour, pattern, pattern_colour = pool[int(rng.integers(len(pool)))]
        background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
        scene = jittered_scene(rng, obj, colour, background, pattern, pattern_colour)
        chosen.append((scene, 128 if rng.random() < 0.1 else 64))
    return chosen


def draw_dataset(scenes: list[tuple[Scene, int]]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(N, 64, 64, 3) uint8 photos and their labels (attribute -> class indices, plus identity)."""
    names = [identity(*entry) for entry in all_identities()]
    index_of = {name: i for i, name in enumerate(names)}
    photos = np.empty((len(scenes), 64, 64, 3), dtype=np.uint8)
    labels: dict[str, list[int]] = {name: [] for name in (*HEADS, "identity")}
    for row, (scene, size) in enumerate(scenes):
        photo = draw_array(scene, size)
        photos[row] = photo if size == 64 else photo.reshape(64, 2, 64, 2, 3).mean(axis=(1, 3)).round()
        attributes = scene.attributes()
        for name, classes in HEADS.items():
            labels[name].append(classes.index(attributes[name]))
        labels["identity"].append(index_of[attributes["identity"]])
    return photos, {name: np.asarray(values) for name, values in labels.items()}


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random flips, blur, down-and-up sampling, brightness/contrast and noise, per photo."""
    n = images.shape[0]

    def pick(p: float) -> torch.Tensor:
        return torch.rand(n, generator=generator) < p

    images = torch.where(pick(0.5)[:, None, None, None], images.flip(3), images)
    blurred = _blur(images, sigma=float(torch.empty(1).uniform_(0.5, 1.3, generator=generator)))
    images = torch.where(pick(0.35)[:, None, None, None], blurred, images)
    coarse = nn.functional.interpolate(
        nn.functional.avg_pool2d(images, 2), scale_factor=2, mode="bilinear", align_corners=False
    )
    images = torch.where(pick(0.2)[:, None, None, None], coarse, images)
    gain = 1 + 0.12 * (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1)
    offset = 0.06 * (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1)
    noise = (
        torch.randn(images.shape, generator=generator) * 0.05 * torch.rand(n, 1, 1, 1, generator=generator)
    )
    return (images * gain + offset + noise).clamp(-1, 1)


def _blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    taps = torch.arange(-2, 3, dtype=torch.float32)
    kernel = torch.exp(-(taps**2) / (2 * sigma * sigma))
    kernel = (kernel / kernel.sum()).to(images.dtype)
    channels = images.shape[1]
    padded = nn.functional.pad(images, (2, 2, 2, 2), mode="replicate")
    rows = nn.functional.conv2d(padded, kernel.view(1, 1, 1, 5).repeat(channels, 1, 1, 1), groups=channels)
    return nn.functional.conv2d(rows, kernel.view(1, 1, 5, 1).repeat(channels, 1, 1, 1), groups=channels)


def train(
    seed: int, images: int, epochs: int, batch_size: int = 128, lr: float = 3e-3, log=print
) -> tuple[EvalNet, dict[str, Any]]:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    photos, labels = draw_dataset(training_scenes(seed, images))
    drawn_s = time.perf_counter() - started
    log(f"drew {images} training photos in {drawn_s:.0f} s")
    names = [identity(*entry) for entry in all_identities()]
    net = EvalNet(widths=(16, 32, 64, 128), embed_dim=64, identities=names)
    steps = epochs * (images // batch_size)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    inputs = to_tensor(photos)
    targets = {name: torch.from_numpy(values) for name, values in labels.items()}
    net.train()
    step = 0
    for epoch in range(epochs):
        order = torch.randperm(images, generator=generator)
        for first in range(0, images - batch_size + 1, batch_size):
            rows = order[first : first + batch_size]
            out = net(augment(inputs[rows], generator))
            loss = sum(nn.functional.cross_entropy(out[name], targets[name][rows]) for name in HEADS)
            cosines = net.identity_cosines(out["embedding"])
            truth = targets["identity"][rows]
            margin = nn.functional.one_hot(truth, len(names)) * COSFACE_MARGIN
            loss = loss + nn.functional.cross_entropy(COSFACE_SCALE * (cosines - margin), truth)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
        log(f"epoch {epoch + 1}/{epochs}: step {step}, loss {loss.item():.3f}")
    net.eval()
    return net, {"draw_seconds": round(drawn_s, 1), "train_seconds": round(time.perf_counter() - started, 1)}


@torch.no_grad()
def evaluate(net: EvalNet, seed: int, images: int = 1200) -> dict[str, Any]:
    """Accuracy on fresh drawn photos (another seed's scenes), clean and blurred, and how well the
    embedding separates the held-out subjects' real photos from each other."""
    photos, labels = draw_dataset(training_scenes(seed + 10_000, images))
    report: dict[str, Any] = {"photos": images}
    for variant, inputs in (("clean", to_tensor(photos)), ("blurred", _blur(to_tensor(photos), 1.0))):
        out = net(inputs)
        accuracy = {
            name: round(float((out[name].argmax(1).numpy() == labels[name]).mean()), 4) for name in HEADS
        }
        nearest = net.identity_cosines(out["embedding"]).argmax(1).numpy()
        accuracy["identity"] = round(float((nearest == labels["identity"]).mean()), 4)
        report[f"accuracy_{variant}"] = accuracy
    report["subjects"] = subject_separation(net)
    return report


@torch.no_grad()
def subject_separation(net: EvalNet) -> dict[str, float]:
    """Mean cosine of a subject's photos to its other photos vs. to the other subjects' photos."""
    embeddings = [embed(net, subject.photos(size=128)) for subject in HELD_OUT_SUBJECTS]
    same, other = [], []
    for i, mine in enumerate(embeddings):
        sims = mine @ mine.T
        count = len(mine)
        same.append(float((sims.sum() - sims.diagonal().sum()) / (count * (count - 1))))
        other += [float((mine @ theirs.T).mean()) for j, theirs in enumerate(embeddings) if j != i]
    return {
        "same_subject_mean": round(float(np.mean(same)), 4),
        "same_subject_min": round(float(np.min(same)), 4),
        "other_subject_mean": round(float(np.mean(other)), 4),
        "other_subject_max": round(float(np.max(other)), 4),
    }


def versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "toyworld": toyworld.WORLD_VERSION,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m toybench.train_evalnet", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for weights, config and manifest")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=8000, help="training photos drawn (default 8000)")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the weights depend on it)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    net, timing = train(args.seed, args.images, args.epochs)
    report = evaluate(net, args.seed)
    command = "python -m toybench.train_evalnet " + " ".join(
        f"--{key} {value}" for key, value in vars(args).items()
    )
    provenance = {
        "command": command,
        "seed": args.seed,
        "threads": args.threads,
        "versions": versions(),
        **timing,
        "evaluation": report,
    }
    save_evalnet(net, args.out, provenance)
    print(json.dumps({**timing, **report}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
