"""One picture of the demo's result: labelled rows of images (the uploads, the base model's class
prompt, the fine-tune's composed prompts, the class prompt after training)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

CELL = 96  # every image is shown at this size (64x64 samples are scaled up, pixels kept sharp)
LABEL_WIDTH = 300
PAD = 6


def write_contact_sheet(path: Path, rows: Sequence[tuple[str, Sequence[bytes]]]) -> Path:
    """rows: (label, encoded images). Returns `path` (a PNG)."""
    columns = max(len(images) for _, images in rows)
    width = LABEL_WIDTH + columns * (CELL + PAD) + PAD
    height = len(rows) * (CELL + PAD) + PAD
    sheet = Image.new("RGB", (width, height), (250, 250, 248))
    draw = ImageDraw.Draw(sheet)
    for row, (label, images) in enumerate(rows):
        top = PAD + row * (CELL + PAD)
        draw.text((PAD, top + CELL // 2 - 6), label, fill=(20, 20, 20))
        for column, data in enumerate(images):
            image = Image.open(io.BytesIO(data)).convert("RGB").resize((CELL, CELL), Image.Resampling.NEAREST)
            sheet.paste(image, (LABEL_WIDTH + PAD + column * (CELL + PAD), top))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, format="PNG")
    return path
