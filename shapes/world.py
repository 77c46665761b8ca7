"""The shapes world: a procedural, deterministic toy world of flat shapes for CPU-scale training and evaluation.

Design (64x64 canonical canvas, built to be learnable by a tiny MLLM whose tokenizer sees 4x4 positions of 16x16 px):

* The canvas is a 4x4 grid of 16-px cells (the tokenizer's patch grid). Each object sits centred in its own cell
  (optional integer jitter), so an object never straddles two tokens and objects never overlap (>= 2 px gap).
* 1-4 objects per scene; vocabulary ``SHAPES`` x ``COLORS`` x ``SIZES`` (5 x 6 x 2). Within a scene every
  (colour, shape) pair is unique, so "the red circle" always names one object, and two objects of the same colour
  are never in neighbouring cells (their gap could close under blur).
* Colours are six saturated, well-separated RGB values (GenEval colour names); backgrounds are light, low-contrast
  flat tones or soft two-tone gradients, all far from every object colour, so colour segmentation is exact.
* Shapes are binary masks sampled at pixel centres with integer arithmetic: no anti-aliasing, bit-exact renders.
  ``shape_mask`` is shared with the detector (``detector.py``), which matches templates against segmented blobs.
* Relations use GenEval's rule (``relative_position``: box centres, 0.1 x (dimA + dimB) margin, |component| > 0.5 of
  the offset norm). Questions and prompts use only relations that hold (or fail) with a clear margin.
* Splits: a scene's split is a function of its object layout (sha256 of the canonical layout; 90/5/5), so train,
  validation and test layouts never coincide, whatever the seeds; ``generate_split`` draws and filters.

Everything here is a pure function of its inputs (scenes, seeds); texts are seeded from the scene id.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image

from metrics.geneval import relative_position, revised_offset as _revised

__all__ = [
    "SHAPES", "COLORS", "COLOR_NAMES", "SIZES", "BACKGROUND_TONES", "BACKGROUND_KINDS", "RELATIONS", "NUMBER_WORDS",
    "GENEVAL_TAGS", "QUESTION_TYPES", "SPLITS",
    "WorldConfig", "DEFAULT_CONFIG", "Obj", "Background", "Scene",
    "shape_mask", "render", "make_scene", "scene_split", "generate_split", "layout_key",
    "relative_position", "relation_strength",
    "with_article", "make_plural", "captions", "questions", "t2i_prompts", "color_prompt", "scene_record",
    "geneval_prompts", "enumerate_prompts", "scene_for_prompt",
]

# ------------------------------------------------------------------------------------------------------------------
# Vocabulary
# ------------------------------------------------------------------------------------------------------------------

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
# Saturated colours; min pairwise RGB distance ~89 (red-orange), every one >= 160 from any background tone.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 40),
    "orange": (240, 120, 10),
    "yellow": (240, 215, 25),
    "green": (35, 160, 60),
    "blue": (35, 75, 215),
    "purple": (140, 50, 190),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
SIZES: dict[str, int] = {"small": 10, "large": 14}  # side of the object's square box, in px at 64x64
# Light, low-contrast background tones (greys, beiges, pale tints).
BACKGROUND_TONES: tuple[tuple[int, int, int], ...] = (
    (236, 236, 236), (222, 222, 222), (242, 236, 222), (230, 222, 205), (222, 230, 238), (236, 226, 230),
    (226, 236, 226), (214, 214, 218),
)
BACKGROUND_KINDS: tuple[str, ...] = ("flat", "hgrad", "vgrad", "dgrad")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")  # GenEval's words
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                                 "ten")  # GenEval's create_prompts.py list
GENEVAL_TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
QUESTION_TYPES: tuple[str, ...] = ("color", "shape", "size", "count", "exists", "position")
SPLITS: tuple[str, ...] = ("train", "validation", "test")
_SPLIT_BUCKETS = {"test": (0, 50), "validation": (50, 100), "train": (100, 1000)}  # of sha256 % 1000


@dataclass(frozen=True)
class WorldConfig:
    canvas: int = 64               # canonical canvas side (positions and sizes are in these pixels)
    grid: int = 4                  # cells per side; cell = canvas // grid
    max_objects: int = 4
    min_objects: int = 1
    jitter: int = 0                # max integer offset of an object's centre inside its cell (0 = centred)
    repeat_prob: float = 0.35      # chance that a scene repeats one shape 2+ times (counting variety)
    position_margin: float = 0.1   # clear-margin for relations used in questions/prompts (see relation_strength)

    @property
    def cell(self) -> int:
        return self.canvas // self.grid


DEFAULT_CONFIG = WorldConfig()


@dataclass(frozen=True)
class Obj:
    """One object. ``x, y``: integer centre in canonical pixels; ``size``: a key of ``SIZES``."""
    shape: str
    color: str
    size: str
    x: int
    y: int

    @property
    def side(self) -> int:
        return SIZES[self.size]

    @property
    def box(self) -> tuple[int, int, int, int]:
        """``(x1, y1, x2, y2)`` with exclusive end, in canonical pixels (= the rendered pixel bbox at 64 px)."""
        h = self.side // 2
        return (self.x - h, self.y - h, self.x - h + self.side, self.y - h + self.side)

    def name(self, with_size: bool = False) -> str:
        return f"{self.size} {self.color} {self.shape}" if with_size else f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Background:
    kind: str = "flat"                                 # one of BACKGROUND_KINDS
    c0: tuple[int, int, int] = BACKGROUND_TONES[0]
    c1: tuple[int, int, int] = BACKGROUND_TONES[0]


@dataclass(frozen=True)
class Scene:
    id: str
    objects: tuple[Obj, ...]
    background: Background = field(default_factory=Background)
    canvas: int = 64

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "canvas": self.canvas, "background": asdict(self.background),
                "objects": [asdict(o) for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Scene":
        bg = d.get("background") or {}
        return cls(id=d["id"], canvas=int(d.get("canvas", 64)),
                   background=Background(bg.get("kind", "flat"), tuple(bg.get("c0", BACKGROUND_TONES[0])),
                                         tuple(bg.get("c1", bg.get("c0", BACKGROUND_TONES[0])))),
                   objects=tuple(Obj(o["shape"], o["color"], o["size"], int(o["x"]), int(o["y"]))
                                 for o in d["objects"]))


# ------------------------------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------------------------------

@lru_cache(maxsize=4096)
def _shape_mask_cached(shape: str, h: int, w: int) -> np.ndarray:
    # Pixel (i, j) centre in box units: a = (2i+1)/(2w), b = (2j+1)/(2h); all tests in exact integer arithmetic.
    di = np.abs(2 * np.arange(w) + 1 - w)[None, :]   # |2i+1-w|  (= 2w |a - 1/2|)
    dj = np.abs(2 * np.arange(h) + 1 - h)[:, None]   # |2j+1-h|
    if shape == "square":
        m = np.ones((h, w), bool)
    elif shape == "circle":        # (a-.5)^2 + (b-.5)^2 <= 1/4
        m = di * di * h * h + dj * dj * w * w <= w * w * h * h
    elif shape == "diamond":       # |a-.5| + |b-.5| <= 1/2
        m = di * h + dj * w <= w * h
    elif shape == "triangle":      # apex up: |a-.5| <= b_bottom/2, b_bottom = (j+1)/h (pixel's lower edge)
        m = di * h <= (np.arange(h) + 1)[:, None] * w
    elif shape == "cross":         # plus sign, arm width 0.4 of the box
        m = (5 * di <= 2 * w) | (5 * dj <= 2 * h)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    m = np.broadcast_to(m, (h, w)).copy()
    m.setflags(write=False)
    return m


def shape_mask(shape: str, h: int, w: int | None = None) -> np.ndarray:
    """Boolean ``(h, w)`` mask of ``shape`` filling its box (touches all four sides). Read-only, cached."""
    return _shape_mask_cached(shape, int(h), int(h if w is None else w))


def _background(bg: Background, size: int) -> np.ndarray:
    c0 = np.asarray(bg.c0, np.float64)
    c1 = np.asarray(bg.c1, np.float64)
    t = (np.arange(size) + 0.5) / size
    if bg.kind == "flat":
        w = np.zeros((size, size))
    elif bg.kind == "hgrad":
        w = np.broadcast_to(t[None, :], (size, size))
    elif bg.kind == "vgrad":
        w = np.broadcast_to(t[:, None], (size, size))
    elif bg.kind == "dgrad":
        w = (t[None, :] + t[:, None]) / 2
    else:
        raise ValueError(f"unknown background kind {bg.kind!r}")
    img = c0 + (c1 - c0) * w[..., None]
    return np.floor(img + 0.5).astype(np.uint8)


def render_array(scene: Scene, size: int | None = None) -> np.ndarray:
    """``(size, size, 3)`` uint8 render. At the canonical size the render is bit-exact; at other sizes each object's
    box is scaled and rounded to whole pixels (exact for integer scale factors)."""
    size = int(size or scene.canvas)
    img = _background(scene.background, size)
    k = size / scene.canvas
    for o in scene.objects:
        x1, y1, x2, y2 = (int(np.floor(v * k + 0.5)) for v in o.box)
        m = shape_mask(o.shape, y2 - y1, x2 - x1)
        # clip to the canvas (objects are always inside for generated scenes; stay safe for user scenes)
        cx1, cy1, cx2, cy2 = max(x1, 0), max(y1, 0), min(x2, size), min(y2, size)
        if cx2 <= cx1 or cy2 <= cy1:
            continue
        sub = m[cy1 - y1:cy2 - y1, cx1 - x1:cx2 - x1]
        img[cy1:cy2, cx1:cx2][sub] = COLORS[o.color]
    return img


def render(scene: Scene, size: int | None = None) -> Image.Image:
    """Render ``scene`` as an RGB ``PIL.Image`` (default: the canonical 64x64)."""
    return Image.fromarray(render_array(scene, size), "RGB")


# ------------------------------------------------------------------------------------------------------------------
# Geometry (GenEval's relative-position rule)
# ------------------------------------------------------------------------------------------------------------------

def relation_strength(box_a, box_b, threshold: float = 0.1) -> dict[str, float]:
    """Signed distance of each relation's test value from GenEval's 0.5 cut (> 0: holds). Used to keep only
    relations that are clearly true or clearly false (robust to a pixel of drift in generated images)."""
    offset, revised = _revised(box_a, box_b, threshold)
    norm = float(np.linalg.norm(offset))
    if norm == 0 or np.all(np.abs(revised) < 1e-3):
        return {r: -0.5 for r in RELATIONS}
    dx, dy = revised / norm
    return {"left of": -dx - 0.5, "right of": dx - 0.5, "above": -dy - 0.5, "below": dy - 0.5}


def _clear_relations(a: Obj, b: Obj, margin: float) -> tuple[list[str], list[str]]:
    """(relations of a w.r.t. b that clearly hold, relations that clearly do not hold)."""
    s = relation_strength(a, b)
    return [r for r in RELATIONS if s[r] > margin], [r for r in RELATIONS if s[r] < -margin]


# ------------------------------------------------------------------------------------------------------------------
# Scene generation and splits
# ------------------------------------------------------------------------------------------------------------------

def layout_key(objects: Iterable[Obj]) -> str:
    """Canonical text of an object layout (order-free; background excluded)."""
    return "|".join(sorted(f"{o.shape},{o.color},{o.size},{o.x},{o.y}" for o in objects))


def _sha_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def scene_split(scene_or_objects: Scene | Iterable[Obj]) -> str:
    """The split a layout belongs to (``train`` 90 %, ``validation`` 5 %, ``test`` 5 %), from its sha256."""
    objs = scene_or_objects.objects if isinstance(scene_or_objects, Scene) else scene_or_objects
    bucket = _sha_int("shapes-world-split:" + layout_key(objs)) % 1000
    for name, (lo, hi) in _SPLIT_BUCKETS.items():
        if lo <= bucket < hi:
            return name
    raise AssertionError(bucket)


def _scene_id(objects: Sequence[Obj], bg: Background) -> str:
    text = layout_key(objects) + "#" + json.dumps(asdict(bg), sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _neighbours(c1: int, c2: int, grid: int) -> bool:
    return max(abs(c1 % grid - c2 % grid), abs(c1 // grid - c2 // grid)) <= 1


def _cell_center(cell: int, cfg: WorldConfig, rng: np.random.Generator | None) -> tuple[int, int]:
    cx = (cell % cfg.grid) * cfg.cell + cfg.cell // 2
    cy = (cell // cfg.grid) * cfg.cell + cfg.cell // 2
    if cfg.jitter and rng is not None:
        # keep the largest object inside its cell with >= 1 px to spare
        j = min(cfg.jitter, (cfg.cell - max(SIZES.values())) // 2 - 1) if cfg.cell > max(SIZES.values()) + 2 else 0
        if j > 0:
            cx += int(rng.integers(-j, j + 1))
            cy += int(rng.integers(-j, j + 1))
    return cx, cy


def _random_background(rng: np.random.Generator) -> Background:
    kind = BACKGROUND_KINDS[int(rng.integers(len(BACKGROUND_KINDS)))]
    i0 = int(rng.integers(len(BACKGROUND_TONES)))
    if kind == "flat":
        return Background(kind, BACKGROUND_TONES[i0], BACKGROUND_TONES[i0])
    i1 = int(rng.integers(len(BACKGROUND_TONES) - 1))
    i1 += i1 >= i0
    return Background(kind, BACKGROUND_TONES[i0], BACKGROUND_TONES[i1])


def _assign_colors(shapes: Sequence[str], cells: Sequence[int], rng: np.random.Generator, cfg: WorldConfig,
                   fixed: Sequence[str | None] | None = None) -> list[str] | None:
    """Colours such that (colour, shape) pairs are unique and same-colour objects are not in neighbouring cells.
    ``fixed[i]`` pins object i's colour. Returns None if the random attempt fails."""
    colors: list[str] = []
    for i, (s, c) in enumerate(zip(shapes, cells)):
        if fixed is not None and fixed[i] is not None:
            cands = [fixed[i]]
        else:
            cands = [COLOR_NAMES[k] for k in rng.permutation(len(COLOR_NAMES))]
        ok = None
        for col in cands:
            if any(col == colors[k] and (shapes[k] == s or _neighbours(cells[k], c, cfg.grid)) for k in range(i)):
                continue
            ok = col
            break
        if ok is None:
            return None
        colors.append(ok)
    return colors


