"""A model's manifest as the `dreambooth.v1.Model` message: the one conversion every servicer
that returns models uses (inference lists and exports them, the trainer deletes them)."""

from __future__ import annotations

import datetime

from dreambooth.v1 import common_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from services.common.model_store import ModelManifest

MODEL_KINDS = {
    "base": common_pb2.MODEL_KIND_BASE,
    "fine_tuned": common_pb2.MODEL_KIND_FINE_TUNED,
    "lora": common_pb2.MODEL_KIND_LORA,
}


def model_proto(manifest: ModelManifest) -> common_pb2.Model:
    training_job = manifest.training_job or ""
    if training_job and not training_job.startswith("trainingJobs/"):
        training_job = f"trainingJobs/{training_job}"
    return common_pb2.Model(
        name=manifest.name,
        kind=MODEL_KINDS.get(manifest.kind, common_pb2.MODEL_KIND_UNSPECIFIED),
        base_model=f"models/{manifest.base_model}" if manifest.base_model else "",
        training_job=training_job,
        create_time=_timestamp(manifest.create_time),
        size_bytes=manifest.size_bytes,
        manifest_digest=manifest.digest,
        file_count=len(manifest.files),
        labels=manifest.labels,
    )


def _timestamp(iso: str) -> Timestamp:
    stamp = Timestamp()
    moment = datetime.datetime.fromisoformat(iso.replace("Z", "+00:00"))
    stamp.FromDatetime(moment.astimezone(datetime.timezone.utc).replace(tzinfo=None))
    return stamp
