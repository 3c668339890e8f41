"""The shipped toy text-to-image pipeline and the toy CLIPs, loaded as chapter 06 loads
Stable Diffusion and CLIP, draw and recognise what the prompt names."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from saekit.analysis import steering as st
from saekit.mini import toy_eval, toy_judge, toy_t2i
from saekit.mini.toyworld import LEAVES, N_CLASSES, ToyWorld
from saekit.mini.toyworld import captions as cap

T2I = toy_t2i.DEFAULT_OUT
JUDGE = toy_judge.DEFAULT_OUT
needs_t2i = pytest.mark.skipif(
    not (T2I / "model_index.json").is_file(),
    reason="toy text-to-image pipeline not built; run `python -m saekit.mini.toy_t2i`",
)
needs_judge = pytest.mark.skipif(
    not (JUDGE / "config.json").is_file(),
    reason="toy judge not built; run `python -m saekit.mini.toy_judge`",
)


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(1)
    return st.load_pipeline(T2I)


def test_contrastive_targets_count_every_true_caption():
    image_f = torch.tensor([[2, 2, 0], [1, 1, 0]])
    text_f = torch.tensor([[2, -1, -1], [-1, 1, -1]])  # "a fish", "a blue ..."
    assert toy_judge.positives(image_f, text_f).tolist() == [[True, False], [False, True]]
    logits = torch.tensor([[5.0, 0.0], [0.0, 5.0]])
    low = toy_judge.contrastive_loss(logits, torch.eye(2, dtype=torch.bool))
    assert low < toy_judge.contrastive_loss(-logits, torch.eye(2, dtype=torch.bool))


@needs_t2i
def test_pipeline_is_stable_diffusion_with_the_toy_clip_text_tower(pipe):
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    clip, processor = st.load_clip(T2I / toy_t2i.CLIP_FOLDER)
    for name, weight in pipe.text_encoder.state_dict().items():
        assert torch.equal(clip.text_model.state_dict()[name], weight), name
    assert pipe.tokenizer.get_vocab() == processor.tokenizer.get_vocab()


@needs_t2i
def test_training_record_and_prompts(pipe):
    record = json.loads((T2I / "training.json").read_text())
    assert record["command"].startswith("python -m saekit.mini.toy_t2i")
    prompted = record["results"]["prompted/penultimate"]
    assert prompted["group_accuracy"] > 0.4 and prompted["style_accuracy"] > 0.4  # chance 0.2
    prompts = st.load_prompts(T2I / toy_t2i.PROMPT_FILE)
    assert len(prompts) >= 100 and all("group" in cap.parse_caption(p) for p in prompts)


@needs_t2i
def test_generated_images_carry_the_prompted_shape_and_palette(pipe):
    # One class per (group, style) pair with distinct styles: ten prompts, chapter 06's path.
    labels = sorted({(leaf.group, leaf.style): c for c, leaf in enumerate(LEAVES)}.values())
    prompts = [cap.canonical_caption(c) for c in labels]
    config = st.GenerationConfig(num_inference_steps=8, guidance_scale=7.5)
    images = st.generate(pipe, prompts, seed=0, config=config)
    assert images[0].size == (32, 32)
    scores = toy_eval.score_images(images, prompts)
    # Chance is 1/5 for each; six of ten right by chance has probability below 1%.
    assert scores["group_accuracy"] >= 0.6, scores
    assert scores["style_accuracy"] >= 0.6, scores


@needs_t2i
def test_unsteered_and_prompt_paths_agree_in_kind(pipe):
    # pipe(prompt=...) conditions on the last layer; it was trained for that layer too.
    prompts = [cap.canonical_caption(c) for c in range(0, N_CLASSES, 3)]
    generator = [torch.Generator().manual_seed(0) for _ in prompts]
    images = pipe(prompts, num_inference_steps=8, generator=generator).images
    scores = toy_eval.score_images(images, prompts)
    assert scores["style_accuracy"] >= 0.6, scores


@pytest.mark.parametrize(
    "folder",
    [
        pytest.param(T2I / toy_t2i.CLIP_FOLDER, marks=needs_t2i),
        pytest.param(JUDGE, marks=needs_judge),
    ],
)
def test_toy_clips_recognise_held_out_images(folder):
    model, processor = st.load_clip(folder)
    world = ToyWorld(seed=2, size=32)  # neither CLIP trained on this world
    toys = world.sample(60, "val")
    texts = [f"a {word}" for word in cap.GROUP_WORDS]
    with torch.inference_mode():
        inputs = processor(
            text=texts, images=[t.image for t in toys], return_tensors="pt", padding=True
        )
        logits = model(**inputs).logits_per_image
    picked = logits.argmax(1).numpy()
    truth = np.array([t.group for t in toys])
    assert (picked == truth).mean() > 0.7


@needs_t2i
@needs_judge
def test_judge_is_not_the_describer():
    describer, _ = st.load_clip(T2I / toy_t2i.CLIP_FOLDER)
    judge, _ = st.load_clip(JUDGE)
    record = json.loads((JUDGE / "training.json").read_text())
    assert record["config"]["world_seed"] != 0 and record["config"]["seed"] != 0
    a = describer.visual_projection.weight
    b = judge.visual_projection.weight
    assert a.shape == b.shape and not torch.allclose(a, b)
