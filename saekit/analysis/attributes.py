"""Naming SAE steering features and checking the names with CLIP (paper 003, §4.2, Table 3).

Given a text-encoder SAE and the steering of `saekit.analysis.steering`:

1. `descriptive_features` keeps features that fire mostly on nouns, adjectives and adverbs
   (part of speech from `wordnet_lexicon`).
2. `discover_attributes` steers sample prompts along each feature and asks a `Describer` what
   changed: `LMMDescriber` for Qwen2.5-VL and the like, `ClipDescriber` for zero-shot ranking
   over a vocabulary (`load_describer` picks one by name).
3. `dominant_keywords` picks each feature's keyword by inverse document frequency;
   `attribute_table` shows the result.
4. Validation (Table 3): `attribute_pairs` draws prompt-attribute pairs, `validate_steering` /
   `clip_similarities` score them with CLIP, `table3` runs the paired t-test (scipy) and
   `table3_figure` draws it.
"""

from __future__ import annotations

import math
import random
import re
import string
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np
import pandas as pd
import torch
from PIL.Image import Image
from scipy import stats
from tqdm.auto import tqdm

from saekit.analysis.steering import GenerationConfig, generate, offline_error

if TYPE_CHECKING:
    from matplotlib.figure import Figure


# --------------------------------------------------------------------------- descriptive features

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


def wordnet_lexicon(nltk_data: str | Path | None = None) -> Lexicon:
    """Part of speech from WordNet lemma lookups (NLTK's tagger data cannot be downloaded here).

    A word's POS is the one whose lemmas (after `morphy` lemmatisation) are most frequent in
    SemCor, falling back to the POS with most senses. The lookup ignores context, so a word
    whose commoner sense is a verb ("desert", "painting") counts as a verb. Searches
    `nltk_data`, NLTK's usual paths (NLTK_DATA) and the repository's `nltk_data/`.
    """
    import nltk
    from nltk.corpus import wordnet

    repo_data = Path(__file__).resolve().parents[1] / "nltk_data"
    for folder in (nltk_data, repo_data if repo_data.is_dir() else None):
        if folder is not None and str(folder) not in nltk.data.path:
            nltk.data.path.append(str(folder))
    try:
        wordnet.ensure_loaded()
    except LookupError as err:
        raise RuntimeError(
            "The WordNet corpus is not installed: run scripts/setup_wordnet.sh (offline), or "
            "point NLTK_DATA (or nltk_data=) at a folder holding corpora/wordnet."
        ) from err

    @cache
    def lookup(word: str) -> str | None:
        best, best_key = None, (0, 0)
        for pos in "nvar":
            lemma = wordnet.morphy(word.lower(), pos)
            if lemma is None:
                continue
            lemmas = wordnet.lemmas(lemma, pos)
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