def make_scene(rng: np.random.Generator, config: WorldConfig = DEFAULT_CONFIG, n_objects: int | None = None,
               scene_id: str | None = None) -> Scene:
    """Draw one random scene. Deterministic given the state of ``rng`` (a ``numpy.random.Generator``)."""
    cfg = config
    n_cells = cfg.grid * cfg.grid
    for _ in range(1000):
        n = int(n_objects) if n_objects is not None else int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
        cells = [int(c) for c in rng.choice(n_cells, size=n, replace=False)]
        shapes = [SHAPES[int(k)] for k in rng.integers(len(SHAPES), size=n)]
        if n >= 2 and rng.random() < cfg.repeat_prob:
            m = int(rng.integers(2, n + 1))
            s = SHAPES[int(rng.integers(len(SHAPES)))]
            for k in rng.choice(n, size=m, replace=False):
                shapes[int(k)] = s
        colors = _assign_colors(shapes, cells, rng, cfg)
        if colors is None:
            continue
        sizes = [tuple(SIZES)[int(k)] for k in rng.integers(len(SIZES), size=n)]
        objs = []
        for s, col, sz, cell in zip(shapes, colors, sizes, cells):
            x, y = _cell_center(cell, cfg, rng)
            objs.append(Obj(s, col, sz, x, y))
        objs.sort(key=lambda o: (o.y, o.x))  # reading order
        bg = _random_background(rng)
        return Scene(scene_id or _scene_id(objs, bg), tuple(objs), bg, cfg.canvas)
    raise RuntimeError("could not draw a valid scene")


