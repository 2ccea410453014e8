"""A small world the project draws itself: objects, colours, backgrounds, captions, held-out subjects.

The toy-world base model is pretrained on it and ToyBench measures DreamBooth on it (DESIGN §6).
numpy and Pillow only. Everything is deterministic: same seed, same scenes, same bytes.
`WORLD_VERSION` changes whenever what the world draws or says changes; models trained on another
version are refused (see `world_fingerprint`, which a test pins to the committed models).
"""

from __future__ import annotations

import hashlib
import json

from toyworld.draw import SIZES, draw, draw_array
from toyworld.scene import Scene, all_identities, identity, pretraining_scenes, random_scene, rng_for
from toyworld.subjects import HELD_OUT_SUBJECTS, Subject, subject
from toyworld.vocabulary import (
    BACKGROUNDS,
    COLOURS,
    OBJECTS,
    PATTERN_COLOURS,
    PATTERNS,
    PLAIN,
    caption,
    parse_prompt,
)

WORLD_VERSION = "1"

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "HELD_OUT_SUBJECTS",
    "OBJECTS",
    "PATTERNS",
    "PATTERN_COLOURS",
    "PLAIN",
    "SIZES",
    "WORLD_VERSION",
    "Scene",
    "Subject",
    "all_identities",
    "caption",
    "draw",
    "draw_array",
    "identity",
    "parse_prompt",
    "pretraining_scenes",
    "random_scene",
    "rng_for",
    "subject",
    "world_fingerprint",
]


def world_fingerprint() -> str:
    """sha256 over the vocabulary, the subjects and the bytes of a few drawn photos.

    It changes when the drawer or the words change; compare it with a model's manifest to know
    the model was made from this world.
    """
    digest = hashlib.sha256()
    words = {
        "version": WORLD_VERSION,
        "objects": OBJECTS,
        "colours": COLOURS,
        "patterns": PATTERNS,
        "pattern_colours": PATTERN_COLOURS,
        "backgrounds": BACKGROUNDS,
        "subjects": [[s.name, s.object, s.colour, s.pattern, s.pattern_colour] for s in HELD_OUT_SUBJECTS],
    }
    digest.update(json.dumps(words, sort_keys=True).encode())
    for scene in pretraining_scenes(0, 6):
        digest.update(draw_array(scene, 64).tobytes())
        digest.update(scene.caption().encode())
    for held_out in HELD_OUT_SUBJECTS:
        digest.update(draw_array(held_out.scenes(1)[0], 64).tobytes())
    return digest.hexdigest()
