"""The toy world: planted taxonomy, generator, shifts, masks, export, and the shipped toy ViT."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from saekit.mini.toyworld import (
    GROUPS,
    LEAVES,
    MIDS,
    N_CLASSES,
    PART_NAMES,
    SHIFTS,
    WNIDS,
    ToyWorld,
    export_imagefolder,
    far_ood,
    masks_root,
    render,
    taxonomy,
    toyvit_path,
)
from saekit.mini.toyworld.train import TrainConfig, to_pixels, train

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parent.parent
GROUP_PARTS = [  # known answers: the parts each shape family is drawn with
    {"body", "head", "legs", "tail"},
    {"body", "head", "legs", "wing", "tail"},
    {"body", "tail", "fin"},
    {"body", "cabin", "wheels"},
    {"body", "neck"},
]


# --- the planted taxonomy --------------------------------------------------------------------


def test_taxonomy_is_a_three_level_tree_of_enough_classes():
    assert N_CLASSES >= 24
    assert len(set(WNIDS)) == N_CLASSES and WNIDS == sorted(WNIDS)
    all_ids = [s.wnid for s in GROUPS] + [s.wnid for s in MIDS] + WNIDS
    assert len(set(all_ids)) == len(all_ids), "a synset sits at two places in the tree"
    assert all(len(w) == 9 and w[0] == "n" and w[1:].isdigit() for w in all_ids)
    for leaf in LEAVES:  # each level's index agrees with the tree it came from
        group, mids = taxonomy.TREE[leaf.group]
        assert MIDS[leaf.mid] in [mid for mid, _ in mids]
        assert leaf.synset in dict(mids)[MIDS[leaf.mid]]
    # The leaf factor separates siblings: every mid holds one leaf per frequency level.
    for mid in range(len(MIDS)):
        assert sorted(leaf.frequency for leaf in LEAVES if leaf.mid == mid) == [0, 1, 2]
    # Colour alone must not name the group: every style is worn by exactly two groups.
    for style in range(taxonomy.N_STYLES):
        assert len({leaf.group for leaf in LEAVES if leaf.style == style}) == 2
    # ...but (group, style, frequency) names the class.
    assert len({(leaf.group, leaf.style, leaf.frequency) for leaf in LEAVES}) == N_CLASSES


def _wordnet():
    os.environ.setdefault("NLTK_DATA", str(REPO / "nltk_data"))
    wordnet = pytest.importorskip("nltk.corpus").wordnet
    try:
        wordnet.ensure_loaded()
    except LookupError:
        pytest.skip("NLTK WordNet corpus not installed (run scripts/setup_wordnet.sh)")
    return wordnet


def test_planted_edges_are_real_wordnet_ancestor_relations():
    wn = _wordnet()

    def synset(s):
        found = wn.synset_from_pos_and_offset("n", int(s.wnid[1:]))
        lemmas = {name.lower().replace("_", " ") for name in found.lemma_names()}
        assert s.name.lower() in lemmas, f"{s} is WordNet's {found.name()}: wrong offset?"
        return found

    def ancestors(found):
        return {a for path in found.hypernym_paths() for a in path if a != found}

    for parent, child in taxonomy.edges():
        assert synset(parent) in ancestors(synset(child)), (
            f"{parent.name} is no ancestor of {child.name}"
        )
    # The groups are disjoint in WordNet too: no leaf also descends from another group.
    for leaf in LEAVES:
        above = ancestors(synset(leaf.synset))
        hits = [g.name for g in GROUPS if synset(g) in above]
        assert hits == [GROUPS[leaf.group].name], (leaf.name, hits)


def test_leaves_are_imagenet1k_classes():
    ontology = pytest.importorskip("saekit.analysis.ontology")
    try:
        imagenet = ontology.Taxonomy.imagenet1k()
    except (AttributeError, FileNotFoundError):
        pytest.skip("saekit.analysis.ontology ships no ImageNet-1k taxonomy yet")
    assert [w for w in WNIDS if w not in imagenet] == []


# --- the generator ---------------------------------------------------------------------------


def _pixels(images):
    return np.stack([np.asarray(t.image) for t in images])


@pytest.mark.parametrize("shift", [None, *SHIFTS])
def test_generator_is_deterministic_per_seed_and_index(shift):
    a = ToyWorld(seed=7).sample(12, "val", shift, start=40)
    b = ToyWorld(seed=7).sample(12, "val", shift, start=40)
    assert np.array_equal(_pixels(a), _pixels(b))
    assert all(np.array_equal(x.mask, y.mask) for x, y in zip(a, b, strict=True))
    # Random access: image i is the same whether drawn alone or in a batch.
    alone = ToyWorld(seed=7).render(45, "val", shift)
    assert np.array_equal(np.asarray(alone.image), np.asarray(a[5].image))
    assert [t.label for t in a] == [i % N_CLASSES for i in range(40, 52)]
    # Other seeds and other splits are other images.
    assert not np.array_equal(
        _pixels(a), _pixels(ToyWorld(seed=8).sample(12, "val", shift, start=40))
    )
    assert not np.array_equal(
        _pixels(a), _pixels(ToyWorld(seed=7).sample(12, "test", shift, start=40))
    )


def test_images_are_rgb_with_aligned_masks():
    world = ToyWorld(seed=0, size=48)
    for toy in world.sample(2 * N_CLASSES, "train"):
        assert toy.image.mode == "RGB" and toy.image.size == (48, 48)
        assert toy.mask.shape == (48, 48) and toy.mask.dtype == np.uint8
        assert toy.wnid == WNIDS[toy.label]
        assert "body" in toy.parts and set(toy.parts) <= GROUP_PARTS[toy.group]
        assert 0.05 < (toy.mask > 0).mean() < 0.6
    with pytest.raises(ValueError, match="between 32 and 64"):
        ToyWorld(size=128)
    with pytest.raises(ValueError, match="choose one of"):
        world.sample(1, "training")
    with pytest.raises(ValueError, match="choose None or one of"):
        world.sample(1, "val", shift="imagenet-c")


def test_group_sets_the_silhouette_and_leaf_the_pattern_frequency():
    u, v = np.meshgrid(np.linspace(-1.1, 1.1, 221), np.linspace(-1.1, 1.1, 221))
    shapes = [render.silhouette(g, u, v) for g in range(len(GROUPS))]
    for g, parts in enumerate(shapes):
        assert {PART_NAMES[i] for i in np.unique(parts) if i} == GROUP_PARTS[g]
        for other in shapes[g + 1 :]:
            a, b = parts > 0, other > 0
            assert (a & b).sum() / (a | b).sum() < 0.75, "two shape families look alike"
    # Along the object's axis, stripes flip sign 2 / period times per unit: coarse < medium < fine.
    line = np.linspace(-1, 1, 4001)
    flips = []
    for frequency, period in enumerate(render.PERIODS):
        stripes = render.texture(0, frequency, line, np.zeros_like(line), (0.13, 0.0))
        flips.append(int(np.count_nonzero(np.diff(stripes.astype(int)))))
        assert abs(flips[-1] - 4 / period) <= 1
    assert flips == sorted(flips) and len(set(flips)) == 3


SHIFT_NAMES = ("sketch", "rendition", "hard", "v2")


def test_shifts_keep_the_label_and_the_scene():
    assert set(SHIFT_NAMES) == set(SHIFTS)
    world = ToyWorld(seed=1)
    clean = world.sample(N_CLASSES, "val")
    sketch, rendition, hard, v2 = (world.sample(N_CLASSES, "val", s) for s in SHIFT_NAMES)
    for c, s, r, h, f in zip(clean, sketch, rendition, hard, v2, strict=True):
        assert c.label == s.label == r.label == h.label == f.label
        # Sketch and rendition redraw the in-domain scene: the object stays where it was.
        assert np.array_equal(c.mask, s.mask) and np.array_equal(c.mask, r.mask)
        # Hard shrinks and occludes it: strictly less of the object is visible.
        assert (h.mask > 0).sum() < (c.mask > 0).sum()
    sketch_px = _pixels(sketch).astype(int)
    assert (sketch_px[..., 0] == sketch_px[..., 1]).all() and (
        sketch_px[..., 1] == sketch_px[..., 2]
    ).all()
    assert set(np.unique(_pixels(rendition))) <= {0, 85, 170, 255}
    # v2 is a fresh draw: same labels, other scenes.
    assert not any(np.array_equal(c.mask, f.mask) for c, f in zip(clean, v2, strict=True))


def test_sketch_ink_lies_on_the_mask_outline():
    """Mask and pixels must agree: in a sketch the silhouette's outline is drawn in ink."""
    from scipy import ndimage

    on_outline, off_outline = [], []
    for toy in ToyWorld(seed=2).sample(2 * N_CLASSES, "val", "sketch"):
        ink = 255 - np.asarray(toy.image)[..., 0].astype(float)
        for mask, bucket in (
            (toy.mask, on_outline),
            (np.roll(toy.mask, (5, 5), (0, 1)), off_outline),
        ):
            obj = mask > 0
            bucket.append(ink[ndimage.binary_dilation(obj) & ~ndimage.binary_erosion(obj)].mean())
    # A mask shifted by 5 px is the control: its outline mostly misses the drawn lines.
    assert np.mean(on_outline) > 2 * np.mean(off_outline)
    assert np.mean(np.array(on_outline) > np.array(off_outline)) > 0.9