@torch.inference_mode()
def descriptive_features(
    sae,
    acts_ND: torch.Tensor,
    words: Sequence[str],
    lexicon: Lexicon | Mapping[str, str],
    *,
    min_share: float = 0.8,
    min_active: int = 5,
    top_k: int = 10,
    batch_size: int = 4096,
) -> pd.DataFrame:
    """Score every SAE feature by how much of its activation lands on descriptive words (§4.2a).

    `words[n]` is the word row n came from (`token_info.word`; "" for special tokens).
    `descriptive_share` is the feature's activation mass on nouns/adjectives/adverbs over its
    total mass; a feature is `selected` when that share is at least `min_share` and it fires on
    at least `min_active` tokens. `top_words` are the words of its `top_k` strongest tokens.
    Streams `acts_ND` in batches, so the [N, S] code matrix never exists at once.
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
    top_values_KS = torch.full((0, n_features), -math.inf)
    top_rows_KS = torch.zeros((0, n_features), dtype=torch.long)
    for start in tqdm(range(0, len(acts_ND), batch_size), desc="feature activations"):
        x_BD = acts_ND[start : start + batch_size].to(sae.W_dec)
        codes_BS = sae.encode(x_BD).float().cpu().clamp_min(0)
        mass_S += codes_BS.sum(0).double()
        descriptive_S += codes_BS[descriptive_N[start : start + len(x_BD)]].sum(0).double()
        active_S += (codes_BS > 0).sum(0)
        rows_BS = torch.arange(start, start + len(x_BD)).unsqueeze(1).expand_as(codes_BS)
        values_KS = torch.cat([top_values_KS, codes_BS])
        k = min(top_k, len(values_KS))
        top_values_KS, order_KS = values_KS.topk(k, dim=0)
        top_rows_KS = torch.cat([top_rows_KS, rows_BS]).gather(0, order_KS)
    share_S = (descriptive_S / mass_S.clamp_min(1e-12)).float()
    top_words = [
        [words[r] or "<special>" for r, v in zip(rows, values, strict=True) if v > 0]
        for rows, values in zip(top_rows_KS.T.tolist(), top_values_KS.T.tolist(), strict=True)
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


# --------------------------------------------------------------------------- describers


class Describer(Protocol):
    """Names what differs between original and steered images (§4.2c), e.g. an LMM or CLIP."""

    def describe(self, originals: Sequence[Image], steered: Sequence[Image]) -> list[str]:
        """Keywords for what the steered images show more of, most important first."""
        ...


@torch.inference_mode()
def _clip_image_embeds(model, processor, images: Sequence[Image]) -> torch.Tensor:
    pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
    out = model.get_image_features(pixel_values=pixels.to(model.device))
    out = out if isinstance(out, torch.Tensor) else out.pooler_output
    return torch.nn.functional.normalize(out.float(), dim=-1).cpu()


@torch.inference_mode()
def _clip_text_embeds(model, processor, texts: Sequence[str]) -> torch.Tensor:
    enc = processor(text=list(texts), return_tensors="pt", padding=True, truncation=True)
    out = model.get_text_features(
        input_ids=enc["input_ids"].to(model.device),
        attention_mask=enc["attention_mask"].to(model.device),
    )
    out = out if isinstance(out, torch.Tensor) else out.pooler_output
    return torch.nn.functional.normalize(out.float(), dim=-1).cpu()


@dataclass
class ClipDescriber:
    """Zero-shot describer: the vocabulary words whose CLIP similarity rises most under steering.

    Stands in for the paper's Qwen2.5-VL where no LMM is available (the mini profile).
    """

    model: object
    """A transformers `CLIPModel`."""
    processor: object
    """Its `CLIPProcessor`."""
    vocabulary: Sequence[str]
    """Candidate attribute words or phrases."""
    top_k: int = 3
    """How many keywords to return."""
    _vocab_VE: torch.Tensor | None = field(default=None, init=False, repr=False)

    def scores(self, originals: Sequence[Image], steered: Sequence[Image]) -> torch.Tensor:
        """Mean cosine similarity gain (steered minus original) for every vocabulary word ([V])."""
        if self._vocab_VE is None:
            self._vocab_VE = _clip_text_embeds(self.model, self.processor, self.vocabulary)
        orig_BE = _clip_image_embeds(self.model, self.processor, originals)
        steer_BE = _clip_image_embeds(self.model, self.processor, steered)
        return (steer_BE @ self._vocab_VE.T).mean(0) - (orig_BE @ self._vocab_VE.T).mean(0)

    def describe(self, originals: Sequence[Image], steered: Sequence[Image]) -> list[str]:
        order = self.scores(originals, steered).argsort(descending=True)[: self.top_k]
        return [self.vocabulary[i] for i in order.tolist()]


LMM_INSTRUCTION = (
    "The first {k} images were generated from some prompts; the last {k} from the same prompts "
    "with one hidden change. Answer with the most important keywords, comma-separated, that "
    "describe what the last {k} images show and the first {k} do not."
)


def parse_keywords(text: str) -> list[str]:
    """Split an LMM's answer into lower-case keywords: commas, semicolons or lines separate them,
    and list bullets, numbering, a leading "keywords:" and trailing punctuation are dropped."""
    keywords = []
    for part in re.split(r"[,;\n]", text.lower()):
        part = re.sub(r"^\s*(keywords?\s*:|[-*\u2022]|\d+[.)])\s*", "", part)
        part = part.strip(" \t" + string.punctuation)
        if any(c.isalnum() for c in part) and part not in keywords:
            keywords.append(part)
    return keywords


@dataclass
class LMMDescriber:
    """The paper's describer: a multimodal LM (Qwen2.5-VL there) shown originals then steered
    images in one chat turn and asked for keywords. Works with any transformers image-text-to-
    text model whose processor has a chat template (Qwen2.5-VL, LLaVA)."""

    model: object
    """A transformers image-text-to-text model (`AutoModelForImageTextToText`)."""
    processor: object
    """Its processor, with a chat template that accepts several `{"type": "image"}` parts."""
    instruction: str = LMM_INSTRUCTION
    """The question; `{k}` becomes the number of image pairs."""
    max_new_tokens: int = 32
    """Length limit of the answer (greedy decoding)."""
    last_answer: str = field(default="", init=False)
    """The raw text of the most recent answer, for inspection."""

    @torch.inference_mode()
    def describe(self, originals: Sequence[Image], steered: Sequence[Image]) -> list[str]:
        images = [*originals, *steered]
        content = [{"type": "image"} for _ in images]
        content.append({"type": "text", "text": self.instruction.format(k=len(originals))})
        prompt = self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True
        )
        inputs = self.processor(images=images, text=[prompt], return_tensors="pt").to(
            self.model.device
        )
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        answer_ids = out[:, inputs["input_ids"].shape[1] :]
        self.last_answer = self.processor.batch_decode(answer_ids, skip_special_tokens=True)[0]
        return parse_keywords(self.last_answer)


def load_lmm(
    id_or_path: str | Path, *, device: str | torch.device = "cpu", local_files_only: bool = False
):
    """Load an image-text-to-text model and processor (e.g. `Qwen/Qwen2.5-VL-7B-Instruct`)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    source = str(id_or_path)
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            source, local_files_only=local_files_only
        )
        processor = AutoProcessor.from_pretrained(source, local_files_only=local_files_only)
    except (OSError, ValueError) as err:
        raise offline_error("multimodal LM", source, err) from err
    return model.to(device).eval(), processor


