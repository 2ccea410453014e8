"""`dreambooth`: the command line over the SDK.

    dreambooth upload photos/
    dreambooth train --base-model tiny-sd --dataset photos/ --instance-prompt "a photo of sks dog" --wait
    dreambooth jobs list | get JOB | cancel JOB | watch JOB | delete JOB
    dreambooth generate --model MODEL --prompt "a photo of sks dog on the moon" --n 4 --out out/
    dreambooth models list | get MODEL | delete MODEL | export MODEL --out DIR
    dreambooth datasets delete DATASET
    dreambooth usage

Addresses come from --trainer/--inference or DREAMBOOTH_TRAINER_ADDRESS /
DREAMBOOTH_INFERENCE_ADDRESS; the API key from --api-key or DREAMBOOTH_API_KEY; TLS from --tls,
--ca-cert and (servers that require a client certificate) --client-cert/--client-key. Bad usage
is an argparse error (exit 2); a server error is one line on stderr and exit 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from dreambooth.v1 import common_pb2, inference_pb2, trainer_pb2
from google.protobuf import json_format
from google.protobuf.message import Message

from dreambooth_client import formatting, messages, training_spec, vocabulary
from dreambooth_client.channels import (
    API_KEY_ENV,
    DEFAULT_INFERENCE,
    DEFAULT_TRAINER,
    INFERENCE_ADDRESS_ENV,
    TRAINER_ADDRESS_ENV,
    env_address,
)
from dreambooth_client.client import DreamBoothClient
from dreambooth_client.errors import DreamBoothError, JobFailedError

SCHEDULERS = vocabulary.SCHEDULER_NAMES
FORMATS = vocabulary.IMAGE_FORMAT_NAMES
STATES = messages.enum_choices(trainer_pb2.TrainingJobState, "TRAINING_JOB_STATE_")
SEED_RANGE = f"{vocabulary.MIN_SEED}..{vocabulary.MAX_SEED}"
GUIDANCE_RANGE = f"{vocabulary.MIN_GUIDANCE:g}..{vocabulary.MAX_GUIDANCE:g}"
ADAPTER_SCALE_RANGE = f"{vocabulary.MIN_ADAPTER_SCALE:g}..{vocabulary.MAX_ADAPTER_SCALE:g}"


class UsageError(Exception):
    """Input the parser could not check (a bad path, a malformed name): reported as usage."""


def seed_value(text: str) -> int:
    """A seed in the range every service accepts (see dreambooth_client.vocabulary)."""
    value = int(text)
    if not vocabulary.is_valid_seed(value):
        raise argparse.ArgumentTypeError(f"must be in {SEED_RANGE}, got {value}")
    return value


def guidance_value(text: str) -> float:
    value = float(text)
    if not vocabulary.is_valid_guidance(value):
        raise argparse.ArgumentTypeError(f"must be in {GUIDANCE_RANGE}, got {value}")
    return value


def adapter_scale_value(text: str) -> float:
    value = float(text)
    if not vocabulary.is_valid_adapter_scale(value):
        raise argparse.ArgumentTypeError(f"must be in {ADAPTER_SCALE_RANGE}, got {value}")
    return value


# ---------------------------------------------------------------- output


class Output:
    """Where results (stdout) and messages (stderr) go; `--json` switches results to JSON."""

    def __init__(self, as_json: bool, out: TextIO, err: TextIO) -> None:
        self.as_json = as_json
        self.out = out
        self.err = err

    def lines(self, lines: Sequence[str]) -> None:
        for line in lines:
            print(line, file=self.out, flush=True)

    def message(
        self, message: Message, human: Callable[[], Sequence[str]], *, one_line: bool = False
    ) -> None:
        if self.as_json:
            self.json(message, one_line=one_line)
        else:
            self.lines(human())

    def json(self, message: Message, *, one_line: bool = False) -> None:
        text = json_format.MessageToJson(message, indent=None if one_line else 2)
        print(text, file=self.out, flush=True)

    def note(self, text: str) -> None:
        print(text, file=self.err, flush=True)


# ---------------------------------------------------------------- commands


def cmd_upload(client: DreamBoothClient, args: argparse.Namespace, output: Output) -> int:
    dataset = upload(client, args.paths, output)
    output.message(dataset, lambda: [dataset.name])
    return 0


def upload(client: DreamBoothClient, paths: Sequence[str], output: Output) -> trainer_pb2.Dataset:
    try:
        sources = messages.collect_image_sources(paths)
    except (OSError, ValueError) as err:
        raise UsageError(str(err)) from err
    total = sum(source.size for source in sources)
    output.note(f"uploading {len(sources)} images ({formatting.size(total)})")
    dataset = client.upload_images(paths)
    stored = formatting.size(dataset.size_bytes)
    output.note(f"dataset {dataset.name}: {dataset.image_count} images, {stored}")
    return dataset


def add_spec_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per row of the spec table; every default is None = not sent = the server's."""
    for field in training_spec.FIELDS:
        options: dict[str, Any] = {"dest": field.name, "default": None, "help": _flag_help(field)}
        if field.required:
            options["required"] = True
        if field.type is bool:
            options["action"] = "store_true"
        elif field.type is tuple:
            options["action"] = "append"
        elif field.choices:
            options["choices"] = field.choices
        else:
            options["type"] = _spec_value(field)
            options["metavar"] = field.cli_flag.lstrip("-").upper().replace("-", "_")
        parser.add_argument(field.cli_flag, **options)


