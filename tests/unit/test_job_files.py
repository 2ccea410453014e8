"""Job files (dreambooth_client.jobfile) and how `dreambooth train --config` merges them with flags."""

from __future__ import annotations

import struct
import sys
from pathlib import Path
from typing import Any

import pytest
import tomllib
from dreambooth.v1 import trainer_pb2
from dreambooth_client import cli, jobfile, messages
from dreambooth_client.training_spec import FIELDS

REQUIRED = 'base_model = "tiny-sd"\ndataset = "datasets/abc"\ninstance_prompt = "a photo of sks dog"\n'
AWKWARD_TEXT = 'tab\there "quoted" back\\slash\nnew line é \x7f \x01 [x] # not a comment'


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def train_args(*argv: str) -> Any:
    return cli.build_parser().parse_args(["train", *argv])


# ---------------------------------------------------------------- reading


def test_a_toml_file_gives_typed_values_by_spec_name(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "job.toml",
        REQUIRED + "max_train_steps = 100\nlearning_rate = 1\nuse_lora = true\nlr_schedule = 'cosine'\n"
        'validation_prompts = ["one", "two"]\n',
    )
    values = jobfile.read_job_file(path).values
    assert values["max_train_steps"] == 100
    assert values["learning_rate"] == 1.0 and isinstance(values["learning_rate"], float)  # an int is fine
    assert values["use_lora"] is True and values["lr_schedule"] == "cosine"
    assert values["validation_prompts"] == ("one", "two")
    spec = messages.build_training_spec(**values)
    assert spec.lr_schedule == trainer_pb2.LR_SCHEDULE_COSINE
    assert list(spec.validation_prompts) == ["one", "two"]


def test_a_yaml_file_reads_as_yaml_1_2(tmp_path: Path) -> None:
    """PyYAML alone (YAML 1.1) reads `no` as false and `1e-4` as a string: not in a job file."""
    path = write(
        tmp_path,
        "job.yml",
        "base_model: tiny-sd\ndataset: datasets/abc\ninstance_prompt: a photo of sks dog\n"
        "learning_rate: 1e-4\nmixed_precision: no\nuse_lora: true\nvalidation_prompts:\n  - one\n  - two\n",
    )
    values = jobfile.read_job_file(path).values
    assert values["learning_rate"] == 1e-4
    assert values["mixed_precision"] == "no" and values["use_lora"] is True
    assert values["validation_prompts"] == ("one", "two")
    with pytest.raises(jobfile.JobFileError, match="use_lora: expected true or false, got 'yes'"):
        jobfile.read_job_file(write(tmp_path, "yes.yaml", "use_lora: yes\n"))


def test_yaml_without_pyyaml_is_refused_saying_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "yaml", None)  # as on a machine without PyYAML
    path = write(tmp_path, "job.yaml", "max_train_steps: 3\n")
    with pytest.raises(jobfile.JobFileError, match=r"job.yaml: YAML job files need PyYAML \(pip install"):
        jobfile.read_job_file(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("stpes = 3\n", "unknown key 'stpes' (did you mean max_train_steps?)"),
        ("learning_rat = 3\n", "unknown key 'learning_rat' (did you mean learning_rate?)"),
        ("steps = 3\n", "unknown key 'steps' (job files use the spec's field names: max_train_steps)"),
        ("color = 'red'\n", "unknown key 'color' (the keys are the training spec's field names)"),
        ('max_train_steps = "100"\n', "max_train_steps: expected a whole number, got '100' (a string)"),
        ("max_train_steps = 1.5\n", "max_train_steps: expected a whole number, got 1.5"),
        ('use_lora = "true"\n', "use_lora: expected true or false, got 'true' (a string)"),
        ("learning_rate = true\n", "learning_rate: expected a number, got true (true/false)"),
        ("learning_rate = 0\n", "learning_rate: must be in >0..1, got 0"),
        ("seed = -1\n", "seed: must be in 0..4294967295, got -1"),
        ('validation_prompts = "one"\n', "validation_prompts: expected a list of strings, got 'one'"),
        ("validation_prompts = [1]\n", "validation_prompts: expected a list of strings, got an item 1"),
        ('lr_schedule = "warp"\n', "lr_schedule: must be one of constant, constant_with_warmup"),
        ("instance_prompt = { a = 1 }\n", "instance_prompt: expected a string, got a table"),
        ("[max_train_steps]\n", "max_train_steps: expected a whole number, got a table"),
        ('identifier_token = "two words"\n', "identifier_token: must be rare word naming the subject"),
        ("max_train_steps = 3\nmax_train_steps = 4\n", "not valid TOML"),
    ],
)
def test_unknown_keys_and_wrong_types_are_refused_naming_the_key_and_the_file(
    tmp_path: Path, text: str, message: str
) -> None:
    path = write(tmp_path, "job.toml", text)
    with pytest.raises(jobfile.JobFileError) as refused:
        jobfile.read_job_file(path)
    assert str(refused.value).startswith(f"{path}: ")
    assert message in str(refused.value)


