"""Content-addressed datasets of subject images: the core of UploadImages.

Every uploaded image is decoded under a pixel limit (decompression bombs refused), EXIF-rotated,
converted to RGB and re-encoded as PNG. The dataset id is the sha256 over the normalised images'
digests, in upload order, so the same photos give the same dataset whatever their original
encoding metadata. The layout is services.trainer.dataset_layout's.
"""

from __future__ import annotations

import datetime
import hashlib
import io

from services.common.errors import InvalidArgument, NotFound
from services.common.images import decode_image, encode_image
from services.common.object_store import ObjectStore
from services.trainer.dataset_layout import (
    DatasetInfo,
    delete_dataset,
    manifest_key,
    read_dataset,
    write_dataset,
)
from services.trainer.settings import UploadLimits


class DatasetStore:
    """Reads and writes datasets in the object store."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    def get(self, dataset_id: str) -> DatasetInfo:
        return read_dataset(self.store, dataset_id)

    def exists(self, dataset_id: str) -> bool:
        return self.store.exists(manifest_key(dataset_id))

    def delete(self, dataset_id: str) -> None:
        delete_dataset(self.store, dataset_id)

    def save(self, normalised: list[bytes], *, now: datetime.datetime | None = None) -> DatasetInfo:
        """Store normalised PNGs as one dataset; the same images again write nothing new."""
        digests = [hashlib.sha256(png).hexdigest() for png in normalised]
        dataset_id = hashlib.sha256("\n".join(digests).encode()).hexdigest()
        try:
            return self.get(dataset_id)
        except NotFound:
            pass
        return write_dataset(self.store, dataset_id, normalised, now=now)


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
