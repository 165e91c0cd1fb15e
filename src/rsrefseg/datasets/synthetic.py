"""The built-in synthetic dataset: procedurally drawn aerial-like scenes with RefSegRS-style phrases.

Each 512x512 scene has roads (grey bands with lane markings), often a parking area (light grey
with stall lines), buildings (rectangles with coloured roofs), tree crowns (dark-green discs) on
low vegetation (light green), and vehicles: cars, vans and trucks, on the roads and in the stalls.
Every scene is used with several phrases whose masks differ, as in RefSegRS:

    category    "vehicle", "car", "road", "building", "tree", "low vegetation", "parking area", ...
    attribute   "light-duty vehicle" (cars and vans), "heavy-duty vehicle" (trucks), "white car", ...
    relation    "vehicle in the parking area", "vehicle along the road", "building along the road",
                "tree near the building", "tree along the road"

Masks follow the phrase's semantics with RefSegRS's inclusion: "vehicle" is every vehicle,
"vehicle in the parking area" only those in a parking area. Because one image comes with several
phrases of different families (vehicle, road, building, ...), a model that ignores the text
cannot score well. Categories differ in colour, size and shape, so a tiny CNN can tell them apart
even at 64 px.

`generate()` writes the RefSegRS on-disk layout, so the real reader (`read_refsegrs`) is what
reads it back.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import tifffile
from PIL import Image

from rsrefseg.platform.atomic import atomic_dir

from .categories import phrase_category
from .refsegrs import read_refsegrs
from .triplet import DatasetError, Triplet

SIZE = 512
GENERATOR_VERSION = 3
# Object sizes follow RefSegRS's ground sampling (SkyScapes imagery, about 13 cm per pixel): a car
# (4.5 x 2 m) is about 35 x 16 px, a tree crown 4-7 m across 28-52 px, buildings and trees as such.
# Vehicles are drawn VEHICLE_SCALE times that, on roads and parking lots widened to hold them:
# the demo's `tiny` preset sees a 512 px scene at 64 px, where a car at RefSegRS's scale is 4 x 2 px,
# half of one of SAM's 4 x 4 px patches, and the demo learned vehicles at 9-14 % IoU (README,
# Performance; version 2 drew them at scale, version 1 everything at two thirds of it).
VEHICLE_SCALE = 2.0
ROAD_SCALE = 1.5  # lanes (a quarter of the road's width) that a doubled truck still fits
PHRASES_PER_SCENE = 4
SPLIT_SHARES = (("train", 0.6), ("val", 0.1), ("test", 0.3))
MARKER_FILE = "synthetic.json"

# Class map codes: what each pixel shows after painting (the last painter wins).
BACKGROUND, ROAD, PARKING, BUILDING, TREE, VEHICLE = range(6)
VEHICLE_KINDS = ("car", "van", "truck")

# Base colours (RGB). Chosen far apart so that categories stay separable after downsampling.
LOW_VEGETATION_RGB = (118, 158, 74)
ROAD_RGB = (96, 96, 100)
PARKING_RGB = (172, 171, 164)
MARKING_RGB = (236, 236, 230)
TREE_RGB = (30, 78, 34)
ROOF_RGB = {"red": (156, 60, 46), "slate": (64, 70, 102), "beige": (206, 186, 148)}
CAR_RGB = {"white": (240, 240, 240), "red": (205, 30, 28), "blue": (34, 72, 200), "black": (28, 28, 32), "yellow": (236, 204, 34)}
CAR_COLOUR_P = {"white": 0.35, "red": 0.2, "blue": 0.2, "black": 0.1, "yellow": 0.15}
TRAILER_RGB = {"white": (232, 232, 226), "orange": (232, 140, 30), "blue": (50, 110, 196)}
GLASS_RGB = (40, 46, 58)


@dataclass
class SceneObject:
    """One painted instance. `tags` holds its relations: in_parking, on_road, near_road,
    near_building."""

    id: int
    kind: str  # car | van | truck | building | tree
    colour: str = ""
    tags: frozenset = frozenset()


@dataclass(frozen=True)
class PhraseRule:
    """What a phrase refers to: either a class of the class map (stuff: road, vegetation), or the
    instances of some kinds that pass a predicate (things). `family` is the object category,
    named as in RefSegRS; it is the `category` of the phrase's samples."""

    family: str
    cls: Optional[int] = None
    kinds: tuple = ()
    where: Callable[[SceneObject], bool] = lambda obj: True