def _spec_value(field: training_spec.SpecField) -> Callable[[str], Any]:
    """The row's type, checked against its numeric bounds here (bounds named after server limits
    are the server's to check)."""

    def parse(text: str) -> Any:
        value = field.type(text)
        low = field.low if isinstance(field.low, int | float) else None
        high = field.high if isinstance(field.high, int | float) else None
        too_low = low is not None and (value <= low if field.low_exclusive else value < low)
        too_high = high is not None and (value >= high if field.high_exclusive else value > high)
        if too_low or too_high:
            shown = f"{'>' if field.low_exclusive else ''}{low if low is not None else ''}.."
            shown += f"{'<' if field.high_exclusive else ''}{high or ''}"
            raise argparse.ArgumentTypeError(f"must be in {shown}, got {text}")
        return value

    parse.__name__ = field.type.__name__  # argparse names the type in "invalid int value" errors
    return parse


def _flag_help(field: training_spec.SpecField) -> str:
    if field.required or field.type in (bool, tuple):
        return field.help
    shown = (repr(field.default) if field.default else "none") if field.type is str else f"{field.default:g}"
    default = field.derived or shown
    if field.default_for(use_lora=True) != field.default:
        default += f"; {field.default_for(use_lora=True):g} with --lora"
    return f"{field.help} (default: {default})".replace("%", "%%")


def cmd_train(client: DreamBoothClient, args: argparse.Namespace, output: Output) -> int:
    dataset = args.dataset
    if not dataset.startswith("datasets/") and Path(dataset).exists():
        dataset = upload(client, [dataset], output).name  # a local folder: upload it first
    fields = {field.name: getattr(args, field.name) for field in training_spec.FIELDS}
    try:
        spec = messages.build_training_spec(**{**fields, "dataset": dataset})
    except (TypeError, ValueError) as err:
        raise UsageError(str(err)) from err
    job = client.create_training_job(spec, request_id=args.request_id)
    output.note(f"created {job.name} ({messages.state_label(job.state)})")
    if not args.wait:
        output.message(job, lambda: [job.name])
        return 0
    return follow(client, job.name, 0, output, previews=args.previews)


def follow(client: DreamBoothClient, job: str, after: int, output: Output, previews: str | None) -> int:
    """Print the job's events until it ends; exit status 0 only when it SUCCEEDED."""
    preview_dir = Path(previews) if previews else None

    def on_event(event: trainer_pb2.WatchTrainingJobResponse) -> None:
        output.message(event, lambda: [formatting.event_line(event)], one_line=True)
        if preview_dir is not None and event.WhichOneof("event") == "preview":
            save_preview(preview_dir, event.preview, output)

    try:
        final = client.wait(job, after_sequence=after, on_event=on_event, check=True)
    except JobFailedError as err:
        output.note(f"error: {err}")
        return 1
    output.note(f"done: {formatting.job_summary(final)}")
    return 0


