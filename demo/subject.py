"""The subject: a held-out subject of the toy world (a red ball with a white stripe), as a user
uploads it: a few photos of the same ball on different backgrounds."""

from __future__ import annotations

from pathlib import Path

from toyworld import Subject, subject

SUBJECT: Subject = subject("striped-ball")


def write_subject_photos(directory: Path, count: int) -> list[Path]:
    """The subject's first `count` photos (128x128 PNGs; at most the subject's photo count)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, photo in enumerate(SUBJECT.photos(count=min(count, SUBJECT.photo_count))):
        path = directory / f"{SUBJECT.object}-{index}.png"
        photo.save(path, format="PNG")
        paths.append(path)
    return paths
