"""The CLIP tokenizer derived from open_clip's BPE file gives the real CLIP ids."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import CLIPTokenizer

from services.common import clip_vocab
from services.common.errors import FailedPrecondition


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> CLIPTokenizer:
    folder = clip_vocab.write_clip_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    return CLIPTokenizer.from_pretrained(str(folder))


def test_vocab_has_clip_size_and_special_ids() -> None:
    vocab, merges = clip_vocab.derive_vocab()
    assert len(vocab) == 49408
    assert len(merges) == 49152 - 256 - 2
    assert vocab["<|startoftext|>"] == 49406
    assert vocab["<|endoftext|>"] == 49407
    # The 256 byte characters come first, then the same with the end-of-word marker.
    assert vocab["!"] == 0
    assert vocab["!</w>"] == 256


def test_a_photo_of_sks_dog_has_clip_ids(tokenizer: CLIPTokenizer) -> None:
    vocab, _ = clip_vocab.derive_vocab()
    words = ["a", "photo", "of", "sks", "dog"]
    from_vocab = [vocab["<|startoftext|>"], *(vocab[f"{w}</w>"] for w in words), vocab["<|endoftext|>"]]
    assert from_vocab == [49406, 320, 1125, 539, 48136, 1929, 49407]
    assert tokenizer("a photo of sks dog").input_ids == from_vocab


def test_tokenizer_lowercases_pads_and_truncates_to_77(tokenizer: CLIPTokenizer) -> None:
    assert len(tokenizer) == 49408
    assert tokenizer.model_max_length == 77
    assert tokenizer("A  Photo of SKS dog").input_ids == tokenizer("a photo of sks dog").input_ids
    padded = tokenizer("a photo", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(padded) == 77 and padded[:3] == [49406, 320, 1125] and set(padded[3:]) == {49407}
    long = tokenizer("dog " * 200, truncation=True, max_length=tokenizer.model_max_length).input_ids
    assert len(long) == 77 and long[0] == 49406 and long[-1] == 49407


def test_written_files_are_deterministic(tmp_path: Path) -> None:
    first = clip_vocab.write_clip_tokenizer(tmp_path / "a")
    second = clip_vocab.write_clip_tokenizer(tmp_path / "b")
    names = sorted(p.name for p in first.iterdir())
    assert names == ["merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes()
    assert (first / "merges.txt").read_text(encoding="utf-8").startswith("#version: 0.2\n")


def test_missing_bpe_file_says_run_make_setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(clip_vocab.BPE_ENV, str(tmp_path / "absent.txt.gz"))
    with pytest.raises(FailedPrecondition, match="make setup"):
        clip_vocab.derive_vocab()
