"""Captions of the toy world: true of their class, read back by the parser, deterministic."""

from __future__ import annotations

import numpy as np
import pytest

from saekit.mini.toyworld import LEAVES, N_CLASSES
from saekit.mini.toyworld import captions as cap
from saekit.mini.toyworld.render import PALETTES, TEXTURES


def test_words_follow_the_renderer():
    # The colour word names the palette's dominant base colour, the texture word its family.
    rgb = {
        "red": (0,),
        "green": (1,),
        "blue": (2,),
        "purple": (0, 2),
        "cyan": (1, 2),
    }
    for style, word in enumerate(cap.COLOR_WORDS):
        base = PALETTES[style][0]
        strongest = set(np.argsort(base)[::-1][: len(rgb[word])].tolist())
        assert strongest == set(rgb[word]), (word, base)
    for word, family in zip(cap.TEXTURE_WORDS, TEXTURES, strict=True):
        assert word[:3] == family[:3]


def test_every_word_names_one_factor_value():
    words = cap.vocabulary()
    assert len(words) == len(set(words))
    for word in words:
        factor, value = cap.factor_of_word(word)
        assert factor in cap.FACTORS and value >= 0
    assert cap.factor_of_word("photo") is None


@pytest.mark.parametrize("label", range(N_CLASSES))
def test_canonical_caption_round_trips(label):
    leaf = LEAVES[label]
    text = cap.canonical_caption(label)
    assert cap.parse_caption(text) == {
        "group": leaf.group,
        "style": leaf.style,
        "frequency": leaf.frequency,
    }
    assert all(cap.caption_matches(text, label).values())


def test_classes_have_distinct_canonical_captions():
    assert len({cap.canonical_caption(c) for c in range(N_CLASSES)}) == N_CLASSES


def test_varied_captions_are_true_of_their_class_and_vary():
    texts = cap.captions_for_images(600, seed=0)
    for i, text in enumerate(texts):
        label = i % N_CLASSES
        assert cap.consistent(text, label), text
        # The noun is always there, so a caption always says what the object is.
        assert cap.parse_caption(text)["group"] == LEAVES[label].group
    named = [cap.parse_caption(t) for t in texts]
    # Adjectives are dropped often enough that each also appears without the others.
    for factor in ("style", "frequency"):
        share = np.mean([factor in n for n in named])
        assert 0.5 < share < 0.95
    assert any(", " in t for t in texts)  # the "prompt, attribute" form of Table 3
    assert len(set(texts)) > 300


def test_captions_are_deterministic_per_seed_split_and_index():
    assert cap.caption_for_image(17, seed=3) == cap.caption_for_image(17, seed=3)
    assert cap.captions_for_images(5, start=10) == [cap.caption_for_image(i) for i in range(10, 15)]
    many = cap.captions_for_images(200, seed=0)
    assert many != cap.captions_for_images(200, seed=1)
    assert many != cap.captions_for_images(200, seed=0, split="val")
    assert cap.prompt_corpus(50) == cap.prompt_corpus(50)


def test_parser_flags_contradictions_and_ignores_other_words():
    assert cap.parse_caption("a red dotted fish") == {"style": -1, "group": 2}
    assert cap.parse_caption("A Red fish, striped.") == {"style": 0, "group": 2}
    assert cap.parse_caption("a photo of nothing") == {}
    assert not cap.consistent("a blue fish", 0)
    with pytest.raises(ValueError, match="toy-world class"):
        cap.factors(N_CLASSES)