def load_describer(
    name: str,
    clip_model=None,
    clip_processor=None,
    vocabulary: Sequence[str] = (),
    *,
    top_k: int = 3,
    device: str | torch.device = "cpu",
) -> Describer:
    """`"clip"`: a `ClipDescriber` over `vocabulary` with the given CLIP model; anything else is
    an image-text-to-text model's hub id or folder, loaded as an `LMMDescriber`."""
    if name == "clip":
        if clip_model is None or clip_processor is None or not vocabulary:
            raise ValueError(
                "the CLIP describer needs clip_model, clip_processor and a non-empty vocabulary "
                "of candidate attribute words."
            )
        return ClipDescriber(clip_model, clip_processor, list(vocabulary), top_k=top_k)
    return LMMDescriber(*load_lmm(name, device=device))


# --------------------------------------------------------------------------- discovery


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
    pipe,
    sae,
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


def attribute_table(
    discovery: Discovery, dominant: Mapping[int, str], descriptive: pd.DataFrame | None = None
) -> pd.DataFrame:
    """One row per steered feature: the describer's keywords with counts, the dominant one and,
    given `descriptive_features`' table, the words the feature fires on most."""
    rows = []
    for feature, keywords in discovery.keywords.items():
        counts = Counter(k.strip().lower() for k in keywords if k.strip())
        row = {
            "feature": feature,
            "attribute": dominant.get(feature, ""),
            "keywords": ", ".join(f"{k} ×{n}" if n > 1 else k for k, n in counts.most_common()),
        }
        if descriptive is not None:
            row["fires_on"] = word_counts(descriptive.set_index("feature").top_words[feature])
        rows.append(row)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- validation


