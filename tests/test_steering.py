"""Tests for saekit.analysis.steering (paper 003 §4.1, App. B) on a miniature Stable Diffusion."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline
from sae_lens import StandardSAE, StandardSAEConfig
from transformers import CLIPTextModel, CLIPTokenizer

from saekit.analysis import steering as st
from saekit.mini.diffusion import (
    build_mini_sd,
    build_mini_sd3,
    mini_prompt_file,
    mini_prompts,
    train_clip_tokenizer,
)
from saekit.sae import SAESpec, get_recipe, train_or_load
from saekit.sae.synthetic import atom_recovery, planted_dictionary
from saekit.studies import steering as study

FAST = st.GenerationConfig(num_inference_steps=2)
PROMPTS = ["an elderly man wearing sunglasses in the desert, anime", "a tiny red dragon by the sea"]


@pytest.fixture(scope="module")
def sd_path(tmp_path_factory):
    return build_mini_sd(tmp_path_factory.mktemp("mini_sd"), seed=0)


@pytest.fixture(scope="module")
def pipe(sd_path):
    return st.load_pipeline(sd_path)


@pytest.fixture(scope="module")
def sae():
    torch.manual_seed(0)
    return StandardSAE(StandardSAEConfig(d_in=32, d_sae=64))


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(image) for image in images])


def sometimes_firing_feature(pipe, sae) -> int:
    """The feature that fires on closest to half of PROMPTS' token positions."""
    codes_BTS = sae.encode(st.encode_prompts(pipe, PROMPTS).tokens_BTD).detach()
    firing_S = codes_BTS.gt(0).float().mean((0, 1))
    return int((firing_S - 0.5).abs().argmin())


# ------------------------------------------------------------------ miniature and loading


def test_mini_sd_round_trips_and_generates_quickly(sd_path, pipe):
    assert isinstance(pipe, StableDiffusionPipeline)
    assert pipe.safety_checker is None
    # The offline-trained BPE survives save/load and splits words as CLIP does (</w> word ends).
    reloaded = CLIPTokenizer.from_pretrained(sd_path / "tokenizer")
    trained = train_clip_tokenizer(mini_prompts())
    assert reloaded(PROMPTS).input_ids == trained(PROMPTS).input_ids
    assert reloaded.tokenize("an elderly man")[-1] == "man</w>"
    images = st.generate(pipe, PROMPTS[0], config=FAST)
    assert len(images) == 1 and images[0].size == (32, 32)


def test_shipped_prompt_file_is_the_generated_corpus(tmp_path):
    assert st.load_prompts(mini_prompt_file()) == mini_prompts()
    (tmp_path / "p.txt").write_text("# a comment\n\n  a red cat  \nblue sea\n")
    assert st.load_prompts(tmp_path / "p.txt") == ["a red cat", "blue sea"]
    with pytest.raises(FileNotFoundError, match="one prompt per line"):
        st.load_prompts("")


def test_last_layer_reproduces_diffusers_own_encoding_and_images(pipe):
    config = st.GenerationConfig(layer=-1, num_inference_steps=2)
    ours = st.encode_prompts(pipe, PROMPTS, layer=-1).tokens_BTD
    theirs, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
    assert torch.equal(ours, theirs)
    generator = torch.Generator("cpu").manual_seed(5)
    reference = pipe(PROMPTS[0], negative_prompt="", num_inference_steps=2, generator=generator)
    assert np.array_equal(
        pixels(st.generate(pipe, PROMPTS[0], seed=5, config=config)), pixels(reference.images)
    )