def generate_split(split: str, n: int, seed: int = 0, config: WorldConfig = DEFAULT_CONFIG) -> list[Scene]:
    """``n`` distinct scenes of ``split`` (``train`` / ``validation`` / ``test``), deterministic in ``seed``.

    Scenes are drawn from a stream seeded by ``(seed, split)`` and kept only if their layout hashes to ``split``
    (``scene_split``), so the splits' layouts are disjoint for any seeds; duplicates within the split are dropped."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}")
    rng = np.random.default_rng([int(seed), SPLITS.index(split), 0x5A7E5])
    out: list[Scene] = []
    seen: set[str] = set()
    while len(out) < n:
        sc = make_scene(rng, config)
        key = layout_key(sc.objects)
        if key in seen or scene_split(sc.objects) != split:
            continue
        seen.add(key)
        out.append(sc)
    return out


# ------------------------------------------------------------------------------------------------------------------
# Text: captions, questions, GenEval-style prompts
# ------------------------------------------------------------------------------------------------------------------

def with_article(name: str) -> str:
    """GenEval's ``with_article``: "an" before a vowel letter."""
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def make_plural(name: str) -> str:
    """GenEval's ``make_plural``: +"es" after a final "s", else +"s"."""
    return f"{name}es" if name[-1] in "s" else f"{name}s"


