"""Where a dataset lives in the store and what its manifest says: the one definition that the
upload side (jobs.datasets writes) and the worker side (worker.data reads) share.

    datasets/{id}/images/{i:03d}.png
    datasets/{id}/manifest.json      written last: a dataset without a manifest does not exist

While a dataset is written its prefix is pinned (services/common/store_pins.py), so the store's
garbage collector does not take its images for the leftovers of an upload that died.
"""

from __future__ import annotations

import datetime
import hashlib
import re
from dataclasses import dataclass

from services.common.errors import InvalidArgument, NotFound
from services.common.object_store import ObjectStore
from services.common.store_pins import Pin, wait_for_collectors

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
        return [image_key(self.dataset_id, image.path) for image in self.images]

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


def dataset_prefix(dataset_id: str) -> str:
    return f"{PREFIX}{dataset_id}/"


def manifest_key(dataset_id: str) -> str:
    return f"{dataset_prefix(dataset_id)}manifest.json"


def image_path(index: int) -> str:
    """The path of the index-th uploaded image, relative to its dataset."""
    return f"images/{index:03d}.png"


def image_key(dataset_id: str, path: str) -> str:
    return f"{PREFIX}{dataset_id}/{path}"


def read_dataset(store: ObjectStore, dataset_id: str) -> DatasetInfo:
    """The dataset's manifest; NotFound (naming the dataset) when it does not exist."""
    try:
        data = store.get_json(manifest_key(dataset_id))
    except NotFound:
        raise NotFound("dataset", f"dataset {dataset_name(dataset_id)!r} not found") from None
    return DatasetInfo.from_json(data)


def write_dataset(
    store: ObjectStore, dataset_id: str, pngs: list[bytes], *, now: datetime.datetime | None = None
) -> DatasetInfo:
    """Write the images, then the manifest (last: only now does the dataset exist)."""
    images = []
    with Pin(store, prefixes=[dataset_prefix(dataset_id)], owner=f"upload {dataset_name(dataset_id)}"):
        wait_for_collectors(store)  # the same images, deleted before, may still be being swept
        for index, png in enumerate(pngs):
            path = image_path(index)
            store.put_bytes(image_key(dataset_id, path), png)
            width, height = _png_size(png)
            digest = hashlib.sha256(png).hexdigest()
            images.append(DatasetImage(path=path, sha256=digest, size=len(png), width=width, height=height))
        moment = now or datetime.datetime.now(datetime.timezone.utc)
        info = DatasetInfo(dataset_id=dataset_id, images=tuple(images), create_time=moment.isoformat())
        store.put_json(manifest_key(dataset_id), info.to_json())
    return info


def delete_dataset(store: ObjectStore, dataset_id: str) -> None:
    """The manifest first (the dataset stops existing), then its images."""
    store.delete(manifest_key(dataset_id))
    store.delete_prefix(dataset_prefix(dataset_id))


def _png_size(png: bytes) -> tuple[int, int]:
    # The IHDR chunk always comes first: width and height are big-endian at bytes 16..24.
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