def test_penultimate_layer_equals_a_truncated_text_encoder(sd_path, pipe):
    n_layers = pipe.text_encoder.config.num_hidden_layers
    truncated = CLIPTextModel.from_pretrained(
        sd_path / "text_encoder", num_hidden_layers=n_layers - 1
    )
    ids = pipe.tokenizer(
        PROMPTS, padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        expected = truncated(ids).last_hidden_state
    torch.testing.assert_close(st.encode_prompts(pipe, PROMPTS, layer=-2).tokens_BTD, expected)


def test_text_token_activations_rows_map_back_to_prompts_and_words(pipe):
    acts_ND, info = st.text_token_activations(pipe, PROMPTS, batch_size=1)
    lengths = [len(pipe.tokenizer(p).input_ids) for p in PROMPTS]
    assert len(acts_ND) == len(info) == sum(lengths)
    embeds_BTD = st.encode_prompts(pipe, PROMPTS).tokens_BTD
    rows = torch.tensor(info.prompt.to_numpy()), torch.tensor(info.position.to_numpy())
    torch.testing.assert_close(acts_ND, embeds_BTD[rows])
    first = info[info.prompt == 0]
    assert first.token.iloc[0] == "<|startoftext|>" and first.token.iloc[-1] == "<|endoftext|>"
    words = [w for w in dict.fromkeys(first.word) if w]
    assert words == [
        "an",
        "elderly",
        "man",
        "wearing",
        "sunglasses",
        "in",
        "the",
        "desert",
        ",",
        "anime",
    ]
    padded, padded_info = st.text_token_activations(pipe, PROMPTS, include_padding=True)
    assert padded.shape == (2 * 77, 32) and (padded_info.word.iloc[70:77] == "").all()


def test_bad_inputs_raise_clear_errors(pipe, sae):
    with pytest.raises(ValueError, match="outside this text encoder"):
        st.encode_prompts(pipe, PROMPTS, layer=-5)
    with pytest.raises(IndexError, match="64 features"):
        st.feature_direction(sae, 64)
    with pytest.raises(ValueError, match="expects 32"):
        st.steer_embeddings(torch.zeros(1, 3, 16), sae, 0, 1.0)
    with pytest.raises(RuntimeError, match="huggingface-cli download"):
        st.load_pipeline(st.PAPER_PIPELINE, local_files_only=True)
    with pytest.raises(RuntimeError, match="save_pretrained"):
        st.load_clip(st.PAPER_CLIP, local_files_only=True)


# ------------------------------------------------------------------ steering


@pytest.mark.parametrize("mode", ["add", "amplify"])
def test_zero_strength_reproduces_the_unsteered_image_exactly(pipe, sae, mode):
    config = st.GenerationConfig(num_inference_steps=2, mode=mode)
    feature = sometimes_firing_feature(pipe, sae)
    unsteered = pixels(st.generate(pipe, PROMPTS, seed=3, config=config))
    zero = pixels(st.generate(pipe, PROMPTS, sae, feature, strength=0.0, seed=3, config=config))
    assert np.array_equal(zero, unsteered)
    steered = pixels(st.generate(pipe, PROMPTS, sae, feature, strength=30.0, seed=3, config=config))
    assert not np.array_equal(steered, unsteered)


def test_add_moves_every_token_by_strength_along_the_unit_direction(pipe, sae):
    embeds_BTD = st.encode_prompts(pipe, PROMPTS).tokens_BTD
    steered_BTD = st.steer_embeddings(embeds_BTD, sae, feature=5, strength=2.5)
    unit_D = sae.W_dec[5].detach() / sae.W_dec[5].detach().norm()
    shift_BTD = steered_BTD - embeds_BTD
    torch.testing.assert_close(shift_BTD @ unit_D, torch.full(embeds_BTD.shape[:2], 2.5))
    # Nothing moves orthogonally to the feature.
    residual_BTD = shift_BTD - (shift_BTD @ unit_D)[..., None] * unit_D
    assert residual_BTD.abs().max() < 1e-5


def test_amplify_scales_the_code_and_keeps_the_error_term(pipe, sae):
    embeds_BTD = st.encode_prompts(pipe, PROMPTS).tokens_BTD
    codes_BTS = sae.encode(embeds_BTD).detach()
    feature = sometimes_firing_feature(pipe, sae)
    steered_BTD = st.steer_embeddings(embeds_BTD, sae, feature, strength=3.0, mode="amplify")
    expected_BTD = embeds_BTD + 3.0 * codes_BTS[..., feature, None] * sae.W_dec[feature].detach()
    torch.testing.assert_close(steered_BTD, expected_BTD)
    silent_BT = codes_BTS[..., feature] == 0
    assert silent_BT.any() and torch.equal(steered_BTD[silent_BT], embeds_BTD[silent_BT])


def test_guidance_pushes_the_negative_embedding_away(pipe, sae, monkeypatch):
    seen = {}
    original_call = StableDiffusionPipeline.__call__

    def spy(self, **kwargs):
        seen.update(kwargs)
        return original_call(self, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", spy)
    st.generate(pipe, PROMPTS[0], sae, feature=2, strength=4.0, negative="blurry", config=FAST)
    unit_D = st.feature_direction(sae, 2)
    positive = st.encode_prompts(pipe, [PROMPTS[0]]).tokens_BTD
    negative = st.encode_prompts(pipe, ["blurry"]).tokens_BTD
    torch.testing.assert_close(seen["prompt_embeds"], positive + 4.0 * unit_D)
    torch.testing.assert_close(seen["negative_prompt_embeds"], negative - 4.0 * unit_D)


def test_sd3_steers_the_joint_clip_t5_sequence(tmp_path, monkeypatch):
    pipe = st.load_pipeline(build_mini_sd3(tmp_path / "sd3"))
    assert isinstance(pipe, StableDiffusion3Pipeline)
    config = st.GenerationConfig(num_inference_steps=2, max_sequence_length=16)
    embeds = st.encode_prompts(pipe, PROMPTS, max_sequence_length=16)
    assert embeds.tokens_BTD.shape == (2, 77 + 16, 64) and embeds.pooled_BE.shape == (2, 64)
    acts_ND, info = st.text_token_activations(pipe, PROMPTS, max_sequence_length=16)
    rows = torch.tensor(info.prompt.to_numpy()), torch.tensor(info.position.to_numpy())
    torch.testing.assert_close(acts_ND, embeds.tokens_BTD[rows])
    # Both the CLIP run (positions < 77) and the T5 run name the same words, punctuation stripped.
    t5_words = info[(info.prompt == 0) & (info.position >= 77)].word
    assert [w for w in dict.fromkeys(t5_words) if w] == PROMPTS[0].replace(",", "").split()
    sae = StandardSAE(StandardSAEConfig(d_in=64, d_sae=32))
    unsteered = pixels(st.generate(pipe, PROMPTS[0], seed=2, config=config))
    seen = {}
    original_call = StableDiffusion3Pipeline.__call__

    def spy(self, **kwargs):
        seen.update(kwargs)
        return original_call(self, **kwargs)

    monkeypatch.setattr(StableDiffusion3Pipeline, "__call__", spy)
    assert np.array_equal(
        pixels(st.generate(pipe, PROMPTS[0], sae, 4, 0.0, seed=2, config=config)), unsteered
    )
    steered = st.generate(pipe, PROMPTS[0], sae, 4, 3.0, seed=2, config=config)
    assert not np.array_equal(pixels(steered), unsteered)
    torch.testing.assert_close(
        seen["prompt_embeds"], embeds.tokens_BTD[:1] + 3.0 * st.feature_direction(sae, 4)
    )
    torch.testing.assert_close(seen["pooled_prompt_embeds"], embeds.pooled_BE[:1])  # left unsteered


# ------------------------------------------------------------------ SAE training, sweeps and figures


def test_text_sae_through_the_cache_recovers_planted_atoms(tmp_path, monkeypatch):
    data = planted_dictionary(n_rows=2048, d_in=16, n_atoms=12, active=2, noise=0.01, seed=0)
    recipe = get_recipe(
        "stevens2025",
        lr=1e-2,
        lr_warmup_steps=20,
        sparsity_warmup_steps=20,
        batch_size=64,
        norm_sample_rows=2048,
        dead_feature_window=50,
    )
    spec = SAESpec(arch="topk", expansion=4, k=2, recipe=recipe)
    sae = train_or_load(spec, data.acts_ND, root=tmp_path, epochs=8, seed=0, progress=False)
    assert sae.cfg.d_in == 16 and sae.cfg.d_sae == 64
    assert atom_recovery(sae.W_dec, data.atoms_AD, threshold=0.9) >= 0.9

    import saekit.sae.cache

    calls = []
    real_train = saekit.sae.cache.train_on_tensor
    monkeypatch.setattr(
        saekit.sae.cache,
        "train_on_tensor",
        lambda *a, **k: calls.append(1) or real_train(*a, **k),
    )
    again = train_or_load(spec, data.acts_ND, root=tmp_path, epochs=8, seed=0, progress=False)
    assert not calls and torch.equal(again.W_dec, sae.W_dec)  # same data and settings: reloaded
    train_or_load(spec, data.acts_ND + 0.5, root=tmp_path, epochs=1, seed=0, progress=False)
    assert len(calls) == 1  # other data: retrained


def test_steer_sweep_grid_and_effect(pipe, sae):
    prompts = PROMPTS
    originals = st.generate(pipe, prompts, seed=4, config=FAST)
    sweep = st.steer_sweep(pipe, prompts, sae, [1, 6], [0.0, 30.0], seed=4, config=FAST)
    assert set(sweep) == {1, 6} and list(sweep[1]) == [0.0, 30.0]
    effect = st.steering_effect(originals, sweep)
    assert effect.loc[1, 0.0] == 0 and effect.loc[6, 0.0] == 0  # λ = 0 is the original
    expected = np.abs(pixels(sweep[6][30.0]).astype(float) - pixels(originals)).mean()
    assert effect.loc[6, 30.0] == pytest.approx(expected) and expected > 0

    fig = study.steering_grid(originals, sweep[6], prompts, column_format="λ = {:g}", title="f6")
    assert len(fig.axes) == 2 * 3
    assert [ax.get_title() for ax in fig.axes[:3]] == ["original", "λ = 0", "λ = 30"]
    shown = fig.axes[5].get_images()[0].get_array()
    assert np.array_equal(np.asarray(shown), np.asarray(sweep[6][30.0][1]))
    plt.close(fig)
    with pytest.raises(ValueError, match="one steered image per prompt"):
        study.steering_grid(originals, {"bad": originals[:1]})


def test_mini_models_build_once_and_redo_an_interrupted_build(tmp_path, monkeypatch):
    import saekit.mini.diffusion as mini

    built = []

    def fake(kind):
        def build(path, seed=0):
            built.append(kind)
            path.mkdir(parents=True)
            (path / "weights").write_text(kind)
            return path

        return build

    monkeypatch.setattr(mini, "build_mini_sd", fake("sd"))
    monkeypatch.setattr(mini, "build_mini_clip", fake("clip"))
    (tmp_path / ".mini-sd.partial").mkdir()  # left behind by an interrupted build
    sd, clip_path = mini.mini_models(tmp_path)
    assert (sd / "weights").read_text() == "sd" and (clip_path / "weights").read_text() == "clip"
    assert not (tmp_path / ".mini-sd.partial").exists()
    assert mini.mini_models(tmp_path) == (sd, clip_path) and built == ["sd", "clip"]
