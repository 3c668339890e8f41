"""saekit.analysis.patch_evolution: a feature's patch map, and active patches at two depths."""

from __future__ import annotations

import pytest
import torch

from saekit.analysis import patch_evolution as pe
from saekit.sae.synthetic import identity_sae


def test_patch_maps_and_evolution_on_planted_activations():
    grid = (2, 3)
    acts_BPD = torch.zeros(1, 6, 4)
    acts_BPD[0, [0, 4], 0] = torch.tensor([1.0, 3.0])  # direction 0 on cells (0,0) and (1,1)
    acts_BPD[0, 2, 1] = 0.5  # a weaker feature elsewhere
    sae = identity_sae(4)
    maps_BHW, features_B = pe.patch_maps(sae, acts_BPD, grid)
    assert features_B.tolist() == [0]  # the dominant feature
    assert maps_BHW[0].tolist() == [[1.0, 0.0, 0.0], [0.0, 3.0, 0.0]]
    fixed_BHW, _ = pe.patch_maps(sae, acts_BPD, grid, feature=1)
    assert fixed_BHW[0].tolist() == [[0.0, 0.0, 0.5], [0.0, 0.0, 0.0]]
    late_BHW = torch.tensor([[[0.0, 0.0, 2.0], [0.0, 1.0, 1.0]]])
    evo = pe.compare_patch_maps(maps_BHW, late_BHW)
    assert evo.overlay_BHW[0].tolist() == [[1, 0, 2], [0, 3, 2]]
    assert evo.persistence_B.tolist() == [0.5] and evo.new_B.tolist() == [2]
    assert torch.isnan(pe.compare_patch_maps(torch.zeros(1, 2, 3), late_BHW).persistence_B[0])
    with pytest.raises(ValueError, match="grid"):
        pe.patch_maps(sae, acts_BPD, (2, 2))


def test_patch_maps_do_not_depend_on_the_chunk():
    gen = torch.Generator().manual_seed(1)
    acts_BPD = torch.randn(7, 6, 5, generator=gen)
    sae = identity_sae(5)
    whole, features = pe.patch_maps(sae, acts_BPD, (2, 3))
    # The dominant feature is each image's largest summed positive part.
    assert features.tolist() == acts_BPD.clamp(min=0).sum(1).argmax(1).tolist()
    for chunk in (1, 6, 13):  # fewer rows than one image, one image, two images and a bit
        maps, again = pe.patch_maps(sae, acts_BPD, (2, 3), chunk=chunk)
        assert torch.equal(maps, whole) and torch.equal(again, features)