PHRASES: dict[str, PhraseRule] = {
    # vehicles: category, attribute and relation phrases
    "vehicle": PhraseRule("vehicle", kinds=VEHICLE_KINDS),
    "car": PhraseRule("vehicle", kinds=("car",)),
    "van": PhraseRule("vehicle", kinds=("van",)),
    "truck": PhraseRule("vehicle", kinds=("truck",)),
    "light-duty vehicle": PhraseRule("vehicle", kinds=("car", "van")),
    "heavy-duty vehicle": PhraseRule("vehicle", kinds=("truck",)),
    "white car": PhraseRule("vehicle", kinds=("car",), where=lambda o: o.colour == "white"),
    "red car": PhraseRule("vehicle", kinds=("car",), where=lambda o: o.colour == "red"),
    "blue car": PhraseRule("vehicle", kinds=("car",), where=lambda o: o.colour == "blue"),
    "vehicle in the parking area": PhraseRule("vehicle", kinds=VEHICLE_KINDS, where=lambda o: "in_parking" in o.tags),
    "car in the parking area": PhraseRule("vehicle", kinds=("car",), where=lambda o: "in_parking" in o.tags),
    "vehicle along the road": PhraseRule("vehicle", kinds=VEHICLE_KINDS, where=lambda o: "on_road" in o.tags),
    "car along the road": PhraseRule("vehicle", kinds=("car",), where=lambda o: "on_road" in o.tags),
    # stuff
    "road": PhraseRule("road", cls=ROAD),
    "parking area": PhraseRule("parking area", cls=PARKING),
    "low vegetation": PhraseRule("low vegetation", cls=BACKGROUND),
    # buildings and trees
    "building": PhraseRule("building", kinds=("building",)),
    "building along the road": PhraseRule("building", kinds=("building",), where=lambda o: "near_road" in o.tags),
    "tree": PhraseRule("tree", kinds=("tree",)),
    "tree near the building": PhraseRule("tree", kinds=("tree",), where=lambda o: "near_building" in o.tags),
    "tree along the road": PhraseRule("tree", kinds=("tree",), where=lambda o: "near_road" in o.tags),
}

MIN_MASK_PIXELS = 40  # a phrase whose target is smaller than this is not offered for a scene


@dataclass
class Scene:
    """A drawn scene: the RGB image, what each pixel shows, and the instances."""

    image: np.ndarray  # uint8 [512, 512, 3]
    classes: np.ndarray  # int8 [512, 512], class map codes
    instances: np.ndarray  # int32 [512, 512], 0 = no instance, else SceneObject.id
    objects: list[SceneObject] = field(default_factory=list)

    def mask(self, phrase: str) -> np.ndarray:
        """bool [512, 512]: the pixels `phrase` refers to (visible pixels only)."""
        rule = PHRASES.get(phrase)
        if rule is None:
            raise KeyError(f"unknown synthetic phrase {phrase!r}; known: {', '.join(PHRASES)}")
        if rule.cls is not None:
            return self.classes == rule.cls
        ids = [o.id for o in self.objects if o.kind in rule.kinds and rule.where(o)]
        return np.isin(self.instances, ids) if ids else np.zeros(self.classes.shape, bool)

    def valid_phrases(self) -> list[str]:
        """Phrases whose target is present (at least MIN_MASK_PIXELS pixels)."""
        return [p for p in PHRASES if int(self.mask(p).sum()) >= MIN_MASK_PIXELS]


# --------------------------------------------------------------------------------------------
# Drawing


@dataclass
class _Road:
    px: float
    py: float
    angle: float  # radians, direction of travel
    width: float

    @property
    def d(self) -> tuple[float, float]:
        return math.cos(self.angle), math.sin(self.angle)

    @property
    def n(self) -> tuple[float, float]:
        return -math.sin(self.angle), math.cos(self.angle)

    def offset(self, x, y):
        """Signed distance from the centre line (along the normal)."""
        nx, ny = self.n
        return (x - self.px) * nx + (y - self.py) * ny

    def along(self, x, y):
        dx, dy = self.d
        return (x - self.px) * dx + (y - self.py) * dy


