"""A general caption corpus of our own, for preservation priors that do not depend on the prompts a user lists.

MACE preserves "everything else" through Σ (W c) cᵀ and Σ c cᵀ over every token of the COCO captions. We cannot
ship COCO, so `captions()` builds a few thousand generic captions from our own word lists (objects, people,
scenes, styles, adjectives) and framings, deterministically (same list on every machine, so its statistics cache
is shared). Users with a real caption set pass their own (`preserve_corpus=` a list or a text file, one caption a
line). The lists are the project's own and under its licence.
"""

from __future__ import annotations

import random
from pathlib import Path

OBJECTS = (
    "dog", "cat", "horse", "bird", "fish", "cow", "sheep", "rabbit", "bear", "lion", "tiger", "elephant",
    "giraffe", "zebra", "monkey", "owl", "duck", "fox", "wolf", "deer", "butterfly", "frog", "turtle", "snake",
    "car", "bus", "truck", "bicycle", "motorcycle", "train", "airplane", "boat", "ship", "tractor", "scooter",
    "house", "castle", "bridge", "tower", "church", "lighthouse", "barn", "tent", "cabin", "skyscraper",
    "tree", "flower", "rose", "sunflower", "cactus", "mushroom", "leaf", "forest", "mountain", "river", "lake",
    "apple", "banana", "orange", "pizza", "cake", "sandwich", "bowl of soup", "cup of coffee", "bottle", "teapot",
    "chair", "table", "sofa", "bed", "lamp", "clock", "vase", "mirror", "window", "door", "bookshelf", "piano",
    "guitar", "violin", "drum", "book", "laptop", "phone", "camera", "television", "umbrella", "backpack",
    "hat", "shoe", "dress", "jacket", "ring", "necklace", "ball", "kite", "balloon", "robot", "toy", "doll",
    "sword", "shield", "crown", "key", "candle", "lantern", "map", "globe", "telescope", "rocket", "planet",
    "moon", "sun", "cloud", "rainbow", "wave", "island", "volcano", "waterfall", "desert", "garden", "street",
)
PEOPLE = (
    "man", "woman", "child", "boy", "girl", "old man", "old woman", "baby", "family", "couple", "crowd",
    "farmer", "chef", "doctor", "nurse", "teacher", "student", "soldier", "police officer", "firefighter",
    "musician", "painter", "dancer", "athlete", "astronaut", "pilot", "sailor", "knight", "king", "queen",
    "scientist", "fisherman", "waiter", "worker", "runner", "skier", "surfer", "climber",
)
ADJECTIVES = (
    "red", "green", "blue", "yellow", "purple", "orange", "pink", "brown", "black", "white", "gray", "golden",
    "silver", "small", "large", "tiny", "huge", "old", "new", "ancient", "modern", "wooden", "metal", "glass",
    "stone", "plastic", "shiny", "dusty", "wet", "broken", "colorful", "bright", "dark", "pale", "striped",
    "spotted", "tall", "short", "happy", "sleepy", "smiling", "young", "cute", "beautiful",
)
SCENES = (
    "on a beach", "in a forest", "in a city street", "in a kitchen", "in a living room", "in a park",
    "on a mountain", "in the snow", "in the rain", "at night", "at sunset", "in a field", "on a table",
    "in a garden", "by a lake", "in the desert", "underwater", "in space", "in a library", "in a classroom",
    "on a white background", "on a black background", "on a wooden floor", "in a studio", "at a market",
    "in a museum", "on a boat", "in front of a house", "on a road", "in a cafe", "on a rooftop", "in a cave",
)
STYLES = (
    "a photo of", "a painting of", "a drawing of", "a sketch of", "an illustration of", "a watercolor of",
    "an oil painting of", "a cartoon of", "a 3d render of", "a close-up photo of", "a black and white photo of",
    "a pencil drawing of", "a poster of", "a digital art of", "an icon of", "a picture of", "an image of",
)
ACTIONS = (
    "standing", "sitting", "running", "walking", "sleeping", "jumping", "eating", "reading", "playing",
    "smiling", "looking at the camera", "holding a cup", "riding a bicycle", "waiting",
)


