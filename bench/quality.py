"""ToyBench: does DreamBooth learn the subject? The DreamBooth paper's table, on the toy world.

    .venv/bin/python bench/quality.py [--quick] [--base models/toy-world-base] [--subjects a,b]
                                      [--train-seeds 1] [--images-per-prompt 4] [--threads 2]

For every held-out subject (toyworld.HELD_OUT_SUBJECTS) and training seed, each recipe of
toybench.recipes is fine-tuned on the committed toy-world base through the project's training
loop and prior-generation core (toybench.dreambooth), then sampled on ToyBench's prompts
(toybench.evaluation: 5 recontextualisations, 5 property changes, the class prompt, the other
classes), `--images-per-prompt` images each. Rows: the real photos (upper bound), the base model
(lower bound: it has never seen the subject), then one row per recipe. Each figure is the mean
over subjects x seeds; `spread` is their standard deviation. `--quick` (one subject, one image
per prompt, the core recipes unless --recipes says otherwise: the same keys, a smoke run, not
figures to quote) is run by `make test`.

The last line is one JSON object: subject_fidelity_ratio (DreamBooth with priors / real photos),
prompt_fidelity (background accuracy of the recontextualised prompts), class_accuracy_drop and
other_class_accuracy_drop (base minus after, with priors), prior_beats_no_prior, lora_ratio
(LoRA's subject fidelity / full fine-tuning's), the rows, and the run's seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from toybench.dreambooth import BASE_MODEL_ID, Workbench
from toybench.evalnet import embed, load_evalnet
from toybench.evaluation import score_model, score_real_photos
from toybench.recipes import CORE, DREAMBOOTH, LORA, NO_PRIOR, RECIPES
from toyworld import HELD_OUT_SUBJECTS, subject

DEFAULT_BASE = Path(__file__).resolve().parent.parent / "models" / "toy-world-base"
QUICK_SUBJECTS = ("striped-ball",)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, default=DEFAULT_BASE, help="the toy-world base model folder")
    parser.add_argument("--subjects", help="comma-separated held-out subjects (default: all)")
    parser.add_argument(
        "--recipes",
        help=f"comma-separated recipes (default: {','.join(RECIPES)}; "
        f"--quick: {','.join(recipe.name for recipe in CORE)})",
    )
    parser.add_argument("--train-seeds", type=int, default=1, help="fine-tunes per subject and recipe")
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--class-images", type=int, default=16, help="images of the class prompt")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, help="keep the store (models, priors) here")
    parser.add_argument("--quick", action="store_true", help="one subject, 1 image per prompt: a smoke run")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.subjects = args.subjects or ",".join(QUICK_SUBJECTS)
        args.images_per_prompt, args.class_images = 1, 4
    subjects = (
        [subject(name) for name in args.subjects.split(",")] if args.subjects else list(HELD_OUT_SUBJECTS)
    )
    if args.recipes:
        unknown = [name for name in args.recipes.split(",") if name not in RECIPES]
        if unknown:
            parser.error(f"unknown recipes {', '.join(unknown)}; choose from {', '.join(RECIPES)}")
        recipes = [RECIPES[name] for name in args.recipes.split(",")]
    else:
        recipes = list(CORE) if args.quick else list(RECIPES.values())
    for needed in (DREAMBOOTH, NO_PRIOR, LORA):
        if needed not in recipes:
            parser.error(f"the summary needs the recipe {needed.name!r}")

    started = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="toybench-"))
    try:
        bench = Workbench(work, args.base)
    except (ValueError, FileNotFoundError) as err:
        print(f"quality: {err}", file=sys.stderr)
        return 2
    net = load_evalnet()
    cells: dict[str, list[dict[str, float]]] = {"real photos": [], "base model": []}
    try:
        for held_out in subjects:
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
                    print(
                        f"{held_out.name} {recipe.name} seed {seed}: {_brief(scores)} ({trained_s:.0f} s)",
                        flush=True,
                    )
    finally:
        bench.close()

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
        "rows": {name: {key: round(value, 4) for key, value in row.items()} for name, row in rows.items()},
        "spread": {
            name: {key: round(value, 4) for key, value in row.items()} for name, row in spreads.items()
        },
        "quick": args.quick,
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(summary, sort_keys=True))
    return 0


COLUMNS = (
    ("subject_fidelity", "subject fidelity"),
    ("prompt_fidelity", "prompt fidelity (background)"),
    ("property_colour_accuracy", "property change (colour)"),
    ("class_accuracy", "class accuracy"),
    ("class_diversity", "class diversity"),
    ("other_class_accuracy", "other classes"),
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
