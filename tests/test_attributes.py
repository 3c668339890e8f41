"""Tests for naming and validating steering features (paper 003 §4.2, Table 3): saekit.analysis
attributes, describers and attribute_validation, on a miniature Stable Diffusion and CLIP."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sae_lens import StandardSAE, StandardSAEConfig
from scipy import stats

from saekit.analysis import attribute_validation as av
from saekit.analysis import attributes as at
from saekit.analysis import describers as ds
from saekit.analysis import steering as st
from saekit.mini.diffusion import build_mini_clip, build_mini_sd, mini_prompts, mini_vocabulary
from saekit.sae.synthetic import identity_sae
from saekit.studies import steering as study

FAST = st.GenerationConfig(num_inference_steps=2)
PROMPTS = ["an elderly man wearing sunglasses in the desert, anime", "a tiny red dragon by the sea"]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return st.load_pipeline(build_mini_sd(tmp_path_factory.mktemp("mini_sd"), seed=0))


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return st.load_clip(build_mini_clip(tmp_path_factory.mktemp("mini_clip"), seed=0))


@pytest.fixture(scope="module")
def sae():
    torch.manual_seed(0)
    return StandardSAE(StandardSAEConfig(d_in=32, d_sae=64))


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(image) for image in images])


# ------------------------------------------------------------------ attribute discovery


def test_descriptive_features_on_planted_codes():
    words = ["red", "dog", "", "the", "quickly", "running", "a", "dog"]
    lexicon = {"red": "a", "dog": "n", "quickly": "r", "running": "v", "a": "n"}
    acts_ND = torch.zeros(len(words), 4)
    acts_ND[[0, 1, 4], 0] = torch.tensor([1.0, 2.0, 3.0])  # adjective, noun, adverb only
    acts_ND[[2, 3, 6], 1] = 5.0  # special token, "the", and "a" (a WordNet noun, but closed-class)
    acts_ND[[5, 7], 2] = torch.tensor([3.0, 1.0])  # verb 3, noun 1
    acts_ND[7, 3] = 9.0  # descriptive, but fires once
    acts_ND[:, 1] -= 1.0  # negative pre-activations must not count
    table = at.descriptive_features(
        identity_sae(4), acts_ND, words, lexicon, min_share=0.8, min_active=2, top_k=2, batch_size=3
    )
    np.testing.assert_allclose(table.descriptive_share, [1.0, 0.0, 0.25, 1.0], atol=1e-6)
    assert table.n_active.tolist() == [3, 3, 2, 1]
    assert table.selected.tolist() == [True, False, False, False]
    assert table.top_words[0] == ["quickly", "dog"] and table.top_words[2] == ["running", "dog"]


def test_wordnet_lexicon_parts_of_speech():
    try:
        lexicon = at.wordnet_lexicon()
    except (ImportError, LookupError):
        pytest.skip("WordNet corpus not installed (NLTK_DATA)")
    assert lexicon("dogs") == "n" and lexicon("quickly") == "r" and lexicon("eat") == "v"
    assert lexicon("happy") in {"a", "s"} and lexicon("the") is None and lexicon("painted") == "v"
    assert at.is_descriptive("sunglasses", lexicon) and not at.is_descriptive("a", lexicon)


def test_dominant_keywords_by_idf_on_a_hand_made_table():
    keywords = {
        0: ["photo", "Elderly", "old"],  # idf: photo log(4/4)=0, elderly log4, old log2
        1: ["photo", "neon", "neon", "old"],  # neon: 2*log4 beats old: log2
        2: ["photo", "bird"],
        3: ["photo", "colorful", "sea"],  # colorful, sea tie on tf*idf and tf: first named wins
        4: [],  # no keywords: left out, and not counted as a document
    }
    assert at.dominant_keywords(keywords) == {0: "elderly", 1: "neon", 2: "bird", 3: "colorful"}
    # A keyword every feature shares loses, even when named most often.
    assert at.dominant_keywords({0: ["art", "art", "art", "cat"], 1: ["art", "dog"]}) == {
        0: "cat",
        1: "dog",
    }


def test_clip_describer_agrees_with_clip_forward(clip, pipe, sae):
    model, processor = clip
    vocabulary = mini_vocabulary()
    originals = st.generate(pipe, PROMPTS, seed=1, config=FAST)
    steered = st.generate(pipe, PROMPTS, sae, 9, 40.0, seed=1, config=FAST)
    describer = ds.ClipDescriber(model, processor, vocabulary, top_k=4)
    with torch.no_grad():

        def logits(images):
            inputs = processor(text=vocabulary, images=images, return_tensors="pt", padding=True)
            return model(**inputs).logits_per_image

        expected_V = (logits(steered).mean(0) - logits(originals).mean(0)) / model.logit_scale.exp()
    torch.testing.assert_close(
        describer.scores(originals, steered), expected_V, atol=1e-5, rtol=1e-4
    )
    assert describer.describe(originals, steered) == [
        vocabulary[i] for i in expected_V.argsort(descending=True)[:4]
    ]


def test_parse_keywords_cleans_an_lmm_answer():
    answer = "Keywords: Neon, elderly man.\n- Sunglasses; 2) anime style\n* neon\n\ufffd\ufffd"
    assert ds.parse_keywords(answer) == ["neon", "elderly man", "sunglasses", "anime style"]


def test_lmm_describer_shows_all_images_and_reads_only_the_answer(tmp_path, monkeypatch):
    from saekit.mini.llava import build_mini_llava

    model, processor = ds.load_lmm(build_mini_llava(tmp_path / "llava"))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(4)]
    describer = ds.LMMDescriber(model, processor, max_new_tokens=4)
    assert isinstance(describer.describe(images[:2], images[2:]), list)  # the real generate runs
    answer_ids = processor.tokenizer("neon, elderly man", add_special_tokens=False).input_ids

    def scripted_generate(**inputs):
        assert inputs["pixel_values"].shape[0] == 4 and inputs["max_new_tokens"] == 4
        return torch.cat([inputs["input_ids"], torch.tensor([answer_ids])], dim=1)

    monkeypatch.setattr(model, "generate", scripted_generate)
    assert describer.describe(images[:2], images[2:]) == ["neon", "elderly man"]


def test_discovery_and_validation_run_end_to_end(pipe, clip, sae):
    model, processor = clip
    prompts = mini_prompts(4, seed=1)
    describer = ds.ClipDescriber(model, processor, mini_vocabulary(), top_k=2)
    found = at.discover_attributes(
        pipe, sae, [3, 8], prompts, describer, 30.0, images_per_call=2, config=FAST
    )
    assert set(found.keywords) == {3, 8} and all(len(k) == 4 for k in found.keywords.values())
    assert not np.array_equal(pixels(found.steered[3]), pixels(found.originals))
    attributes = at.dominant_keywords(found.keywords)
    assert all(attributes[f] in found.keywords[f] for f in (3, 8))
    pairs = [(p, f, attributes[f]) for p in prompts[:2] for f in (3, 8)]
    sims = av.validate_steering(pipe, model, processor, sae, pairs, 30.0, config=FAST)
    assert len(sims) == 4 and sims.feature.tolist() == [3, 8, 3, 8]
    # Pairs with the same prompt share the original image, so share its (I_orig, t_orig) score.
    assert sims.orig_orig[0] == pytest.approx(sims.orig_orig[1], abs=1e-6)
    assert av.table3(sims).n == 4


# ------------------------------------------------------------------ validation


def test_clip_similarities_match_clip_forward(clip, pipe):
    model, processor = clip
    originals = st.generate(pipe, PROMPTS, seed=0, config=FAST)
    steered = st.generate(pipe, PROMPTS, seed=1, config=FAST)
    sims = av.clip_similarities(model, processor, originals, steered, PROMPTS, ["neon", "bird"])

    def cosine(image, text):
        with torch.no_grad():
            out = model(**processor(text=[text], images=[image], return_tensors="pt", padding=True))
            return float(out.logits_per_image[0, 0] / model.logit_scale.exp())

    for i, prompt in enumerate(PROMPTS):
        assert sims.orig_orig[i] == pytest.approx(cosine(originals[i], prompt), abs=1e-5)
        assert sims.steer_orig[i] == pytest.approx(cosine(steered[i], prompt), abs=1e-5)
    assert sims.steer_attr[1] == pytest.approx(cosine(steered[1], PROMPTS[1] + ", bird"), abs=1e-5)
    with pytest.raises(ValueError, match="aligned"):
        av.clip_similarities(model, processor, originals, steered[:1], PROMPTS, ["neon", "bird"])


def test_table3_statistics_agree_with_scipy_on_synthetic_numbers():
    rng = np.random.default_rng(0)
    n = 100
    steer_orig = rng.normal(0.216, 0.03, n)
    sims = pd.DataFrame(
        {
            "orig_orig": rng.normal(0.264, 0.03, n),
            "steer_orig": steer_orig,
            "steer_attr": steer_orig + rng.normal(0.012, 0.01, n),
        }
    )
    result = av.table3(sims, alternative="greater")
    expected = stats.ttest_rel(sims.steer_attr, sims.steer_orig, alternative="greater")
    assert result.t_statistic == pytest.approx(expected.statistic)
    assert result.p_value == pytest.approx(expected.pvalue)
    assert result.n == n and result.p_value < 1e-4
    assert result.table.cosine_similarity.tolist() == pytest.approx(
        [sims.orig_orig.mean(), sims.steer_orig.mean(), sims.steer_attr.mean()]
    )
    assert result.relative_increase == pytest.approx(sims.steer_attr.mean() / steer_orig.mean() - 1)


def test_table3_hand_computed_paired_t_test():
    # Differences 1, 2, 3 (x0.01): mean 2, sd 1, t = 2 / (1 / sqrt 3) = 2 sqrt 3 with 2 dof, and
    # the t(2) distribution's CDF 1/2 + t / (2 sqrt(2 + t^2)) gives p = 1 - sqrt(12 / 14).
    sims = pd.DataFrame(
        {
            "orig_orig": [0.3, 0.3, 0.3],
            "steer_orig": [0.20, 0.20, 0.20],
            "steer_attr": [0.21, 0.22, 0.23],
        }
    )
    result = av.table3(sims)
    assert result.t_statistic == pytest.approx(2 * math.sqrt(3))
    assert result.p_value == pytest.approx(1 - math.sqrt(12 / 14))
    assert av.table3(sims, alternative="greater").p_value == pytest.approx(
        (1 - math.sqrt(12 / 14)) / 2
    )
    assert result.relative_increase == pytest.approx(0.1)
    # Negative similarities (an untrained CLIP): t_attr still wins, and the increase says so.
    negative = sims.assign(steer_orig=-sims.steer_orig, steer_attr=-sims.steer_orig + 0.02)
    assert av.table3(negative).relative_increase == pytest.approx(0.1)
    assert result.table.image.tolist() == ["I_orig", "I_steer", "I_steer"]
    assert result.table.text.tolist() == ["t_orig", "t_orig", "t_attr"]


def test_table3_figure_reports_the_paired_test():
    rng = np.random.default_rng(1)
    steer_orig = rng.normal(0.2, 0.02, 12)
    sims = pd.DataFrame(
        {
            "orig_orig": rng.normal(0.25, 0.02, 12),
            "steer_orig": steer_orig,
            "steer_attr": steer_orig + rng.normal(0.01, 0.01, 12),
        }
    )
    result = av.table3(sims)
    fig = study.table3_figure(sims)
    left, right = fig.axes[:2]
    assert f"t = {result.t_statistic:.2f}" in right.get_title() and "n = 12" in left.get_title()
    # one faint line per pair plus the mean line
    assert len(left.lines) >= 12
    plt.close(fig)


def test_attribute_pairs_cycle_features_and_skip_prompts_naming_the_attribute():
    prompts = ["a neon cat", "a dog at sea", "an old bird", "a red car", "a neon sign by the sea"]
    attributes = {7: "neon", 2: "sea"}
    pairs = av.attribute_pairs(prompts, attributes, n=6, seed=3)
    assert [f for _, f, _ in pairs] == [2, 7, 2, 7, 2, 7]
    assert all(attributes[f] == a for _, f, a in pairs)
    assert all(a not in p.split() for p, _, a in pairs)
    # the same seed gives the same pairs; the first pairs use distinct prompts
    assert av.attribute_pairs(prompts, attributes, n=6, seed=3) == pairs
    assert len({p for p, _, _ in pairs[:3]}) == 3
    # a whole-word match only: "seal" does not name "sea"
    assert av.attribute_pairs(["a seal"], {0: "sea"}, n=1) == [("a seal", 0, "sea")]
    with pytest.raises(ValueError, match="already names 'neon'"):
        av.attribute_pairs(["a neon cat"], {7: "neon"}, n=1)
    with pytest.raises(ValueError, match="no attributes"):
        av.attribute_pairs(prompts, {}, n=1)


def test_attribute_table_and_describer_loading(clip):
    found = at.Discovery(
        prompts=["p"],
        originals=[],
        steered={},
        keywords={3: ["neon", "Neon", "bird"], 5: ["sea"]},
    )
    descriptive = pd.DataFrame({"feature": [3, 5], "top_words": [["red", "tiny", "red"], ["sea"]]})
    table = study.attribute_table(found, {3: "neon", 5: "sea"}, descriptive)
    assert table.to_dict("records") == [
        {
            "feature": 3,
            "attribute": "neon",
            "keywords": "neon ×2, bird",
            "fires_on": "red ×2, tiny",
        },
        {"feature": 5, "attribute": "sea", "keywords": "sea", "fires_on": "sea"},
    ]
    model, processor = clip
    describer = ds.load_describer("clip", model, processor, ["neon", "sea"], top_k=1)
    assert isinstance(describer, ds.ClipDescriber) and describer.top_k == 1
    with pytest.raises(ValueError, match="vocabulary"):
        ds.load_describer("clip", model, processor, [])