def _join(items: Sequence[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _rng_for(scene: Scene, purpose: str) -> np.random.Generator:
    return np.random.default_rng(_sha_int(f"{purpose}:{scene.id}:{layout_key(scene.objects)}"))


def captions(scene: Scene) -> list[str]:
    """Captions, most detailed first: objects with size and colour (reading order), objects with colour, a count
    summary by shape, and (for 2+ objects) one clear spatial relation in GenEval's words."""
    objs = list(scene.objects)
    caps = [
        "a photo of " + _join([with_article(o.name(with_size=True)) for o in objs]),
        "a photo of " + _join([with_article(o.name()) for o in objs]),
    ]
    counts: dict[str, int] = {}
    for o in objs:
        counts[o.shape] = counts.get(o.shape, 0) + 1
    caps.append("a photo of " + _join([with_article(s) if c == 1 else f"{NUMBER_WORDS[c]} {make_plural(s)}"
                                       for s, c in counts.items()]))
    if len(objs) >= 2:
        rng = _rng_for(scene, "caption")
        pairs = [(a, b) for a in objs for b in objs if a is not b]
        for k in rng.permutation(len(pairs)):
            a, b = pairs[int(k)]
            yes, _ = _clear_relations(a, b, 0.1)
            if yes:
                rel = yes[int(rng.integers(len(yes)))]
                caps.append(f"a photo of {with_article(a.name())} {rel} {with_article(b.name())}")
                break
    return caps


def _q(question: str, answer: str, qtype: str) -> dict[str, str]:
    return {"question": question, "answer": answer, "type": qtype}


# Wordings of each question kind. Index 0 is the canonical wording (the scored test set); training draws from all
# of WORDINGS; PARAPHRASES is a fixed held-out set, worded unlike any training template, that measures whether the
# model reads the question or keys on its template (never in training, nor in the text tokenizer's corpus). The
# training wordings do use the paraphrases' words (hue, form, item, thing, little, total, picture) in other
# sentences: a model that has never seen a word cannot map it, which is a vocabulary gap, not a wording one.
WORDINGS: dict[str, tuple[str, ...]] = {
    "color": ("What color is the {shape}?", "What colour is the {shape}?", "Which color is the {shape}?",
              "What is the color of the {shape}?", "Tell me the color of the {shape}.", "What hue is the {shape}?",
              "Which hue does the {shape} have?"),
    "shape": ("What shape is the {color} object?", "Which shape is {color}?", "What is the {color} shape?",
              "Name the shape of the {color} object.", "Which form is the {color} item?",
              "What kind of shape is the {color} thing?"),
    "size": ("What size is the {color} {shape}?", "Is the {color} {shape} small or large?",
             "How big is the {color} {shape}?", "Is the {color} {shape} big or small?",
             "Is the {color} {shape} large or little?"),
    "count_shape": ("How many {shapes} are there?", "How many {shapes} do you see?", "Count the {shapes}.",
                    "What is the number of {shapes}?", "What is the total of {shapes}?",
                    "How many {shapes} does the picture show?"),
    "count_color": ("How many {color} objects are there?", "How many {color} shapes do you see?",
                    "Count the {color} objects.", "How many {color} items do you see?",
                    "How many things in the image are {color}?"),
    "count_all": ("How many objects are there?", "How many shapes are in the image?", "Count the objects.",
                  "How many items are there overall?", "What is the number of things in the picture?"),
    "exists": ("Is there {a_object}?", "Do you see {a_object}?", "Does the image contain {a_object}?",
               "Can you find {a_object}?", "Is {a_object} anywhere in the picture?"),
    "position": ("Is the {a} {relation} the {b}?", "Is the {a} located {relation} the {b}?",
                 "Would you say the {a} is {relation} the {b}?", "Does the {a} sit {relation} the {b}?",
                 "In the image, is the {a} {relation} the {b}?"),
}
PARAPHRASES: dict[str, str] = {
    "color": "Can you tell what hue the {shape} has?",
    "shape": "The {color} thing: what form does it take?",
    "size": "Would you call the {color} {shape} little or big?",
    "count_shape": "Give me the total of {shapes} in this picture.",
    "count_color": "In this picture, how many items are {color}?",
    "count_all": "What's the overall number of items here?",
    "exists": "Can you spot {a_object} anywhere?",
    "position": "In the picture, does the {a} appear {relation} the {b}?",
}
WORDING_STYLES = ("canonical", "varied", "paraphrase")


def questions(scene: Scene, config: WorldConfig = DEFAULT_CONFIG,
              wording: str = "canonical") -> list[dict[str, str]]:
    """Short-answer questions with their answers, as ``{"question", "answer", "type"}``.

    Types: ``color`` ("What color is the circle?": only for a shape present once), ``shape`` ("What shape is the
    red object?": only for a colour present once), ``size`` ("What size is the red circle?": small/large),
    ``count`` (objects of a shape / of a colour / in total; answers are digits "0".."4"), ``exists`` (one "yes" and
    one "no" per scene; the "no" is a near miss: a present shape in another colour or a present colour on another
    shape), ``position`` (one "yes" and, when possible, one "no": "Is the red circle left of the blue square?",
    decided by GenEval's rule with a clear margin). Answers are already in normal form
    (``vqa_metric.normalize_answer(a) == a``). Deterministic per scene.

    ``wording``: ``canonical`` (``WORDINGS[kind][0]``), ``varied`` (a training wording drawn per question) or
    ``paraphrase`` (the held-out ``PARAPHRASES``). The questions asked and their answers do not depend on it."""
    if wording not in WORDING_STYLES:
        raise ValueError(f"wording must be one of {WORDING_STYLES}, got {wording!r}")
    rng = _rng_for(scene, "questions")
    word_rng = _rng_for(scene, "wording")  # its own stream: the questions asked do not depend on the wording
    objs = list(scene.objects)
    out: list[dict[str, str]] = []
    shape_count: dict[str, int] = {}
    color_count: dict[str, int] = {}
    for o in objs:
        shape_count[o.shape] = shape_count.get(o.shape, 0) + 1
        color_count[o.color] = color_count.get(o.color, 0) + 1

    def pick(seq):
        return seq[int(rng.integers(len(seq)))]

    def ask(kind: str, answer: str, qtype: str, **fields) -> None:
        if wording == "paraphrase":
            template = PARAPHRASES[kind]
        else:
            options = WORDINGS[kind]
            template = options[int(word_rng.integers(len(options)))] if wording == "varied" else options[0]
        out.append(_q(template.format(**fields), answer, qtype))

    uniq_shape = [o for o in objs if shape_count[o.shape] == 1]
    if uniq_shape:
        o = pick(uniq_shape)
        ask("color", o.color, "color", shape=o.shape)
    uniq_color = [o for o in objs if color_count[o.color] == 1]
    if uniq_color:
        o = pick(uniq_color)
        ask("shape", o.shape, "shape", color=o.color)
    o = pick(objs)
    ask("size", o.size, "size", color=o.color, shape=o.shape)

    # counting: by shape (a present one 3 times in 4), then by colour (same) or in total
    absent_shapes = [s for s in SHAPES if s not in shape_count]
    s = pick(absent_shapes) if absent_shapes and rng.random() < 0.25 else pick(sorted(shape_count))
    ask("count_shape", str(shape_count.get(s, 0)), "count", shapes=make_plural(s))
    if rng.random() < 0.5:
        absent_colors = [c for c in COLOR_NAMES if c not in color_count]
        c = pick(absent_colors) if absent_colors and rng.random() < 0.25 else pick(sorted(color_count))
        ask("count_color", str(color_count.get(c, 0)), "count", color=c)
    else:
        ask("count_all", str(len(objs)), "count")

    # existence, balanced
    present = {(o.color, o.shape) for o in objs}
    o = pick(objs)
    ask("exists", "yes", "exists", a_object=with_article(o.color + " " + o.shape))
    ref = pick(objs)
    misses = [(c, ref.shape) for c in COLOR_NAMES if (c, ref.shape) not in present]
    misses += [(ref.color, s) for s in SHAPES if (ref.color, s) not in present]
    c, s = pick(misses)
    ask("exists", "no", "exists", a_object=with_article(c + " " + s))

    # relative position, balanced when possible
    if len(objs) >= 2:
        pairs = [(a, b) for a in objs for b in objs if a is not b]
        order = [pairs[int(k)] for k in rng.permutation(len(pairs))]
        asked_yes = asked_no = False
        for a, b in order:
            yes, no = _clear_relations(a, b, config.position_margin)
            if not asked_yes and yes:
                ask("position", "yes", "position", a=a.name(), relation=pick(yes), b=b.name())
                asked_yes = True
            elif not asked_no and no:
                ask("position", "no", "position", a=a.name(), relation=pick(no), b=b.name())
                asked_no = True
            if asked_yes and asked_no:
                break
    return out


def _meta(tag: str, include: list[dict], prompt: str, exclude: list[dict] | None = None) -> dict[str, Any]:
    d: dict[str, Any] = {"tag": tag, "include": include}
    if exclude is not None:
        d["exclude"] = exclude
    d["prompt"] = prompt
    return d


def _prompt_single(s: str) -> dict[str, Any]:
    return _meta("single_object", [{"class": s, "count": 1}], f"a photo of {with_article(s)}")


def _prompt_two(a: str, b: str) -> dict[str, Any]:
    return _meta("two_object", [{"class": a, "count": 1}, {"class": b, "count": 1}],
                 f"a photo of {with_article(a)} and {with_article(b)}")


def _prompt_count(s: str, n: int) -> dict[str, Any]:
    return _meta("counting", [{"class": s, "count": n}], f"a photo of {NUMBER_WORDS[n]} {make_plural(s)}",
                 exclude=[{"class": s, "count": n + 1}])


def color_prompt(s: str, c: str) -> dict[str, Any]:
    """GenEval's ``colors`` metadata for one ``c``-coloured ``s``: "a photo of a red circle"."""
    return _meta("colors", [{"class": s, "count": 1, "color": c}], f"a photo of {with_article(c)} {s}")


def _prompt_position(a: str, rel: str, b: str) -> dict[str, Any]:
    # GenEval: include = [B, A with position (rel, 0)], prompt "a photo of A rel B"
    return _meta("position", [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [rel, 0]}],
                 f"a photo of {with_article(a)} {rel} {with_article(b)}")


def _prompt_color_attr(a: str, ca: str, b: str, cb: str) -> dict[str, Any]:
    return _meta("color_attr", [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}],
                 f"a photo of {with_article(ca)} {a} and {with_article(cb)} {b}")


