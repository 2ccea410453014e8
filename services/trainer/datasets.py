"""Content-addressed datasets of subject images: the core of UploadImages.

Every uploaded image is decoded under a pixel limit (decompression bombs refused), EXIF-rotated,
converted to RGB and re-encoded as PNG. The dataset id is the sha256 over the normalised images'
digests, in upload order, so the same photos give the same dataset whatever their original
encoding metadata. Layout:

    datasets/{id}/images/{i:03d}.png
    datasets/{id}/manifest.json      written last: a dataset without a manifest does not exist
"""

from __future__ import annotations

import datetime
import hashlib
import io
import re
from dataclasses import dataclass

from services.common.errors import InvalidArgument, NotFound
from services.common.images import decode_image, encode_image
from services.common.object_store import ObjectStore
from services.trainer.settings import UploadLimits

PREFIX = "datasets/"
_DATASET_ID = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class DatasetImage:
    path: str  # relative to the dataset, e.g. "images/000.png"
    sha256: str
    size: int
    width: int
    height: int


@dataclass(frozen=True)
class DatasetInfo:
    dataset_id: str
    images: tuple[DatasetImage, ...]
    create_time: str  # ISO-8601, UTC

    @property
    def image_count(self) -> int:
        return len(self.images)

    @property
    def size_bytes(self) -> int:
        return sum(image.size for image in self.images)

    @property
    def name(self) -> str:
        return dataset_name(self.dataset_id)

    def image_keys(self) -> list[str]:
        return [f"{PREFIX}{self.dataset_id}/{image.path}" for image in self.images]

    def to_json(self) -> dict[str, object]:
        return {
            "dataset_id": self.dataset_id,
            "create_time": self.create_time,
            "images": [vars(image) for image in self.images],
        }

    @classmethod
    def from_json(cls, data: dict[str, object]) -> DatasetInfo:
        images = tuple(DatasetImage(**image) for image in data["images"])  # type: ignore[attr-defined]
        return cls(dataset_id=str(data["dataset_id"]), images=images, create_time=str(data["create_time"]))


def dataset_name(dataset_id: str) -> str:
    return f"{PREFIX}{dataset_id}"


def parse_dataset_name(name: str, field: str) -> str:
    """`datasets/{sha256}` -> the id; InvalidArgument naming `field` otherwise."""
    if not name:
        raise InvalidArgument(field, "is required (a dataset name from UploadImages, datasets/{sha256})")
    dataset_id = name.removeprefix(PREFIX)
    if dataset_id == name or not _DATASET_ID.match(dataset_id):
        raise InvalidArgument(field, f"must be datasets/{{sha256}} as returned by UploadImages, got {name!r}")
    return dataset_id


def manifest_key(dataset_id: str) -> str:
    return f"{PREFIX}{dataset_id}/manifest.json"


