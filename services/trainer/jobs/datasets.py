"""Content-addressed datasets of subject images: the core of UploadImages.

Every uploaded image is decoded under a pixel limit (decompression bombs refused), EXIF-rotated,
converted to RGB and re-encoded as PNG. The dataset id is the sha256 over the normalised images'
digests, in upload order, so the same photos give the same dataset whatever their original
encoding metadata. The layout is services.trainer.dataset_layout's, in the tenant's view of the
store; a named tenant's ids are salted with its name, so two tenants uploading the same photos
each get their own dataset name and neither can tell the other has them.
"""

from __future__ import annotations

import datetime
import hashlib
import io
from collections.abc import Callable

from services.common.errors import InvalidArgument, NotFound
from services.common.images import decode_image, encode_image, image_size
from services.common.namespaced_store import scoped_store
from services.common.object_store import ObjectStore
from services.trainer.dataset_layout import (
    DatasetInfo,
    delete_dataset,
    manifest_key,
    read_dataset,
    write_dataset,
)
from services.trainer.settings import UploadLimits


def dataset_id_of(image_digests: list[str], tenant: str = "") -> str:
    """The content address of a dataset: the same images give the same id, per tenant."""
    salt = f"tenant:{tenant}\n" if tenant else ""  # none for the implicit tenant: ids as before
    return hashlib.sha256((salt + "\n".join(image_digests)).encode()).hexdigest()


class DatasetStore:
    """Reads and writes one tenant's datasets (the implicit tenant's: "") in the object store."""

    def __init__(self, store: ObjectStore, tenant: str = "") -> None:
        self.store = scoped_store(store, tenant)
        self.tenant = tenant

    def get(self, dataset_id: str) -> DatasetInfo:
        return read_dataset(self.store, dataset_id)

    def exists(self, dataset_id: str) -> bool:
        return self.store.exists(manifest_key(dataset_id))

    def delete(self, dataset_id: str) -> None:
        delete_dataset(self.store, dataset_id)

    def save(
        self,
        normalised: list[bytes],
        *,
        now: datetime.datetime | None = None,
        before_write: Callable[[int], None] | None = None,
    ) -> DatasetInfo:
        """Store normalised PNGs as one dataset; the same images again write nothing new.
        `before_write(new_bytes)` runs only when something will be written (a quota check)."""
        dataset_id = dataset_id_of([hashlib.sha256(png).hexdigest() for png in normalised], self.tenant)
        try:
            return self.get(dataset_id)
        except NotFound:
            pass
        if before_write is not None:
            before_write(sum(len(png) for png in normalised))
        return write_dataset(self.store, dataset_id, normalised, now=now)


def check_image_shape(data: bytes, index: int, limits: UploadLimits) -> int:
    """The image's pixel count, read from its header (no pixel decoded), once its size and
    aspect ratio passed the limits."""
    field = f"images[{index}]"
    width, height = image_size(data, field)
    short, long = sorted((width, height))
    if short < limits.min_image_side:
        raise InvalidArgument(
            field, f"is {width}x{height}; each side must be at least {limits.min_image_side} pixels"
        )
    if long > short * limits.max_aspect_ratio:
        raise InvalidArgument(
            field,
            f"is {width}x{height}, an aspect ratio of {long / short:.1f}; "
            f"at most {limits.max_aspect_ratio:g}:1 is accepted (crop it first)",
        )
    if width * height > limits.max_image_pixels:
        raise InvalidArgument(
            field, f"is {width}x{height} = {width * height} pixels; the limit is {limits.max_image_pixels}"
        )
    return width * height


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

    def finish(
        self, datasets: DatasetStore, before_write: Callable[[int], None] | None = None
    ) -> DatasetInfo:
        if not self._images:
            raise InvalidArgument(
                "images", f"no images: upload between 1 and {self.limits.max_images} images"
            )
        self._check_declared_size()
        # Every header first: a stream is refused before any of its pixels is decoded.
        pixels = [
            check_image_shape(buffer.getvalue(), i, self.limits) for i, buffer in enumerate(self._images)
        ]
        if sum(pixels) > self.limits.max_stream_pixels:
            raise InvalidArgument(
                "images",
                f"the images decode to {sum(pixels)} pixels together; "
                f"the limit is {self.limits.max_stream_pixels} per upload",
            )
        normalised = [
            normalise_image(buffer.getvalue(), index, self.limits.max_image_pixels)
            for index, buffer in enumerate(self._images)
        ]
        return datasets.save(normalised, before_write=before_write)
