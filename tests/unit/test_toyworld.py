"""The toy world: deterministic bytes, captions that name the background, patterns only on the
held-out subjects, and patterns big enough to survive a VAE with 16x16 latents at 64x64."""

from __future__ import annotations

import dataclasses
import hashlib
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

import toyworld
from toyworld import (
    BACKGROUNDS,
    COLOURS,
    HELD_OUT_SUBJECTS,
    OBJECTS,
    PLAIN,
    Scene,
    all_identities,
    draw_array,
    parse_prompt,
    pretraining_scenes,
)
from toyworld.vocabulary import BACKGROUND_PHRASES

DIGEST_SCRIPT = (
    "import hashlib, toyworld as t; d = hashlib.sha256()\n"
    "for s in t.pretraining_scenes(7, 12): d.update(t.draw_array(s, 64).tobytes())\n"
    "for s in t.HELD_OUT_SUBJECTS[0].scenes(): d.update(t.draw_array(s, 128).tobytes())\n"
    "print(d.hexdigest())"
)


def test_same_seed_gives_the_same_bytes_in_another_process() -> None:
    here = hashlib.sha256()
    for scene in pretraining_scenes(7, 12):
        here.update(draw_array(scene, 64).tobytes())
    for scene in HELD_OUT_SUBJECTS[0].scenes():
        here.update(draw_array(scene, 128).tobytes())
    there = subprocess.run(
        [sys.executable, "-c", DIGEST_SCRIPT], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert there == here.hexdigest()
    assert toyworld.world_fingerprint() == toyworld.world_fingerprint()


def test_scene_n_does_not_depend_on_how_many_were_drawn() -> None:
    assert pretraining_scenes(3, 10)[7] == pretraining_scenes(3, 5, start=5)[2]
    assert pretraining_scenes(3, 10) != pretraining_scenes(4, 10)
    first, again = draw_array(pretraining_scenes(3, 1)[0]), draw_array(pretraining_scenes(3, 1)[0])
    assert np.array_equal(first, again)


def test_pretraining_world_is_balanced_and_never_patterned() -> None:
    scenes = pretraining_scenes(0, 360)
    assert all(scene.pattern == PLAIN and scene.subject is None for scene in scenes)
    combos = Counter((s.object, s.colour, s.background) for s in scenes)
    assert len(combos) == len(OBJECTS) * len(COLOURS) * len(BACKGROUNDS)
    assert set(combos.values()) == {2}
    assert len({s.texture_seed for s in scenes}) == len(scenes)  # every shot its own jitter


@pytest.mark.parametrize("size", [64, 128])
def test_photos_have_the_asked_size(size: int) -> None:
    image = toyworld.draw(pretraining_scenes(0, 1)[0], size)
    assert image.size == (size, size) and image.mode == "RGB"


def test_bad_scenes_and_sizes_are_refused() -> None:
    scene = pretraining_scenes(0, 1)[0]
    with pytest.raises(ValueError, match="size"):
        draw_array(scene, 96)
    with pytest.raises(ValueError, match="object"):
        dataclasses.replace(scene, object="dog")
    with pytest.raises(ValueError, match="pattern_colour"):
        dataclasses.replace(scene, pattern="stripe")


def test_captions_always_name_the_background_and_parse_back() -> None:
    for scene in pretraining_scenes(1, 180):
        text = scene.caption()
        assert BACKGROUND_PHRASES[scene.background] in text
        assert parse_prompt(text) == {
            "object": scene.object,
            "colour": scene.colour,
            "background": scene.background,
        }
    assert pretraining_scenes(1, 200)[0].caption().startswith("a photo of ")
    assert "an orange car" in toyworld.caption("car", "orange", "snow")


def test_parse_prompt_reads_only_what_a_prompt_names() -> None:
    assert parse_prompt("a photo of sks ball in the snow") == {"object": "ball", "background": "snow"}
    assert parse_prompt("a photo of a ball") == {"object": "ball"}
    striped = HELD_OUT_SUBJECTS[0].scenes(1)[0].caption()
    assert "with a white stripe" in striped
    assert parse_prompt(striped)["colour"] == "red"  # the stripe's white is not the ball's colour
    assert parse_prompt(HELD_OUT_SUBJECTS[0].scenes(1)[0].caption("sks")).keys() == {"object", "background"}
    # a property change names a colour before the identifier; a world word in between is no identifier
    assert parse_prompt("a photo of a blue sks ball")["colour"] == "blue"
    assert "colour" not in parse_prompt("a photo of a blue on ball")
    assert "colour" not in parse_prompt("a ball with white dots and a cube")


def test_held_out_subjects_are_patterned_instances_in_varied_contexts() -> None:
    names = set()
    for subject in HELD_OUT_SUBJECTS:
        scenes = subject.scenes()
        assert 4 <= len(scenes) <= 6
        assert subject.pattern != PLAIN and subject.pattern_colour != subject.colour
        assert len({s.background for s in scenes}) == min(len(scenes), len(BACKGROUNDS))  # varied
        assert {s.attributes()["identity"] for s in scenes} == {subject.identity}
        assert subject.photos(size=128, count=1)[0].size == (128, 128)
        names.add(subject.identity)
    assert len(names) == len(HELD_OUT_SUBJECTS)
    assert {s.object for s in HELD_OUT_SUBJECTS} == set(OBJECTS)  # every class has one
    assert toyworld.subject("striped-ball").description == "a red ball with a white stripe"
    with pytest.raises(ValueError, match="striped-ball"):
        toyworld.subject("nobody")


@pytest.mark.parametrize("subject", HELD_OUT_SUBJECTS, ids=lambda s: s.name)
def test_patterns_are_big_enough_to_survive_a_16x16_latent_vae(subject: toyworld.Subject) -> None:
    """At 64x64 a latent cell is 4x4 pixels: a pattern feature must span more than one cell."""
    for scene in subject.scenes():
        patterned = draw_array(scene, 64).astype(int)
        plain = draw_array(dataclasses.replace(scene, pattern=PLAIN, pattern_colour=None), 64).astype(int)
        ink = np.abs(patterned - plain).max(axis=2) > 48
        assert ink.sum() >= 40, (scene, ink.sum())
        tallest_run = max(_longest_run(column) for column in ink.T)
        assert tallest_run >= 5, (scene, tallest_run)


def _longest_run(values: np.ndarray) -> int:
    best = run = 0
    for value in values:
        run = run + 1 if value else 0
        best = max(best, run)
    return best


def test_identities_cover_the_world_once() -> None:
    identities = all_identities()
    assert len(identities) == len(set(identities))
    names = {toyworld.identity(*entry) for entry in identities}
    assert len(names) == len(identities)
    assert {s.identity for s in HELD_OUT_SUBJECTS} <= names
    assert Scene("ball", "red", "beach").attributes()["identity"] == "red-ball"