def t2i_prompts(scene: Scene, config: WorldConfig = DEFAULT_CONFIG) -> list[dict[str, Any]]:
    """Every GenEval-style prompt (metadata in GenEval's ``evaluation_metadata.jsonl`` schema, ``class`` = shape)
    that ``scene`` satisfies under GenEval's rules: single_object / two_object for shapes present; counting for a
    shape present 2-4 times (exact, with GenEval's ``exclude`` of count+1); colors / position / color_attr only for
    shapes present once (GenEval checks the single most confident detection); position only for relations that hold
    with a clear margin."""
    objs = list(scene.objects)
    by_shape: dict[str, list[Obj]] = {}
    for o in objs:
        by_shape.setdefault(o.shape, []).append(o)
    shapes = [s for s in SHAPES if s in by_shape]
    uniq = [s for s in shapes if len(by_shape[s]) == 1]
    out = [_prompt_single(s) for s in shapes]
    out += [_prompt_two(a, b) for a in shapes for b in shapes if a != b]
    out += [_prompt_count(s, len(by_shape[s])) for s in shapes if 2 <= len(by_shape[s]) <= 4]
    out += [color_prompt(s, by_shape[s][0].color) for s in uniq]
    for a in uniq:
        for b in uniq:
            if a != b:
                yes, _ = _clear_relations(by_shape[a][0], by_shape[b][0], config.position_margin)
                out += [_prompt_position(a, rel, b) for rel in yes]
    out += [_prompt_color_attr(a, by_shape[a][0].color, b, by_shape[b][0].color)
            for a in uniq for b in uniq if a != b and by_shape[a][0].color != by_shape[b][0].color]
    return out


