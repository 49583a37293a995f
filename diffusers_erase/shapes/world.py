"""The shapes world: a seeded procedural renderer, its concepts, and captions with synonyms.

Every image holds one object (a shape with a colour and a rendering style) on a plain background.
Because the renderer knows the ground truth exactly, a small classifier can check what a generated
image shows, so concept erasure can be measured on a CPU.

Everything here is deterministic given a seed: `render(Scene)` has no randomness at all, and
`sample_scene(rng)` / `sample_caption(scene, rng)` draw only from the generator they are given.
"""

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 32
# Shapes are drawn at 4x and box-filtered down, which gives clean anti-aliased edges.
_SUPERSAMPLE = 4

SHAPES = ("circle", "square", "triangle", "star", "heart", "cross")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
BACKGROUNDS = ("white", "black", "gray", "beige")
STYLES = ("solid", "striped", "outlined")

# The classifier heads and the evaluator iterate over this table.
ATTRIBUTES = {"shape": SHAPES, "color": COLORS, "style": STYLES, "background": BACKGROUNDS}
CONCEPTS = SHAPES + COLORS + STYLES + BACKGROUNDS

# Words used in captions for each concept. The first is the concept's name (the "direct" word);
# the rest are synonyms. Both are used in training, so the model learns that they mean the same
# thing, and erasure can be checked for residue: erasing "circle" must also remove "a red disk".
SYNONYMS = {
    "circle": ("circle", "disk", "round shape"),
    "square": ("square", "box", "four-sided tile"),
    "triangle": ("triangle", "three-sided shape", "wedge"),
    "star": ("star", "pentagram", "starburst"),
    "heart": ("heart", "love symbol", "valentine"),
    "cross": ("cross", "plus sign", "plus symbol"),
    "red": ("red", "crimson", "scarlet"),
    "green": ("green", "emerald", "lime"),
    "blue": ("blue", "azure", "cobalt"),
    "yellow": ("yellow", "golden", "lemon"),
    "purple": ("purple", "violet", "lilac"),
    "orange": ("orange", "tangerine", "amber"),
    "white": ("white", "snowy", "ivory"),
    "black": ("black", "dark", "jet"),
    "gray": ("gray", "grey", "slate"),
    "beige": ("beige", "cream", "sand"),
}

# Styles are phrased three ways: an adjective before the colour ("a striped red star"),
# a phrase before the article ("a line drawing of a red star"), or a phrase after the shape
# ("a red star with stripes"). Direct wording first, synonyms after.
STYLE_WORDS = {
    "solid": {"adjective": ("solid", "filled", "flat"), "prefix": (), "suffix": ("filled in",)},
    "striped": {"adjective": ("striped", "stripy", "banded"), "prefix": (), "suffix": ("with stripes",)},
    "outlined": {
        "adjective": ("outlined", "hollow", "contour"),
        "prefix": ("line drawing of",),
        "suffix": ("drawn as an outline",),
    },
}
# Direct and synonym wordings of each style, for the evaluator.
STYLE_DIRECT = {"solid": "solid", "striped": "striped", "outlined": "outlined"}
STYLE_SYNONYMS = {
    "solid": ("filled", "flat"),
    "striped": ("stripy", "with stripes"),
    "outlined": ("line drawing of", "hollow"),
}

# Base RGB of each colour; each image jitters it a little so the classifier cannot rely on exact
# values and the model sees some variety.
_RGB = {
    "red": (215, 35, 35),
    "green": (40, 165, 60),
    "blue": (35, 75, 220),
    "yellow": (240, 205, 25),
    "purple": (140, 45, 185),
    "orange": (245, 130, 25),
}
_BACKGROUND_RGB = {"white": (245, 245, 245), "black": (22, 22, 22), "gray": (128, 128, 128), "beige": (222, 203, 160)}


@dataclass(frozen=True)
class Scene:
    """Everything needed to render one image. Geometry is in pixels of the 32x32 image."""

    shape: str
    color: str
    style: str
    background: str
    x: float  # object centre
    y: float
    radius: float  # half the object's extent
    angle: float  # rotation in degrees
    color_jitter: tuple = (0, 0, 0)
    background_jitter: int = 0

    def labels(self) -> dict:
        return {"shape": self.shape, "color": self.color, "style": self.style, "background": self.background}


