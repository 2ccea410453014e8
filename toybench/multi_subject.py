"""Scoring a multi-subject model: each subject's fidelity under its own identifier, and bleed.

Bleed is the failure multi-subject DreamBooth is known for: prompting subject A's identifier
draws subject B (or a blend). It is read on A's recontextualised images, the same images its
subject fidelity is scored on:
- `cross_fidelity`: their mean cosine similarity to the other subjects' real photos (compare it
  with `real_cross_fidelity`, A's own photos against the others': what the subjects share anyway);
- `confusion`: the fraction of them nearer (mean similarity) to another subject's photos than to
  A's own — 0 when every image is A's, about (k-1)/k when the identifiers mean nothing apart;
- `pattern_bleed`: the fraction whose pattern heads (pattern and its colour) read another
  subject's look rather than A's (only over subjects whose look differs from A's).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from toybench.evalnet import EvalNet, embed, predict
from toybench.evaluation import Sample, prompts_for, score_model
from toyworld import Subject


def score_subjects(
    net: EvalNet,
    sample: Sample,
    subjects: Sequence[Subject],
    identifiers: Sequence[str],
    images_per_prompt: int,
    class_images: int,
) -> dict[str, dict[str, float]]:
    """Per subject: score_model's recontext and class scores under its identifier, and bleed."""
    cached = _memoised(sample)
    real = {subject.name: embed(net, subject.photos()) for subject in subjects}
    rows: dict[str, dict[str, float]] = {}
    for subject, identifier in zip(subjects, identifiers, strict=True):
        scores = score_model(
            net,
            cached,
            subject,
            real[subject.name],
            images_per_prompt,
            class_images,
            all_prompts=False,
            identifier=identifier,
        )
        recontext = prompts_for(subject, identifier=identifier).recontext.values()
        images = [image for prompt in recontext for image in cached(prompt, images_per_prompt)]
        others = [other for other in subjects if other.name != subject.name]
        rows[subject.name] = {**scores, **bleed(net, images, subject, others, real)}
    return rows


def bleed(
    net: EvalNet,
    images: Sequence[np.ndarray],
    subject: Subject,
    others: Sequence[Subject],
    real: dict[str, torch.Tensor],
) -> dict[str, float]:
    """How much of the other subjects is in `subject`'s images (see the module's docstring)."""
    embeddings = embed(net, images)
    own = (embeddings @ real[subject.name].T).mean(dim=1)  # per image
    cross = torch.stack([(embeddings @ real[other.name].T).mean(dim=1) for other in others])
    real_cross = torch.stack([(real[subject.name] @ real[other.name].T).mean() for other in others])
    scores = {
        "cross_fidelity": float(cross.mean()),
        "real_cross_fidelity": float(real_cross.mean()),
        "confusion": float((cross.max(dim=0).values > own).float().mean()),
    }
    own_look = (subject.pattern, subject.pattern_colour)
    looks = {(other.pattern, other.pattern_colour) for other in others} - {own_look}
    if looks:
        read = [(row["pattern"], row["pattern_colour"]) for row in predict(net, images)]
        scores["pattern_bleed"] = float(np.mean([look in looks for look in read]))
    return scores


def _memoised(sample: Sample) -> Sample:
    """The same images for the same (prompt, count): scoring and bleed read one set."""
    memory: dict[tuple[str, int], Sequence[np.ndarray]] = {}

    def cached(prompt: str, count: int) -> Sequence[np.ndarray]:
        if (prompt, count) not in memory:
            memory[prompt, count] = sample(prompt, count)
        return memory[prompt, count]

    return cached