def scene_record(scene: Scene, config: WorldConfig = DEFAULT_CONFIG) -> dict[str, Any]:
    """Everything about one scene as JSON-ready data (the image itself: ``render(scene)``)."""
    d = scene.to_dict()
    d.update(split=scene_split(scene), captions=captions(scene), questions=questions(scene, config),
             t2i_prompts=t2i_prompts(scene, config))
    return d


def enumerate_prompts(tag: str) -> list[dict[str, Any]]:
    """The complete prompt space of one GenEval tag in this world (deterministic order)."""
    if tag == "single_object":
        return [_prompt_single(s) for s in SHAPES]
    if tag == "two_object":
        return [_prompt_two(a, b) for a in SHAPES for b in SHAPES if a != b]
    if tag == "counting":
        return [_prompt_count(s, n) for s in SHAPES for n in (2, 3, 4)]
    if tag == "colors":
        return [color_prompt(s, c) for s in SHAPES for c in COLOR_NAMES]
    if tag == "position":
        return [_prompt_position(a, r, b) for a in SHAPES for r in RELATIONS for b in SHAPES if a != b]
    if tag == "color_attr":
        return [_prompt_color_attr(a, ca, b, cb) for a in SHAPES for ca in COLOR_NAMES for b in SHAPES
                for cb in COLOR_NAMES if a != b and ca != cb]
    raise ValueError(f"unknown GenEval tag {tag!r}")


