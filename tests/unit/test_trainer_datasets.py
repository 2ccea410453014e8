"""UploadImages' core: limits, safe decoding, normalisation and content addressing."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from services.common.errors import InvalidArgument, NotFound
from services.common.local_store import LocalObjectStore
from services.trainer.dataset_layout import parse_dataset_name
from services.trainer.jobs.datasets import DatasetStore, ImageUpload
from services.trainer.settings import UploadLimits
from tests.fixtures.trainer_server import encode, make_image, make_png


class CountingStore(LocalObjectStore):
    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.puts: list[str] = []

    def put_bytes(self, key: str, data: bytes) -> None:
        self.puts.append(key)
        super().put_bytes(key, data)


@pytest.fixture
def store(tmp_path: Path) -> CountingStore:
    return CountingStore(tmp_path / "store")


def _truncated() -> bytes:
    whole = encode(make_image(5, (128, 128)), "JPEG")
    return whole[: len(whole) // 2]


def upload(store: CountingStore, images: list[bytes], limits: UploadLimits | None = None, chunk: int = 1000):
    up = ImageUpload(limits or UploadLimits())
    for index, data in enumerate(images):
        up.start_image(f"img{index}.png", len(data))
        for start in range(0, len(data), chunk):
            up.add_chunk(data[start : start + chunk])
    return up.finish(DatasetStore(store))


def test_upload_stores_normalised_pngs_and_manifest_last(store: CountingStore) -> None:
    images = [make_png(0), encode(make_image(1), "JPEG", quality=95), encode(make_image(2).convert("RGBA"))]
    info = upload(store, images)
    assert info.image_count == 3
    prefix = f"datasets/{info.dataset_id}/"
    expected = [f"{prefix}images/{index:03d}.png" for index in range(3)]
    pins = [key for key in store.puts if key.startswith("pins/")]
    assert len(pins) == 1 and store.puts == [*pins, *expected, f"{prefix}manifest.json"]  # pinned first
    assert not list(store.list("pins/"))  # and unpinned once the manifest is written
    for key, image in zip(info.image_keys(), info.images, strict=True):
        decoded = Image.open(io.BytesIO(store.get_bytes(key)))
        assert (
            decoded.format == "PNG" and decoded.mode == "RGB" and decoded.size == (image.width, image.height)
        )
    assert DatasetStore(store).get(info.dataset_id) == info
    assert parse_dataset_name(info.name, "spec.dataset") == info.dataset_id


def test_same_images_twice_give_the_same_dataset_and_write_nothing_new(store: CountingStore) -> None:
    images = [make_png(0), make_png(1)]
    first = upload(store, images)
    writes = len(store.puts)
    second = upload(store, images, chunk=77)
    assert second == first
    assert len(store.puts) == writes


def test_identity_is_the_pixels_not_the_file(store: CountingStore) -> None:
    """Metadata and compression level do not change the dataset; order and pixels do."""
    plain = make_png(0)
    meta = PngImagePlugin.PngInfo()
    meta.add_text("Software", "camera 1.0")
    decorated = encode(make_image(0), "PNG", pnginfo=meta, compress_level=1)
    assert plain != decorated
    assert (
        upload(store, [plain, make_png(1)]).dataset_id == upload(store, [decorated, make_png(1)]).dataset_id
    )
    assert upload(store, [make_png(1), plain]).dataset_id != upload(store, [plain, make_png(1)]).dataset_id


def test_exif_orientation_is_applied(store: CountingStore) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to view
    sideways = encode(make_image(3, (128, 64)), "JPEG", exif=exif)
    info = upload(store, [sideways])
    assert (info.images[0].width, info.images[0].height) == (64, 128)


def test_decompression_bomb_is_refused_naming_the_image(store: CountingStore) -> None:
    bomb = encode(Image.new("L", (3000, 3000)))  # 9 Mpx of zeros: a few kB compressed
    assert len(bomb) < 100_000
    limits = UploadLimits(max_image_pixels=1_000_000)
    with pytest.raises(InvalidArgument) as info:
        upload(store, [make_png(0), bomb], limits)
    assert info.value.field == "images[1]"
    assert "pixels" in str(info.value)
    assert store.puts == []


@pytest.mark.parametrize(
    "junk",
    [b"not an image at all", _truncated(), b"GIF89a" + b"\x00" * 30],
    ids=["text", "truncated", "gif"],
)
def test_undecodable_image_is_refused_naming_it(store: CountingStore, junk: bytes) -> None:
    with pytest.raises(InvalidArgument) as info:
        upload(store, [make_png(0), make_png(1), junk])
    assert info.value.field == "images[2]"
    assert store.puts == []


def test_no_images(store: CountingStore) -> None:
    with pytest.raises(InvalidArgument) as info:
        ImageUpload(UploadLimits()).finish(DatasetStore(store))
    assert info.value.field == "images"


def test_too_many_images() -> None:
    up = ImageUpload(UploadLimits(max_images=2))
    for index in range(2):
        up.start_image("", 0)
        up.add_chunk(make_png(index))
    with pytest.raises(InvalidArgument) as info:
        up.start_image("", 0)
    assert info.value.field == "images" and "at most 2" in str(info.value)


def test_oversized_image_stops_as_its_bytes_arrive() -> None:
    up = ImageUpload(UploadLimits(max_image_bytes=1500))
    up.start_image("a.png", 0)
    up.add_chunk(b"x" * 1000)
    with pytest.raises(InvalidArgument) as info:
        up.add_chunk(b"x" * 1000)
    assert info.value.field == "images[0]"


def test_oversized_declared_size_is_refused_at_the_header() -> None:
    up = ImageUpload(UploadLimits(max_image_bytes=1500))
    with pytest.raises(InvalidArgument) as info:
        up.start_image("a.png", 10_000)
    assert info.value.field == "images[0]"


def test_total_size_limit() -> None:
    limits = UploadLimits(max_image_bytes=1000, max_total_bytes=1500)
    up = ImageUpload(limits)
    up.start_image("", 0)
    up.add_chunk(b"x" * 1000)
    up.start_image("", 0)
    with pytest.raises(InvalidArgument) as info:
        up.add_chunk(b"x" * 600)
    assert info.value.field == "images"


def test_chunk_limits_and_order() -> None:
    up = ImageUpload(dataclasses.replace(UploadLimits(), max_chunk_bytes=10))
    with pytest.raises(InvalidArgument) as before:
        up.add_chunk(b"x")
    assert before.value.field == "image_header"
    up.start_image("", 0)
    with pytest.raises(InvalidArgument) as big:
        up.add_chunk(b"x" * 11)
    assert big.value.field == "chunk"


def test_declared_size_must_match_and_images_must_not_be_empty(store: CountingStore) -> None:
    up = ImageUpload(UploadLimits())
    up.start_image("a.png", 5)
    up.add_chunk(b"abc")
    with pytest.raises(InvalidArgument) as mismatch:
        up.finish(DatasetStore(store))
    assert mismatch.value.field == "images[0]" and "declared 5" in str(mismatch.value)
    empty = ImageUpload(UploadLimits())
    empty.start_image("a.png", 0)
    with pytest.raises(InvalidArgument) as nothing:
        empty.start_image("b.png", 0)
    assert nothing.value.field == "images[0]"


def test_unknown_dataset_is_not_found(store: CountingStore) -> None:
    with pytest.raises(NotFound):
        DatasetStore(store).get("0" * 64)


@pytest.mark.parametrize(
    "name", ["", "datasets/", "datasets/abc", "models/" + "0" * 64, "datasets/" + "G" * 64]
)
def test_bad_dataset_names(name: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_dataset_name(name, "spec.dataset")
    assert info.value.field == "spec.dataset"


@pytest.mark.parametrize(
    ("size", "words"),
    [
        ((1, 40_000), "at least 64"),
        ((64, 40_000), "aspect ratio"),
        ((1, 1), "at least 64"),
        ((63, 200), "at least 64"),
        ((300, 64), "aspect"),
    ],
)
def test_tiny_and_extreme_aspect_images_are_refused_before_decoding(
    store: CountingStore, size: tuple[int, int], words: str
) -> None:
    """A 243-byte 1x40000 PNG would become a 64 x 2.56M-pixel training image; a 1x1 one teaches
    nothing. Both are refused from the header, naming the image, and nothing is stored."""
    strip = encode(Image.new("RGB", size, (200, 10, 10)))
    with pytest.raises(InvalidArgument) as info:
        upload(store, [make_png(0), strip])
    assert info.value.field == "images[1]" and words in str(info.value)
    assert store.puts == []


def test_the_decoded_pixels_of_one_upload_are_bounded(store: CountingStore) -> None:
    limits = UploadLimits(max_stream_pixels=3 * 64 * 64)
    upload(store, [make_png(i) for i in range(3)], limits)  # exactly at the budget
    with pytest.raises(InvalidArgument) as info:
        upload(store, [make_png(i) for i in range(4)], limits)
    assert info.value.field == "images" and "pixels" in str(info.value)


def test_16_bit_grayscale_is_scaled_not_clipped(store: CountingStore) -> None:
    """Pillow's own convert clips 16-bit values to 255: a ramp became 99.6 % white."""
    ramp = (np.arange(256 * 64).reshape(64, 256) % 256 * 257).astype(np.uint16)  # 0..65535
    info = upload(store, [encode(Image.fromarray(ramp))])
    stored = np.asarray(Image.open(io.BytesIO(store.get_bytes(info.image_keys()[0]))))
    assert stored.shape == (64, 256, 3)
    assert list(stored[0, :4, 0]) == [0, 1, 2, 3] and stored[0, 255, 0] == 255
    assert (stored == 255).mean() < 0.01
