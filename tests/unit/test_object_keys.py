"""Object keys: what validate_key / validate_prefix accept, and that nothing accepted can escape."""

from __future__ import annotations

import posixpath

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.common.errors import InvalidArgument
from services.common.object_store import validate_key, validate_prefix

SEGMENT_ALPHABET = "abcXYZ019._=+@-"
segments = st.text(alphabet=SEGMENT_ALPHABET, min_size=1, max_size=12).filter(lambda s: s not in (".", ".."))
valid_keys = st.lists(segments, min_size=1, max_size=6).map("/".join)


@pytest.mark.parametrize(
    "key",
    [
        "a",
        "models/tiny-sd/manifest.json",
        "blobs/sha256/" + "0" * 64,
        "jobs/job-1/checkpoints/step-100/unet/diffusion_pytorch_model.safetensors",
        "priors/key=value/img@2x+1.png",
        ".gitattributes",
        "a/..b/c..",
        "...",
    ],
)
def test_valid_keys_are_returned_unchanged(key: str) -> None:
    assert validate_key(key) == key


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("", "empty"),
        ("/abs", "relative"),
        ("/", "relative"),
        ("a//b", "empty path segment"),
        ("a/", "empty path segment"),
        ("..", "'..'"),
        ("a/../b", "'..'"),
        ("a/..", "'..'"),
        ("./a", "'.'"),
        ("a/./b", "'.'"),
        ("a\\b", "characters"),
        ("..\\..\\etc", "characters"),
        ("a b", "characters"),
        ("a\x00b", "characters"),
        ("é", "characters"),
        ("a?b", "characters"),
        ("a#b", "characters"),
        ("a~b", "characters"),
    ],
)
def test_invalid_keys_are_refused_with_a_reason(key: str, reason: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_key(key, "name")
    assert caught.value.field == "name"
    assert reason in caught.value.message


@pytest.mark.parametrize("prefix", ["", "models/", "models", "models/tiny", "a/b/"])
def test_valid_prefixes(prefix: str) -> None:
    assert validate_prefix(prefix) == prefix


@pytest.mark.parametrize("prefix", ["/", "/models", "a//", "../", "a/../", "a//b/", "a b"])
def test_invalid_prefixes(prefix: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_prefix(prefix)
    assert caught.value.field == "prefix"


@given(valid_keys)
def test_generated_valid_keys_are_accepted(key: str) -> None:
    assert validate_key(key) == key
    assert validate_prefix(key) == key
    assert validate_prefix(key + "/") == key + "/"


@given(st.text(max_size=40))
def test_any_accepted_key_stays_inside_the_store_root(key: str) -> None:
    try:
        validate_key(key)
    except InvalidArgument:
        return
    root = "/store/root"
    joined = posixpath.normpath(posixpath.join(root, key))
    assert joined.startswith(root + "/")
    assert posixpath.relpath(joined, root) == key  # no segment was collapsed or reinterpreted
    assert "\\" not in key and "\x00" not in key


@given(valid_keys, valid_keys)
def test_a_dotdot_segment_anywhere_is_refused(head: str, tail: str) -> None:
    for key in (f"../{tail}", f"{head}/../{tail}", f"{head}/.."):
        with pytest.raises(InvalidArgument):
            validate_key(key)


@given(valid_keys)
def test_absolute_or_empty_segment_variants_are_refused(key: str) -> None:
    for bad in (f"/{key}", f"{key}/", f"{key}//x", f"x//{key}"):
        with pytest.raises(InvalidArgument):
            validate_key(bad)
