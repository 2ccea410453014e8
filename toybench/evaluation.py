"""ToyBench's prompts for a subject and the scores of one model on them (one cell of a table row).

Prompts, as DreamBench has them for objects:
- recontextualisation: "a photo of sks ball on the beach", one per background (5);
- property change: "a photo of a blue sks ball", one per other colour (5);
- the class prompt "a photo of a ball" (class preservation, language drift);
- the other classes, "a photo of a green car" (one per other object: do they keep their identity?).
Every prompt is sampled `images_per_prompt` times (image i from seed i, as the services do).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import torch

from toybench.dreambooth import IDENTIFIER, class_prompt, instance_prompt
from toybench.evalnet import EvalNet, embed
from toybench.metrics import attribute_accuracy, class_preservation, diversity, real_photo_fidelity
from toyworld import BACKGROUNDS, COLOURS, OBJECTS, Subject, draw_array, rng_for
from toyworld.scene import jittered_scene
from toyworld.vocabulary import article, caption

# Sample(prompt, count) -> images: a model under test.
Sample = Callable[[str, int], Sequence[np.ndarray]]


@dataclasses.dataclass(frozen=True)
class PromptSet:
    recontext: dict[str, str]  # background -> prompt
    property_change: dict[str, str]  # colour -> prompt
    class_prompt: str
    other_classes: dict[str, str]  # object -> prompt


def prompts_for(subject: Subject, property_count: int = 5, identifier: str = IDENTIFIER) -> PromptSet:
    other_colours = [colour for colour in COLOURS if colour != subject.colour][:property_count]
    others = [obj for obj in OBJECTS if obj != subject.object]
    return PromptSet(
        recontext={
            background: instance_prompt(subject, background, identifier) for background in BACKGROUNDS
        },
        property_change={
            colour: f"a photo of {article(colour)} {colour} {identifier} {subject.object}"
            for colour in other_colours
        },
        class_prompt=class_prompt(subject),
        # each other class in a colour of its own, cycling, so no colour is favoured
        other_classes={
            obj: caption(obj, list(COLOURS)[index % len(COLOURS)], None) for index, obj in enumerate(others)
        },
    )


def score_model(
    net: EvalNet,
    sample: Sample,
    subject: Subject,
    real_embeddings: torch.Tensor,
    images_per_prompt: int,
    class_images: int,
    *,
    all_prompts: bool = True,
    identifier: str = IDENTIFIER,
) -> dict[str, float]:
    """Subject and prompt fidelity, class preservation and other-class accuracy of one model.

    `all_prompts=False` leaves out the property changes and the other classes (a faster check);
    `identifier` is the token the model learned the subject as.
    """
    prompts = prompts_for(subject, identifier=identifier)
    recontext = {bg: sample(prompt, images_per_prompt) for bg, prompt in prompts.recontext.items()}
    recontext_images = [image for images in recontext.values() for image in images]
    background_accuracy = np.mean(
        [
            attribute_accuracy(net, images, {"background": bg})["background"]
            for bg, images in recontext.items()
        ]
    )
    object_accuracy = attribute_accuracy(net, recontext_images, {"object": subject.object})["object"]
    preserved = class_preservation(net, sample(prompts.class_prompt, class_images), subject.object)
    scores = {
        "subject_fidelity": float((embed(net, recontext_images) @ real_embeddings.T).mean()),
        "prompt_fidelity": float(background_accuracy),
        "recontext_object_accuracy": float(object_accuracy),
        "class_accuracy": preserved["class_accuracy"],
        "class_diversity": preserved["diversity"],
    }
    if all_prompts:
        scores["property_colour_accuracy"] = float(
            np.mean(
                [
                    attribute_accuracy(net, sample(prompt, images_per_prompt), {"colour": colour})["colour"]
                    for colour, prompt in prompts.property_change.items()
                ]
            )
        )
        scores["other_class_accuracy"] = float(
            np.mean(
                [
                    attribute_accuracy(net, sample(prompt, images_per_prompt), {"object": obj})["object"]
                    for obj, prompt in prompts.other_classes.items()
                ]
            )
        )
    return scores


def score_real_photos(
    net: EvalNet, subject: Subject, per_background: int, class_images: int
) -> dict[str, float]:
    """The upper bound: the world's own photos (the subject's, on every background; the class's)."""
    photos = np.stack([draw_array(scene, 64) for scene in subject.scenes()])
    fresh = subject.scenes(per_background * len(BACKGROUNDS), start=subject.photo_count)
    by_background = {bg: [draw_array(s, 64) for s in fresh if s.background == bg] for bg in BACKGROUNDS}
    background_accuracy = np.mean(
        [
            attribute_accuracy(net, images, {"background": bg})["background"]
            for bg, images in by_background.items()
        ]
    )
    rng = rng_for(4_242, sum(map(ord, subject.name)))
    class_photos = [
        draw_array(
            jittered_scene(
                rng,
                subject.object,
                list(COLOURS)[int(rng.integers(len(COLOURS)))],
                BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))],
            ),
            64,
        )
        for _ in range(class_images)
    ]
    return {
        "subject_fidelity": real_photo_fidelity(net, photos),
        "prompt_fidelity": float(background_accuracy),
        "class_accuracy": attribute_accuracy(net, class_photos, {"object": subject.object})["object"],
        "class_diversity": diversity(net, class_photos),
    }