def clip_similarities(
    model,
    processor,
    originals: Sequence[Image],
    steered: Sequence[Image],
    prompts: Sequence[str],
    attributes: Sequence[str],
) -> pd.DataFrame:
    """CLIP cosine similarities for Table 3, one row per prompt-attribute pair.

    Columns: `prompt`, `attribute`, `orig_orig` = cos(I_orig, t_orig), `steer_orig` =
    cos(I_steer, t_orig), `steer_attr` = cos(I_steer, t_attr), where t_attr = "t_orig, attr".
    """
    n = len(prompts)
    if not len(originals) == len(steered) == len(attributes) == n:
        raise ValueError(
            "originals, steered, prompts and attributes must be aligned lists of one length; got "
            f"{len(originals)}, {len(steered)}, {n}, {len(attributes)}."
        )
    z_orig_NE = _clip_image_embeds(model, processor, originals)
    z_steer_NE = _clip_image_embeds(model, processor, steered)
    z_t_NE = _clip_text_embeds(model, processor, prompts)
    attributed = [f"{p}, {a}" for p, a in zip(prompts, attributes, strict=True)]
    z_attr_NE = _clip_text_embeds(model, processor, attributed)
    return pd.DataFrame(
        {
            "prompt": list(prompts),
            "attribute": list(attributes),
            "orig_orig": (z_orig_NE * z_t_NE).sum(-1).numpy(),
            "steer_orig": (z_steer_NE * z_t_NE).sum(-1).numpy(),
            "steer_attr": (z_steer_NE * z_attr_NE).sum(-1).numpy(),
        }
    )


def attribute_pairs(
    prompts: Sequence[str], attributes: Mapping[int, str], n: int, seed: int = 0
) -> list[tuple[str, int, str]]:
    """`n` (prompt, feature, attribute) triples for Table 3, the features taken in turn.

    Prompts are drawn in a seeded random order, cycling when `n` exceeds them; a prompt that
    already names the attribute (as a whole word) is passed over for that feature, since
    appending the attribute would leave t_attr saying nothing new.
    """
    if not attributes:
        raise ValueError("no attributes; run discover_attributes and dominant_keywords first.")
    prompts = list(prompts)
    order = random.Random(seed).sample(prompts, len(prompts))
    features = sorted(attributes)
    pairs, cursor = [], 0
    for i in range(n):
        feature = features[i % len(features)]
        attribute = attributes[feature]
        named = re.compile(rf"\b{re.escape(attribute.lower())}\b")
        for step in range(len(order)):
            prompt = order[(cursor + step) % len(order)]
            if not named.search(prompt.lower()):
                pairs.append((prompt, feature, attribute))
                cursor += step + 1
                break
        else:
            raise ValueError(f"every prompt already names {attribute!r} (feature {feature}).")
    return pairs


def validate_steering(
    pipe,
    model,
    processor,
    sae,
    pairs: Sequence[tuple[str, int, str]],
    strength: float,
    *,
    seed: int = 0,
    config: GenerationConfig | None = None,
) -> pd.DataFrame:
    """Generate original and steered images for (prompt, feature, attribute) triples and score them.

    Each distinct prompt is generated once unsteered, and each feature's prompts in one batch.
    """
    prompts = [p for p, _, _ in pairs]
    unique = list(dict.fromkeys(prompts))
    by_prompt = dict(zip(unique, generate(pipe, unique, seed=seed, config=config), strict=True))
    steered = [None] * len(pairs)
    features = sorted({f for _, f, _ in pairs})
    for feature in tqdm(features, desc="steered images"):
        rows = [i for i, (_, f, _) in enumerate(pairs) if f == feature]
        images = generate(
            pipe, [prompts[i] for i in rows], sae, feature, strength, seed, config=config
        )
        for i, image in zip(rows, images, strict=True):
            steered[i] = image
    originals = [by_prompt[p] for p in prompts]
    sims = clip_similarities(model, processor, originals, steered, prompts, [a for *_, a in pairs])
    sims.insert(1, "feature", [f for _, f, _ in pairs])
    return sims