class _Canvas:
    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.rgb = np.empty((SIZE, SIZE, 3), np.float32)
        self.rgb[:] = LOW_VEGETATION_RGB
        self.classes = np.full((SIZE, SIZE), BACKGROUND, np.int8)
        self.instances = np.zeros((SIZE, SIZE), np.int32)
        self.objects: list[SceneObject] = []
        self.yy, self.xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)

    def new_object(self, kind: str, colour: str = "", tags=()) -> SceneObject:
        obj = SceneObject(id=len(self.objects) + 1, kind=kind, colour=colour, tags=frozenset(tags))
        self.objects.append(obj)
        return obj

    def rotated_rect(self, cx: float, cy: float, length: float, width: float, angle: float):
        """Window slices and the local coordinates (u along `angle`, v across) of a rotated
        rectangle, plus its inside mask; everything is computed in the bounding window only."""
        half = 0.5 * math.hypot(length, width) + 1
        y0, y1 = max(int(cy - half), 0), min(int(cy + half) + 1, SIZE)
        x0, x1 = max(int(cx - half), 0), min(int(cx + half) + 1, SIZE)
        if y0 >= y1 or x0 >= x1:
            return None
        window = (slice(y0, y1), slice(x0, x1))
        dx, dy = self.xx[window] - cx, self.yy[window] - cy
        c, s = math.cos(angle), math.sin(angle)
        u, v = dx * c + dy * s, -dx * s + dy * c
        inside = (np.abs(u) <= length / 2) & (np.abs(v) <= width / 2)
        return window, u, v, inside

    def jitter(self, rgb, amount: float = 10.0) -> np.ndarray:
        return np.clip(np.asarray(rgb, np.float32) + self.rng.uniform(-amount, amount, 3), 0, 255)


def make_scene(rng: np.random.Generator | int) -> Scene:
    """Draw one scene. Same seed, same scene (bit for bit)."""
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    canvas = _Canvas(rng)
    roads = _draw_roads(canvas)
    parking = _draw_parking(canvas) if rng.random() < 0.75 else None
    buildings = _draw_buildings(canvas, roads)
    _draw_trees(canvas, roads, buildings)
    _draw_road_vehicles(canvas, roads)
    if parking is not None:
        _draw_parked_vehicles(canvas, parking)
    image = _finish(canvas)
    return Scene(image=image, classes=canvas.classes, instances=canvas.instances, objects=canvas.objects)


def _draw_roads(canvas: _Canvas) -> list[_Road]:
    rng = canvas.rng
    first_angle = rng.choice([0.0, math.pi / 2]) if rng.random() < 0.7 else rng.uniform(0, math.pi)
    roads = [_Road(*rng.uniform(140, 372, 2), angle=float(first_angle), width=float(ROAD_SCALE * rng.uniform(52, 72)))]
    if rng.random() < 0.5:
        angle = first_angle + math.pi / 2 + rng.uniform(-0.2, 0.2)
        roads.append(_Road(*rng.uniform(100, 412, 2), angle=float(angle), width=float(ROAD_SCALE * rng.uniform(48, 64))))
    for road in roads:
        offset = road.offset(canvas.xx, canvas.yy)
        surface = np.abs(offset) <= road.width / 2
        canvas.rgb[surface] = canvas.jitter(ROAD_RGB, 6)
        canvas.classes[surface] = ROAD
    for road in roads:
        # Markings after all surfaces, so that a crossing road does not erase them half-way.
        offset = np.abs(road.offset(canvas.xx, canvas.yy))
        along = road.along(canvas.xx, canvas.yy)
        centre = (offset <= 1.5) & (np.mod(along, 36) < 18)
        edges = (offset >= road.width / 2 - 5) & (offset <= road.width / 2 - 3)
        painted = (centre | edges) & (canvas.classes == ROAD)
        canvas.rgb[painted] = MARKING_RGB
    return roads


@dataclass
class _Parking:
    x0: int
    y0: int
    w: int
    h: int
    stalls: list  # (cx, cy) of each stall; vehicles stand vertically (angle pi/2)


