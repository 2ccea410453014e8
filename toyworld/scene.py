"""What one photo shows: a Scene is the ground truth of a drawn image, its caption and attributes.

Scenes are sampled from a seed with numpy's PCG64 (SeedSequence([seed, index])), so the n-th
scene of a seed is the same on every run and does not depend on how many were drawn before it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from toyworld.vocabulary import BACKGROUNDS, COLOURS, OBJECTS, PATTERN_COLOURS, PATTERNS, PLAIN, caption


@dataclasses.dataclass(frozen=True)
class Scene:
    """One object on one background, with its pattern (if any) and the jitter of the shot."""

    object: str
    colour: str
    background: str
    pattern: str = PLAIN
    pattern_colour: str | None = None
    x: float = 0.5  # object centre, as a fraction of the image width
    y: float = 0.56  # object centre, as a fraction of the image height
    scale: float = 1.0  # times the object's nominal size
    light: float = -30.0  # light direction in degrees from straight above (negative: from the left)
    brightness: float = 1.0
    horizon: float = 0.45  # as a fraction of the image height
    tint: tuple[int, int, int] = (0, 0, 0)  # the object's colour jitter, added to its colour
    texture_seed: int = 0  # background texture, stars, sensor noise
    subject: str | None = None  # the held-out subject this is a photo of

    def __post_init__(self) -> None:
        checks = {
            "object": (self.object, OBJECTS),
            "colour": (self.colour, COLOURS),
            "background": (self.background, BACKGROUNDS),
            "pattern": (self.pattern, PATTERNS),
        }
        for field, (value, allowed) in checks.items():
            if value not in allowed:
                raise ValueError(f"unknown {field} {value!r}; one of {', '.join(allowed)}")
        if (self.pattern == PLAIN) != (self.pattern_colour is None):
            raise ValueError("a pattern needs a pattern_colour, and plain objects have none")
        if self.pattern_colour is not None and self.pattern_colour not in PATTERN_COLOURS:
            raise ValueError(f"unknown pattern_colour {self.pattern_colour!r}")

    def caption(self, identifier: str | None = None) -> str:
        """The full caption: colour, pattern and background named ("sks" replaces colour/pattern)."""
        return caption(
            self.object, self.colour, self.background, self.pattern, self.pattern_colour, identifier
        )

    def attributes(self) -> dict[str, str]:
        """The ground truth the evaluation nets are trained on and scored against."""
        return {
            "object": self.object,
            "colour": self.colour,
            "background": self.background,
            "pattern": self.pattern,
            "pattern_colour": self.pattern_colour or "none",
            "identity": identity(self.object, self.colour, self.pattern, self.pattern_colour),
        }


def identity(obj: str, colour: str, pattern: str = PLAIN, pattern_colour: str | None = None) -> str:
    """The name of an instance, regardless of where it is photographed: "red-ball-white-stripe"."""
    name = f"{colour}-{obj}"
    return name if pattern == PLAIN else f"{name}-{pattern_colour}-{pattern}"


def all_identities() -> list[tuple[str, str, str, str | None]]:
    """Every (object, colour, pattern, pattern_colour) the world can draw, in a fixed order.

    A pattern in the object's own colour would be invisible, so it is left out.
    """
    found: list[tuple[str, str, str, str | None]] = []
    for obj in OBJECTS:
        for colour in COLOURS:
            found.append((obj, colour, PLAIN, None))
            for pattern in PATTERNS[1:]:
                found += [(obj, colour, pattern, pc) for pc in PATTERN_COLOURS if pc != colour]
    return found


def rng_for(seed: int, index: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, index])))


def jittered_scene(
    rng: np.random.Generator,
    obj: str,
    colour: str,
    background: str,
    pattern: str = PLAIN,
    pattern_colour: str | None = None,
    subject: str | None = None,
) -> Scene:
    """The given object on the given background, shot with random position, size and light."""
    return Scene(
        object=obj,
        colour=colour,
        background=background,
        pattern=pattern,
        pattern_colour=pattern_colour,
        x=round(float(rng.uniform(0.36, 0.64)), 4),
        y=round(float(rng.uniform(0.5, 0.6)), 4),
        scale=round(float(rng.uniform(0.88, 1.12)), 4),
        light=round(float(rng.uniform(-60.0, 60.0)), 2),
        brightness=round(float(rng.uniform(0.9, 1.1)), 4),
        horizon=round(float(rng.uniform(0.36, 0.5)), 4),
        tint=tuple(int(v) for v in rng.integers(-14, 15, size=3)),  # type: ignore[arg-type]
        texture_seed=int(rng.integers(0, 2**31)),
        subject=subject,
    )


def random_scene(
    rng: np.random.Generator,
    objects: Sequence[str] = OBJECTS,
    colours: Sequence[str] = tuple(COLOURS),
    backgrounds: Sequence[str] = BACKGROUNDS,
) -> Scene:
    """A plain object of a random class and colour on a random background: the pretraining world."""
    obj = objects[int(rng.integers(len(objects)))]
    colour = colours[int(rng.integers(len(colours)))]
    background = backgrounds[int(rng.integers(len(backgrounds)))]
    return jittered_scene(rng, obj, colour, background)


def pretraining_scenes(seed: int, count: int, start: int = 0) -> list[Scene]:
    """Scenes start..start+count-1 of the pretraining distribution (no patterns, ever).

    Classes, colours and backgrounds are balanced: scene i shows combination i mod 180 of the
    6 x 6 x 5 grid, in a seed-shuffled order, with its own jitter.
    """
    grid = [(o, c, b) for o in OBJECTS for c in COLOURS for b in BACKGROUNDS]
    order = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 2**31]))).permutation(len(grid))
    scenes = []
    for index in range(start, start + count):
        obj, colour, background = grid[int(order[index % len(grid)])]
        scenes.append(jittered_scene(rng_for(seed, index), obj, colour, background))
    return scenes


def light_vector(degrees: float) -> tuple[float, float]:
    """(x, y) unit vector towards the light in image coordinates (y down)."""
    radians = math.radians(degrees)
    return math.sin(radians), -math.cos(radians)
