"""The held-out subjects: particular instances whose pattern the pretraining world never shows.

Each is what a user would upload: 4-6 photos of the same thing in varied contexts (every photo
on another background, with its own position, size and light). The photos are fixed: the n-th
photo of a subject is the same everywhere (demo, benchmark, tests).
"""

from __future__ import annotations

import dataclasses

from PIL import Image

from toyworld.draw import draw
from toyworld.scene import Scene, identity, jittered_scene, rng_for
from toyworld.vocabulary import BACKGROUNDS, describe

SUBJECT_SEED = 9_000  # the photos' jitter stream; far from any pretraining seed's use


@dataclasses.dataclass(frozen=True)
class Subject:
    name: str
    object: str
    colour: str
    pattern: str
    pattern_colour: str
    photo_count: int

    @property
    def identity(self) -> str:
        return identity(self.object, self.colour, self.pattern, self.pattern_colour)

    @property
    def description(self) -> str:
        """ "a red ball with a white stripe" """
        return describe(self.object, self.colour, self.pattern, self.pattern_colour)

    def scenes(self, count: int | None = None, start: int = 0) -> list[Scene]:
        """Photo scenes start..start+count-1 (default: the subject's own photo_count from 0).

        Photo i is on background (offset + i) mod 5, so any 5 consecutive photos use all five.
        """
        count = self.photo_count if count is None else count
        offset = sum(map(ord, self.name)) % len(BACKGROUNDS)
        scenes = []
        for index in range(start, start + count):
            rng = rng_for(SUBJECT_SEED + sum(map(ord, self.name)), index)
            background = BACKGROUNDS[(offset + index) % len(BACKGROUNDS)]
            scenes.append(
                jittered_scene(
                    rng, self.object, self.colour, background, self.pattern, self.pattern_colour, self.name
                )
            )
        return scenes

    def photos(self, size: int = 128, count: int | None = None, start: int = 0) -> list[Image.Image]:
        """The uploaded photos (128x128 by default, as a user's photos are larger than 64)."""
        return [draw(scene, size) for scene in self.scenes(count, start)]


HELD_OUT_SUBJECTS: tuple[Subject, ...] = (
    Subject("striped-ball", "ball", "red", "stripe", "white", 5),
    Subject("dotted-cube", "cube", "blue", "dots", "yellow", 5),
    Subject("star-cup", "cup", "green", "star", "yellow", 4),
    Subject("dotted-star", "star", "purple", "dots", "white", 6),
    Subject("racing-car", "car", "orange", "stripe", "white", 5),
    Subject("blossom-tree", "tree", "green", "dots", "white", 4),
    Subject("spotted-ball", "ball", "yellow", "dots", "black", 6),
    Subject("star-car", "car", "blue", "star", "yellow", 5),
)
SUBJECTS_BY_NAME: dict[str, Subject] = {subject.name: subject for subject in HELD_OUT_SUBJECTS}


def subject(name: str) -> Subject:
    try:
        return SUBJECTS_BY_NAME[name]
    except KeyError:
        raise ValueError(f"no held-out subject {name!r}; one of {', '.join(SUBJECTS_BY_NAME)}") from None