def test_far_ood_is_classless_noise():
    noise = far_ood(10, seed=3)
    assert all(t.label == -1 and t.wnid is None and not t.mask.any() for t in noise)
    assert np.array_equal(_pixels(noise), _pixels(far_ood(10, seed=3)))
    assert _pixels(noise).std() > 10


def test_export_is_an_imagenet_style_folder(tmp_path):
    from saekit.data import ImageFolder

    root = export_imagefolder(
        tmp_path / "toy", n_per_class=2, split="test", shift="rendition", seed=4
    )
    dataset = ImageFolder(root)
    assert dataset.wnids == WNIDS and len(dataset) == 2 * N_CLASSES
    world = ToyWorld(seed=4)
    for i in (0, 17, len(dataset) - 1):
        index = int(Path(dataset.image_ids[i]).stem.split("_")[1])
        expected = world.render(index, "test", "rendition")
        assert dataset.labels[i] == expected.label
        assert np.array_equal(np.asarray(dataset.load(i)), np.asarray(expected.image))
        mask = np.asarray(Image.open(masks_root(root) / dataset.image_ids[i]))
        assert np.array_equal(mask, expected.mask)
    manifest = json.loads((root / "toyworld.json").read_text())
    assert manifest["shift"] == "rendition" and manifest["part_names"] == list(PART_NAMES)
    # Far-OOD noise has no class: one folder, as many images as a classed export.
    noise = ImageFolder(export_imagefolder(tmp_path / "noise", n_per_class=1, shift="far_ood"))
    assert noise.wnids is None and len(noise) == N_CLASSES and set(noise.labels) == {0}
    assert np.array_equal(np.asarray(noise.load(3)), np.asarray(far_ood(4)[3].image))
    with pytest.raises(ValueError, match="far_ood"):
        export_imagefolder(tmp_path / "bad", n_per_class=1, shift="imagenet-c")


