"""Untrusted image bytes decode safely; results encode deterministically."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from PIL import Image

from services.common.errors import InvalidArgument
from services.common.images import decode_image, encode_image

LIMIT = 4096 * 4096


def halves(width: int = 40, height: int = 20) -> Image.Image:
    """Left half red, right half blue: shows which way an image was turned."""
    image = Image.new("RGB", (width, height), (255, 0, 0))
    image.paste((0, 0, 255), (width // 2, 0, width, height))
    return image


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, followed by a tiny (truncated) body."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_encode_is_deterministic_and_decodes_back(fmt: str) -> None:
    image = halves()
    data = encode_image(image, fmt)
    assert data == encode_image(halves(), fmt)
    decoded = decode_image(data, LIMIT)
    assert decoded.mode == "RGB" and decoded.size == (40, 20)
    assert Image.open(io.BytesIO(data)).format == {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[fmt]
    red = decoded.getpixel((5, 10))
    assert red[0] > 200 and red[2] < 60


def test_png_round_trip_is_lossless() -> None:
    image = Image.frombytes("RGB", (16, 16), bytes(range(256)) * 3)
    assert decode_image(encode_image(image, "png"), LIMIT).tobytes() == image.tobytes()


def test_encode_rejects_unknown_format_and_quality() -> None:
    with pytest.raises(InvalidArgument) as err:
        encode_image(halves(), "gif", field="output_format")
    assert err.value.field == "output_format"
    with pytest.raises(InvalidArgument):
        encode_image(halves(), "jpeg", quality=0)


@pytest.mark.parametrize("data", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\0" * 20])
def test_junk_is_invalid_argument_naming_the_field(data: bytes) -> None:
    with pytest.raises(InvalidArgument) as err:
        decode_image(data, LIMIT, field="images[2]")
    assert err.value.field == "images[2]"


def test_truncated_image_is_refused() -> None:
    data = encode_image(halves(400, 400), "png")
    with pytest.raises(InvalidArgument, match="readable"):
        decode_image(data[: len(data) // 2], LIMIT)


def test_unsupported_container_is_refused() -> None:
    out = io.BytesIO()
    halves().save(out, format="TIFF")
    with pytest.raises(InvalidArgument):
        decode_image(out.getvalue(), LIMIT)


def test_pixel_limit_is_checked_from_the_header_before_decoding() -> None:
    before = Image.MAX_IMAGE_PIXELS
    # 100M pixels claimed, a few bytes of body: refused on the size alone, not for being truncated.
    with pytest.raises(InvalidArgument, match="10000x10000"):
        decode_image(png_claiming(10_000, 10_000), LIMIT)
    # Far beyond anything: refused too (PIL's own bomb check may fire first; same error type).
    with pytest.raises(InvalidArgument):
        decode_image(png_claiming(100_000, 100_000), LIMIT)
    with pytest.raises(InvalidArgument, match="64x64"):
        decode_image(encode_image(halves(64, 64), "png"), max_pixels=1000)
    assert before == Image.MAX_IMAGE_PIXELS  # the limit is per call, never global


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display rotated 90 degrees clockwise
    out = io.BytesIO()
    halves(40, 20).save(out, format="JPEG", quality=95, exif=exif)
    upright = decode_image(out.getvalue(), LIMIT)
    assert upright.size == (20, 40)
    top, bottom = upright.getpixel((10, 5)), upright.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60  # the stored left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_transparency_becomes_white_and_palettes_rgb() -> None:
    image = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    image.paste((0, 255, 0, 255), (0, 0, 4, 8))
    decoded = decode_image(encode_image_rgba(image), LIMIT)
    assert decoded.mode == "RGB"
    assert decoded.getpixel((6, 4)) == (255, 255, 255)
    assert decoded.getpixel((1, 4)) == (0, 255, 0)
    out = io.BytesIO()
    halves().convert("P").save(out, format="GIF")
    assert decode_image(out.getvalue(), LIMIT).mode == "RGB"


def encode_image_rgba(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()
