"""ToyBench: does DreamBooth learn the subject? The DreamBooth paper's table, on the toy world.

    .venv/bin/python bench/quality.py [--quick] [--base models/toy-world-base] [--subjects a,b]
                                      [--train-seeds 1] [--images-per-prompt 4] [--threads 2]
                                      [--multi-subject on|off|only]

For every held-out subject (toyworld.HELD_OUT_SUBJECTS) and training seed, each recipe of
toybench.recipes is fine-tuned on the committed toy-world base through the project's training
loop and prior-generation core (toybench.dreambooth), then sampled on ToyBench's prompts
(toybench.evaluation: 5 recontextualisations, 5 property changes, the class prompt, the other
classes), `--images-per-prompt` images each. Rows: the real photos (upper bound), the base model
(lower bound: it has never seen the subject), then one row per recipe. Each figure is the mean
over subjects x seeds; `spread` is their standard deviation. `--quick` (one subject, the three
recipes the summary needs, 30 steps, 8 class priors, one image per prompt: the same keys, a smoke
run, not figures to quote) is run by `make test`.

Multi-subject rows: the DreamBooth recipe on 2 and on 3 held-out subjects in ONE job
(MULTI_SUBJECT_SETS; each subject its own identifier, toybench.dreambooth.IDENTIFIERS), for
the recipe's steps times the number of subjects, so each subject gets the examples it gets
alone. Each subject is scored under its own identifier, with the bleed between them
(toybench.multi_subject). `--quick` runs the 2-subject job only, at the quick steps (a smoke
run); `--multi-subject only` skips the single-subject rows, `off` the multi-subject ones.

The last line is one JSON object: subject_fidelity_ratio (DreamBooth with priors / real photos),
prompt_fidelity (background accuracy of the recontextualised prompts), class_accuracy_drop and
other_class_accuracy_drop (base minus after, with priors), prior_beats_no_prior, lora_ratio
(LoRA's subject fidelity / full fine-tuning's), the rows, multi_subject (per job: each
subject's scores, their mean fidelity and confusion, and each subject's fidelity in a job of
its own when this run trained one), and the run's seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from toybench.dreambooth import BASE_MODEL_ID, IDENTIFIERS, Recipe, Workbench
from toybench.evalnet import EvalNet, embed, load_evalnet
from toybench.evaluation import score_model, score_real_photos
from toybench.multi_subject import score_subjects
from toybench.recipes import DREAMBOOTH, LORA, NO_PRIOR, RECIPES
from toyworld import HELD_OUT_SUBJECTS, subject

DEFAULT_BASE = Path(__file__).resolve().parent.parent / "models" / "toy-world-base"
QUICK_SUBJECTS = ("striped-ball",)
QUICK_STEPS = 30
QUICK_CLASS_PRIORS = 8
SUMMARY_RECIPES = (DREAMBOOTH, NO_PRIOR, LORA)  # the rows the JSON summary compares
# Two balls (one class, one shared prior set: the hardest to keep apart), then a cube with them.
MULTI_SUBJECT_SETS = (("striped-ball", "spotted-ball"), ("striped-ball", "spotted-ball", "dotted-cube"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, default=DEFAULT_BASE, help="the toy-world base model folder")
    parser.add_argument("--subjects", help="comma-separated held-out subjects (default: all)")
    parser.add_argument(
        "--recipes",
        help=f"comma-separated recipes (default: {','.join(RECIPES)}; "
        f"--quick: {','.join(recipe.name for recipe in SUMMARY_RECIPES)})",
    )
    parser.add_argument("--train-seeds", type=int, default=1, help="fine-tunes per subject and recipe")
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--class-images", type=int, default=16, help="images of the class prompt")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, help="keep the store (models, priors) here")
    parser.add_argument("--steps", type=int, help="train every recipe this many steps (default: its own)")
    parser.add_argument("--class-priors", type=int, help="class-prior images per job (default: the recipe's)")
    parser.add_argument("--quick", action="store_true", help="a smoke run (same keys; not figures to quote)")
    parser.add_argument(
        "--multi-subject",
        choices=("on", "off", "only"),
        default="on",
        help="the multi-subject rows: with the others (on), not at all (off), or alone (only)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.subjects = args.subjects or ",".join(QUICK_SUBJECTS)
        args.images_per_prompt, args.class_images = 1, 4
        args.recipes = args.recipes or ",".join(recipe.name for recipe in SUMMARY_RECIPES)
        args.steps, args.class_priors = args.steps or QUICK_STEPS, args.class_priors or QUICK_CLASS_PRIORS
    subjects = (
        [subject(name) for name in args.subjects.split(",")] if args.subjects else list(HELD_OUT_SUBJECTS)
    )
    names = args.recipes.split(",") if args.recipes else list(RECIPES)
    for name in names:
        if name not in RECIPES:
            parser.error(f"unknown recipe {name!r} (known: {', '.join(RECIPES)})")
    for needed in SUMMARY_RECIPES:
        if needed.name not in names:
            parser.error(f"the summary needs the recipe {needed.name!r}")
    for name, value in (("--steps", args.steps), ("--class-priors", args.class_priors)):
        if value is not None and value < 1:
            parser.error(f"{name} must be at least 1")
    recipes = [_adjusted(RECIPES[name], args.steps, args.class_priors) for name in names]

    started = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="toybench-"))
    try:
        bench = Workbench(work, args.base)
    except (ValueError, FileNotFoundError) as err:
        print(f"quality: {err}", file=sys.stderr)
        return 2
    net = load_evalnet()
    cells: dict[str, list[dict[str, float]]] = {"real photos": [], "base model": []}
    single: dict[str, float] = {}  # subject -> its DreamBooth fine-tune's fidelity (seed 0)
    multi: dict[str, dict] = {}
    try:
        for held_out in subjects if args.multi_subject != "only" else ():
            real = embed(net, held_out.photos())
            cells["real photos"].append(
                score_real_photos(net, held_out, args.images_per_prompt, args.class_images)
            )

            def sampler(model_id: str, seed: int = 0):
                return lambda prompt, count: bench.sample(model_id, prompt, count, seed)

            cells["base model"].append(
                score_model(
                    net, sampler(BASE_MODEL_ID), held_out, real, args.images_per_prompt, args.class_images
                )
            )
            for recipe in recipes:
                for seed in range(args.train_seeds):
                    tic = time.perf_counter()
                    model_id = bench.finetune(held_out, recipe, seed)
                    trained_s = time.perf_counter() - tic
                    scores = score_model(
                        net, sampler(model_id), held_out, real, args.images_per_prompt, args.class_images
                    )
                    cells.setdefault(recipe.name, []).append({**scores, "train_s": trained_s})
                    if recipe.name == DREAMBOOTH.name and seed == 0:
                        single[held_out.name] = scores["subject_fidelity"]
                    print(
                        f"{held_out.name} {recipe.name} seed {seed}: {_brief(scores)} ({trained_s:.0f} s)",
                        flush=True,
                    )
        if args.multi_subject != "off":
            dreambooth = next(recipe for recipe in recipes if recipe.name == DREAMBOOTH.name)
            for together in MULTI_SUBJECT_SETS[:1] if args.quick else MULTI_SUBJECT_SETS:
                multi[f"{len(together)}_subjects"] = _multi_subject(
                    bench, net, together, dreambooth, args, single
                )
    finally:
        bench.close()

    if args.multi_subject == "only":
        print(json.dumps({"multi_subject": multi, "quick": args.quick, "seconds": _since(started)}))
        return 0
    rows = {name: _mean(values) for name, values in cells.items()}
    spreads = {name: _spread(values) for name, values in cells.items()}
    print(_table(rows, spreads))
    full, no_prior, base, real_row = (
        rows[DREAMBOOTH.name],
        rows[NO_PRIOR.name],
        rows["base model"],
        rows["real photos"],
    )
    prior_gain = full["class_accuracy"] - no_prior["class_accuracy"]
    seed_spread = max(spreads[DREAMBOOTH.name]["class_accuracy"], spreads[NO_PRIOR.name]["class_accuracy"])
    summary = {
        "subject_fidelity_ratio": round(full["subject_fidelity"] / real_row["subject_fidelity"], 4),
        "prompt_fidelity": round(full["prompt_fidelity"], 4),
        "class_accuracy_drop": round(base["class_accuracy"] - full["class_accuracy"], 4),
        "other_class_accuracy_drop": round(base["other_class_accuracy"] - full["other_class_accuracy"], 4),
        "prior_beats_no_prior": bool(prior_gain > seed_spread),
        "prior_class_accuracy_gain": round(prior_gain, 4),
        "class_accuracy_spread": round(seed_spread, 4),
        "lora_ratio": round(rows[LORA.name]["subject_fidelity"] / full["subject_fidelity"], 4),
        "subjects": [held_out.name for held_out in subjects],
        "train_seeds": args.train_seeds,
        "images_per_prompt": args.images_per_prompt,
        "steps": {recipe.name: recipe.steps for recipe in recipes},
        "class_priors": {recipe.name: recipe.num_class_images for recipe in recipes},
        "rows": {name: {key: round(value, 4) for key, value in row.items()} for name, row in rows.items()},
        "spread": {
            name: {key: round(value, 4) for key, value in row.items()} for name, row in spreads.items()
        },
        "multi_subject": multi,
        "quick": args.quick,
        "seconds": _since(started),
    }
    print(json.dumps(summary, sort_keys=True))
    return 0


def _multi_subject(
    bench: Workbench,
    net: EvalNet,
    names: tuple[str, ...],
    recipe: Recipe,
    args: argparse.Namespace,
    single: dict[str, float],
) -> dict:
    """One job of the DreamBooth recipe on `names`, each subject scored under its identifier."""
    held_out = [subject(name) for name in names]
    steps = recipe.steps * (1 if args.quick else len(held_out))
    tic = time.perf_counter()
    model_id = bench.finetune_subjects(held_out, recipe, seed=0, steps=steps)
    trained_s = time.perf_counter() - tic

    def sample(prompt: str, count: int):
        return bench.sample(model_id, prompt, count)

    identifiers = IDENTIFIERS[: len(held_out)]
    rows = score_subjects(net, sample, held_out, identifiers, args.images_per_prompt, args.class_images)
    for name, row in rows.items():
        print(f"{'+'.join(names)} ({name}): {_brief(row)}, confusion {row['confusion']:.3f}", flush=True)
    result = {
        "subjects": dict(zip(names, identifiers, strict=True)),
        "steps": steps,
        "train_s": round(trained_s, 1),
        "subject_fidelity": round(float(np.mean([row["subject_fidelity"] for row in rows.values()])), 4),
        "confusion": round(float(np.mean([row["confusion"] for row in rows.values()])), 4),
        "cross_fidelity": round(float(np.mean([row["cross_fidelity"] for row in rows.values()])), 4),
        "rows": {name: {key: round(value, 4) for key, value in row.items()} for name, row in rows.items()},
    }
    alone = {name: round(single[name], 4) for name in names if name in single}
    if alone:
        result["single_subject_fidelity"] = alone
    return result


def _since(started: float) -> float:
    return round(time.perf_counter() - started, 1)


COLUMNS = (
    ("subject_fidelity", "subject fidelity"),
    ("prompt_fidelity", "prompt fidelity (background)"),
    ("property_colour_accuracy", "property change (colour)"),
    ("class_accuracy", "class accuracy"),
    ("class_diversity", "class diversity"),
    ("other_class_accuracy", "other classes"),
)


def _adjusted(recipe: Recipe, steps: int | None, class_priors: int | None) -> Recipe:
    """The recipe with the run's overrides (the row keeps its name: the override is in the JSON)."""
    return dataclasses.replace(
        recipe,
        steps=steps or recipe.steps,
        num_class_images=class_priors or recipe.num_class_images,
    )


def _mean(cells: list[dict[str, float]]) -> dict[str, float]:
    return {key: float(np.mean([cell[key] for cell in cells])) for key in cells[0]}


def _spread(cells: list[dict[str, float]]) -> dict[str, float]:
    return {key: float(np.std([cell[key] for cell in cells])) for key in cells[0]}


def _brief(scores: dict[str, float]) -> str:
    return ", ".join(f"{key} {scores[key]:.3f}" for key, _ in COLUMNS if key in scores)


def _table(rows: dict[str, dict[str, float]], spreads: dict[str, dict[str, float]]) -> str:
    lines = ["| row | " + " | ".join(title for _, title in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, row in rows.items():
        cells = [f"{row[key]:.3f} ± {spreads[name][key]:.3f}" if key in row else "—" for key, _ in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
