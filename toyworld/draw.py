"""Drawing a Scene: numpy only, supersampled for anti-aliased edges, quantised once at the end.

Every object is described in its own unit frame (x right, y down, about [-1, 1]): its parts are
masks with a base colour and a shading, its *body* is the part a pattern goes on, centred at
`body_centre`. Patterns are measured in the object's pattern unit (its size times `pattern_scale`)
and sized to survive a VAE with 16x16 latents at 64x64 (a stripe ~7 px high, dots ~6 px wide).
Only +, *, sqrt and comparisons touch pixels, so the bytes are the same on every run.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
from PIL import Image

from toyworld.scene import Scene, light_vector
from toyworld.vocabulary import COLOURS, PATTERN_COLOURS, PLAIN

SIZES = (64, 128)
SUPERSAMPLE = {64: 3, 128: 2}
NIGHT_LIGHT = 0.68  # objects at night are lit by the moon, dimmer but still their colour

Mask = np.ndarray  # bool, (H, W)
Shade = np.ndarray  # float, (H, W), multiplies the part's colour


@dataclasses.dataclass(frozen=True)
class Part:
    mask: Mask
    shade: Shade | float
    colour: tuple[float, float, float] | None = None  # None: the object's colour


@dataclasses.dataclass(frozen=True)
class Drawing:
    """An object's parts (painted in order) and its body: where a pattern goes, and its light."""

    parts: list[Part]
    body: Mask
    body_shade: Shade | float


@dataclasses.dataclass(frozen=True)
class Shape:
    """An object class: its nominal radius (fraction of the image), extent and how to draw it."""

    radius: float
    bottom: float  # lowest point in the unit frame (where the shadow goes)
    half_width: float
    pattern_scale: float
    body_centre: tuple[float, float]
    parts: Callable[[np.ndarray, np.ndarray, tuple[float, float]], Drawing]


# ---------------------------------------------------------------- geometry helpers


def _polygon(px: np.ndarray, py: np.ndarray, points: list[tuple[float, float]]) -> Mask:
    """Even-odd point-in-polygon test for every pixel (any simple polygon)."""
    inside = np.zeros(px.shape, dtype=bool)
    for (x1, y1), (x2, y2) in zip(points, points[1:] + points[:1], strict=True):
        if y1 == y2:
            continue
        crosses = (y1 > py) != (y2 > py)
        x_at = (x2 - x1) * (py - y1) / (y2 - y1) + x1
        inside ^= crosses & (px < x_at)
    return inside


def _disc(px: np.ndarray, py: np.ndarray, cx: float, cy: float, r: float) -> Mask:
    return (px - cx) ** 2 + (py - cy) ** 2 <= r * r


def _star_points(cx: float, cy: float, outer: float, inner: float) -> list[tuple[float, float]]:
    points = []
    for k in range(10):
        radius = outer if k % 2 == 0 else inner
        angle = math.pi * k / 5
        points.append((cx + radius * math.sin(angle), cy - radius * math.cos(angle)))
    return points


def _flat_shade(px: np.ndarray, py: np.ndarray, light: tuple[float, float], depth: float = 0.2) -> Shade:
    """A gentle gradient, brighter towards the light."""
    return np.clip(0.86 + depth * (px * light[0] + py * light[1]) * 0.5, 0.6, 1.05)


# ---------------------------------------------------------------- the objects


def _ball(px: np.ndarray, py: np.ndarray, light: tuple[float, float]) -> Drawing:
    body = px * px + py * py <= 1.0
    nz = np.sqrt(np.clip(1.0 - px * px - py * py, 0.0, 1.0))
    lx, ly, lz = light[0] * 0.6, light[1] * 0.6, 0.8
    diffuse = np.clip(px * lx + py * ly + nz * lz, 0.0, 1.0)
    shade = 0.32 + 0.72 * diffuse
    return Drawing([Part(body, shade)], body, shade)


def _ball_glint(px: np.ndarray, py: np.ndarray, light: tuple[float, float]) -> Mask:
    return _disc(px, py, 0.55 * light[0], 0.55 * light[1], 0.16)


def _cube(px: np.ndarray, py: np.ndarray, light: tuple[float, float]) -> Drawing:
    front = (px >= -0.85) & (px <= 0.45) & (py >= -0.45) & (py <= 0.85)
    top = _polygon(px, py, [(-0.85, -0.45), (0.45, -0.45), (0.85, -0.85), (-0.45, -0.85)])
    side = _polygon(px, py, [(0.45, -0.45), (0.85, -0.85), (0.85, 0.45), (0.45, 0.85)])
    lx, ly = light
    front_shade = 0.82 + 0.08 * (-ly)
    parts = [
        Part(front, front_shade),
        Part(top & ~front, 0.92 + 0.12 * max(0.0, -ly)),
        Part(side & ~front & ~top, 0.5 + 0.3 * max(0.0, lx)),
    ]
    return Drawing(parts, front, front_shade)


