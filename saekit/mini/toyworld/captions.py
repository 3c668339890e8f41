"""Captions for toy-world images, written from the factors the world planted.

Every class owns one shape family (its group), one style (a colour palette with a texture
family) and one pattern frequency (see ``taxonomy`` and ``render``), so a caption naming those
factors is true of every image of the class: "a coarse striped red fish". Each factor has its
own small word list, so a word names exactly one factor value and `parse_caption` can read the
factors back out of any text (a generated caption, a prompt) to score it.

Three kinds of text come out of here:

* `canonical_caption`: the one full caption of a class, in a fixed word order (what the toy
  LLaVA is taught to say, so its answers can be scored word by word);
* `caption` with a random generator: a varied caption of the same truth, where the colour,
  texture and frequency words are each kept or dropped, the adjectives come in any order,
  a template frames them, and sometimes a dropped word comes back after a comma ("a red fish,
  striped": the form paper 003's Table 3 builds its attribute prompts in). Text-to-image
  models and CLIPs train on these, so every word alone has a meaning;
* `caption_for_image` / `prompt_corpus`: deterministic per (seed, index), like the world's
  images, so that any run regenerates the same text.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from saekit.mini.toyworld.taxonomy import LEAVES, N_CLASSES, N_STYLES
from saekit.mini.toyworld.world import SPLITS

GROUP_WORDS: tuple[str, ...] = ("dog", "bird", "fish", "vehicle", "instrument")
"""Per group (shape family), the noun that names it."""
COLOR_WORDS: tuple[str, ...] = ("red", "blue", "green", "purple", "cyan")
"""Per style, the name of its base colour (``render.PALETTES[style][0]``)."""
TEXTURE_WORDS: tuple[str, ...] = ("striped", "checkered", "dotted", "ringed", "wavy")
"""Per style, the adjective of its texture family (``render.TEXTURES``)."""
FREQUENCY_WORDS: tuple[str, ...] = ("coarse", "medium", "fine")
"""Per pattern frequency level (coarse to fine), the adjective that names it."""
TEMPLATES: tuple[str, ...] = (
    "{thing}",
    "a picture of {thing}",
    "{thing} on a plain background",
    "a photo of {thing}",
)
"""Frames of a varied caption; ``{thing}`` is "a/an <adjectives> <noun>"."""

FACTORS = ("group", "style", "frequency")
"""The planted factors a caption names, in `Factors` order."""
_WORDS = {"group": GROUP_WORDS, "style": COLOR_WORDS, "frequency": FREQUENCY_WORDS}
_CAPTION_STREAM = 7_000
"""Random stream of captions, apart from every stream the world's images use."""

assert len(COLOR_WORDS) == len(TEXTURE_WORDS) == N_STYLES


@dataclass(frozen=True)
class Factors:
    """The planted factors of one class."""

    group: int
    """Shape family, index into ``GROUP_WORDS``."""
    style: int
    """Palette and texture family, index into ``COLOR_WORDS`` and ``TEXTURE_WORDS``."""
    frequency: int
    """Pattern frequency level, index into ``FREQUENCY_WORDS``."""


def factors(label: int) -> Factors:
    """The planted factors of class ``label``."""
    if not 0 <= label < N_CLASSES:
        raise ValueError(f"label must be a toy-world class in 0..{N_CLASSES - 1}, got {label}.")
    leaf = LEAVES[label]
    return Factors(leaf.group, leaf.style, leaf.frequency)


def vocabulary() -> list[str]:
    """Every word that names a factor value: nouns, colours, textures, frequencies."""
    return [*GROUP_WORDS, *COLOR_WORDS, *TEXTURE_WORDS, *FREQUENCY_WORDS]


def factor_of_word(word: str) -> tuple[str, int] | None:
    """(factor, value) a vocabulary word names, e.g. "striped" -> ("style", 0); None otherwise.

    Colour and texture words both name the style: in the toy world they never vary apart."""
    word = word.lower()
    for factor, words in (*_WORDS.items(), ("style", TEXTURE_WORDS)):
        if word in words:
            return factor, words.index(word)
    return None