def _article(phrase: str) -> str:
    return "an" if phrase[0] in "aeiou" else "a"


def _noun_phrase(rng: random.Random) -> str:
    noun = rng.choice(OBJECTS + PEOPLE)
    if rng.random() < 0.6:
        noun = f"{rng.choice(ADJECTIVES)} {noun}"
    return f"{_article(noun)} {noun}"


def _caption(rng: random.Random) -> str:
    subject = _noun_phrase(rng)
    form = rng.random()
    if form < 0.25:
        text = f"{subject} {rng.choice(SCENES)}"
    elif form < 0.45:
        text = f"{rng.choice(STYLES)} {subject}"
    elif form < 0.6:
        text = f"{rng.choice(STYLES)} {subject} {rng.choice(SCENES)}"
    elif form < 0.75:
        text = f"{subject} and {_noun_phrase(rng)}"
    elif form < 0.9:
        person = rng.choice(PEOPLE)
        text = f"{_article(person)} {person} {rng.choice(ACTIONS)} {rng.choice(SCENES)}"
    else:
        text = f"{subject} next to {_noun_phrase(rng)} {rng.choice(SCENES)}"
    return text


def captions(count: int = 3000, seed: int = 0) -> list[str]:
    """`count` distinct generic captions ("a photo of a wooden chair in a kitchen", …), the same on every
    machine for the same arguments."""
    rng = random.Random(seed)
    out: dict[str, None] = {}
    while len(out) < count:
        out[_caption(rng)] = None
    return list(out)


def read_corpus(corpus) -> list[str]:
    """A caption list from `corpus`: "builtin" (`captions()`), a list of strings, or a UTF-8 text file with one
    caption a line (blank lines skipped)."""
    if isinstance(corpus, str) and corpus == "builtin":
        return captions()
    if isinstance(corpus, (str, Path)):
        path = Path(corpus)
        if not path.is_file():
            raise FileNotFoundError(f"preserve_corpus={str(corpus)!r} is neither 'builtin' nor a text file; pass "
                                    "a list of captions, a path to a UTF-8 text file (one caption a line), or "
                                    "'builtin'.")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"preserve_corpus file {str(path)!r} is not UTF-8 text ({error}); give a text file "
                             "with one caption a line.") from None
        if "\x00" in text:
            raise ValueError(f"preserve_corpus file {str(path)!r} is binary, not text; give a text file with "
                             "one caption a line.")
        lines = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        lines = list(corpus)
        bad = [c for c in lines if not isinstance(c, str)]
        if bad:
            raise TypeError(f"preserve_corpus must hold strings; got {type(bad[0]).__name__} {bad[0]!r}.")
    if not lines:
        raise ValueError("preserve_corpus is empty; give at least one caption, or 'builtin'.")
    return lines


def _with_adjective(prompt: str, adjective: str) -> str:
    head, _, rest = prompt.partition(" ")
    if head.lower() in ("a", "an") and rest:
        return f"{_article(adjective)} {adjective} {rest}"
    return f"{adjective} {prompt}"


def expand_preserved(prompt: str, count: int = 12, seed: int = 0) -> list[str]:
    """`prompt` and `count` variants of it in the corpus's framings, adjectives and scenes ("a square" → "a red
    square", "a photo of a square in a park", "a wooden square on a black background", …): a preserved name is
    then held in the contexts it is prompted in, not only bare. Deterministic for a given prompt and seed."""
    rng = random.Random(f"{seed}:{prompt}")
    out = {prompt: None}
    while len(out) < count + 1:
        form = len(out) % 4
        adjective, scene, style = rng.choice(ADJECTIVES), rng.choice(SCENES), rng.choice(STYLES)
        if form == 1:
            text = _with_adjective(prompt, adjective)
        elif form == 2:
            text = f"{prompt} {scene}"
        elif form == 3:
            text = f"{style} {prompt}"
        else:
            text = f"{style} {_with_adjective(prompt, adjective)} {scene}"
        out[text] = None
    return list(out)