def _draw_parking(canvas: _Canvas) -> Optional[_Parking]:
    rng = canvas.rng
    # Stalls hold a van of VEHICLE_SCALE: 24 px wide and 49 px deep at scale 1, where a lot holds
    # two rows of them; at scale 2, one row.
    stall_w, stall_depth = round(24 * VEHICLE_SCALE), round(49 * VEHICLE_SCALE)
    for _ in range(40):
        w, h = int(rng.integers(150, 240)), int(rng.integers(104, 140))
        x0, y0 = int(rng.integers(0, SIZE - w)), int(rng.integers(0, SIZE - h))
        region = (slice(max(y0 - 4, 0), y0 + h + 4), slice(max(x0 - 4, 0), x0 + w + 4))
        if (canvas.classes[region] != BACKGROUND).any():
            continue
        area = (slice(y0, y0 + h), slice(x0, x0 + w))
        canvas.rgb[area] = canvas.jitter(PARKING_RGB, 6)
        canvas.classes[area] = PARKING
        rows = max(1, (h - 6) // stall_depth)
        depth = (h - 6) // rows
        n = (w - 6) // stall_w
        stalls = []
        for row in range(rows):
            row_y = y0 + 3 + row * depth
            for k in range(n + 1):  # stall separators
                x = x0 + 3 + k * stall_w
                canvas.rgb[row_y + 2 : row_y + depth - 2, x : x + 2] = MARKING_RGB
            stalls += [(x0 + 3 + (k + 0.5) * stall_w + 1, row_y + depth / 2) for k in range(n)]
            if row:  # the line between two rows
                canvas.rgb[row_y - 1 : row_y + 1, x0 + 3 : x0 + 3 + n * stall_w + 2] = MARKING_RGB
        return _Parking(x0, y0, w, h, stalls)
    return None


def _near_road_distance(road: _Road, corners: np.ndarray) -> float:
    """Gap between a convex shape (its corners) and the road band, 0 when they touch."""
    offsets = road.offset(corners[:, 0], corners[:, 1])
    if offsets.min() < 0 < offsets.max():
        return 0.0
    return float(np.abs(offsets).min() - road.width / 2)


def _draw_buildings(canvas: _Canvas, roads: list[_Road]) -> list[tuple]:
    rng = canvas.rng
    placed = []
    target = int(rng.integers(2, 6))
    for _ in range(80):
        if len(placed) == target:
            break
        length, width = float(rng.uniform(48, 112)), float(rng.uniform(40, 80))
        if rng.random() < 0.6:
            # Line it up along a road: the usual street front, and what "along the road" means.
            road = roads[int(rng.integers(len(roads)))]
            t = rng.uniform(-300, 300)
            side = rng.choice([-1.0, 1.0])
            gap = rng.uniform(5, 20) + road.width / 2 + width / 2
            dx, dy = road.d
            nx, ny = road.n
            cx, cy = road.px + t * dx + side * gap * nx, road.py + t * dy + side * gap * ny
            angle = road.angle
        else:
            cx, cy = rng.uniform(40, SIZE - 40, 2)
            angle = float(rng.choice([0.0, math.pi / 2]))
        body = canvas.rotated_rect(cx, cy, length, width, angle)
        if body is None or body[3].sum() < 0.6 * length * width:  # mostly outside the image
            continue
        window, _, _, clearance = canvas.rotated_rect(cx, cy, length + 12, width + 12, angle)
        if (canvas.classes[window][clearance] != BACKGROUND).any():
            continue
        window, u, v, inside = body
        c, s = math.cos(angle), math.sin(angle)
        corners = np.array([[cx + a * c * length / 2 - b * s * width / 2, cy + a * s * length / 2 + b * c * width / 2] for a in (-1, 1) for b in (-1, 1)])
        near = min(_near_road_distance(r, corners) for r in roads) <= 24
        roof = str(rng.choice(list(ROOF_RGB)))
        obj = canvas.new_object("building", roof, tags=["near_road"] if near else [])
        base = canvas.jitter(ROOF_RGB[roof], 12)
        # Gable roof: the two halves lit differently, a ridge line, and a darker eave border.
        colour = np.where((v > 0)[..., None], base * 0.86, base)
        colour = np.where((np.abs(v) < 1.5)[..., None], base * 1.12, colour)
        edge = (np.abs(u) > length / 2 - 2.5) | (np.abs(v) > width / 2 - 2.5)
        colour = np.where(edge[..., None], base * 0.7, colour)
        canvas.rgb[window][inside] = np.clip(colour[inside], 0, 255)
        canvas.classes[window][inside] = BUILDING
        canvas.instances[window][inside] = obj.id
        placed.append((cx, cy, length, width, angle))
    return placed


def _draw_trees(canvas: _Canvas, roads: list[_Road], buildings: list[tuple]) -> None:
    rng = canvas.rng
    for _ in range(int(rng.integers(3, 7))):
        if buildings and rng.random() < 0.5:
            bx, by, bl, bw, _ = buildings[int(rng.integers(len(buildings)))]
            a = rng.uniform(0, 2 * math.pi)
            reach = 0.5 * max(bl, bw) + rng.uniform(14, 30)
            cx, cy = bx + reach * math.cos(a), by + reach * math.sin(a)
        else:
            cx, cy = rng.uniform(0, SIZE, 2)
        for _ in range(int(rng.integers(2, 6))):
            x, y = cx + rng.normal(0, 24), cy + rng.normal(0, 24)
            r = float(rng.uniform(14, 26))
            _draw_crown(canvas, x, y, r, roads, buildings)


def _draw_crown(canvas, x, y, r, roads, buildings) -> None:
    rect = canvas.rotated_rect(x, y, 2 * r, 2 * r, 0.0)
    if rect is None:
        return
    window, u, v, _ = rect
    rho2 = (u * u + v * v) / (r * r)
    disc = (rho2 <= 1.0) & np.isin(canvas.classes[window], (BACKGROUND, TREE))  # never over paved ground
    if disc.sum() < 0.6 * math.pi * r * r:
        return
    tags = []
    for bx, by, bl, bw, ba in buildings:
        c, s = math.cos(ba), math.sin(ba)
        du, dv = (x - bx) * c + (y - by) * s, -(x - bx) * s + (y - by) * c
        if math.hypot(max(abs(du) - bl / 2, 0), max(abs(dv) - bw / 2, 0)) - r <= 18:
            tags.append("near_building")
            break
    if any(abs(float(road.offset(x, y))) - road.width / 2 - r <= 18 for road in roads):
        tags.append("near_road")
    obj = canvas.new_object("tree", tags=tags)
    base = canvas.jitter(TREE_RGB, 8)
    shade = (1.25 - 0.45 * rho2)[..., None]  # lit crown, dark rim: round, unlike anything else
    canvas.rgb[window][disc] = np.clip(base * shade, 0, 255)[disc]
    canvas.classes[window][disc] = TREE
    canvas.instances[window][disc] = obj.id


def _vehicle_kind(rng, allow_truck: bool) -> tuple[str, float, float, str]:
    """kind, length and width (px, VEHICLE_SCALE included), colour."""
    kind = rng.choice(["car", "van", "truck"], p=[0.5, 0.2, 0.3] if allow_truck else [0.8, 0.2, 0.0])
    if kind == "car":
        colour = str(rng.choice(list(CAR_COLOUR_P), p=list(CAR_COLOUR_P.values())))
        length, width = rng.uniform(32, 38), rng.uniform(15, 17)
    elif kind == "van":
        length, width = rng.uniform(42, 48), rng.uniform(18, 20)
        colour = str(rng.choice(["white", "white", "blue"]))
    else:
        length, width = rng.uniform(70, 90), rng.uniform(21, 24)
        colour = str(rng.choice(list(TRAILER_RGB)))
    return str(kind), float(VEHICLE_SCALE * length), float(VEHICLE_SCALE * width), colour


def _place_vehicle(canvas: _Canvas, cx, cy, angle, kind, length, width, colour, ground: int, tags) -> bool:
    body = canvas.rotated_rect(cx, cy, length, width, angle)
    if body is None or body[3].sum() < 0.5 * length * width:  # mostly outside the image
        return False
    clearance = canvas.rotated_rect(cx, cy, length + 6, width + 2, angle)
    window, _, _, inside = clearance
    if (canvas.classes[window][inside] != ground).any() or (canvas.instances[window][inside] != 0).any():
        return False
    window, u, v, inside = body
    obj = canvas.new_object(kind, colour, tags=tags)
    rng = canvas.rng
    if kind == "truck":
        body = np.broadcast_to(canvas.jitter(TRAILER_RGB[colour], 8), u.shape + (3,))
        cab = canvas.jitter(CAR_RGB[str(rng.choice(["red", "blue", "white"]))], 8)
        colour_map = np.where((u > length / 2 - 12 * VEHICLE_SCALE)[..., None], cab, body)
        glass = (u > length / 2 - 6 * VEHICLE_SCALE) & (u < length / 2 - 2 * VEHICLE_SCALE)
    else:
        body = canvas.jitter(CAR_RGB[colour] if colour in CAR_RGB else CAR_RGB["white"], 8)
        colour_map = np.broadcast_to(body, u.shape + (3,))
        front = 0.5 * length
        glass = ((u > front - 0.38 * length) & (u < front - 0.22 * length)) | ((u < -front + 0.16 * length) & (u > -front + 0.06 * length))
    colour_map = np.where((glass & (np.abs(v) < width / 2 - 1.5))[..., None], np.asarray(GLASS_RGB, np.float32), colour_map)
    canvas.rgb[window][inside] = colour_map[inside]
    canvas.classes[window][inside] = VEHICLE
    canvas.instances[window][inside] = obj.id
    return True


def _draw_road_vehicles(canvas: _Canvas, roads: list[_Road]) -> None:
    rng = canvas.rng
    for road in roads:
        dx, dy = road.d
        nx, ny = road.n
        for _ in range(int(rng.integers(2, 8))):
            for _attempt in range(12):
                kind, length, width, colour = _vehicle_kind(rng, allow_truck=True)
                t = rng.uniform(-360, 360)
                lane = rng.choice([-1.0, 1.0]) * road.width / 4
                cx, cy = road.px + t * dx + lane * nx, road.py + t * dy + lane * ny
                angle = road.angle + (math.pi if lane < 0 else 0.0)  # drive on the right
                if _place_vehicle(canvas, cx, cy, angle, kind, length, width, colour, ROAD, ["on_road"]):
                    break


def _draw_parked_vehicles(canvas: _Canvas, parking: _Parking) -> None:
    rng = canvas.rng
    fill = rng.uniform(0.3, 0.85)
    for sx, sy in parking.stalls:
        if rng.random() < fill:
            kind, length, width, colour = _vehicle_kind(rng, allow_truck=False)
            angle = math.pi / 2 * (1 if rng.random() < 0.5 else -1)
            _place_vehicle(canvas, sx, sy + rng.uniform(-2, 2), angle, kind, length, width, colour, PARKING, ["in_parking"])


def _finish(canvas: _Canvas) -> np.ndarray:
    """Texture, uneven lighting and sensor noise, then quantise."""
    rng = canvas.rng
    coarse = rng.normal(0, 1, (17, 17)).astype(np.float32)
    texture = np.asarray(Image.fromarray(coarse).resize((SIZE, SIZE), Image.BILINEAR))
    vegetation = np.isin(canvas.classes, (BACKGROUND, TREE))
    rgb = canvas.rgb
    rgb += (np.where(vegetation, 9.0, 3.0) * texture)[..., None]
    ramp_angle = rng.uniform(0, 2 * math.pi)
    ramp = ((canvas.xx - SIZE / 2) * math.cos(ramp_angle) + (canvas.yy - SIZE / 2) * math.sin(ramp_angle)) / SIZE
    rgb *= (1.0 + rng.uniform(0.03, 0.1) * ramp)[..., None]
    rgb += rng.normal(0, 4.0, rgb.shape).astype(np.float32)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def pick_phrases(scene: Scene, k: int, rng: np.random.Generator) -> list[str]:
    """k phrases of one scene, one per family first (vehicle, road, building, ...) so that the
    same image comes with targets that differ; then more vehicle phrases if families run out."""
    valid = scene.valid_phrases()
    by_family: dict[str, list[str]] = {}
    for phrase in valid:
        by_family.setdefault(PHRASES[phrase].family, []).append(phrase)
    families = list(by_family)
    rng.shuffle(families)
    chosen = [str(rng.choice(by_family[f])) for f in families[:k]]
    rest = [p for p in valid if p not in chosen]
    rng.shuffle(rest)
    masks = [scene.mask(p) for p in chosen]
    for phrase in rest:  # top up with phrases whose masks are new for this image
        if len(chosen) >= k:
            break
        m = scene.mask(phrase)
        if not any(np.array_equal(m, other) for other in masks):
            chosen.append(phrase)
            masks.append(m)
    return chosen[:k]


# --------------------------------------------------------------------------------------------
# Writing the RefSegRS layout


def split_sizes(size: int) -> dict[str, int]:
    """~60/10/30, and never an empty split (prepare refuses empty splits)."""
    if size < 3:
        raise ValueError(f"a synthetic dataset needs at least 3 samples (one per split), got {size}")
    val = max(1, round(size * 0.1))
    test = max(1, round(size * 0.3))
    return {"train": size - val - test, "val": val, "test": test}


def generate(out_dir: str | os.PathLike, size: int = 300, seed: int = 0) -> Path:
    """Write `size` synthetic samples in the RefSegRS layout under `out_dir` and return it.

    Deterministic in (size, seed). A scene (image) never straddles two splits. The folder is
    written beside `out_dir` and renamed into place; an existing `out_dir` is replaced only if it
    is an earlier synthetic set (has synthetic.json) or empty.
    """
    out = Path(out_dir)
    if out.exists() and not (out.is_dir() and ((out / MARKER_FILE).is_file() or not any(out.iterdir()))):
        raise DatasetError(f"refusing to overwrite {out}: it exists and is not a synthetic dataset (no {MARKER_FILE})")
    sizes = split_sizes(size)
    with atomic_dir(out) as staging:
        (staging / "images").mkdir()
        (staging / "masks").mkdir()
        next_id, scene_index = 0, 0
        for split, count in sizes.items():
            lines = []
            while count > 0:
                scene_rng = np.random.default_rng([seed, scene_index])
                scene = make_scene(scene_rng)
                phrases = pick_phrases(scene, min(PHRASES_PER_SCENE, count), scene_rng)
                first_image = None
                for phrase in phrases:
                    sample_id = str(next_id)
                    image_path = staging / "images" / f"{sample_id}.tif"
                    if first_image is None:
                        tifffile.imwrite(image_path, scene.image, photometric="rgb", compression="zlib")
                        first_image = image_path
                    else:
                        _link_or_copy(first_image, image_path)  # same scene: same pixels
                    mask = scene.mask(phrase).astype(np.uint8) * 255
                    tifffile.imwrite(staging / "masks" / f"{sample_id}.tif", mask, compression="zlib")
                    lines.append(f"{sample_id} {phrase}\n")
                    next_id += 1
                count -= len(phrases)
                scene_index += 1
            (staging / f"output_phrase_{split}.txt").write_text("".join(lines), encoding="utf-8")
        (staging / "README.txt").write_text(_readme(size, seed, sizes), encoding="utf-8")
        marker = {"generator": "rsrefseg.datasets.synthetic", "version": GENERATOR_VERSION, "size": size, "seed": seed, "counts": sizes, "scenes": scene_index}
        (staging / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    return out


def synthetic_category(phrase: str) -> str:
    """The generator's own category of a phrase (exact); the RefSegRS rule for a phrase it does
    not know (a hand-edited copy)."""
    rule = PHRASES.get(phrase)
    return rule.family if rule else phrase_category(phrase)


def read_synthetic(root: str | os.PathLike, **options) -> Iterator[Triplet]:
    """A folder `generate` wrote: the RefSegRS reader, with the generator's categories."""
    return read_refsegrs(root, categorize=synthetic_category, **options)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _readme(size: int, seed: int, sizes: dict[str, int]) -> str:
    counts = ", ".join(f"{k} {v}" for k, v in sizes.items())
    return (
        "SYNTHETIC DATA - not real imagery.\n\n"
        f"Procedurally drawn by rsrefseg.datasets.synthetic (size={size}, seed={seed}; {counts}).\n"
        "Aerial-like 512x512 scenes (roads, parking areas, buildings, trees, low vegetation, cars,\n"
        "vans, trucks) with RefSegRS-style phrases, in the RefSegRS layout: images/<id>.tif,\n"
        "masks/<id>.tif (0/255), output_phrase_{train,val,test}.txt. Several ids share one scene\n"
        "(hard-linked image files) with different phrases and masks.\n"
        "Use it for demos and tests; figures measured on it say nothing about real datasets.\n"
    )
