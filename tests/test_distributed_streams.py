"""`torchrun -m saekit extract` over streamed inputs with 2 CPU processes (gloo): 3 sources
dealt to 2 ranks (rank 0 reads two, rank 1 one) give the store one process writes, byte for
byte, for WebDataset tar shards and for Hugging Face streaming parquet shards."""

from __future__ import annotations

import json

import pytest
from test_distributed_extract import _files, _torchrun
from test_streams import write_parquets, write_tars

from saekit.cli import main
from saekit.stream_extract import CHUNK_STRIDE

ARGS = ["--layers", "0,1", "--tokens", "both", "--batch-size", "2", "--shard-images", "3"]


@pytest.mark.parametrize("kind", ["wds", "hf"])
def test_two_ranks_write_the_single_process_store_from_three_sources(kind, miniatures, tmp_path):
    if kind == "wds":
        write_tars(tmp_path / "data")
        data = ["--data", f"wds:{tmp_path}/data/data-{{000000..000002}}.tar"]
    else:
        write_parquets(tmp_path / "data")
        data = ["--data", f"hf:{tmp_path}/data", "--streaming"]
    command = ["extract", "--model", str(miniatures["dinov2"]), *data, *ARGS]
    assert main([*command, "--workers", "0", "--out", str(tmp_path / "single")]) == 0
    result = _torchrun(*command, "--workers", "1", "--out", str(tmp_path / "ranks"))
    expected = _files(tmp_path / "single")
    assert _files(tmp_path / "ranks") == expected
    shards = json.loads(expected["manifest.json"])["shards"]
    assert [s["source"] for s in shards] == [0, 0, 1, 1, 2, 2]  # source 1 from rank 1
    assert shards[2]["index"] == CHUNK_STRIDE and shards[-1]["row_offset"] == 15
    assert result.stdout.count("ActivationStore(") == 1  # rank 0 reports the store, once
