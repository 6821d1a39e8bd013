"""The trainers' data order: one sequence of global batches per seed, split across ranks, resumable at any step."""

import threading

import numpy as np
import pytest

from pipeline.runtime.train_stream import RankBatches, global_rows, permutation_order


def ids_of(rows: np.ndarray) -> dict[str, np.ndarray]:
    return {"id": rows.copy(), "square": rows.astype(np.float32)[:, None] ** 2}


def steps(n: int, *, seed: int = 0, batch: int = 3, rank: int = 0, world: int = 1, start: int = 0, count: int = 10,
          threads: int = 2) -> list[np.ndarray]:
    with RankBatches(permutation_order(n, seed), n, ids_of, batch=batch, rank=rank, world=world, start_step=start,
                     threads=threads, rows_per_read=2) as batches:
        return [next(batches)["id"] for _ in range(count)]


def test_every_pass_is_a_permutation_and_passes_follow_each_other():
    order = permutation_order(7, 3)
    rows = global_rows(order, 7, 0, 21, {})
    for p in range(3):
        assert sorted(rows[7 * p:7 * p + 7]) == list(range(7))
        assert (rows[7 * p:7 * p + 7] == order(p)).all()
    assert (global_rows(order, 7, 5, 16, {}) == rows[5:16]).all()
    with pytest.raises(ValueError, match="no training rows"):
        global_rows(order, 0, 0, 1, {})


def test_the_same_seed_gives_the_same_batches_and_another_seed_others():
    assert all((a == b).all() for a, b in zip(steps(10), steps(10)))
    assert not all((a == b).all() for a, b in zip(steps(10), steps(10, seed=1)))


def test_ranks_split_each_global_batch_between_them():
    world, batch = 3, 2
    ranks = [steps(11, batch=batch, rank=r, world=world, count=8) for r in range(world)]
    alone = steps(11, batch=batch * world, count=8)
    for s in range(8):
        assert (np.concatenate([ranks[r][s] for r in range(world)]) == alone[s]).all()


def test_a_worker_restored_at_a_step_reads_what_an_uninterrupted_one_would():
    whole = steps(13, batch=4, rank=1, world=2, count=12)
    resumed = steps(13, batch=4, rank=1, world=2, start=7, count=5)
    assert all((a == b).all() for a, b in zip(whole[7:], resumed))


def test_pieces_come_back_in_row_order_with_every_column():
    batches = RankBatches(permutation_order(20, 0), 20, ids_of, batch=7, rank=0, world=1, threads=3, rows_per_read=2)
    out = next(batches)
    batches.close()
    assert (out["id"] == permutation_order(20, 0)(0)[:7]).all()
    assert (out["square"][:, 0] == out["id"].astype(np.float32) ** 2).all()


def test_a_failed_read_is_tried_again_and_the_last_failure_is_raised(monkeypatch):
    monkeypatch.setattr("pipeline.runtime.train_stream.time.sleep", lambda s: None)
    calls = {"n": 0}
    lock = threading.Lock()

    def flaky(rows):
        with lock:
            calls["n"] += 1
            if calls["n"] == 1:
                raise OSError("storage hiccup")
        return ids_of(rows)

    with RankBatches(permutation_order(5, 0), 5, flaky, batch=5, rank=0, world=1, threads=1) as batches:
        assert len(next(batches)["id"]) == 5

    def broken(rows):
        raise OSError("gone")

    with RankBatches(permutation_order(5, 0), 5, broken, batch=5, rank=0, world=1, threads=1) as batches:
        with pytest.raises(OSError, match="gone"):
            next(batches)


def test_a_bad_rank_is_refused():
    with pytest.raises(ValueError, match="rank"):
        RankBatches(permutation_order(5, 0), 5, ids_of, batch=2, rank=2, world=2)