def test_files_that_are_not_job_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(jobfile.JobFileError, match=r"job.json: a job file is .toml, .yaml or .yml"):
        jobfile.read_job_file(write(tmp_path, "job.json", "{}"))
    with pytest.raises(jobfile.JobFileError, match=r"missing\.toml: No such file"):
        jobfile.read_job_file(tmp_path / "missing.toml")
    with pytest.raises(jobfile.JobFileError, match="expected spec fields as `name: value` pairs"):
        jobfile.read_job_file(write(tmp_path, "list.yaml", "- max_train_steps\n"))


def test_a_bad_job_file_is_a_usage_error_of_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write(tmp_path, "job.toml", REQUIRED + "stpes = 3\n")
    with pytest.raises(SystemExit) as exited:
        cli.main(["--trainer", "127.0.0.1:1", "train", "--config", str(path)])
    assert exited.value.code == 2
    assert f"{path}: unknown key 'stpes'" in capsys.readouterr().err


# ---------------------------------------------------------------- merging with flags


def test_flags_given_override_the_file_and_only_those(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "job.toml",
        REQUIRED + 'max_train_steps = 100\nuse_lora = true\nvalidation_prompts = ["a", "b"]\nseed = 5\n',
    )
    job_file = jobfile.read_job_file(path)
    values = cli.train_values(
        train_args("--steps", "7", "--no-lora", "--validation-prompt", "c", "--instance-prompt", "sks cat"),
        job_file,
        [],
    )
    assert values["max_train_steps"] == 7  # the flag beats the file
    assert values["use_lora"] is False  # --no-lora turns off what the file turns on
    assert values["validation_prompts"] == ["c"]  # a list flag replaces the file's list
    assert values["instance_prompt"] == "sks cat"
    assert values["seed"] == 5 and values["base_model"] == "tiny-sd"  # not given: the file's
    assert "learning_rate" not in values  # in neither: left to the server
    spec = messages.build_training_spec(**values)
    assert not spec.HasField("learning_rate") and spec.HasField("use_lora") and not spec.use_lora


def test_required_fields_may_come_from_the_file_or_a_flag(tmp_path: Path) -> None:
    path = write(tmp_path, "job.toml", 'base_model = "tiny-sd"\ndataset = "datasets/abc"\n')
    job_file = jobfile.read_job_file(path)
    required = r"required: --instance-prompt \(as flags or in the --config file\)"
    with pytest.raises(cli.UsageError, match=required):
        cli.train_values(train_args(), job_file, [])
    values = cli.train_values(train_args("--instance-prompt", "a sks dog"), job_file, [])
    assert values["instance_prompt"] == "a sks dog"


def test_a_dataset_folder_in_the_file_is_relative_to_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = tmp_path / "jobs"
    (jobs / "photos").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "photos").mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    base = 'base_model = "tiny-sd"\ninstance_prompt = "a sks dog"\n'
    values = cli.train_values(
        train_args(), jobfile.read_job_file(write(jobs, "job.toml", base + 'dataset = "photos"\n')), []
    )
    assert values["dataset"] == str(jobs / "photos")
    named = write(jobs, "named.toml", base + 'dataset = "datasets/abc"\n')
    assert cli.train_values(train_args(), jobfile.read_job_file(named), [])["dataset"] == "datasets/abc"
    missing = write(jobs, "missing.toml", base + 'dataset = "./nope"\n')
    with pytest.raises(cli.UsageError, match=r"missing.toml: dataset: no such folder .*jobs/nope"):
        cli.train_values(train_args(), jobfile.read_job_file(missing), [])
    # A --dataset flag stays relative to the working directory, as without a file.
    flagged = cli.train_values(train_args("--dataset", "photos"), jobfile.read_job_file(missing), [])
    assert flagged["dataset"] == "photos"


# ---------------------------------------------------------------- writing: spec -> file -> spec


def value_for(row: Any) -> Any:
    """A value of the row's type that its client-side checks accept (not the default)."""
    if row.type is bool:
        return True
    if row.type is int:
        return 3
    if row.type is float:
        return 3e-5 if row.name.endswith("learning_rate") else 0.1
    if row.item is not None:  # a repeated message (the additional concepts): two of them
        return [
            {"dataset": f"datasets/{'a' * 64}", "identifier_token": "zwx", "instance_prompt": AWKWARD_TEXT},
            {
                "dataset": f"datasets/{'b' * 64}",
                "identifier_token": "ohwx",
                "instance_prompt": "a photo of ohwx cat",
                "class_prompt": "a photo of cat",
            },
        ]
    if row.type is tuple:
        return ("one", AWKWARD_TEXT, "three")
    if row.choices:
        return row.choices[-1]
    if row.name == "identifier_token":
        return "sks"
    return AWKWARD_TEXT if row.prompt else "some-id"