# --- the shipped toy ViT ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def toyvit():
    path = toyvit_path()
    record = json.loads((path / "training.json").read_text())
    model = transformers.ViTForImageClassification.from_pretrained(path).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(path)
    return model, processor, record


def _run(toyvit, images):
    """Logits and every layer's CLS token, through the saved processor like a hub model."""
    model, processor, _ = toyvit
    pixels = processor(images=[t.image for t in images], return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        out = model(pixel_values=pixels, output_hidden_states=True)
    labels = np.array([t.label for t in images])
    return out.logits.argmax(-1).numpy(), [h[:, 0] for h in out.hidden_states], labels


def test_toyvit_is_a_small_hub_style_checkpoint(toyvit):
    path = toyvit_path()
    assert (path / "model.safetensors").is_file()
    assert sum(f.stat().st_size for f in path.iterdir()) < 10_000_000
    model, processor, record = toyvit
    assert 6 <= model.config.num_hidden_layers <= 8 and 64 <= model.config.hidden_size <= 128
    assert record["seed"] == 0 and record["command"].startswith("python -m saekit.mini.toyworld.train")
    assert [model.config.id2label[i] for i in range(N_CLASSES)] == [leaf.name for leaf in LEAVES]
    # The processor feeds the model exactly what training fed it.
    toys = ToyWorld(0).sample(4, "val")
    processed = processor(images=[t.image for t in toys], return_tensors="pt")["pixel_values"]
    assert torch.allclose(processed, to_pixels(_pixels(toys)), atol=1e-5)
    # AutoModel and saekit's encoder loader read it as they read a hub checkpoint.
    backbone = transformers.AutoModel.from_pretrained(path)
    assert isinstance(backbone, transformers.ViTModel)
    from saekit.models import load_encoder

    encoder = load_encoder(path)
    assert (encoder.n_layers, encoder.d_model, encoder.grid) == (6, 64, (6, 6))
    out = encoder([t.image for t in toys], layers=[5])
    _, cls, _ = _run(toyvit, toys)
    assert torch.allclose(out.cls[5], cls[6], atol=1e-5)


def test_toyvit_meets_its_recorded_in_domain_accuracy(toyvit):
    record = toyvit[2]
    start = record["config"]["n_eval"]  # images the record never scored
    preds, _, labels = _run(toyvit, ToyWorld(0).sample(600, "test", start=start))
    accuracy = (preds == labels).mean()
    assert record["results"]["test"]["accuracy"] >= 0.85
    assert abs(accuracy - record["results"]["test"]["accuracy"]) < 0.05


@pytest.fixture(scope="module")
def clean_val_accuracy(toyvit):
    """In-domain accuracy on 300 val images the record never scored."""
    preds, _, labels = _run(
        toyvit, ToyWorld(0).sample(300, "val", start=toyvit[2]["config"]["n_eval"])
    )
    return (preds == labels).mean()


@pytest.mark.parametrize("shift", SHIFTS)
def test_toyvit_loses_accuracy_under_every_shift(toyvit, clean_val_accuracy, shift):
    record = toyvit[2]
    start = record["config"]["n_eval"]
    shift_preds, _, shift_labels = _run(toyvit, ToyWorld(0).sample(300, "val", shift, start=start))
    clean, shifted = clean_val_accuracy, (shift_preds == shift_labels).mean()
    assert shifted < clean - 0.05, f"{shift}: {shifted:.3f} vs in-domain {clean:.3f}"
    assert abs(shifted - record["results"][f"val/{shift}"]["accuracy"]) < 0.08


def _probe_accuracy(train_X, train_y, test_X, test_y, n_classes):
    """Multinomial logistic regression (L-BFGS, small L2) on standardised features."""
    mean, std = train_X.mean(0), train_X.std(0) + 1e-6
    train_X, test_X = (train_X - mean) / std, (test_X - mean) / std
    weight = torch.zeros(train_X.shape[1], n_classes, requires_grad=True)
    bias = torch.zeros(n_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=200, line_search_fn="strong_wolfe")
    targets = torch.as_tensor(train_y)

    def closure():
        optimizer.zero_grad()
        logits = train_X @ weight + bias
        loss = torch.nn.functional.cross_entropy(logits, targets) + 1e-3 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return float(((test_X @ weight + bias).argmax(1).numpy() == test_y).mean())


def test_planted_groups_are_linearly_decodable_and_emerge_with_depth(toyvit):
    world = ToyWorld(0)
    _, train_cls, train_labels = _run(toyvit, world.sample(600, "train"))
    _, test_cls, test_labels = _run(toyvit, world.sample(300, "val"))
    group = np.array([leaf.group for leaf in LEAVES])
    accuracy = {
        layer: _probe_accuracy(
            train_cls[layer], group[train_labels], test_cls[layer], group[test_labels], len(GROUPS)
        )
        for layer in (1, len(train_cls) - 1)  # after the first block; after the last
    }
    first, last = accuracy[1], accuracy[len(train_cls) - 1]
    assert last > 0.85, f"last-layer group probe {last:.3f} (chance 0.2)"
    assert first < last - 0.15, f"first layer {first:.3f} vs last {last:.3f}"


def test_training_script_is_deterministic(tmp_path):
    def tiny(out):
        cfg = TrainConfig(
            steps=3, n_train=64, batch_size=16, n_eval=30, warmup_steps=1, out=str(out)
        )
        return train(cfg)

    first, second = tiny(tmp_path / "a"), tiny(tmp_path / "b")
    assert first["results"] == second["results"]
    a = (tmp_path / "a" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "model.safetensors").read_bytes()
    reloaded = transformers.ViTForImageClassification.from_pretrained(tmp_path / "a")
    assert reloaded.config.num_labels == N_CLASSES