def geneval_prompts(n_per_tag: int = 100, seed: int = 43) -> list[dict[str, Any]]:
    """A GenEval-style evaluation suite for this world, drawn like GenEval's ``create_prompts.py``: every
    single-object prompt, then ``n_per_tag`` random draws for each other tag (counting 2-4; two distinct shapes;
    two distinct colours for color_attr), de-duplicated keeping the first occurrence. Deterministic in ``seed``.
    (The prompt space is small, e.g. 20 two-object prompts, so tags with fewer distinct prompts simply end up with
    all of them.)"""
    rng = np.random.default_rng(seed)
    ns, nc = len(SHAPES), len(COLOR_NAMES)
    samples = [_prompt_single(s) for s in SHAPES]
    for _ in range(n_per_tag):
        a, b = rng.choice(ns, size=2, replace=False)
        samples.append(_prompt_two(SHAPES[a], SHAPES[b]))
    for _ in range(n_per_tag):
        s = int(rng.choice(ns))
        samples.append(_prompt_count(SHAPES[s], int(rng.integers(2, 4, endpoint=True))))
    for _ in range(n_per_tag):
        s = int(rng.choice(ns))
        samples.append(color_prompt(SHAPES[s], COLOR_NAMES[int(rng.choice(nc))]))
    for _ in range(n_per_tag):
        a, b = rng.choice(ns, size=2, replace=False)
        samples.append(_prompt_position(SHAPES[a], RELATIONS[int(rng.choice(len(RELATIONS)))], SHAPES[b]))
    for _ in range(n_per_tag):
        a, b = rng.choice(ns, size=2, replace=False)
        ca, cb = rng.choice(nc, size=2, replace=False)
        samples.append(_prompt_color_attr(SHAPES[a], COLOR_NAMES[ca], SHAPES[b], COLOR_NAMES[cb]))
    out, seen = [], set()
    for s in samples:
        key = json.dumps(s, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out


def scene_for_prompt(metadata: dict[str, Any], rng: np.random.Generator, config: WorldConfig = DEFAULT_CONFIG,
                     n_distractors: int = 0) -> Scene:
    """A random scene that satisfies GenEval metadata (any tag): exactly ``count`` objects per ``include`` item (in
    the required colour; at a position that satisfies the relation with a clear margin), nothing an ``exclude`` item
    forbids, plus ``n_distractors`` objects of shapes the prompt does not mention. Unspecified colours, sizes,
    cells and the background are random. Raises ``ValueError`` for metadata no scene can satisfy under GenEval's
    rules (e.g. two include items of the same class with different colours, or more than 4 objects)."""
    cfg = config
    include = list(metadata.get("include", []))
    exclude = list(metadata.get("exclude", []))
    by_class: dict[str, int] = {}
    for it in include:
        if it["class"] not in SHAPES:
            raise ValueError(f"unknown class {it['class']!r}")
        by_class[it["class"]] = max(by_class.get(it["class"], 0), int(it["count"]))
    # every include item takes the *first* count objects of its class: items of one class share objects
    item_objs: list[list[int]] = []  # indices into the object list
    shapes: list[str] = []
    fixed_color: list[str | None] = []
    first_idx: dict[str, int] = {}
    for s, n in by_class.items():
        first_idx[s] = len(shapes)
        shapes += [s] * n
        fixed_color += [None] * n
    for it in include:
        idx = list(range(first_idx[it["class"]], first_idx[it["class"]] + int(it["count"])))
        item_objs.append(idx)
        if "color" in it:
            if it["color"] not in COLORS:
                raise ValueError(f"colour {it['color']!r} is not in this world")
            for k in idx:
                if fixed_color[k] not in (None, it["color"]):
                    raise ValueError("conflicting colours for the same objects")
                fixed_color[k] = it["color"]
    for ex in exclude:
        if by_class.get(ex["class"], 0) >= int(ex["count"]):
            raise ValueError("include and exclude contradict each other")
    mentioned = set(by_class) | {ex["class"] for ex in exclude}
    others = [s for s in SHAPES if s not in mentioned]
    if n_distractors and not others:
        raise ValueError("no shape left for distractors")
    n_main = len(shapes)
    if n_main + n_distractors > cfg.max_objects or n_main == 0:
        raise ValueError(f"prompt needs {n_main + n_distractors} objects; the world allows 1..{cfg.max_objects}")
    n_cells = cfg.grid * cfg.grid
    for _ in range(2000):
        all_shapes = shapes + [others[int(k)] for k in rng.integers(len(others), size=n_distractors)] \
            if n_distractors else list(shapes)
        n = len(all_shapes)
        cells = [int(c) for c in rng.choice(n_cells, size=n, replace=False)]
        colors = _assign_colors(all_shapes, cells, rng, cfg, fixed_color + [None] * (n - n_main))
        if colors is None:
            continue
        sizes = [tuple(SIZES)[int(k)] for k in rng.integers(len(SIZES), size=n)]
        objs = [Obj(s, c, z, *_cell_center(cell, cfg, rng)) for s, c, z, cell in zip(all_shapes, colors, sizes, cells)]
        ok = True
        for it, idx in zip(include, item_objs):
            if "position" in it:
                rel, target = it["position"]
                for k in idx:
                    for t in item_objs[int(target)]:
                        if relation_strength(objs[k], objs[t])[rel] <= cfg.position_margin:
                            ok = False
        if not ok:
            continue
        objs.sort(key=lambda o: (o.y, o.x))
        bg = _random_background(rng)
        return Scene(_scene_id(objs, bg), tuple(objs), bg, cfg.canvas)
    raise ValueError(f"could not build a scene for {metadata.get('prompt')!r}")