def sample_scene(rng: np.random.Generator, **fixed) -> Scene:
    """Draw a random scene; keyword arguments (shape=, color=, style=, background=) pin attributes."""
    attrs = {name: fixed.get(name) or values[rng.integers(len(values))] for name, values in ATTRIBUTES.items()}
    radius = float(rng.uniform(8.5, 12.5))
    # Keep the whole object inside the frame, with a pixel of margin.
    margin = radius + 1.0
    x = float(rng.uniform(margin, IMAGE_SIZE - margin))
    y = float(rng.uniform(margin, IMAGE_SIZE - margin))
    # Limited rotation: a square turned 45 degrees reads as a diamond and a cross as an "x".
    angle = float(rng.uniform(-30.0, 30.0))
    color_jitter = tuple(int(v) for v in rng.integers(-12, 13, size=3))
    background_jitter = int(rng.integers(-10, 11))
    return Scene(**attrs, x=x, y=y, radius=radius, angle=angle, color_jitter=color_jitter,
                 background_jitter=background_jitter)


def _outline(shape: str) -> np.ndarray:
    """The shape's polygon in unit coordinates (extent about [-1, 1]), y pointing down."""
    if shape == "circle":
        t = np.linspace(0, 2 * np.pi, 72, endpoint=False)
        return np.stack([np.cos(t), np.sin(t)], 1)
    if shape == "square":
        s = 0.85
        return np.array([[-s, -s], [s, -s], [s, s], [-s, s]])
    if shape == "triangle":
        t = np.deg2rad([-90, 30, 150])
        return np.stack([np.cos(t), np.sin(t)], 1) * 1.05 + [0, 0.15]
    if shape == "star":
        t = np.deg2rad(np.arange(10) * 36 - 90)
        r = np.where(np.arange(10) % 2 == 0, 1.05, 0.45)
        return np.stack([r * np.cos(t), r * np.sin(t)], 1) + [0, 0.08]
    if shape == "heart":
        t = np.linspace(0, 2 * np.pi, 72, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
        return np.stack([x, -y], 1) / 16.5 + [0, 0.1]
    if shape == "cross":
        a, b = 0.95, 0.32
        return np.array([[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b], [b, a], [-b, a], [-b, b],
                         [-a, b], [-a, -b], [-b, -b]])
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _clip_rgb(rgb) -> tuple:
    return tuple(int(min(255, max(0, v))) for v in rgb)


def render(scene: Scene) -> Image.Image:
    """Render a scene to a 32x32 RGB image. Pure function of the scene."""
    big = IMAGE_SIZE * _SUPERSAMPLE
    background = _clip_rgb(np.array(_BACKGROUND_RGB[scene.background]) + scene.background_jitter)
    color = _clip_rgb(np.array(_RGB[scene.color]) + np.array(scene.color_jitter))

    # 1. The object's polygon in supersampled pixel coordinates.
    theta = np.deg2rad(scene.angle)
    rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    points = _outline(scene.shape) @ rotation.T * scene.radius + [scene.x, scene.y]
    points = [tuple(p) for p in (points * _SUPERSAMPLE)]

    # 2. A mask of the filled shape, and of its outline for the outlined style.
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    if scene.style == "outlined":
        draw.polygon(points, outline=255, width=int(2.2 * _SUPERSAMPLE))
    else:
        draw.polygon(points, fill=255)
    mask = np.asarray(mask, dtype=np.float32) / 255.0

    # 3. Fill colour per pixel: stripes alternate the colour with a pale tint of it, so the
    #    silhouette stays visible on any background. Stripes turn with the object.
    fill = np.empty((big, big, 3), dtype=np.float32)
    fill[:] = color
    if scene.style == "striped":
        yy, xx = np.mgrid[0:big, 0:big].astype(np.float32) / _SUPERSAMPLE
        across = (xx - scene.x) * np.sin(theta) + (yy - scene.y) * np.cos(theta)
        # 3 coloured, 3 pale pixels: the VAE maps 4x4 pixels to one latent, and thinner stripes
        # are lost in its round trip.
        period = 6.0
        pale = np.array(color, dtype=np.float32) * 0.3 + 255 * 0.7
        fill[np.floor(across / (period / 2)) % 2 == 1] = pale

    image = np.empty((big, big, 3), dtype=np.float32)
    image[:] = background
    image = image * (1 - mask[..., None]) + fill * mask[..., None]
    image = Image.fromarray(np.round(image).astype(np.uint8))
    return image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


def render_batch(scenes) -> np.ndarray:
    """Render scenes into a uint8 array of shape (n, 32, 32, 3)."""
    return np.stack([np.asarray(render(scene)) for scene in scenes])


# --- captions -----------------------------------------------------------------------------------

def _article(next_word: str) -> str:
    return "an" if next_word[0] in "aeiou" else "a"


def caption(shape_word=None, color_word=None, style=None, background_word=None, style_form="adjective",
            style_word=None, template=0) -> str:
    """Assemble a caption from words; any part may be None (omitted).

    `style_form` is "adjective", "prefix" or "suffix" (see STYLE_WORDS); `style_word` is the
    wording for that form. `template` picks one of a few framings of the same content.
    """
    noun = shape_word or "shape"
    words = []
    if style is not None and style_form == "adjective":
        words.append(style_word)
    if color_word:
        words.append(color_word)
    words.append(noun)
    phrase = " ".join(words)
    phrase = f"{_article(phrase)} {phrase}"
    if style is not None and style_form == "prefix":
        phrase = f"{_article(style_word)} {style_word} {phrase}"
    if style is not None and style_form == "suffix":
        phrase = f"{phrase} {style_word}"
    if background_word:
        phrase = [f"{phrase} on a {background_word} background", f"{phrase} on {background_word}",
                  f"{phrase} against a {background_word} backdrop"][template % 3]
    framing = ["{}", "a picture of {}", "an image showing {}", "{}, simple icon"][template // 3 % 4]
    return framing.format(phrase)


def sample_caption(scene: Scene, rng: np.random.Generator, synonym_rate: float = 0.35,
                   empty_rate: float = 0.1) -> str:
    """A random training caption for a scene: random template, omissions and synonyms.

    About `empty_rate` of captions are empty, which trains the unconditional branch used by
    classifier-free guidance.
    """
    if rng.random() < empty_rate:
        return ""

    def word(concept):
        options = SYNONYMS[concept]
        if rng.random() < synonym_rate:
            return options[1 + rng.integers(len(options) - 1)]
        return options[0]

    # The shape is named most of the time; other attributes are dropped more often, so the model
    # also learns to fill them in itself.
    shape_word = word(scene.shape) if rng.random() < 0.92 else None
    color_word = word(scene.color) if rng.random() < 0.85 else None
    background_word = word(scene.background) if rng.random() < 0.6 else None
    style, style_form, style_word = None, "adjective", None
    # Solid is the default look, so it is named less often than the two marked styles.
    if rng.random() < (0.4 if scene.style == "solid" else 0.85):
        style = scene.style
        forms = [f for f in ("adjective", "prefix", "suffix") if STYLE_WORDS[style][f]]
        style_form = forms[rng.integers(len(forms))]
        options = STYLE_WORDS[style][style_form]
        if style_form == "adjective" and rng.random() >= synonym_rate:
            style_word = options[0]
        else:
            style_word = options[rng.integers(len(options))]
    return caption(shape_word, color_word, style, background_word, style_form, style_word,
                   template=int(rng.integers(12)))


# --- prompts for evaluation ---------------------------------------------------------------------

def _style_phrasing(style: str, wording: str) -> tuple:
    """(style_form, style_word) for a wording listed in STYLE_DIRECT / STYLE_SYNONYMS."""
    for form, options in STYLE_WORDS[style].items():
        if wording in options:
            return form, wording
    raise ValueError(f"{wording!r} is not a wording of style {style!r}")


def concept_attribute(concept: str) -> str:
    """Which attribute ("shape", "color", "style", "background") a concept name belongs to."""
    for name, values in ATTRIBUTES.items():
        if concept in values:
            return name
    raise ValueError(f"unknown concept {concept!r}; expected one of {[v for vs in ATTRIBUTES.values() for v in vs]}")


@dataclass(frozen=True)
class Prompt:
    """An evaluation prompt and the attribute values it asks for, e.g. {"shape": "circle", "color": "red"}."""

    text: str
    asks: dict


def concept_prompts(concept: str, synonyms: bool = False) -> list:
    """Prompts (as `Prompt`s) that ask for `concept`: by its name (direct), or only through synonyms.

    The other attributes vary over a fixed, small set so each prompt list is deterministic:
    shapes are asked in every colour, colours on every shape, styles and backgrounds on every
    shape with a cycling colour. Only the concept itself is ever worded with a synonym.
    """
    attribute = concept_attribute(concept)
    prompts = []
    if attribute == "style":
        wordings = STYLE_SYNONYMS[concept] if synonyms else (STYLE_DIRECT[concept],)
        for i, shape in enumerate(SHAPES):
            form, word = _style_phrasing(concept, wordings[i % len(wordings)])
            prompts.append(Prompt(caption(shape, COLORS[i], concept, None, form, word),
                                  {"shape": shape, "color": COLORS[i], "style": concept}))
        return prompts
    words = SYNONYMS[concept][1:] if synonyms else SYNONYMS[concept][:1]
    for i in range(6):
        word = words[i % len(words)]
        if attribute == "shape":
            prompts.append(Prompt(caption(word, COLORS[i]), {"shape": concept, "color": COLORS[i]}))
        elif attribute == "color":
            prompts.append(Prompt(caption(SHAPES[i], word), {"shape": SHAPES[i], "color": concept}))
        else:
            prompts.append(Prompt(caption(SHAPES[i], COLORS[i], background_word=word),
                                  {"shape": SHAPES[i], "color": COLORS[i], "background": concept}))
    return prompts


# Styles of the held-out prompts, one per prompt (None: unstated).
_HELD_OUT_STYLES = (None, "striped", "outlined", None, "solid", "striped")


def held_out_prompts(concept: str) -> list:
    """Prompts naming `concept` directly in forms no recipe or preserve list contains: with a colour, a
    background, a style and a framing together ("a picture of a striped purple square against a black backdrop").
    A neighbour must survive these, not only the prompts an erasure was told to keep (issue 16)."""
    attribute = concept_attribute(concept)
    prompts = []
    for i in range(6):
        values = {"shape": SHAPES[(i + 1) % 6], "color": COLORS[(i + 3) % 6],
                  "background": BACKGROUNDS[i % 4], "style": _HELD_OUT_STYLES[i]}
        values[attribute] = concept
        style = values["style"]
        text = caption(values["shape"], values["color"], style, values["background"], "adjective", style,
                       template=(i * 5) % 12)
        prompts.append(Prompt(text, {k: v for k, v in values.items() if v is not None}))
    return prompts


def direct_prompts(concept: str) -> list:
    """Prompts naming `concept` directly, e.g. "a red circle" for circle."""
    return [p.text for p in concept_prompts(concept, synonyms=False)]


def synonym_prompts(concept: str) -> list:
    """Prompts asking for `concept` only through synonyms, e.g. "a red disk" for circle."""
    return [p.text for p in concept_prompts(concept, synonyms=True)]


# --- what to erase toward, and what to keep ------------------------------------------------------

def erasure_recipe(concept: str) -> dict:
    """`anchor` and `preserve` for erasing `concept` from the shapes model, as measured in docs/shapes.md.

    The anchor is another value of the same attribute (circle -> square): "shape" or "" encode almost like the
    empty prompt here, and the unconditional model still draws the concept in ~17% of images. The preserve set is
    every other value, bare and in the direct prompts that name it ("a red square"): the model carries the shape
    in the colour and padding tokens too, so bare names alone let the edit damage other shapes. Synonym prompts
    ("a red box") are never in the set, so they measure specificity on prompts the edit did not see.
    """
    others = [v for v in ATTRIBUTES[concept_attribute(concept)] if v != concept]
    return {"anchor": others[0], "preserve": others + [p for other in others for p in direct_prompts(other)]}
