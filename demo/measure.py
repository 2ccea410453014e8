"""What the demo measured with ToyBench's evaluation net: subject fidelity (the fine-tune's
composed images against the uploaded photos, and the photos against each other as the upper
bound), prompt fidelity (does each composed image show the background its prompt named) and the
class prompt's class accuracy before and after training."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from demo.console import say
from demo.journey import DemoResult
from demo.subject import SUBJECT
from toybench.evalnet import EvalNet, embed, load_evalnet
from toybench.metrics import attribute_accuracy, real_photo_fidelity


def _arrays(images: list[bytes]) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for data in images]


def _class_accuracy(net: EvalNet, images: list[bytes]) -> float:
    return attribute_accuracy(net, _arrays(images), {"object": SUBJECT.object})["object"]


def measure(result: DemoResult, photos: list[Path]) -> dict[str, float]:
    net = load_evalnet()
    uploads = [np.asarray(Image.open(path).convert("RGB")) for path in photos]
    composed = [image for images in result.composed.values() for image in _arrays(images)]
    figures = {
        "subject_fidelity": float((embed(net, composed) @ embed(net, uploads).T).mean()),
        "real_photo_fidelity": real_photo_fidelity(net, uploads),
        "prompt_fidelity": float(
            np.mean(
                [
                    attribute_accuracy(net, _arrays(images), {"background": background})["background"]
                    for background, images in result.composed.items()
                ]
            )
        ),
        "class_accuracy_before": _class_accuracy(net, result.class_before),
        "class_accuracy_after": _class_accuracy(net, result.class_after),
    }
    say("\nmeasured with ToyBench's evaluation net (docs/quality.md):")
    say(
        f"  subject fidelity {figures['subject_fidelity']:.3f} "
        f"(the uploads among themselves: {figures['real_photo_fidelity']:.3f}, "
        f"ratio {figures['subject_fidelity'] / figures['real_photo_fidelity']:.2f})"
    )
    shown = f"{figures['prompt_fidelity']:.0%}"
    say(f"  prompt fidelity  {shown} of the composed images show the background asked for")
    say(
        f"  class prompt     {figures['class_accuracy_before']:.0%} balls before training, "
        f"{figures['class_accuracy_after']:.0%} after (prior preservation)"
    )
    return figures
