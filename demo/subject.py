"""The subject: deterministic photos of one red ball (a white stripe) on varying backgrounds."""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

BACKGROUNDS = [  # (top colour, bottom colour): sky, grass, sand, wall, dusk, night
    ((135, 190, 235), (70, 150, 60)),
    ((190, 225, 160), (60, 120, 40)),
    ((240, 220, 170), (200, 170, 110)),
    ((200, 200, 205), (150, 150, 160)),
    ((250, 170, 110), (90, 60, 110)),
    ((20, 30, 70), (60, 70, 110)),
]


def subject_photo(index: int, size_px: int = 128) -> Image.Image:
    """A red ball with a highlight and a shadow; background, position and size vary by index."""
    rng = random.Random(index)
    top, bottom = BACKGROUNDS[index % len(BACKGROUNDS)]
    image = Image.new("RGB", (size_px, size_px))
    draw = ImageDraw.Draw(image)
    for y in range(size_px):
        t = y / (size_px - 1)
        draw.line(
            [(0, y), (size_px, y)],
            fill=tuple(round(a + (b - a) * t) for a, b in zip(top, bottom, strict=True)),
        )
    radius = size_px * rng.uniform(0.22, 0.3)
    cx = size_px * rng.uniform(0.38, 0.62)
    cy = size_px * rng.uniform(0.4, 0.6)
    shadow = (cx - radius, cy + radius * 0.8, cx + radius * 1.1, cy + radius * 1.15)
    draw.ellipse(shadow, fill=(40, 40, 40))
    draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=(210, 35, 40))
    band = radius * 0.18  # a white stripe makes it one particular ball, not any red disc
    draw.rectangle((cx - radius * 0.95, cy - band, cx + radius * 0.95, cy + band), fill=(245, 245, 240))
    glint = radius * 0.25
    draw.ellipse(
        (cx - radius * 0.55, cy - radius * 0.6, cx - radius * 0.55 + glint, cy - radius * 0.6 + glint),
        fill=(255, 200, 200),
    )
    return image


def write_subject_photos(directory: Path, count: int) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = directory / f"ball-{index}.png"
        subject_photo(index).save(path, format="PNG")
        paths.append(path)
    return paths