def save_preview(directory: Path, preview: trainer_pb2.ValidationPreview, output: Output) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    index = len(list(directory.glob(f"step-{preview.step:06d}-*")))
    path = directory / f"step-{preview.step:06d}-{index}.{messages.image_extension(preview.image.data)}"
    path.write_bytes(preview.image.data)
    output.note(f"      saved preview {path}")


def cmd_jobs_list(client: DreamBoothClient, args: argparse.Namespace, output: Output) -> int:
    jobs = []
    for job in client.list_training_jobs(state=args.state):
        jobs.append(job)
        if args.limit and len(jobs) >= args.limit:
            break
    if output.as_json:
        response = trainer_pb2.ListTrainingJobsResponse(training_jobs=jobs)
        output.json(response)
        return 0
    rows = [
        [
            job.name,
            messages.state_label(job.state),
            f"{job.progress.step}/{job.progress.total_steps}" if job.progress.total_steps else "",
            job.model,
            formatting.timestamp(job.create_time),
        ]
        for job in jobs
    ]
    output.lines(formatting.table(["NAME", "STATE", "STEP", "MODEL", "CREATED"], rows))
    return 0


def cmd_jobs_get(client: DreamBoothClient, args: argparse.Namespace, output: Output) -> int:
    job = client.get_training_job(args.job)
    output.message(job, lambda: formatting.job_details(job))
    return 0


def cmd_jobs_cancel(client: DreamBoothClient, args: argparse.Namespace, output: Output) -> int:
    job = client.cancel_training_job(args.job)
    output.message(job, lambda: [formatting.job_summary(job)])
    return 0


def cmd_jobs_delete(client: DreamBoothClient, args: argparse.Namespace, output: Output) -> int:
    job = client.delete_training_job(args.job)
    output.message(job, lambda: [f"deleted {job.name}"])
    return 0


def cmd_jobs_watch(client: DreamBoothClient, args: argparse.Namespace, output: Output) -> int:
    return follow(client, messages.job_name(args.job), args.after, output, previews=args.previews)


