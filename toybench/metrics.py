"""ToyBench's metrics, in the form of the DreamBooth paper's (DreamBench) table.

- subject fidelity (the paper's DINO / CLIP-I): mean cosine similarity between the embeddings of
  generated images and of the subject's real photos, over all pairs;
- prompt fidelity (the paper's CLIP-T): how often the attribute heads read, in a generated
  image, what its prompt named (object, colour, background; `toyworld.parse_prompt`);
- class preservation (language drift): on "a photo of a {class}" after fine-tuning, how often
  the image still shows that class, and how varied the images are (mean pairwise embedding
  distance, 1 - cosine; a model that draws the subject for every class prompt scores low).

Every function takes photos as PIL images or uint8 arrays of any square size (see evalnet.to_tensor).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from toybench.evalnet import EvalNet, embed, predict
from toyworld import parse_prompt

Photos = Sequence[Image.Image | np.ndarray] | np.ndarray
PROMPT_ATTRIBUTES = ("object", "colour", "background")


def subject_fidelity(net: EvalNet, generated: Photos, real: Photos | torch.Tensor) -> float:
    """Mean cosine similarity of every generated image to every real photo of the subject.

    `real` may be the photos' embeddings (`embed(net, photos)`), to embed them once per subject.
    """
    real_embeddings = real if isinstance(real, torch.Tensor) else embed(net, real)
    return float((embed(net, generated) @ real_embeddings.T).mean())


def real_photo_fidelity(net: EvalNet, real: Photos) -> float:
    """The upper bound: mean cosine similarity between distinct real photos of the subject."""
    embeddings = embed(net, real)
    count = len(embeddings)
    if count < 2:
        raise ValueError("need at least two real photos")
    sims = embeddings @ embeddings.T
    return float((sims.sum() - sims.diagonal().sum()) / (count * (count - 1)))


def attribute_accuracy(net: EvalNet, images: Photos, expected: Mapping[str, str]) -> dict[str, float]:
    """Per named attribute, the fraction of images whose head reads the expected class."""
    predictions = predict(net, images)
    return {
        name: float(np.mean([row[name] == value for row in predictions])) for name, value in expected.items()
    }


def prompt_fidelity(net: EvalNet, images: Photos, prompt: str) -> dict[str, float]:
    """Accuracy of each attribute the prompt names, and `mean` over them.

    "a photo of sks ball on the beach" is scored on object and background; the identifier's
    look is subject fidelity's business.
    """
    expected = {k: v for k, v in parse_prompt(prompt).items() if k in PROMPT_ATTRIBUTES}
    if not expected:
        raise ValueError(f"the prompt {prompt!r} names no attribute of the toy world")
    accuracy = attribute_accuracy(net, images, expected)
    return {**accuracy, "mean": float(np.mean(list(accuracy.values())))}


def diversity(net: EvalNet, images: Photos) -> float:
    """Mean pairwise embedding distance (1 - cosine) over distinct pairs: 0 for identical images."""
    embeddings = embed(net, images)
    count = len(embeddings)
    if count < 2:
        raise ValueError("need at least two images")
    sims = embeddings @ embeddings.T
    mean_cosine = (sims.sum() - sims.diagonal().sum()) / (count * (count - 1))
    return float(1.0 - mean_cosine)


def class_preservation(net: EvalNet, images: Photos, class_name: str) -> dict[str, float]:
    """On a class prompt's images: class accuracy and diversity."""
    return {
        "class_accuracy": attribute_accuracy(net, images, {"object": class_name})["object"],
        "diversity": diversity(net, images),
    }
