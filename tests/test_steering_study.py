"""Chapter 06's study code (saekit.studies.steering): settings, models, judge, strengths, text."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import CLIPModel

from saekit.analysis.attribute_validation import table3
from saekit.analysis.describers import ClipDescriber
from saekit.analysis.steering import PAPER_CLIP, PAPER_PIPELINE
from saekit.mini.toyworld import captions
from saekit.runner import chapter_parameters
from saekit.studies import steering as study

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "06_steering.py"


def test_settings_fields_are_exactly_the_chapters_parameters():
    declared = chapter_parameters(NOTEBOOK)
    assert list(declared) == [f.name for f in dataclasses.fields(study.SteeringSettings)]
    for name in study.SteeringSettings.PAPER:  # profile-dependent: None in the notebook
        assert declared[name] is None, name


def test_settings_resolve_each_profile():
    mini = study.SteeringSettings.for_profile("mini", device="cpu")
    assert (mini.l1, mini.lr, mini.epochs, mini.num_inference_steps) == (1.0, 1e-3, 30, 8)
    assert mini.pipeline == str(study.TOY_PIPELINE) and mini.describer == "clip"
    assert mini.judge_clip == str(study.TOY_JUDGE_CLIP)
    assert mini.describer_clip == str(study.TOY_DESCRIBER_CLIP)
    assert mini.prompt_file == str(study.TOY_PIPELINE / "prompts.txt") == mini.captions_file
    assert mini.vocabulary == tuple(captions.vocabulary())
    paper = study.SteeringSettings.for_profile("paper", vocabulary=["neon", "sea"], epochs=None)
    assert (paper.pipeline, paper.judge_clip) == (PAPER_PIPELINE, PAPER_CLIP)
    assert paper.describer == study.PAPER_DESCRIBER and paper.describer_clip != PAPER_CLIP
    assert (paper.l1, paper.lr, paper.epochs, paper.num_inference_steps) == (10.0, 1e-4, 3, 50)
    assert paper.prompt_file is None and paper.vocabulary == ("neon", "sea")
    assert paper.replace(caption_file="coco.txt").captions_file == "coco.txt"
    config = mini.replace(mode="amplify", layer=-1).generation()
    assert (config.layer, config.mode, config.num_inference_steps) == (-1, "amplify", 8)
    spec = mini.sae_spec().resolved()
    assert (spec.expansion, spec.l1, spec.recipe.lr, spec.name) == (8, 1.0, 1e-3, "text-sae")


def test_mini_describer_and_judge_are_separately_trained_clips(tmp_path):
    settings = study.SteeringSettings.for_profile("mini", device="cpu")
    models = study.resolve_models(settings, tmp_path)
    assert models.describer_clip != models.judge_clip
    assert study.has_planted_truth(models)
    assert not study.has_planted_truth(study.SteeringModels("org/sd", None, "org/clip"))
    describer = CLIPModel.from_pretrained(models.describer_clip).state_dict()
    judge = CLIPModel.from_pretrained(models.judge_clip).state_dict()
    assert describer.keys() == judge.keys()
    differ = [k for k in describer if not torch.equal(describer[k], judge[k])]
    assert "text_projection.weight" in differ and "visual_projection.weight" in differ
    namer = study.load_namer(settings, models)
    assert isinstance(namer, ClipDescriber)
    assert list(namer.vocabulary) == captions.vocabulary()
    text = study.who_judged(settings, models)
    assert models.judge_clip in text and models.describer_clip in text


def test_a_judge_that_is_the_describer_is_refused(tmp_path):
    same = study.SteeringSettings.for_profile(
        "paper", describer="clip", describer_clip=str(tmp_path), judge_clip=str(tmp_path) + "/"
    )
    with pytest.raises(ValueError, match="must not be the one that validates"):
        study.resolve_models(same, tmp_path)
    with pytest.raises(ValueError, match="must not be the one"):
        study.resolve_models(
            same.replace(describer_clip="org/clip", judge_clip="org/clip"), tmp_path
        )
    # An LMM names the features on paper: no describer CLIP is involved.
    paper = study.resolve_models(study.SteeringSettings.for_profile("paper"), tmp_path)
    assert paper == study.SteeringModels(PAPER_PIPELINE, None, PAPER_CLIP)
    assert study.PAPER_DESCRIBER in study.who_judged(
        study.SteeringSettings.for_profile("paper"), paper
    )


def test_chosen_features_are_the_most_active_selected_ones():
    descriptive = pd.DataFrame(
        {
            "feature": [0, 1, 2, 3],
            "n_active": [9, 50, 30, 70],
            "selected": [True, True, True, False],
        }
    )
    assert study.chosen_features(descriptive, 2) == [1, 2]
    assert study.chosen_features(descriptive, 10) == [1, 2, 0]
    with pytest.raises(ValueError, match="smaller l1"):
        study.chosen_features(descriptive.assign(selected=False), 2)


def test_strengths_split_and_summaries():
    acts_ND = torch.tensor([[3.0, 4.0], [0.0, 1.0]])  # norms 5 and 1: mean 3
    settings = study.SteeringSettings.for_profile("mini", device="cpu")
    strength, strengths = study.steering_strengths(settings, acts_ND)
    assert strength == pytest.approx(2.25) and strengths == pytest.approx(
        (0.5625, 1.125, 2.25, 4.5)
    )
    assert study.steering_strengths(settings.replace(strength=0.0), acts_ND) == (
        0.0,
        (0.0, 0.0, 0.0, 0.0),
    )
    fixed = settings.replace(strength=1.0, strengths=(1.0, 3.0))
    assert study.steering_strengths(fixed, acts_ND) == (1.0, (1.0, 3.0))
    prompts = [f"p{i}" for i in range(10)]
    sample, test = study.split_prompts(prompts, 3, seed=4)
    assert len(sample) == 3 and sorted(sample + test) == sorted(prompts)
    assert study.split_prompts(prompts, 3, seed=4) == (sample, test)
    assert study.split_prompts(prompts, 3, seed=5) != (sample, test)
    sims = pd.DataFrame(
        {"orig_orig": [0.3] * 3, "steer_orig": [0.2] * 3, "steer_attr": [0.21, 0.22, 0.23]}
    )
    models = study.SteeringModels("sd", "describer", "judge")
    summary = study.table3_summary(table3(sims), settings, models)
    assert "+10.0%" in summary and "n = 3" in summary and "`judge`" in summary
    assert "`describer`" in summary
