"""Scenes of coloured shapes: sampling, rendering (PIL), and true sentences about them.

A scene is a list of objects on a 3x3 grid of cells, each object a (shape, colour, size, cell).
Captions name every object group with its attributes, count and (for single objects) position,
so a model has to see colour, shape, size, count and layout to match images and texts.
"""
from __future__ import annotations

import io
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = {"red": (215, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 215), "yellow": (235, 200, 30),
           "purple": (135, 60, 180), "orange": (245, 130, 20), "black": (25, 25, 25)}
SIZES = {"small": 0.45, "large": 0.85}  # fraction of a grid cell
CELLS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
BACKGROUNDS = ((235, 235, 235), (245, 238, 220), (222, 234, 245), (250, 250, 250))
NUMBERS = ("zero", "one", "two", "three", "four")


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    cell: int

    @property
    def kind(self) -> tuple[str, str, str]:
        return self.shape, self.colour, self.size


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: int

    def groups(self) -> dict[tuple[str, str, str], list[Obj]]:
        out: dict = {}
        for o in self.objects:
            out.setdefault(o.kind, []).append(o)
        return out

    def count(self, shape: str | None = None, colour: str | None = None) -> int:
        return sum((shape is None or o.shape == shape) and (colour is None or o.colour == colour)
                   for o in self.objects)


def sample_scene(rng: random.Random) -> Scene:
    """1-3 object kinds, each shown 1-3 times (mostly once), on distinct cells."""
    n_kinds = rng.choices((1, 2, 3), weights=(3, 4, 2))[0]
    cells = rng.sample(range(9), 9)
    kinds = set()
    while len(kinds) < n_kinds:
        kinds.add((rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(SIZES))))
    objects = []
    for kind in sorted(kinds):
        for _ in range(rng.choices((1, 2, 3), weights=(6, 2, 1))[0]):
            if cells:
                objects.append(Obj(*kind, cells.pop()))
    return Scene(tuple(objects), rng.randrange(len(BACKGROUNDS)))


def render(scene: Scene, size: int, rng: random.Random) -> Image.Image:
    """Draw at 2x and downsample, which gives anti-aliased edges at small sizes."""
    big = 2 * size
    img = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    cell = big / 3
    for o in scene.objects:
        row, col = divmod(o.cell, 3)
        r = cell * SIZES[o.size] * rng.uniform(0.9, 1.05) / 2
        slack = cell / 2 - r
        cx = (col + 0.5) * cell + rng.uniform(-slack, slack) * 0.6
        cy = (row + 0.5) * cell + rng.uniform(-slack, slack) * 0.6
        fill = COLOURS[o.colour]
        if o.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif o.shape == "square":
            s = r * 0.88
            draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
        elif o.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
        elif o.shape == "diamond":
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
        else:  # cross
            t = r * 0.35
            draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
            draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    return img.resize((size, size), Image.LANCZOS)


def png_bytes(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


# ----- language ---------------------------------------------------------------------------------
def _where(cell: int, rng: random.Random) -> str:
    name = CELLS[cell]
    if name == "center":
        return rng.choice(("in the center", "in the middle"))
    if " " in name:
        return rng.choice(("in the ", "at the ")) + name
    return {"top": "at the top", "bottom": "at the bottom"}.get(name) or rng.choice(("on the ", "at the ")) + name


def _group_phrase(objs: list[Obj], rng: random.Random, with_size: bool) -> str:
    o = objs[0]
    attrs = f"{o.size} {o.colour}" if with_size else o.colour
    if len(objs) == 1:
        return f"a {attrs} {o.shape} {_where(o.cell, rng)}"
    return f"{NUMBERS[len(objs)]} {attrs} {o.shape}{'es' if o.shape == 'cross' else 's'}"


def caption(scene: Scene, rng: random.Random) -> str:
    """One true description; repeated calls give different wordings and orders."""
    groups = list(scene.groups().values())
    rng.shuffle(groups)
    with_size = rng.random() < 0.8
    phrases = [_group_phrase(g, rng, with_size) for g in groups]
    body = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    prefix = rng.choice(("", "", "a picture of ", "an image with ", "there is ", "this shows ", "we see "))
    return prefix + body


def question(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """A (question, answer) pair that the scene answers."""
    singles = [g[0] for g in scene.groups().values() if len(g) == 1]
    while True:
        kind = rng.randrange(5)
        if kind == 0:
            shape = rng.choice(SHAPES)
            return f"how many {shape}{'es' if shape == 'cross' else 's'} are there?", NUMBERS[min(scene.count(shape), 4)]
        if kind == 1:
            shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
            return f"is there a {colour} {shape}?", "yes" if scene.count(shape, colour) else "no"
        if kind == 2:
            shapes = [s for s in SHAPES if len({o.colour for o in scene.objects if o.shape == s}) == 1]
            if shapes:
                s = rng.choice(shapes)
                return f"what color is the {s}?", next(o.colour for o in scene.objects if o.shape == s)
        if kind == 3:
            colours = [c for c in COLOURS if len({o.shape for o in scene.objects if o.colour == c}) == 1]
            if colours:
                c = rng.choice(colours)
                return f"what shape is the {c} object?", next(o.shape for o in scene.objects if o.colour == c)
        if kind == 4 and singles:
            o = rng.choice(singles)
            return f"where is the {o.colour} {o.shape}?", CELLS[o.cell]


def statement(left: Scene, right: Scene, rng: random.Random) -> tuple[str, bool]:
    """An NLVR2-style sentence about an image pair and whether it is true."""
    shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
    plural = shape + ("es" if shape == "cross" else "s")
    kind = rng.randrange(5)
    if kind == 0:
        side, scene = rng.choice((("left", left), ("right", right)))
        return f"the {side} image contains a {colour} {shape}", scene.count(shape, colour) > 0
    if kind == 1:
        return f"both images contain a {shape}", left.count(shape) > 0 and right.count(shape) > 0
    if kind == 2:
        return f"there are more {plural} in the left image than in the right image", left.count(shape) > right.count(shape)
    if kind == 3:
        return f"exactly one image contains a {colour} object", (left.count(colour=colour) > 0) != (right.count(colour=colour) > 0)
    n = rng.randrange(1, 4)
    return f"the two images together contain {NUMBERS[n]} {plural if n > 1 else shape}", left.count(shape) + right.count(shape) == n
