"""The shipped toy LLaVA: loaded as chapter 07 loads LLaVA-1.5, it captions toy images."""

from __future__ import annotations

import json

import pytest
import torch

from saekit.analysis import multimodal as mm
from saekit.mini import toy_eval, toy_llava
from saekit.mini.toyworld import CLASS_NAMES, GROUP_OF_CLASS, ToyWorld, toyvit_path
from saekit.mini.toyworld import captions as cap

pytestmark = pytest.mark.skipif(
    not (toy_llava.DEFAULT_OUT / "config.json").is_file(),
    reason="toy LLaVA not built; run `python -m saekit.mini.toy_llava`",
)


@pytest.fixture(scope="module")
def llava():
    torch.set_num_threads(1)
    return mm.load_llava(str(toy_llava.DEFAULT_OUT))


def test_training_record_says_how_it_was_made_and_how_good_it_is():
    record = json.loads((toy_llava.DEFAULT_OUT / "training.json").read_text())
    assert record["command"].startswith("python -m saekit.mini.toy_llava")
    captions = record["results"]["val_captions"]
    assert captions["n"] >= 100
    assert captions["group_accuracy"] > 0.6 and captions["style_accuracy"] > 0.6  # chance 0.2


def test_vision_tower_is_the_toy_vit(llava):
    model, processor = llava
    from transformers import ViTForImageClassification

    reference = ViTForImageClassification.from_pretrained(toyvit_path()).vit.state_dict()
    tower = model.model.vision_tower.state_dict()
    for name, weight in reference.items():
        assert torch.equal(tower[name], weight), name
    assert mm.patch_grid(model, processor) == (6, 6)


def test_describes_held_out_images_through_the_chapter_path(llava):
    model, processor = llava
    # Two val images of every group, of different styles: the chapter's answer path.
    labels = [c for c in range(len(CLASS_NAMES)) if c % 3 == 0]
    world = ToyWorld(seed=0, size=48)
    images = [world.render(label + 30 * 7, "val").image for label in labels]
    config = mm.AnswerConfig(layer=2, max_new_tokens=8, batch_size=len(images))
    answers = mm.image_responses(model, processor, images, labels, config)
    scores = toy_eval.score_captions(answers.texts, labels)
    assert scores["group_accuracy"] >= 0.7, answers.texts
    assert scores["style_accuracy"] >= 0.7, answers.texts
    # Activations were read while answering: one row per answer token, model width.
    assert all(a.shape[1] == model.config.text_config.hidden_size for a in answers.acts)


def test_defines_classes_by_their_planted_factors_without_an_image(llava):
    model, processor = llava
    names = [CLASS_NAMES[c] for c in (0, 9, 20, 29)]
    config = mm.AnswerConfig(layer=2, max_new_tokens=14, batch_size=4)
    answers = mm.text_responses(model, processor, names, config)
    groups = [cap.parse_caption(t).get("group") for t in answers.texts]
    assert sum(g == GROUP_OF_CLASS[c] for g, c in zip(groups, (0, 9, 20, 29), strict=True)) >= 3