def cmd_generate(client: DreamBoothClient, args: argparse.Namespace, output: Output) -> int:
    out_dir = Path(args.out)
    show_progress = output.err.isatty() and not output.as_json

    def on_progress(step: int, total: int) -> None:
        if show_progress:
            end = "\n" if step >= total else ""
            bar = formatting.progress_bar(step, total)
            print(f"\rsampling {step}/{total} {bar}", end=end, file=output.err, flush=True)

    images = client.generate(
        args.model,
        args.prompt,
        negative_prompt=args.negative_prompt,
        num_images=args.n,
        width=args.width,
        height=args.height,
        steps=args.steps,
        guidance_scale=args.guidance,
        scheduler=args.scheduler,
        seed=args.seed,
        output_format=args.format,
        truncate_prompt=args.truncate_prompt,
        adapter_scale=args.adapter_scale,
        on_progress=on_progress,
        timeout=args.generate_timeout,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model_id = messages.resource_id(messages.model_name(args.model))
    paths = []
    for image in images:
        path = out_dir / f"{model_id}-seed{image.seed}.{image.extension}"
        path.write_bytes(image.data)
        paths.append(path)
    if output.as_json:
        records = [{"path": str(p), "seed": i.seed} for p, i in zip(paths, images, strict=True)]
        print(json.dumps(records), file=output.out)
    else:
        output.lines([f"{path}  seed {image.seed}" for path, image in zip(paths, images, strict=True)])
    return 0


def cmd_models_list(client: DreamBoothClient, args: argparse.Namespace, output: Output) -> int:
    models = list(client.list_models())
    if output.as_json:
        output.json(inference_pb2.ListModelsResponse(models=models))
        return 0
    rows = [
        [
            model.name,
            messages.model_kind_label(model.kind),
            model.base_model,
            formatting.size(model.size_bytes),
            formatting.timestamp(model.create_time),
        ]
        for model in models
    ]
    output.lines(formatting.table(["NAME", "KIND", "BASE", "SIZE", "CREATED"], rows))
    return 0


def cmd_models_get(client: DreamBoothClient, args: argparse.Namespace, output: Output) -> int:
    model = client.get_model(args.model)
    output.message(model, lambda: formatting.model_details(model))
    return 0


def cmd_models_delete(client: DreamBoothClient, args: argparse.Namespace, output: Output) -> int:
    model = client.delete_model(args.model)
    output.message(model, lambda: [f"deleted {model.name}"])
    return 0


def cmd_models_export(client: DreamBoothClient, args: argparse.Namespace, output: Output) -> int:
    out_dir = Path(args.out)
    model = client.export_model(args.model, out_dir)
    load = "pipe.load_lora_weights" if model.kind == common_pb2.MODEL_KIND_LORA else "from_pretrained"
    output.note(
        f"exported {model.name} ({formatting.size(model.size_bytes)}), sha256 verified; load with {load}"
    )
    output.message(model, lambda: [str(out_dir)])
    return 0


def cmd_datasets_delete(client: DreamBoothClient, args: argparse.Namespace, output: Output) -> int:
    dataset = client.delete_dataset(args.dataset)
    output.message(dataset, lambda: [f"deleted {dataset.name}"])
    return 0


def cmd_usage(client: DreamBoothClient, args: argparse.Namespace, output: Output) -> int:
    usage = client.get_usage()
    output.message(usage, lambda: formatting.usage_details(usage))
    return 0


# ---------------------------------------------------------------- parser


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dreambooth", description="Train and sample DreamBooth models.")
    parser.add_argument(
        "--trainer",
        default=env_address(TRAINER_ADDRESS_ENV, DEFAULT_TRAINER),
        help=f"trainer host:port (env {TRAINER_ADDRESS_ENV}, default {DEFAULT_TRAINER})",
    )
    parser.add_argument(
        "--inference",
        default=env_address(INFERENCE_ADDRESS_ENV, DEFAULT_INFERENCE),
        help=f"inference host:port (env {INFERENCE_ADDRESS_ENV}, default {DEFAULT_INFERENCE})",
    )
    parser.add_argument("--api-key", default=None, help=f"API key (env {API_KEY_ENV})")
    parser.add_argument("--tls", action="store_true", help="connect with TLS")
    parser.add_argument("--ca-cert", default=None, help="PEM file of the CA to trust (implies --tls)")
    parser.add_argument("--client-cert", default=None, help="PEM client certificate for mTLS (implies --tls)")
    parser.add_argument("--client-key", default=None, help="PEM key of --client-cert")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per unary call (default 30)")
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    upload_p = commands.add_parser("upload", help="upload subject images; prints the dataset name")
    upload_p.add_argument("paths", nargs="+", metavar="DIR|FILE")
    upload_p.set_defaults(handler=cmd_upload)

    train = commands.add_parser("train", help="create a training job")
    add_spec_flags(train)
    train.add_argument("--request-id", default=None, help="idempotency key (default: a fresh uuid)")
    train.add_argument("--wait", action="store_true", help="watch the job until it ends")
    train.add_argument("--previews", default=None, metavar="DIR", help="with --wait: save previews here")
    train.set_defaults(handler=cmd_train)

    jobs = commands.add_parser("jobs", help="list, inspect, cancel and watch training jobs")
    job_commands = jobs.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    jobs_list = job_commands.add_parser("list", help="jobs, newest first")
    jobs_list.add_argument("--state", choices=STATES, default=None)
    jobs_list.add_argument("--limit", type=positive_int, default=None)
    jobs_list.set_defaults(handler=cmd_jobs_list)
    for action, handler, text in (
        ("get", cmd_jobs_get, "show one job"),
        ("cancel", cmd_jobs_cancel, "cancel a job"),
        ("watch", cmd_jobs_watch, "print a job's events until it ends"),
        ("delete", cmd_jobs_delete, "delete a job and what it stored but its model (cancels it first)"),
    ):
        sub = job_commands.add_parser(action, help=text)
        sub.add_argument("job", help="job id or trainingJobs/ID")
        sub.set_defaults(handler=handler)
        if action == "watch":
            sub.add_argument("--after", type=int, default=0, help="skip events up to this sequence number")
            sub.add_argument("--previews", default=None, metavar="DIR", help="save validation previews")

    gen = commands.add_parser("generate", help="sample images from a model")
    gen.add_argument("--model", required=True, help="model id or models/ID")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt", default="")
    gen.add_argument("--n", type=positive_int, default=1, help="number of images (default 1)")
    gen.add_argument("--steps", type=positive_int, default=0, help="denoising steps (default: server's)")
    gen.add_argument(
        "--guidance",
        type=guidance_value,
        default=0.0,
        help=f"guidance scale, {GUIDANCE_RANGE}; 1 disables it (default {vocabulary.DEFAULT_GUIDANCE:g})",
    )
    gen.add_argument("--seed", type=seed_value, help=f"seed of image 0, {SEED_RANGE} (default: random)")
    gen.add_argument(
        "--scheduler", choices=SCHEDULERS, default=None, help=f"(default {vocabulary.DEFAULT_SCHEDULER})"
    )
    gen.add_argument("--width", type=positive_int, default=0)
    gen.add_argument("--height", type=positive_int, default=0)
    gen.add_argument("--format", choices=FORMATS, help=f"(default {vocabulary.DEFAULT_IMAGE_FORMAT})")
    gen.add_argument("--truncate-prompt", action="store_true", help="cut prompts over 77 tokens")
    gen.add_argument(
        "--adapter-scale",
        type=adapter_scale_value,
        default=None,
        help=f"LoRA models only: adapter strength, {ADAPTER_SCALE_RANGE} (default 1)",
    )
    gen.add_argument("--generate-timeout", type=float, default=None, help="seconds for the whole call")
    gen.add_argument("--out", required=True, metavar="DIR", help="where to write the images")
    gen.set_defaults(handler=cmd_generate)

    models = commands.add_parser("models", help="list and inspect models")
    model_commands = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    model_commands.add_parser("list", help="every model").set_defaults(handler=cmd_models_list)
    models_get = model_commands.add_parser("get", help="show one model")
    models_get.add_argument("model", help="model id or models/ID")
    models_get.set_defaults(handler=cmd_models_get)
    models_delete = model_commands.add_parser("delete", help="delete a model")
    models_delete.add_argument("model", help="model id or models/ID")
    models_delete.set_defaults(handler=cmd_models_delete)
    models_export = model_commands.add_parser(
        "export", help="download a model for stock diffusers (a folder, or a LoRA's weights)"
    )
    models_export.add_argument("model", help="model id or models/ID")
    models_export.add_argument("--out", required=True, metavar="DIR", help="a new or empty folder")
    models_export.set_defaults(handler=cmd_models_export)

    datasets = commands.add_parser("datasets", help="manage uploaded datasets")
    dataset_commands = datasets.add_subparsers(dest="datasets_command", required=True, metavar="ACTION")
    datasets_delete = dataset_commands.add_parser("delete", help="delete a dataset")
    datasets_delete.add_argument("dataset", help="datasets/SHA256 (or the bare sha256)")
    datasets_delete.set_defaults(handler=cmd_datasets_delete)

    commands.add_parser("usage", help="this key's usage and quotas").set_defaults(handler=cmd_usage)
    return parser


def make_client(args: argparse.Namespace) -> DreamBoothClient:
    pems: dict[str, bytes | None] = {}
    for flag, value in (
        ("--ca-cert", args.ca_cert),
        ("--client-cert", args.client_cert),
        ("--client-key", args.client_key),
    ):
        try:
            pems[flag] = Path(value).read_bytes() if value else None
        except OSError as err:
            raise UsageError(f"{flag}: {err}") from err
    if (pems["--client-cert"] is None) != (pems["--client-key"] is None):
        raise UsageError("--client-cert and --client-key go together")
    return DreamBoothClient(
        trainer=args.trainer,
        inference=args.inference,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        tls=args.tls,
        ca_cert=pems["--ca-cert"],
        client_cert=pems["--client-cert"],
        client_key=pems["--client-key"],
        timeout=args.timeout,
    )


def main(
    argv: Sequence[str] | None = None, *, stdout: TextIO | None = None, stderr: TextIO | None = None
) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    output = Output(args.json, stdout or sys.stdout, stderr or sys.stderr)
    try:
        with make_client(args) as client:
            return int(args.handler(client, args, output))
    except (UsageError, ValueError, TypeError) as err:  # names or values the parser could not check
        parser.error(str(err))  # exits 2
    except DreamBoothError as err:
        output.note(f"error: {err}")
    except OSError as err:  # writing images or previews
        output.note(f"error: {err}")
    except KeyboardInterrupt:
        output.note("interrupted")
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
