"""Linear probes and the segmentation head on data with planted answers."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig

from saekit.analysis.probes import (
    Probe,
    ProbeConfig,
    SegmentationConfig,
    evaluate_probe,
    mean_iou,
    store_features,
    train_probe,
    train_segmentation_head,
)
from saekit.sae import encode_in_batches


def clusters(n_per_class=100, n_classes=4, d=8, spread=0.3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(n_classes, d, generator=gen)
    labels = torch.arange(n_classes).repeat_interleave(n_per_class)
    feats = centres[labels] + spread * torch.randn(len(labels), d, generator=gen)
    return feats, labels


@pytest.mark.parametrize(
    "config", [ProbeConfig(), ProbeConfig(optimizer="adam", lr=1e-2, max_iter=60, batch_size=64)]
)
def test_probe_separates_separable_classes(config):
    feats, labels = clusters()
    held_out, held_labels = clusters(seed=0, n_per_class=50)  # same centres, new noise draws
    probe = train_probe(feats, labels, config=config)
    assert probe.accuracy(feats, labels) == 1.0
    assert probe.accuracy(held_out, held_labels) >= 0.97
    # scale invariance from standardisation: same settings, features ×1000
    big = train_probe(feats * 1000, labels, config=config)
    assert big.accuracy(held_out * 1000, held_labels) >= 0.97


def test_class_subset_takes_the_argmax_over_those_classes_only():
    probe = Probe(3, 3, ProbeConfig(standardize=False))
    with torch.no_grad():
        probe.linear.weight.copy_(torch.eye(3))
        probe.linear.bias.zero_()
    feats = torch.tensor([[5.0, 2.0, 1.0], [5.0, 1.0, 2.0], [0.0, 3.0, 1.0]])  # logits = feats
    labels = torch.tensor([1, 1, 1])
    assert probe.predict(feats).tolist() == [0, 0, 1]
    assert probe.predict(feats, class_subset=[1, 2]).tolist() == [1, 2, 1]
    assert probe.accuracy(feats, labels) == pytest.approx(1 / 3)
    assert probe.accuracy(feats, labels, class_subset=[1, 2]) == pytest.approx(2 / 3)
    scores = evaluate_probe(probe, {"full": (feats, labels), "a": (feats, labels)}, {"a": [1, 2]})
    assert scores == pytest.approx({"full": 1 / 3, "a": 2 / 3})
    with pytest.raises(ValueError, match="class_subset"):
        probe.predict(feats, class_subset=[7])


def test_pre_activation_codes_keep_what_relu_throws_away():
    # Three classes by the size of a 1-d activation; a ReLU SAE maps classes 0 and 1 (both
    # negative) to the same zero code, its pre-activations do not (paper 003 Fig. 12).
    x = torch.randn(600, 1, generator=torch.Generator().manual_seed(0))
    labels = torch.bucketize(x[:, 0].contiguous(), torch.tensor([-0.7, 0.0]))
    sae = StandardSAE(StandardSAEConfig(d_in=1, d_sae=1))
    with torch.no_grad():
        for p in (sae.W_enc, sae.W_dec):
            p.fill_(1.0)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    codes = encode_in_batches(sae, x)
    pre = encode_in_batches(sae, x, pre_activation=True)
    settings = ProbeConfig()  # the same optimiser settings for every input
    acc_raw = train_probe(x, labels, config=settings).accuracy(x, labels)
    acc_codes = train_probe(codes, labels, config=settings).accuracy(codes, labels)
    acc_pre = train_probe(pre, labels, config=settings).accuracy(pre, labels)
    assert acc_raw >= 0.97 and acc_pre >= 0.97
    # classes 0 and 1 share the code 0, so at best the larger of them is always guessed
    best_possible = 1 - min((labels == 0).sum(), (labels == 1).sum()).item() / len(labels)
    assert acc_codes <= best_possible + 1e-6
    assert acc_codes < acc_pre - 0.15


def test_probe_round_trips_through_safetensors(tmp_path):
    feats, labels = clusters()
    probe = train_probe(feats, labels, config=ProbeConfig(max_iter=20))
    probe.save(tmp_path / "probe")
    loaded = Probe.load(tmp_path / "probe")
    assert torch.equal(loaded.logits(feats.numpy()), probe.logits(feats))
    assert loaded.config == probe.config


def test_probe_input_errors():
    feats, labels = clusters()
    with pytest.raises(ValueError, match="labels"):
        train_probe(feats, labels[:-1])
    probe = train_probe(feats, labels, config=ProbeConfig(max_iter=5))
    with pytest.raises(ValueError, match="8 wide|expects 8"):
        probe.accuracy(torch.zeros(3, 5), torch.zeros(3))
    with pytest.raises(ValueError, match="labels must lie"):
        probe.accuracy(feats[:2], torch.tensor([0, 9]))


def test_mean_iou_known_answer():
    target = np.array([[0, 0, 1, 1], [0, 0, 1, 255]])
    pred = np.array([[0, 1, 1, 1], [0, 0, 2, 0]])
    miou, per_class = mean_iou(pred, target, n_classes=3)
    # class 0: predicted at 3 pixels, true at 4, overlap 3 (the 255 pixel is ignored)
    assert per_class[0] == pytest.approx(3 / 4)
    assert per_class[1] == pytest.approx(2 / 4)  # pred1 at 3 pixels, target1 at 3, inter 2
    assert per_class[2] == pytest.approx(0.0)  # predicted once, never true
    assert miou == pytest.approx((3 / 4 + 2 / 4 + 0) / 3)
    assert mean_iou(target, target, n_classes=3)[0] == 1.0


def test_segmentation_head_learns_planted_patch_classes():
    # 4x4 patch grid, 16x16 masks: every patch's class is readable from its vector.
    gen = torch.Generator().manual_seed(0)
    n, grid, n_classes, d = 48, (4, 4), 3, 6
    patch_classes = torch.randint(0, n_classes, (n, 16), generator=gen)
    embed = 2 * torch.randn(n_classes, d, generator=gen)
    patches = embed[patch_classes] + 0.1 * torch.randn(n, 16, d, generator=gen)
    masks = patch_classes.reshape(n, 4, 4).repeat_interleave(4, 1).repeat_interleave(4, 2)
    masks[:, 0, 0] = 255  # an ignored pixel
    head = train_segmentation_head(
        patches,
        masks,
        grid,
        n_classes,
        config=SegmentationConfig(lr=5e-2, epochs=30, batch_size=16),
    )
    logits = head(patches[:2], (16, 16))
    assert logits.shape == (2, n_classes, 16, 16)
    pred = head.predict(patches, (16, 16))
    miou, _ = mean_iou(pred, masks, n_classes)
    assert miou >= 0.8
    with pytest.raises(ValueError, match="16 patches"):
        head.patch_logits(patches[:, :9])


class LabelledStore:
    """The slice of the activation-store contract probes use: CLS tokens and labels."""

    def __init__(self, feats, labels):
        self._feats = feats.numpy()
        self.labels = labels.numpy()

    def cls(self, layer):
        assert layer == 3
        return self._feats


def test_probe_scored_on_several_stores_through_an_sae():
    feats, labels = clusters(n_classes=4, d=6)
    shifted, shifted_labels = clusters(n_classes=4, d=6, n_per_class=30)  # a second "store"
    sae = StandardSAE(StandardSAEConfig(d_in=6, d_sae=12))
    torch.manual_seed(0)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(6, 12))
        sae.W_dec.copy_(torch.randn(12, 6))
    train_x, train_y = store_features(LabelledStore(feats, labels), 3, sae=sae, pre_activation=True)
    assert torch.allclose(train_x, (feats - sae.b_dec) @ sae.W_enc + sae.b_enc, atol=1e-5)
    assert torch.equal(train_y, labels)
    probe = train_probe(train_x, train_y)
    eval_sets = {
        "train": (train_x, train_y),
        "other": store_features(
            LabelledStore(shifted, shifted_labels), 3, sae=sae, pre_activation=True
        ),
    }
    scores = evaluate_probe(probe, eval_sets, class_subsets={"other": [0, 1]})
    assert scores["train"] == 1.0
    # restricted to classes 0 and 1, rows of classes 2 and 3 can never be right
    assert scores["other"] == pytest.approx(0.5, abs=0.02)
    raw_x, _ = store_features(LabelledStore(feats, labels), 3)
    assert torch.equal(raw_x, feats)


def test_mean_iou_refuses_labels_outside_the_classes():
    # A prediction of 3 with n_classes=3 would otherwise land in another class's confusion cell.
    with pytest.raises(ValueError, match="prediction labels must lie in 0..2"):
        mean_iou(np.array([[3, 0]]), np.array([[0, 0]]), n_classes=3)
    with pytest.raises(ValueError, match="target labels"):
        mean_iou(np.array([[0]]), np.array([[7]]), n_classes=3, ignore_index=None)
    assert mean_iou(np.array([[0]]), np.array([[255]]), n_classes=3)[1].size == 3  # ignored pixel


class ChunkOnlyArray:
    """A memory-mapped layer stand-in that refuses to be read whole and records the largest
    block read, so a test can tell that training streamed it."""

    def __init__(self, feats):
        self._feats = feats.numpy()
        self.shape = self._feats.shape
        self.largest_read = 0

    def __len__(self):
        return len(self._feats)

    def __getitem__(self, key):
        block = self._feats[key]
        self.largest_read = max(self.largest_read, len(block))
        return block

    def __array__(self, dtype=None, copy=None):
        raise AssertionError("the whole layer was loaded into memory")


def test_adam_probe_streams_a_layer_in_blocks_with_exact_standardisation():
    feats, labels = clusters(n_per_class=150, d=8)
    acts = ChunkOnlyArray(feats * 50 + 7)
    config = ProbeConfig(optimizer="adam", lr=1e-2, max_iter=20, batch_size=64, chunk_rows=128)
    probe = train_probe(acts, labels, config=config)
    assert acts.largest_read == 128  # one block at a time, never the 600 rows at once
    torch.testing.assert_close(probe.mean_D, (feats * 50 + 7).mean(0), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(probe.std_D, (feats * 50).std(0), rtol=1e-4, atol=1e-4)
    held_out, held_labels = clusters(seed=0, n_per_class=50)
    assert probe.accuracy(held_out * 50 + 7, held_labels) >= 0.97
    # the same seed gives the same probe; another block size visits rows in another order
    again = train_probe(ChunkOnlyArray(feats * 50 + 7), labels, config=config)
    torch.testing.assert_close(again.linear.weight, probe.linear.weight)
    other = train_probe(
        ChunkOnlyArray(feats * 50 + 7), labels, config=replace(config, chunk_rows=256)
    )
    assert not torch.equal(other.linear.weight, probe.linear.weight)


def test_adam_probe_with_one_block_is_plain_minibatch_adam():
    # With every row in one block the probe is the textbook algorithm, written out here: one
    # permutation of all rows per epoch from the seeded generator, standardised inputs.
    feats, labels = clusters(n_per_class=40)
    config = ProbeConfig(optimizer="adam", lr=1e-2, max_iter=5, batch_size=32, weight_decay=1e-3)
    probe = train_probe(feats, labels, config=config)
    linear = torch.nn.Linear(8, 4)
    torch.nn.init.zeros_(linear.weight), torch.nn.init.zeros_(linear.bias)
    x = (feats - feats.mean(0)) / feats.std(0)
    opt = torch.optim.Adam(linear.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        for idx in torch.randperm(len(x), generator=gen).split(32):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(linear(x[idx]), labels[idx])
            (loss + 0.5e-3 * linear.weight.pow(2).sum()).backward()
            opt.step()
    torch.testing.assert_close(probe.linear.weight, linear.weight)
    torch.testing.assert_close(probe.linear.bias, linear.bias)