def every_field_spec() -> trainer_pb2.TrainingJobSpec:
    """Every row of the table set (so a row added later is covered by the round trip at once)."""
    return messages.build_training_spec(**{row.name: value_for(row) for row in FIELDS})


def test_spec_to_file_to_spec_is_exact_for_every_field(tmp_path: Path) -> None:
    spec = every_field_spec()
    assert all(spec.HasField(row.name) for row in FIELDS if row.type is not tuple)
    failed = trainer_pb2.TRAINING_JOB_STATE_FAILED
    job = trainer_pb2.TrainingJob(name="trainingJobs/abc", spec=spec, state=failed)
    path = write(tmp_path, "again.toml", jobfile.job_file_text(job))
    again = messages.build_training_spec(**jobfile.read_job_file(path).values)
    assert again == spec
    assert list(again.validation_prompts) == ["one", AWKWARD_TEXT, "three"]
    text = path.read_text()
    assert "learning_rate = 3e-05\n" in text  # written as typed, not as float32's 2.99999992e-05
    assert "# Written from trainingJobs/abc (FAILED)" in text


def test_unset_fields_stay_unset_and_an_empty_list_is_written(tmp_path: Path) -> None:
    spec = messages.build_training_spec(base_model="m", dataset="datasets/d", instance_prompt="sks", seed=0)
    text = jobfile.job_file_text(trainer_pb2.TrainingJob(name="trainingJobs/x", spec=spec))
    assert "seed = 0\n" in text and "validation_prompts = []\n" in text and "max_train_steps" not in text
    again = messages.build_training_spec(**jobfile.read_job_file(write(tmp_path, "j.toml", text)).values)
    assert again == spec and again.HasField("seed") and not again.HasField("max_train_steps")


def test_a_model_id_derived_from_the_job_id_is_left_out_and_a_chosen_one_kept() -> None:
    derived = messages.build_training_spec(model_id="job-abc123")
    text = jobfile.job_file_text(trainer_pb2.TrainingJob(name="trainingJobs/abc123", spec=derived))
    assert "model_id =" not in text and "model_id is left out" in text
    chosen = messages.build_training_spec(model_id="my-dog")
    text = jobfile.job_file_text(trainer_pb2.TrainingJob(name="trainingJobs/abc123", spec=chosen))
    assert 'model_id = "my-dog"\n' in text


@pytest.mark.parametrize(
    ("typed", "written"),
    [
        (1e-4, 1e-4),
        (5e-6, 5e-6),
        (0.1, 0.1),
        (1.0, 1.0),
        (2.5e-38, 2.5e-38),
        (3.4e38, 3.4e38),
        (1 / 3, 0.33333334),  # float32 keeps 8 of its digits
        (123456.789, 123456.79),
        (16777217.0, 16777216.0),  # not a float32: the proto never carried it
    ],
)
def test_floats_are_written_short_and_read_back_as_the_same_float32(typed: float, written: float) -> None:
    as_float32 = struct.unpack("f", struct.pack("f", typed))[0]
    assert as_float32 != typed or typed in (1.0, 16777216.0)
    assert jobfile.shortest_float32(as_float32) == written
    assert struct.unpack("f", struct.pack("f", written))[0] == as_float32
    assert tomllib.loads(f"x = {jobfile.toml_value(written)}")["x"] == written


def test_lists_of_tables_are_toml_arrays_of_tables_and_fill_repeated_messages() -> None:
    """The mapping a repeated message field of the spec uses (none exists yet): `[[name]]` blocks,
    each table's keys the message's field names, enums by short name, nested messages as tables."""
    response = trainer_pb2.ListTrainingJobsResponse(
        training_jobs=[
            trainer_pb2.TrainingJob(
                name="trainingJobs/a",
                state=trainer_pb2.TRAINING_JOB_STATE_SUCCEEDED,
                spec=messages.build_training_spec(learning_rate=3e-5, lr_schedule="cosine"),
            ),
            trainer_pb2.TrainingJob(name="trainingJobs/b", checkpoint_step=4),
        ],
        next_page_token="t",
    )
    values = jobfile.message_values(response)
    text = jobfile.render_toml(values)
    assert "[[training_jobs]]" in text and 'state = "succeeded"' in text
    parsed = tomllib.loads(text)
    again = messages.fill_message(trainer_pb2.ListTrainingJobsResponse(), parsed, "file")
    assert again == response
    with pytest.raises(TypeError, match=r"file.training_jobs\[1\]: unknown field 'colour'"):
        messages.fill_message(
            trainer_pb2.ListTrainingJobsResponse(), {"training_jobs": [{}, {"colour": "red"}]}, "file"
        )
