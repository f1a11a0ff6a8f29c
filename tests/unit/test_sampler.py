"""The data order contract: step s consumes items [s*G, (s+1)*G) as a set, whatever dp and accumulation."""
from __future__ import annotations

import pytest

from launcher.sampler import BatchLayout, StepBatchSampler

N, G = 100, 24  # 4 full global batches per epoch, 4 items dropped at each epoch's end


def step_sets(dp: int, accum: int, shuffle: bool, start: int, end: int) -> list[set[int]]:
    micro = G // (dp * accum)
    per_rank = []
    for rank in range(dp):
        layout = BatchLayout(N, micro, accum, rank, dp, seed=3, shuffle=shuffle)
        per_rank.append(list(StepBatchSampler(layout, start, end)))
    steps = []
    for s in range(end - start):
        items = [i for r in range(dp) for batch in per_rank[r][s * accum:(s + 1) * accum] for i in batch]
        assert len(items) == len(set(items)) == G  # no item twice within a step
        steps.append(set(items))
    return steps


@pytest.mark.parametrize("dp,accum", [(1, 1), (1, 6), (2, 3), (3, 2), (4, 1), (2, 6)])
def test_unshuffled_step_consumes_consecutive_items(dp, accum):
    for s, items in enumerate(step_sets(dp, accum, shuffle=False, start=0, end=4)):
        assert items == set(range(s * G, (s + 1) * G))


@pytest.mark.parametrize("dp,accum", [(2, 3), (4, 1), (1, 6)])
def test_shuffled_sets_do_not_depend_on_layout(dp, accum):
    assert step_sets(dp, accum, True, 0, 9) == step_sets(1, 1, True, 0, 9)


def test_epochs_reshuffle_and_resume_needs_only_the_step():
    whole = step_sets(2, 3, True, 0, 12)
    assert whole[0] != whole[4]  # a new epoch is a new permutation
    assert step_sets(2, 3, True, 5, 12) == whole[5:]


def test_dataset_smaller_than_one_global_batch_is_an_error():
    with pytest.raises(ValueError, match="fewer than one global batch of 24"):
        StepBatchSampler(BatchLayout(10, 4, 3, 0, 2, 0, False), 0, 1)