@dataclass
class Table3:
    """Paper 003's Table 3 with the paired t-test of (I_steer, t_attr) against (I_steer, t_orig)."""

    table: pd.DataFrame
    """Rows (image, text, mean cosine similarity, std) as in the paper."""
    t_statistic: float
    """Paired t statistic, positive when steered images match t_attr better than t_orig."""
    p_value: float
    """p-value of the paired t-test under `alternative`."""
    n: int
    """Number of prompt-attribute pairs."""
    relative_increase: float
    """mean(I_steer, t_attr) / mean(I_steer, t_orig) - 1 (the paper reports 5.8%)."""


def table3(
    sims: pd.DataFrame, alternative: Literal["two-sided", "greater", "less"] = "two-sided"
) -> Table3:
    """Summarise `clip_similarities` output as Table 3 with `scipy.stats.ttest_rel`."""
    missing = {"orig_orig", "steer_orig", "steer_attr"} - set(sims.columns)
    if missing:
        raise ValueError(f"sims lacks columns {sorted(missing)}; pass clip_similarities' output.")
    if len(sims) < 2:
        raise ValueError("a paired t-test needs at least 2 prompt-attribute pairs.")
    rows = [
        ("I_orig", "t_orig", "orig_orig"),
        ("I_steer", "t_orig", "steer_orig"),
        ("I_steer", "t_attr", "steer_attr"),
    ]
    table = pd.DataFrame(
        [(image, text, sims[col].mean(), sims[col].std()) for image, text, col in rows],
        columns=["image", "text", "cosine_similarity", "std"],
    )
    test = stats.ttest_rel(sims.steer_attr, sims.steer_orig, alternative=alternative)
    return Table3(
        table=table,
        t_statistic=float(test.statistic),
        p_value=float(test.pvalue),
        n=len(sims),
        relative_increase=float(sims.steer_attr.mean() / sims.steer_orig.mean() - 1),
    )


def table3_figure(sims: pd.DataFrame, result: Table3 | None = None) -> Figure:
    """The three similarities of every pair (lines join a pair) and the paired differences
    cos(I_steer, t_attr) - cos(I_steer, t_orig) that the t-test is about."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    result = result or table3(sims)
    names = {
        "orig_orig": "(I_orig, t_orig)",
        "steer_orig": "(I_steer, t_orig)",
        "steer_attr": "(I_steer, t_attr)",
    }
    long = sims[list(names)].rename(columns=names).melt(var_name="pair", value_name="cosine")
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), width_ratios=[3, 2])
    left.plot(range(3), sims[list(names)].to_numpy().T, color="0.6", alpha=0.25, linewidth=0.7)
    sns.pointplot(long, x="pair", y="cosine", color="C3", errorbar="sd", ax=left)
    left.set_xlabel("")
    left.set_ylabel("CLIP cosine similarity")
    left.set_title(f"n = {result.n} prompt-attribute pairs (mean ± std)")
    diff = sims.steer_attr - sims.steer_orig
    sns.histplot(diff, ax=right, color="C0", bins=min(30, max(5, len(diff) // 3)))
    right.axvline(0, color="0.2", linestyle="--", linewidth=1)
    right.set_xlabel("cos(I_steer, t_attr) − cos(I_steer, t_orig)")
    right.set_title(f"paired t = {result.t_statistic:.2f}, p = {result.p_value:.2g}")
    fig.tight_layout()
    return fig
