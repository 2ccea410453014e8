"""The base-model attribute probe: distinct captions that name all three attributes, and one
accuracy per attribute for a guidance scale (a tiny run on the committed base)."""

from __future__ import annotations

import json

import pytest

from toybench.base_attributes import ATTRIBUTES, captions, main
from toyworld.vocabulary import parse_prompt


def test_captions_are_distinct_and_name_every_attribute() -> None:
    drawn = captions(12)
    assert len(set(drawn)) == 12 and drawn == captions(12)
    assert all(set(ATTRIBUTES) <= set(parse_prompt(text)) for text in drawn)


def test_a_tiny_run_prints_one_accuracy_per_attribute(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--guidance", "7.5", "--steps", "2", "--prompts", "2", "--images", "1"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    accuracy = result["accuracy"]["7.5"]
    assert set(accuracy) == set(ATTRIBUTES)
    assert all(value in (0.0, 0.5, 1.0) for value in accuracy.values())  # 2 images each
