"""Data order: a pure function of (seed, step)."""

from prism.data.order import step_records


def test_data_order_covers_each_epoch_once_and_splits_over_processes():
    one = step_records(0, 2, 8, 16, seed=5, rank=0, world=1, per_device=4, accumulation=2)
    rank0 = step_records(0, 2, 8, 16, seed=5, rank=0, world=2, per_device=2, accumulation=2)
    rank1 = step_records(0, 2, 8, 16, seed=5, rank=1, world=2, per_device=2, accumulation=2)
    flat = lambda micro: sorted(i for m in micro for i in m)
    assert flat(one) == sorted(flat(rank0) + flat(rank1))
    second = step_records(1, 2, 8, 16, seed=5, rank=0, world=1, per_device=4, accumulation=2)
    assert sorted(flat(one) + flat(second)) == list(range(16))  # the epoch, each record once
    next_epoch = step_records(2, 2, 8, 16, seed=5, rank=0, world=1, per_device=4, accumulation=2)
    assert flat(next_epoch) != flat(one)  # a new permutation per epoch
