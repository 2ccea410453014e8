"""ToyBench's committed evaluation net and metrics, on real (drawn) photos: the net reads the
world's attributes, a subject's photos separate clearly from other subjects', and the loader
refuses changed files and nets of another world."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import toyworld
from toybench.evalnet import (
    DEFAULT_DIR,
    HEADS,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    WrongWorld,
    embed,
    load_evalnet,
    predict,
)
from toybench.metrics import (
    class_preservation,
    diversity,
    prompt_fidelity,
    real_photo_fidelity,
    subject_fidelity,
)
from toybench.multi_subject import bleed
from toybench.train_evalnet import draw_dataset, training_scenes
from toyworld import HELD_OUT_SUBJECTS, pretraining_scenes


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The net is tiny: a second thread only adds waiting on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def net():
    return load_evalnet()


def test_the_committed_net_is_small_and_of_this_world() -> None:
    manifest = json.loads((DEFAULT_DIR / MANIFEST_FILE).read_text())
    assert manifest["world_fingerprint"] == toyworld.world_fingerprint(), (
        "the world draws differently from when the evaluation net was trained: bump "
        "toyworld.WORLD_VERSION and retrain it (its manifest has the command)"
    )
    assert manifest["command"].startswith("python -m toybench.train_evalnet --out toybench/weights --seed 0")
    assert (DEFAULT_DIR / WEIGHTS_FILE).stat().st_size < 2_000_000


def test_the_net_reads_every_attribute_of_fresh_drawn_photos(net) -> None:
    photos, labels = draw_dataset(training_scenes(seed=4242, count=240))  # never trained on
    predictions = predict(net, photos)
    for name, classes in HEADS.items():
        truth = [classes[index] for index in labels[name]]
        accuracy = np.mean([row[name] == expected for row, expected in zip(predictions, truth, strict=True)])
        assert accuracy >= 0.97, (name, accuracy)


def test_a_subjects_photos_separate_clearly_from_other_subjects(net) -> None:
    real = {s.name: s.photos(size=128) for s in HELD_OUT_SUBJECTS}
    for subject in HELD_OUT_SUBJECTS:
        elsewhere = subject.photos(size=64, count=3, start=20)  # the same thing, new shots
        same = subject_fidelity(net, elsewhere, real[subject.name])
        others = [
            subject_fidelity(net, elsewhere, photos) for name, photos in real.items() if name != subject.name
        ]
        assert same >= 0.7 and real_photo_fidelity(net, real[subject.name]) >= 0.7, subject.name
        assert same - max(others) >= 0.25, (subject.name, same, max(others))
        # The class without the pattern (what a base model draws) is not the subject.
        plain = [
            toyworld.draw(dataclasses.replace(scene, pattern="plain", pattern_colour=None), 64)
            for scene in subject.scenes(3, start=20)
        ]
        assert subject_fidelity(net, plain, real[subject.name]) <= same - 0.25, subject.name


def test_prompt_fidelity_scores_what_the_prompt_names(net) -> None:
    scenes = pretraining_scenes(77, 10)
    for scene in scenes:
        image = [toyworld.draw(scene, 64)]
        assert prompt_fidelity(net, image, scene.caption()) == {
            "object": 1.0,
            "colour": 1.0,
            "background": 1.0,
            "mean": 1.0,
        }
        elsewhere = next(b for b in toyworld.BACKGROUNDS if b != scene.background)
        wrong = prompt_fidelity(net, image, toyworld.caption(scene.object, None, elsewhere))
        assert wrong == {"object": 1.0, "background": 0.0, "mean": 0.5}
    striped = HELD_OUT_SUBJECTS[0]
    composed = prompt_fidelity(net, striped.photos(64), "a photo of sks ball in the snow")
    assert set(composed) == {"object", "background", "mean"} and composed["object"] == 1.0
    with pytest.raises(ValueError, match="names no attribute"):
        prompt_fidelity(net, striped.photos(64), "a photo of sks")


def test_class_preservation_sees_accuracy_and_collapse(net) -> None:
    balls = [toyworld.draw(s, 64) for s in pretraining_scenes(5, 180) if s.object == "ball"][:8]
    varied = class_preservation(net, balls, "ball")
    assert varied["class_accuracy"] == 1.0 and varied["diversity"] >= 0.5
    collapsed = class_preservation(net, HELD_OUT_SUBJECTS[0].photos(64), "ball")  # every ball the subject
    assert collapsed["class_accuracy"] == 1.0 and collapsed["diversity"] <= varied["diversity"] - 0.3
    assert class_preservation(net, balls, "car")["class_accuracy"] == 0.0
    assert diversity(net, [balls[0]] * 4) == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError):
        diversity(net, balls[:1])


def test_the_loader_refuses_changed_files_and_other_worlds(tmp_path: Path) -> None:
    changed = shutil.copytree(DEFAULT_DIR, tmp_path / "changed")
    weights = bytearray((changed / WEIGHTS_FILE).read_bytes())
    weights[-1] ^= 1
    (changed / WEIGHTS_FILE).write_bytes(bytes(weights))
    with pytest.raises(ValueError, match="digest"):
        load_evalnet(changed)
    other = shutil.copytree(DEFAULT_DIR, tmp_path / "other")
    manifest = json.loads((other / MANIFEST_FILE).read_text())
    (other / MANIFEST_FILE).write_text(json.dumps({**manifest, "world_version": "0"}))
    with pytest.raises(WrongWorld, match="version"):
        load_evalnet(other)
    with pytest.raises(FileNotFoundError):
        load_evalnet(tmp_path)


def test_bleed_reads_which_subject_an_image_shows(net) -> None:
    """New photos of A score no bleed against B; B's photos offered as A's score all bleed."""
    a, b = toyworld.subject("striped-ball"), toyworld.subject("spotted-ball")  # one class, two looks
    real = {s.name: embed(net, s.photos()) for s in (a, b)}
    fresh = [np.asarray(photo) for photo in a.photos(size=64, count=5, start=20)]
    clean = bleed(net, fresh, a, [b], real)
    assert clean["confusion"] == 0.0 and clean["pattern_bleed"] == 0.0
    assert clean["cross_fidelity"] < 0.5 and clean["real_cross_fidelity"] < 0.5
    swapped = bleed(net, [np.asarray(photo) for photo in b.photos(size=64, count=5, start=20)], a, [b], real)
    assert swapped["confusion"] == 1.0 and swapped["pattern_bleed"] == 1.0
    assert swapped["cross_fidelity"] > 0.7
    # A subject whose look is the same as A's gives no pattern reading to compare.
    assert "pattern_bleed" not in bleed(
        net, fresh, a, [toyworld.subject("racing-car")], {**real, "racing-car": real[a.name]}
    )