def _star(px: np.ndarray, py: np.ndarray, light: tuple[float, float]) -> Drawing:
    body = _polygon(px, py, _star_points(0.0, 0.06, 1.0, 0.46))
    shade = _flat_shade(px, py, light)
    return Drawing([Part(body, shade)], body, shade)


def _cup(px: np.ndarray, py: np.ndarray, light: tuple[float, float]) -> Drawing:
    body = _polygon(px, py, [(-0.62, -0.5), (0.62, -0.5), (0.5, 0.85), (-0.5, 0.85)])
    rim = ((px / 0.62) ** 2 + ((py + 0.5) / 0.14) ** 2) <= 1.0
    inside = ((px / 0.52) ** 2 + ((py + 0.5) / 0.1) ** 2) <= 1.0
    ring = (px - 0.62) ** 2 + (py - 0.12) ** 2
    handle = (ring <= 0.36**2) & (ring >= 0.2**2) & (px > 0.5)
    across = np.clip(px / 0.62, -1.0, 1.0)
    cylinder = np.clip(across * light[0] * 0.7 + np.sqrt(1.0 - across * across) * 0.75, 0.0, 1.0)
    shade = 0.45 + 0.6 * cylinder
    parts = [Part(handle & ~body, 0.75), Part(body | rim, shade), Part(inside, 0.42)]
    return Drawing(parts, body & ~rim, shade)


def _tree(px: np.ndarray, py: np.ndarray, light: tuple[float, float]) -> Drawing:
    trunk = (np.abs(px) <= 0.15) & (py >= 0.35) & (py <= 1.0)
    lower = _polygon(px, py, [(0.0, -0.55), (0.78, 0.45), (-0.78, 0.45)])
    upper = _polygon(px, py, [(0.0, -1.0), (0.58, -0.12), (-0.58, -0.12)])
    foliage = lower | upper
    shade = _flat_shade(px, py, light, depth=0.25)
    return Drawing([Part(trunk, 0.9, colour=(112, 72, 40)), Part(foliage, shade)], foliage, shade)


def _car(px: np.ndarray, py: np.ndarray, light: tuple[float, float]) -> Drawing:
    lower = ((np.abs(px) <= 0.9) & (py >= -0.02) & (py <= 0.55)) | (
        (np.abs(px) <= 1.0) & (py >= 0.08) & (py <= 0.45)
    )
    for cx in (-0.9, 0.9):
        for cy in (0.08, 0.45):
            lower |= _disc(px, py, cx, cy, 0.1)
    cabin = _polygon(px, py, [(-0.6, 0.0), (0.6, 0.0), (0.38, -0.45), (-0.36, -0.45)])
    windows = _polygon(px, py, [(-0.5, -0.05), (0.5, -0.05), (0.33, -0.38), (-0.31, -0.38)])
    pillar = np.abs(px - 0.02) <= 0.05
    wheels = _disc(px, py, -0.55, 0.58, 0.24) | _disc(px, py, 0.55, 0.58, 0.24)
    hubs = _disc(px, py, -0.55, 0.58, 0.1) | _disc(px, py, 0.55, 0.58, 0.1)
    shade = _flat_shade(px, py, light)
    parts = [
        Part(cabin | lower, shade),
        Part(windows & ~pillar, 1.0, colour=(176, 206, 226)),
        Part(wheels, 1.0, colour=(28, 28, 30)),
        Part(hubs, 1.0, colour=(165, 165, 170)),
    ]
    return Drawing(parts, lower & ~wheels, shade)


SHAPES: dict[str, Shape] = {
    "ball": Shape(0.23, 1.0, 1.0, 1.0, (0.0, 0.0), _ball),
    "cube": Shape(0.25, 0.85, 0.85, 0.92, (-0.2, 0.2), _cube),
    "star": Shape(0.27, 0.86, 0.95, 0.85, (0.0, 0.08), _star),
    "cup": Shape(0.25, 0.85, 0.98, 0.95, (0.0, 0.18), _cup),
    "tree": Shape(0.27, 1.0, 0.78, 0.88, (0.0, 0.05), _tree),
    "car": Shape(0.3, 0.82, 1.0, 0.72, (0.0, 0.24), _car),
}


# ---------------------------------------------------------------- patterns


