"""Naming SAE steering features (paper 003, §4.2): which features are descriptive, what do
they do to an image, and which word says it.

Given a text-encoder SAE and the steering of `saekit.analysis.steering`:

1. `descriptive_features` keeps features that fire mostly on nouns, adjectives and adverbs
   (part of speech from `wordnet_lexicon`).
2. `discover_attributes` steers sample prompts along each feature and asks a describer
   (`saekit.analysis.describers`: an LMM such as Qwen2.5-VL, or CLIP over a vocabulary) what
   changed.
3. `dominant_keywords` picks each feature's keyword by inverse document frequency.

Checking the names with CLIP (Table 3) is `saekit.analysis.attribute_validation`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from PIL.Image import Image
from sae_lens import SAE
from tqdm.auto import tqdm

from saekit.analysis.describers import Describer
from saekit.analysis.steering import GenerationConfig, generate
from saekit.sae.codes import iter_codes, merge_top_k
from saekit.taxonomy import wordnet

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline


Lexicon = Callable[[str], "str | None"]
"""Maps a word to its WordNet part of speech (`n`, `v`, `a`, `r`) or None when it has none."""

DESCRIPTIVE_POS = frozenset("nars")  # noun, adjective, adverb, adjective satellite
# Closed-class words: WordNet lists only open-class words but gives some of these a rare noun
# sense ("a" = vitamin A, "in" = inch), which would make them look descriptive.
CLOSED_CLASS = frozenset(
    "a an the this that these those some any each every no and or but nor so yet of in on at by "
    "for with without from to into onto over under above below near behind between through "
    "during before after up down out off about as than like is are was were be been being am "
    "it its he she they them their his her him we us our you your i me my who which what".split()
)


def wordnet_lexicon() -> Lexicon:
    """Part of speech from WordNet lemma lookups (NLTK's tagger data cannot be downloaded here).

    A word's POS is the one whose lemmas (after `morphy` lemmatisation) are most frequent in
    SemCor, falling back to the POS with most senses. The lookup ignores context, so a word
    whose commoner sense is a verb ("desert", "painting") counts as a verb. WordNet comes from
    `saekit.taxonomy.wordnet` (the repository's ``nltk_data/`` or NLTK_DATA), whose error says
    how to install it.
    """
    wn = wordnet()

    @cache
    def lookup(word: str) -> str | None:
        best, best_key = None, (0, 0)
        for pos in "nvar":
            lemma = wn.morphy(word.lower(), pos)
            if lemma is None:
                continue
            lemmas = wn.lemmas(lemma, pos)
            key = (sum(entry.count() for entry in lemmas), len(lemmas))
            if key > best_key:
                best, best_key = pos, key
        return best

    return lookup


def is_descriptive(word: str, lexicon: Lexicon | Mapping[str, str]) -> bool:
    """Whether `word` is a noun, adjective or adverb (closed-class words never are)."""
    word = word.lower()
    if not word or word in CLOSED_CLASS:
        return False
    pos = lexicon.get(word) if isinstance(lexicon, Mapping) else lexicon(word)
    return pos is not None and pos[:1] in DESCRIPTIVE_POS


def descriptive_features(
    sae: SAE,
    acts_ND: torch.Tensor,
    words: Sequence[str],
    lexicon: Lexicon | Mapping[str, str],
    *,
    min_share: float = 0.8,
    min_active: int = 5,
    top_k: int = 10,
    batch_size: int = 4096,
    progress: bool = True,
) -> pd.DataFrame:
    """Score every SAE feature by how much of its activation lands on descriptive words (§4.2a).

    `words[n]` is the word row n came from (`token_info.word`; "" for special tokens).
    `descriptive_share` is the feature's activation mass on nouns/adjectives/adverbs over its
    total mass; a feature is `selected` when that share is at least `min_share` and it fires on
    at least `min_active` tokens. `top_words` are the words of its `top_k` strongest tokens.
    Streams `acts_ND` in batches (`iter_codes`), so the [N, S] code matrix never exists at once.
    """
    if len(words) != len(acts_ND):
        raise ValueError(
            f"{len(words)} words for {len(acts_ND)} activation rows; pass token_info.word."
        )
    descriptive_N = torch.tensor([is_descriptive(w, lexicon) for w in words], dtype=torch.bool)
    n_features = sae.cfg.d_sae
    mass_S = torch.zeros(n_features, dtype=torch.float64)
    descriptive_S = torch.zeros(n_features, dtype=torch.float64)
    active_S = torch.zeros(n_features, dtype=torch.long)
    top_values_SK = torch.empty(n_features, 0)
    top_rows_SK = torch.empty(n_features, 0, dtype=torch.long)
    chunks = iter_codes(sae, acts_ND, batch_size, progress=progress, desc="feature activations")
    for start, codes_BS in chunks:
        codes_BS = codes_BS.cpu().clamp_min(0)
        mass_S += codes_BS.sum(0).double()
        descriptive_S += codes_BS[descriptive_N[start : start + len(codes_BS)]].sum(0).double()
        active_S += (codes_BS > 0).sum(0)
        rows_B = torch.arange(start, start + len(codes_BS))
        top_values_SK, top_rows_SK = merge_top_k(
            top_values_SK, top_rows_SK, codes_BS.T, rows_B, top_k
        )
    share_S = (descriptive_S / mass_S.clamp_min(1e-12)).float()
    top_words = [
        [words[r] or "<special>" for r, v in zip(rows, values, strict=True) if v > 0]
        for rows, values in zip(top_rows_SK.tolist(), top_values_SK.tolist(), strict=True)
    ]
    table = pd.DataFrame(
        {
            "feature": np.arange(n_features),
            "n_active": active_S.numpy(),
            "descriptive_share": share_S.numpy(),
            "top_words": top_words,
        }
    )
    table["selected"] = (table.descriptive_share >= min_share) & (table.n_active >= min_active)
    return table


def word_counts(words: Sequence[str], k: int = 3) -> str:
    """The `k` most frequent of `words` with their counts, e.g. "tiny ×7, car ×3"."""
    return ", ".join(f"{word} ×{n}" if n > 1 else word for word, n in Counter(words).most_common(k))


@dataclass
class Discovery:
    """Images and keywords from `discover_attributes`."""

    prompts: list[str]
    """The sample prompts."""
    originals: list[Image]
    """Unsteered image of each prompt."""
    steered: dict[int, list[Image]]
    """Per feature, the steered image of each prompt."""
    keywords: dict[int, list[str]]
    """Per feature, every keyword the describer returned (all calls, in order)."""


def discover_attributes(
    pipe: DiffusionPipeline,
    sae: SAE,
    features: Sequence[int],
    prompts: Sequence[str],
    describer: Describer,
    strength: float,
    *,
    seed: int = 0,
    images_per_call: int = 4,
    config: GenerationConfig | None = None,
) -> Discovery:
    """Steer `prompts` along each feature and ask `describer` what changed (§4.2b-c).

    Prompts go to the describer in groups of `images_per_call` (the paper shows Qwen2.5-VL 4
    image pairs); each group's keywords are appended, so a keyword named by several groups
    counts several times in `dominant_keywords`.
    """
    prompts = list(prompts)
    originals = generate(pipe, prompts, seed=seed, config=config)
    steered, keywords = {}, {}
    for feature in tqdm(list(features), desc="steering features"):
        images = generate(pipe, prompts, sae, feature, strength, seed, config=config)
        steered[feature], keywords[feature] = images, []
        for start in range(0, len(prompts), images_per_call):
            group = slice(start, start + images_per_call)
            keywords[feature] += describer.describe(originals[group], images[group])
    return Discovery(prompts, originals, steered, keywords)


def dominant_keywords(keywords: Mapping[int, Sequence[str]]) -> dict[int, str]:
    """Each feature's main attribute: its keyword with the highest tf x idf (§4.2d).

    A feature's keywords form one document; idf(w) = log(F / df(w)) over the F features that
    have keywords, so words every feature gets ("colorful") lose to the feature's own. Ties
    go to the more frequent keyword, then to the one named first. Written here rather than
    taken from scikit-learn, which the project does not depend on, in a dozen lines.
    """
    documents = {
        f: [w.strip().lower() for w in words if w.strip()] for f, words in keywords.items()
    }
    documents = {f: words for f, words in documents.items() if words}
    document_frequency = Counter(w for words in documents.values() for w in set(words))
    n_documents = len(documents)
    chosen = {}
    for feature, words in documents.items():
        counts = Counter(words)

        def score(word: str, counts: Counter = counts, words: list[str] = words) -> tuple:
            idf = math.log(n_documents / document_frequency[word])
            return (counts[word] * idf, counts[word], -words.index(word))

        chosen[feature] = max(counts, key=score)
    return chosen
