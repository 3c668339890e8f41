"""Tests for saekit.analysis.multimodal (paper 003 §5) on a miniature LLaVA built offline."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch
from PIL import Image
from sae_lens import StandardSAE, StandardSAEConfig
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from saekit.analysis import modality_overlap as mo
from saekit.analysis import multimodal as mm
from saekit.analysis import patch_evolution as pe
from saekit.mini.llava import build_mini_llava

CLASSES = ["clock", "red circle", "great_white_shark"]


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    path = build_mini_llava(tmp_path_factory.mktemp("mini_llava"), seed=0, extra_words=CLASSES)
    model, processor = mm.load_llava(str(path))
    return path, model, processor


def noise_images(n: int, seed: int = 0, size: tuple[int, int] = (48, 48)) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8)) for _ in range(n)]


def planted_sae(W_enc: torch.Tensor) -> StandardSAE:
    """A ReLU SAE whose codes are relu(x @ W_enc): zero biases, chosen encoder."""
    d_in, d_sae = W_enc.shape
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae))
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.W_dec.copy_(W_enc.T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


# ------------------------------------------------------------------ miniature and loading


def test_mini_llava_round_trips_through_from_pretrained(llava, tmp_path):
    path, model, processor = llava
    assert isinstance(model, LlavaForConditionalGeneration)
    assert isinstance(processor, LlavaProcessor)
    assert mm.patch_grid(model, processor) == (6, 6)
    # The processor expands one <image> into one token per patch (CLS dropped, as LLaVA-1.5).
    prompt = mm.build_prompt(processor, "Describe this image.", with_image=True)
    assert prompt.startswith("USER: <image>\n") and prompt.endswith("ASSISTANT:")
    ids = processor(images=noise_images(1), text=[prompt], return_tensors="pt")["input_ids"]
    assert int((ids == model.config.image_token_id).sum()) == 36
    # Class names given as extra words tokenize to whole tokens, not bytes.
    assert len(processor.tokenizer.tokenize("clock")) == 1
    # Same seed, same weights; another seed, other weights.
    again, _ = mm.load_llava(str(build_mini_llava(tmp_path / "again", seed=0, extra_words=CLASSES)))
    other, _ = mm.load_llava(str(build_mini_llava(tmp_path / "other", seed=1, extra_words=CLASSES)))
    name, weight = next(iter(model.state_dict().items()))
    assert torch.equal(weight, again.state_dict()[name])
    assert not torch.equal(weight, other.state_dict()[name])


def test_load_llava_fails_offline_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_cache"))
    with pytest.raises(OSError, match="build_mini_llava"):
        mm.load_llava("llava-hf/no-such-llava-checkpoint")


# -------------------------------------------------------------------- image-token positions


def test_image_token_positions_on_planted_sequences():
    image_id, grid = 9, (2, 3)
    ids_BT = torch.full((2, 12), 5)
    ids_BT[0, 1:7] = image_id  # image block near the start
    ids_BT[1, 4:10] = image_id  # shifted, as with left padding or a longer prefix
    tokens = mm.image_token_positions(ids_BT, image_id, grid)
    assert tokens.positions_BP.tolist() == [list(range(1, 7)), list(range(4, 10))]
    assert tokens.rows_P.tolist() == [0, 0, 0, 1, 1, 1]
    assert tokens.cols_P.tolist() == [0, 1, 2, 0, 1, 2]
    grid_BHW = tokens.to_grid(torch.arange(12.0).reshape(2, 6))
    assert grid_BHW[1].tolist() == [[6, 7, 8], [9, 10, 11]]
    # With CLS kept ("full" strategy) the first placeholder is skipped.
    ids_BT[0, 0] = image_id
    ids_BT[1, 3] = image_id
    assert mm.image_token_positions(ids_BT, image_id, grid).positions_BP[1].tolist() == list(
        range(4, 10)
    )
    with pytest.raises(ValueError, match="one image"):
        mm.image_token_positions(ids_BT[:, :8], image_id, grid)


def test_image_tokens_carry_projector_output_in_grid_order(llava):
    _, model, processor = llava
    prompt = mm.build_prompt(processor, "Describe this image.", with_image=True)
    inputs = processor(images=noise_images(2), text=[prompt] * 2, return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
        projected_BPD = model.model.get_image_features(
            pixel_values=inputs["pixel_values"],
            vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        ).pooler_output
    projected_BPD = torch.stack(list(projected_BPD))
    tokens = mm.image_token_positions(inputs["input_ids"], model.config.image_token_id, (6, 6))
    embeds_BPD = out.hidden_states[0][torch.arange(2)[:, None], tokens.positions_BP]
    torch.testing.assert_close(embeds_BPD, projected_BPD)


@pytest.mark.parametrize("cell", [(0, 0), (1, 4), (5, 2)])
def test_planted_patch_moves_its_own_grid_cell(llava, cell):
    """Paint one 8x8 patch white: the image token mapped to that cell must change the most,
    at the projector and at a language-model block."""
    _, model, processor = llava
    base = np.full((48, 48, 3), 90, dtype=np.uint8)
    planted = base.copy()
    r, c = cell
    planted[8 * r : 8 * r + 8, 8 * c : 8 * c + 8] = 255
    images = [Image.fromarray(base), Image.fromarray(planted)]
    acts, tokens = mm.image_token_activations(model, processor, images, (mm.PROJECTOR, 0))
    for key in (mm.PROJECTOR, 0):
        change_P = (acts[key][1] - acts[key][0]).norm(dim=-1)
        change_HW = tokens.to_grid(change_P[None])[0]
        assert divmod(int(change_HW.argmax()), 6) == cell, key


# ------------------------------------------------------------------- response activations


def test_response_mask_stops_after_first_eos():
    eos, pad = 2, 3
    new_BN = torch.tensor([[7, 8, 2, 3, 3], [2, 3, 3, 3, 3], [7, 8, 9, 10, 11], [7, 4, 2, 2, 2]])
    keep = mm.response_mask(new_BN, [eos, 4])
    assert keep.tolist() == [
        [True, True, True, False, False],
        [True, False, False, False, False],
        [True] * 5,
        [True, True, False, False, False],
    ]
    assert pad not in new_BN[keep].tolist()  # padding only ever follows an EOS


def test_response_activations_match_teacher_forced_pass(llava):
    _, model, processor = llava
    cfg = mm.AnswerConfig(layer=2, max_new_tokens=6, batch_size=3)
    # Different prompt lengths in one batch: left padding must not change the activations.
    names = ["clock", "great_white_shark is a kind of animal", "red circle"]
    batched = mm.text_responses(model, processor, names, cfg)
    assert batched.labels.tolist() == [0, 1, 2]
    assert [a.shape for a in batched.acts] == [(6, 64)] * 3
    for name, acts_TD in zip(names, batched.acts, strict=True):
        alone = mm.text_responses(model, processor, [name], cfg)
        torch.testing.assert_close(acts_TD, alone.acts[0], atol=1e-4, rtol=1e-4)
    # Row t is the block output at the position that produced response token t.
    prompt = mm.build_prompt(processor, "What is a great white shark?", with_image=False)
    prompt_ids = processor.tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        full = model.generate(prompt_ids, max_new_tokens=6, do_sample=False)
        hidden = model(full, output_hidden_states=True).hidden_states[cfg.layer + 1][0]
    n_prompt = prompt_ids.shape[1]
    expected = hidden[n_prompt - 1 : n_prompt - 1 + 6]
    got = mm.text_responses(model, processor, ["great_white_shark"], cfg).acts[0]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_image_responses_and_class_profiles(llava):
    _, model, processor = llava
    cfg = mm.AnswerConfig(layer=2, max_new_tokens=4)
    images = noise_images(3, seed=1)
    responses = mm.image_responses(model, processor, images, [0, 1, 0], cfg)
    assert responses.stacked().shape == (12, 64)
    sae = planted_sae(torch.randn(64, 32, generator=torch.Generator().manual_seed(0)))
    profile_CS = mo.class_profiles(sae, responses, n_classes=3)
    with torch.no_grad():
        means = [sae.encode(a).mean(0).numpy() for a in responses.acts]
    np.testing.assert_allclose(profile_CS[0], (means[0] + means[2]) / 2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(profile_CS[1], means[1], rtol=1e-5, atol=1e-6)
    assert not profile_CS[2].any()  # no image of class 2


# -------------------------------------------------------------------------- image tokens to maps


def test_evolution_study_end_to_end_on_mini(llava):
    _, model, processor = llava
    images = noise_images(3, seed=2, size=(60, 80))
    acts, tokens = mm.image_token_activations(model, processor, images, (mm.PROJECTOR, 1))
    assert acts[mm.PROJECTOR].shape == acts[1].shape == (3, 36, 64)
    assert tokens.grid == (6, 6)
    gen = torch.Generator().manual_seed(0)
    early, _ = pe.patch_maps(
        planted_sae(torch.randn(64, 16, generator=gen)), acts[mm.PROJECTOR], tokens.grid
    )
    late, _ = pe.patch_maps(planted_sae(torch.randn(64, 16, generator=gen)), acts[1], tokens.grid)
    evo = pe.compare_patch_maps(early, late)
    assert evo.overlay_BHW.shape == (3, 6, 6)
    # The overlay is a faithful code of both masks.
    assert torch.equal(evo.overlay_BHW % 2 == 1, evo.early_BHW)
    assert torch.equal(evo.overlay_BHW >= 2, evo.late_BHW)
    assert mm.square_crop(processor, images[0]).size == (48, 48)
    with pytest.raises(ValueError, match="block index"):
        mm.image_token_activations(model, processor, images, (99,))
