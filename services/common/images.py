"""Image bytes in and out of the services: untrusted uploads decoded safely, results encoded.

Decoding checks the pixel count from the header before any pixel is decoded (a small PNG can
claim 100k x 100k pixels), applies the EXIF orientation (phone photos are stored sideways), and
turns anything unreadable into InvalidArgument naming the request field. PIL's global
`Image.MAX_IMAGE_PIXELS` is left alone: the limit is the caller's, per call.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
from dreambooth_client.vocabulary import DEFAULT_IMAGE_FORMAT
from PIL import Image, ImageOps, UnidentifiedImageError

from services.common.errors import InvalidArgument

# How each ImageFormat of the vocabulary is written: (PIL format, save options, takes `quality`).
# A format added to the proto needs an entry here (tests/unit/test_vocabulary.py checks).
ENCODERS: Mapping[str, tuple[str, Mapping[str, Any], bool]] = {
    "png": ("PNG", {"optimize": False, "compress_level": 6}, False),  # no metadata chunks
    "jpeg": ("JPEG", {"optimize": False, "progressive": False}, True),
    "webp": ("WEBP", {"method": 4, "exact": False}, True),
}
ENCODE_FORMATS = tuple(ENCODERS)
# What people upload (the JPEG opener also yields MPO, how Pillow names many phone JPEGs).
# Every other container is refused without being parsed.
DECODE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")


def encode_image(
    image: Image.Image, fmt: str = DEFAULT_IMAGE_FORMAT, quality: int = 90, field: str = "output_format"
) -> bytes:
    """RGB bytes in `fmt` (a vocabulary image format); same image and arguments => same bytes."""
    if fmt not in ENCODERS:
        raise InvalidArgument(
            field, f"unsupported image format {fmt!r}; expected one of {', '.join(ENCODE_FORMATS)}"
        )
    if not 1 <= quality <= 100:
        raise InvalidArgument("quality", f"must be between 1 and 100, got {quality}")
    pil_format, options, lossy = ENCODERS[fmt]
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    out = io.BytesIO()
    rgb.save(out, format=pil_format, **options, **({"quality": quality} if lossy else {}))
    return out.getvalue()


def image_size(data: bytes, field: str = "image") -> tuple[int, int]:
    """(width, height) from the header alone: cheap, decodes no pixel."""
    if not data:
        raise InvalidArgument(field, "image is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=DECODE_FORMATS) as image:
                return image.size
    except Image.DecompressionBombError as err:
        raise InvalidArgument(field, f"image is too large: {err}") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as err:
        raise InvalidArgument(field, f"not a readable PNG, JPEG, WebP, BMP or GIF image ({err})") from err


def decode_image(data: bytes, max_pixels: int, field: str = "image") -> Image.Image:
    """A fully loaded RGB image from untrusted bytes, upright per EXIF, at most `max_pixels`."""
    if not data:
        raise InvalidArgument(field, "image is empty")
    try:
        with warnings.catch_warnings():
            # Our own limit below is the one that matters; PIL's global warning is noise here.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=DECODE_FORMATS)  # reads the header only
            width, height = image.size
            if width <= 0 or height <= 0:
                raise InvalidArgument(field, f"image has an empty size {width}x{height}")
            if width * height > max_pixels:
                raise InvalidArgument(
                    field, f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
                )
            image.load()
            upright = ImageOps.exif_transpose(image) or image
            return _to_rgb(upright)
    except InvalidArgument:
        raise
    except Image.DecompressionBombError as err:
        raise InvalidArgument(field, f"image is too large: {err}") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as err:
        # Truncated or corrupt files surface as any of these from Pillow's decoders.
        raise InvalidArgument(field, f"not a readable PNG, JPEG, WebP, BMP or GIF image ({err})") from err


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB; transparent areas become white (product shots on transparent backgrounds)."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        return _wide_gray_to_rgb(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def _wide_gray_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit (and 32-bit integer or float) grayscale scaled to 8 bits. Pillow's own convert
    clips these to 0..255, which turns a 16-bit photo almost white."""
    values = np.asarray(image, dtype=np.float64)
    full_scale = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
    if image.mode == "F":
        full_scale = 1.0 if values.max(initial=0) <= 1.0 else full_scale
    gray = np.clip(np.rint(values * (255.0 / full_scale)), 0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")  # a 2-D uint8 array is mode L
