"""Does the base model draw what a full caption names? Attribute accuracy of its images per
guidance scale (issue 9: check that the base follows object, colour and background before
judging any fine-tune).

    .venv/bin/python -m toybench.base_attributes [--guidance 1,3,7.5] [--steps 20] [--prompts 12]
                                                 [--images 4] [--base models/toy-world-base]

Captions ("a photo of a red ball on the beach") are drawn at random (seed 0) from every object x
colour x background of the world; each is sampled `--images` times with the services' sampler
(toybench.dreambooth.Workbench) and read back by the evaluation net's attribute heads. Prints a
line per guidance scale and, last, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from toybench.dreambooth import BASE_MODEL_ID, Sampling, Workbench
from toybench.evalnet import load_evalnet
from toybench.metrics import prompt_fidelity
from toyworld.vocabulary import BACKGROUNDS, COLOURS, OBJECTS, caption

ATTRIBUTES = ("object", "colour", "background")
DEFAULT_BASE = Path(__file__).resolve().parent.parent / "models" / "toy-world-base"


def captions(count: int, seed: int = 0) -> list[str]:
    """`count` distinct full captions, drawn at random from the whole world."""
    combos = [(o, c, b) for o in OBJECTS for c in COLOURS for b in BACKGROUNDS]
    picked = np.random.default_rng(seed).choice(len(combos), count, replace=False)
    return [caption(*combos[index]) for index in picked]


def measure(base: Path, guidance: float, steps: int, prompts: list[str], images: int) -> dict[str, float]:
    """Mean accuracy of each attribute over `images` samples of every prompt."""
    net = load_evalnet()
    with tempfile.TemporaryDirectory(prefix="base-attributes-") as work:
        bench = Workbench(Path(work), base, Sampling(steps=steps, guidance_scale=guidance))
        try:
            scores = [prompt_fidelity(net, bench.sample(BASE_MODEL_ID, p, images), p) for p in prompts]
        finally:
            bench.close()
    return {name: float(np.mean([score[name] for score in scores])) for name in ATTRIBUTES}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, default=DEFAULT_BASE)
    parser.add_argument("--guidance", default="1,3,7.5,15", help="comma-separated guidance scales")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps")
    parser.add_argument("--prompts", type=int, default=12, help="captions drawn from the world")
    parser.add_argument("--images", type=int, default=4, help="images per caption")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    prompts = captions(args.prompts)
    results = {}
    for guidance in (float(value) for value in args.guidance.split(",")):
        results[str(guidance)] = accuracy = measure(args.base, guidance, args.steps, prompts, args.images)
        print(f"guidance {guidance:g}: " + ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items()), flush=True)
    print(
        json.dumps({"steps": args.steps, "prompts": len(prompts), "images": args.images, "accuracy": results})
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
