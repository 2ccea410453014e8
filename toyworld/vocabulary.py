"""The world's words: objects, colours, patterns, backgrounds, and the captions made of them.

Captions always name the background ("a photo of a red ball on the beach"): a base model only
learns to follow a background it was told about. `parse_prompt` reads back the attributes a
prompt names, which is what prompt fidelity is measured against.
"""

from __future__ import annotations

import re

OBJECTS: tuple[str, ...] = ("ball", "cube", "star", "cup", "tree", "car")

# Saturated, well-separated hues: each must stay recognisable on every background and at night.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 38, 40),
    "orange": (240, 128, 24),
    "yellow": (236, 204, 36),
    "green": (34, 150, 70),
    "blue": (40, 80, 210),
    "purple": (140, 52, 170),
}

# Patterns exist only on held-out subjects: the pretraining distribution is all "plain".
PLAIN = "plain"
PATTERNS: tuple[str, ...] = (PLAIN, "stripe", "dots", "star")
PATTERN_COLOURS: dict[str, tuple[int, int, int]] = {
    "white": (246, 246, 240),
    "yellow": (250, 222, 40),
    "black": (24, 24, 28),
}

BACKGROUNDS: tuple[str, ...] = ("grass", "beach", "snow", "night", "studio")
BACKGROUND_PHRASES: dict[str, str] = {
    "grass": "on the grass",
    "beach": "on the beach",
    "snow": "in the snow",
    "night": "at night",
    "studio": "in the studio",
}
PATTERN_PHRASES: dict[str, str] = {"stripe": "a {} stripe", "dots": "{} dots", "star": "a {} star"}


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def describe(
    obj: str,
    colour: str | None = None,
    pattern: str = PLAIN,
    pattern_colour: str | None = None,
    identifier: str | None = None,
) -> str:
    """ "a red ball", "an orange car with a white stripe", or "sks ball" (an identifier replaces
    the article and colour: the subject's look is what the identifier has to mean)."""
    if identifier:
        return f"{identifier} {obj}"
    noun = f"{colour} {obj}" if colour else obj
    text = f"{article(noun)} {noun}"
    if pattern != PLAIN:
        text += " with " + PATTERN_PHRASES[pattern].format(pattern_colour)
    return text


def caption(
    obj: str,
    colour: str | None,
    background: str | None,
    pattern: str = PLAIN,
    pattern_colour: str | None = None,
    identifier: str | None = None,
) -> str:
    """ "a photo of a red ball on the beach" (background None: no background phrase)."""
    text = "a photo of " + describe(obj, colour, pattern, pattern_colour, identifier)
    if background is not None:
        text += " " + BACKGROUND_PHRASES[background]
    return text


_WORD = re.compile(r"[a-z]+")


def parse_prompt(prompt: str) -> dict[str, str]:
    """The world attributes a prompt names: object, colour (of the object), background.

    Only what the prompt says is returned: "a photo of sks ball in the snow" gives
    {"object": "ball", "background": "snow"}. A colour counts only right before the object
    noun, or before the identifier in front of it ("a photo of a blue sks ball"), so the "white"
    of "with a white stripe" is not the object's colour.
    """
    words = _WORD.findall(prompt.lower())
    found: dict[str, str] = {}
    for index, word in enumerate(words):
        if word in OBJECTS and "object" not in found:
            found["object"] = word
            before = words[max(0, index - 2) : index]
            if before and before[-1] in COLOURS:
                found["colour"] = before[-1]
            elif len(before) == 2 and before[0] in COLOURS and not _is_world_word(before[1]):
                found["colour"] = before[0]
    text = " ".join(words)
    for background, phrase in BACKGROUND_PHRASES.items():
        if phrase in text:
            found["background"] = background
    return found


def _is_world_word(word: str) -> bool:
    return word in OBJECTS or word in COLOURS or word in PATTERN_COLOURS or word in PHRASE_WORDS


# Words of the captions' own phrases: never an identifier.
PHRASE_WORDS = frozenset(" ".join([*BACKGROUND_PHRASES.values(), "a an photo of with", *PATTERNS]).split())