class DatasetStore:
    """Reads and writes datasets in the object store."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    def get(self, dataset_id: str) -> DatasetInfo:
        try:
            data = self.store.get_json(manifest_key(dataset_id))
        except NotFound:
            raise NotFound("dataset", f"dataset {dataset_name(dataset_id)!r} not found") from None
        return DatasetInfo.from_json(data)

    def exists(self, dataset_id: str) -> bool:
        return self.store.exists(manifest_key(dataset_id))

    def save(self, normalised: list[bytes], *, now: datetime.datetime | None = None) -> DatasetInfo:
        """Store normalised PNGs as one dataset; the same images again write nothing new."""
        digests = [hashlib.sha256(png).hexdigest() for png in normalised]
        dataset_id = hashlib.sha256("\n".join(digests).encode()).hexdigest()
        try:
            return self.get(dataset_id)
        except NotFound:
            pass
        images = []
        for index, (png, digest) in enumerate(zip(normalised, digests, strict=True)):
            path = f"images/{index:03d}.png"
            self.store.put_bytes(f"{PREFIX}{dataset_id}/{path}", png)
            width, height = _png_size(png)
            images.append(DatasetImage(path=path, sha256=digest, size=len(png), width=width, height=height))
        moment = now or datetime.datetime.now(datetime.timezone.utc)
        info = DatasetInfo(dataset_id=dataset_id, images=tuple(images), create_time=moment.isoformat())
        self.store.put_json(manifest_key(dataset_id), info.to_json())  # last: the dataset now exists
        return info


def _png_size(png: bytes) -> tuple[int, int]:
    # The IHDR chunk always comes first: width and height are big-endian at bytes 16..24.
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def normalise_image(data: bytes, index: int, max_pixels: int) -> bytes:
    """Decode (bomb-safe, EXIF-transposed, RGB) and re-encode as PNG; errors name `images[index]`."""
    field = f"images[{index}]"
    try:
        image = decode_image(data, max_pixels, field=field)
    except InvalidArgument:
        raise
    except Exception as err:  # Pillow raises many kinds for truncated or hostile files
        raise InvalidArgument(field, f"cannot be decoded as an image ({type(err).__name__})") from None
    return encode_image(image.convert("RGB"), "png")


class ImageUpload:
    """Collects one UploadImages stream (header, chunks, header, chunks...) within the limits.

    Feeding is cheap and checks sizes as bytes arrive, so an oversized upload stops early;
    `finish()` does the decoding and storing (CPU and I/O: run it off the event loop).
    """

    def __init__(self, limits: UploadLimits) -> None:
        self.limits = limits
        self._images: list[io.BytesIO] = []
        self._declared: list[int] = []
        self._filenames: list[str] = []
        self._total = 0

    @property
    def _field(self) -> str:
        return f"images[{len(self._images) - 1}]"

    def start_image(self, filename: str, size_bytes: int) -> None:
        self._check_declared_size()
        if len(self._images) >= self.limits.max_images:
            raise InvalidArgument("images", f"too many images: at most {self.limits.max_images} per dataset")
        self._images.append(io.BytesIO())
        self._filenames.append(filename)
        self._declared.append(size_bytes)
        if size_bytes < 0:
            raise InvalidArgument(f"{self._field}.size_bytes", f"must be >= 0, got {size_bytes}")
        if size_bytes > self.limits.max_image_bytes:
            raise InvalidArgument(
                self._field,
                f"is {size_bytes} bytes; the limit is {self.limits.max_image_bytes} bytes per image",
            )

    def add_chunk(self, chunk: bytes) -> None:
        if not self._images:
            raise InvalidArgument(
                "image_header", "the upload must start with an image_header before any chunk"
            )
        if len(chunk) > self.limits.max_chunk_bytes:
            raise InvalidArgument(
                "chunk", f"is {len(chunk)} bytes; chunks are at most {self.limits.max_chunk_bytes}"
            )
        current = self._images[-1]
        if current.tell() + len(chunk) > self.limits.max_image_bytes:
            raise InvalidArgument(
                self._field, f"is larger than the limit of {self.limits.max_image_bytes} bytes per image"
            )
        if self._total + len(chunk) > self.limits.max_total_bytes:
            raise InvalidArgument(
                "images", f"the upload is larger than the limit of {self.limits.max_total_bytes} bytes"
            )
        current.write(chunk)
        self._total += len(chunk)

    def _check_declared_size(self) -> None:
        if not self._images:
            return
        got, declared = self._images[-1].tell(), self._declared[-1]
        if got == 0:
            raise InvalidArgument(self._field, "is empty: an image_header must be followed by its bytes")
        if declared and got != declared:
            raise InvalidArgument(self._field, f"declared {declared} bytes but {got} arrived")

    def finish(self, datasets: DatasetStore) -> DatasetInfo:
        if not self._images:
            raise InvalidArgument(
                "images", f"no images: upload between 1 and {self.limits.max_images} images"
            )
        self._check_declared_size()
        normalised = [
            normalise_image(buffer.getvalue(), index, self.limits.max_image_pixels)
            for index, buffer in enumerate(self._images)
        ]
        return datasets.save(normalised)
