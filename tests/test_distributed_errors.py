"""A rank that fails stops every rank at once, each saying why (2 gloo processes)."""

from __future__ import annotations

import json

import torch
import torch.multiprocessing as mp

from saekit.distributed import RankFailedError, Ranks, all_or_none


def _worker(rank: int, world: int, init: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    ranks = Ranks(rank, world)
    outcome = {}
    try:
        with all_or_none(ranks, "reading its images"):
            if rank == 1:
                raise ValueError("image 7 is truncated")
        outcome["first"] = "went on"
    except RankFailedError as err:
        outcome["first"] = f"stopped: {err}"
    except ValueError as err:
        outcome["first"] = f"own error: {err}"
    with all_or_none(ranks, "a step that succeeds"):  # the ranks are still in step
        pass
    outcome["second"] = "went on"
    torch.distributed.destroy_process_group()
    with open(f"{out}.{rank}", "w") as handle:
        json.dump(outcome, handle)


def test_a_failing_rank_stops_the_others_with_its_cause(tmp_path):
    out = str(tmp_path / "outcome")
    mp.spawn(_worker, args=(2, f"file://{tmp_path}/pg", out), nprocs=2, join=True)
    zero, one = (json.loads(open(f"{out}.{r}").read()) for r in range(2))
    assert one == {"first": "own error: image 7 is truncated", "second": "went on"}
    assert zero["second"] == "went on"
    assert zero["first"].startswith("stopped: Rank 1 failed while reading its images")
    assert "ValueError: image 7 is truncated" in zero["first"]


def test_one_process_runs_the_block_as_it_is():
    try:
        with all_or_none(Ranks(0, 1), "anything"):
            raise KeyError("own")
    except KeyError as err:
        assert err.args == ("own",)
    else:
        raise AssertionError("the block's error was swallowed")