def _pattern_mask(pattern: str, qx: np.ndarray, qy: np.ndarray) -> Mask:
    """The pattern in pattern units, centred on the body (qx, qy = 0, 0)."""
    if pattern == "stripe":
        return np.abs(qy) <= 0.26
    if pattern == "dots":
        spacing, radius = 0.72, 0.23
        row = np.floor(qy / spacing + 0.5)
        shift = np.where(row % 2 == 1, spacing / 2, 0.0)
        dx = qx - shift - spacing * np.floor((qx - shift) / spacing + 0.5)
        dy = qy - spacing * row
        return dx * dx + dy * dy <= radius * radius
    if pattern == "star":
        return _polygon(qx, qy, _star_points(0.0, 0.04, 0.56, 0.24))
    raise ValueError(f"no pattern {pattern!r}")


# ---------------------------------------------------------------- backgrounds


def _upsample(coarse: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a small 2-D field to (height, width)."""
    rows = np.linspace(0.0, coarse.shape[0] - 1.0, height)
    cols = np.linspace(0.0, coarse.shape[1] - 1.0, width)
    r0 = np.minimum(np.floor(rows).astype(int), coarse.shape[0] - 2)
    c0 = np.minimum(np.floor(cols).astype(int), coarse.shape[1] - 2)
    fr, fc = (rows - r0)[:, None], (cols - c0)[None, :]
    top = coarse[r0][:, c0] * (1 - fc) + coarse[r0][:, c0 + 1] * fc
    bottom = coarse[r0 + 1][:, c0] * (1 - fc) + coarse[r0 + 1][:, c0 + 1] * fc
    return top * (1 - fr) + bottom * fr


def _gradient(v: np.ndarray, start: float, end: float, top: tuple, bottom: tuple) -> np.ndarray:
    """(rows, 1, 3) colours from `top` at v=start to `bottom` at v=end (v: one value per row)."""
    t = np.clip((v - start) / max(end - start, 1e-6), 0.0, 1.0)[:, None, None]
    return np.asarray(top, dtype=float) * (1 - t) + np.asarray(bottom, dtype=float) * t


def _background(scene: Scene, size: int, rng: np.random.Generator) -> np.ndarray:
    """The background at output resolution, (size, size, 3) float: it has no edges worth
    supersampling but the horizon, which gets a blended row."""
    coords = (np.arange(size, dtype=float) + 0.5) / size
    v = coords
    h = scene.horizon
    noise = _upsample(rng.uniform(-1.0, 1.0, (9, 9)), size, size)[..., None]
    # How much of each row lies below the horizon (0..1): a soft, not a jagged, horizon.
    ground = np.clip((v - h) * size + 0.5, 0.0, 1.0)[:, None, None]

    def split(sky: np.ndarray, land: np.ndarray) -> np.ndarray:
        return sky * (1 - ground) + land * ground

    sky_blue = _gradient(v, 0.0, h, (118, 176, 232), (192, 222, 242))
    if scene.background == "grass":
        blades = _upsample(rng.uniform(-1.0, 1.0, (6, 40)), size, size)[..., None]
        grass = _gradient(v, h, 1.0, (116, 172, 72), (58, 122, 40)) + 16 * noise + 12 * blades
        return split(np.broadcast_to(sky_blue, grass.shape), grass)
    if scene.background == "beach":
        sand = _gradient(v, h + 0.07, 1.0, (236, 216, 168), (214, 188, 134)) + 8 * noise
        sea = np.asarray((42, 118, 188), dtype=float) + 10 * noise
        shore = np.clip((v - h - 0.07) * size + 0.5, 0.0, 1.0)[:, None, None]
        return split(np.broadcast_to(sky_blue, sand.shape), sea * (1 - shore) + sand * shore)
    if scene.background == "snow":
        sky = _gradient(v, 0.0, h, (176, 188, 206), (214, 222, 234))
        snow = _gradient(v, h, 1.0, (236, 242, 250), (222, 230, 244)) + 6 * noise * (0.6, 0.8, 1.0)
        return split(np.broadcast_to(sky, snow.shape), snow)
    if scene.background == "night":
        sky = _gradient(v, 0.0, h, (8, 12, 36), (30, 38, 78)) + np.zeros((1, size, 3))
        land = _gradient(v, h, 1.0, (30, 34, 52), (14, 16, 26)) + 4 * noise
        mx, my = rng.uniform(0.1, 0.9), rng.uniform(0.06, max(0.07, h - 0.12))
        u_grid, v_grid = coords[None, :], coords[:, None]
        moon = np.clip((0.055 - np.sqrt((u_grid - mx) ** 2 + (v_grid - my) ** 2)) * size + 0.5, 0.0, 1.0)
        sky = sky * (1 - moon[..., None]) + np.asarray((232, 230, 200), dtype=float) * moon[..., None]
        for _ in range(14):  # stars: single pixels above the horizon
            sx, sy = int(rng.integers(size)), int(rng.integers(max(1, int(h * size) - 1)))
            sky[sy, sx] = (220, 222, 205)
        return split(sky, land)
    # studio: a seamless backdrop, no horizon, a soft vignette
    grey = rng.uniform(150.0, 200.0)
    distance2 = (coords[None, :] - 0.5) ** 2 + (coords[:, None] - 0.45) ** 2
    backdrop = np.repeat((grey * (1.05 - 0.55 * distance2))[..., None], 3, axis=2)
    return backdrop + _gradient(v, h, 1.0, (0, 0, 0), (18, 18, 18)) + 3 * noise


# ---------------------------------------------------------------- the photo


def draw(scene: Scene, size: int = 64) -> Image.Image:
    """The scene as an RGB photo of size x size pixels (64 or 128)."""
    return Image.fromarray(draw_array(scene, size), mode="RGB")


def draw_array(scene: Scene, size: int = 64) -> np.ndarray:
    """The scene as a (size, size, 3) uint8 array."""
    if size not in SUPERSAMPLE:
        raise ValueError(f"size must be one of {SIZES}, not {size}")
    rng = np.random.Generator(np.random.PCG64(scene.texture_seed))
    image = _background(scene, size, rng)

    shape = SHAPES[scene.object]
    radius = shape.radius * scene.scale
    cx = min(max(scene.x, shape.half_width * radius + 0.02), 1 - shape.half_width * radius - 0.02)
    cy = min(scene.y, 0.98 - shape.bottom * radius)
    light = light_vector(scene.light)
    lit = scene.brightness * (NIGHT_LIGHT if scene.background == "night" else 1.0)

    # The object and its shadow are drawn supersampled, in their bounding box only.
    reach = (shape.half_width + 0.2) * radius
    x0, x1 = _pixel_span(cx - reach, cx + reach, size)
    y0, y1 = _pixel_span(cy - 1.05 * radius, cy + (shape.bottom + 0.2) * radius, size)
    factor = SUPERSAMPLE[size]
    n = size * factor
    v, u = np.meshgrid(
        (np.arange(y0 * factor, y1 * factor, dtype=float) + 0.5) / n,
        (np.arange(x0 * factor, x1 * factor, dtype=float) + 0.5) / n,
        indexing="ij",
    )
    px, py = (u - cx) / radius, (v - cy) / radius

    shadow_x = cx - 0.35 * light[0] * radius
    shadow_y = cy + shape.bottom * radius
    in_shadow = ((u - shadow_x) / (shape.half_width * radius)) ** 2 + (
        (v - shadow_y) / (0.16 * radius)
    ) ** 2 <= 1.0
    darkness = 0.22 if scene.background == "night" else 0.42
    shadow = _box_down(in_shadow.astype(float), factor)[..., None]
    image[y0:y1, x0:x1] *= 1.0 - darkness * shadow

    colour = np.clip(np.asarray(COLOURS[scene.colour], dtype=float) + scene.tint, 0, 255)
    drawing = shape.parts(px, py, light)
    paint = np.zeros((*px.shape, 3))
    cover = np.zeros(px.shape, dtype=bool)
    for part in drawing.parts:
        base = colour if part.colour is None else np.asarray(part.colour, dtype=float)
        paint = np.where(part.mask[..., None], base * (np.asarray(part.shade)[..., None] * lit), paint)
        cover |= part.mask
    if scene.pattern != PLAIN:
        unit = shape.pattern_scale
        qx, qy = (px - shape.body_centre[0]) / unit, (py - shape.body_centre[1]) / unit
        ink = drawing.body & _pattern_mask(scene.pattern, qx, qy)
        pattern_rgb = np.asarray(PATTERN_COLOURS[scene.pattern_colour or "white"], dtype=float)
        body_light = np.asarray(drawing.body_shade)[..., None] * lit  # painted on, in the body's light
        paint = np.where(ink[..., None], pattern_rgb * body_light, paint)
    if scene.object == "ball":
        glint = _ball_glint(px, py, light)
        paint = np.where(glint[..., None], paint * 0.35 + 255 * 0.65 * lit, paint)
    alpha = _box_down(cover.astype(float), factor)[..., None]
    premultiplied = _box_down(paint, factor)  # paint is 0 where nothing covers
    image[y0:y1, x0:x1] = image[y0:y1, x0:x1] * (1 - alpha) + premultiplied

    image += rng.normal(0.0, 2.0, image.shape)  # sensor noise
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _pixel_span(start: float, end: float, size: int) -> tuple[int, int]:
    return max(0, math.floor(start * size)), min(size, math.ceil(end * size))


def _box_down(values: np.ndarray, factor: int) -> np.ndarray:
    """Average factor x factor blocks: (H*f, W*f, ...) -> (H, W, ...)."""
    height, width = values.shape[0] // factor, values.shape[1] // factor
    return values.reshape(height, factor, width, factor, *values.shape[2:]).mean(axis=(1, 3))