def _with_article(words: Sequence[str]) -> str:
    article = "an" if words[0][0] in "aeiou" else "a"
    return " ".join([article, *words])


def canonical_caption(label: int) -> str:
    """The full caption of class ``label`` in fixed order: frequency, texture, colour, noun."""
    f = factors(label)
    words = (
        FREQUENCY_WORDS[f.frequency],
        TEXTURE_WORDS[f.style],
        COLOR_WORDS[f.style],
        GROUP_WORDS[f.group],
    )
    return _with_article(words)


def caption(label: int, rng: np.random.Generator | None = None, keep: float = 0.7) -> str:
    """A caption of class ``label``: the canonical one without `rng`, a varied one with it.

    Varied: each adjective (frequency, texture, colour) is kept with probability `keep`, the
    kept ones are shuffled, a template frames the phrase, and in one caption of five a dropped
    adjective is appended after a comma. The noun is always there: a caption always says what
    the object is, and every word it holds is true of the class.
    """
    if rng is None:
        return canonical_caption(label)
    f = factors(label)
    adjectives = [
        FREQUENCY_WORDS[f.frequency],
        TEXTURE_WORDS[f.style],
        COLOR_WORDS[f.style],
    ]
    kept_mask = rng.random(len(adjectives)) < keep
    kept = [a for a, k in zip(adjectives, kept_mask, strict=True) if k]
    dropped = [a for a, k in zip(adjectives, kept_mask, strict=True) if not k]
    kept = [kept[i] for i in rng.permutation(len(kept))]
    text = TEMPLATES[int(rng.integers(len(TEMPLATES)))].format(
        thing=_with_article([*kept, GROUP_WORDS[f.group]])
    )
    if dropped and rng.random() < 0.2:
        text += ", " + dropped[int(rng.integers(len(dropped)))]
    return text


def caption_for_image(index: int, seed: int = 0, split: str = "train") -> str:
    """The varied caption of image ``index`` of a world split (label ``index % N_CLASSES``),
    deterministic per (seed, split, index) as the image itself is."""
    rng = np.random.default_rng([seed, _CAPTION_STREAM, SPLITS[split], index])
    return caption(index % N_CLASSES, rng)


def captions_for_images(n: int, seed: int = 0, split: str = "train", start: int = 0) -> list[str]:
    """`caption_for_image` for images ``start .. start + n - 1``."""
    return [caption_for_image(i, seed, split) for i in range(start, start + n)]


def prompt_corpus(n: int = 300, seed: int = 0) -> list[str]:
    """`n` varied captions covering every class evenly: prompts for steering and tokenizers."""
    rng = np.random.default_rng([seed, _CAPTION_STREAM, 99])
    return [caption(i % N_CLASSES, rng) for i in range(n)]


def parse_caption(text: str) -> dict[str, int]:
    """The factor values a text names, e.g. "a red fish" -> {"group": 2, "style": 0}.

    A factor named twice with different values (a confused caption) maps to -1; factors the
    text does not name are absent."""
    found: dict[str, int] = {}
    for word in re.findall(r"[a-z]+", text.lower()):
        hit = factor_of_word(word)
        if hit is None:
            continue
        factor, value = hit
        found[factor] = value if found.get(factor, value) == value else -1
    return found


def caption_matches(text: str, label: int) -> dict[str, bool]:
    """Per factor, whether `text` names class ``label``'s true value (False when unnamed)."""
    truth = factors(label)
    named = parse_caption(text)
    return {factor: named.get(factor) == getattr(truth, factor) for factor in FACTORS}


def consistent(text: str, label: int) -> bool:
    """True when every factor `text` names is true of class ``label`` (unnamed ones are free):
    the caption could describe any image of the class."""
    truth = factors(label)
    return all(getattr(truth, k) == v for k, v in parse_caption(text).items())
