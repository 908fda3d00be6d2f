import numpy as np
import pytest
import torch

from kotodama_core import artifacts
from kotodama_core.artifacts import ArtifactError
from kotodama_core.data.loader import TokenLoader, iter_eval_batches
from kotodama_core.data.manifest_fields import ShardError, describe_splits
from kotodama_core.data.shards import write_shard

WINDOW = 17


def _artifact(root, train_rows=(40, 23), val_rows=(9,)):
    """A data artifact whose window k holds the value k everywhere, so batches name their windows."""
    work = artifacts.begin(root)
    splits, value = {}, 0
    for split, shard_rows in (("train", train_rows), ("val", val_rows)):
        (work / split).mkdir()
        splits[split] = []
        for i, rows in enumerate(shard_rows):
            ids = np.repeat(np.arange(value, value + rows, dtype=np.uint16)[:, None], WINDOW, axis=1)
            value += rows
            path = work / split / f"shard_{i:05d}.arrow"
            write_shard(path, ids)
            splits[split].append(path)
    extra = describe_splits(work, splits, WINDOW, 49152, 0)
    artifacts.write_manifest(work, stage="data", config={}, inputs={}, extra=extra)
    return artifacts.commit(root).parent


def _ids(batch):
    assert (batch == batch[:, :1]).all()
    return batch[:, 0].tolist()


def test_batches_shape_dtype_and_epoch_reshuffle(tmp_path):
    root = _artifact(tmp_path / "a")
    loader = TokenLoader(root, batch_size=7, seed=3)
    batch = loader.next_batch()
    assert batch.shape == (7, WINDOW) and batch.dtype == torch.int64 and loader.window == WINDOW
    epoch0 = _ids(batch) + sum((_ids(loader.next_batch()) for _ in range(8)), [])  # 63 // 7 = 9 steps
    assert sorted(epoch0) == list(range(63))
    epoch1 = sum((_ids(loader.next_batch()) for _ in range(9)), [])
    assert loader.epoch == 1 and sorted(epoch1) == list(range(63)) and epoch1 != epoch0


def test_resume_gives_exactly_the_same_batches(tmp_path):
    root = _artifact(tmp_path / "a")
    full = TokenLoader(root, batch_size=5, seed=11)
    reference = [full.next_batch() for _ in range(30)]  # crosses two epoch boundaries
    first = TokenLoader(root, batch_size=5, seed=11)
    for _ in range(15):
        first.next_batch()
    state = first.state_dict()
    resumed = TokenLoader(root, batch_size=5, seed=11)
    resumed.load_state_dict(state)
    for want in reference[15:]:
        assert torch.equal(resumed.next_batch(), want)
    with pytest.raises(ValueError, match="seed"):
        TokenLoader(root, batch_size=5, seed=12).load_state_dict(state)


def test_ranks_get_disjoint_windows(tmp_path):
    root = _artifact(tmp_path / "a")
    ranks = [TokenLoader(root, batch_size=4, rank=r, world_size=3, seed=5) for r in range(3)]
    for _ in range(5):  # 5 steps x 12 windows <= 63: one epoch
        seen = [_ids(l.next_batch()) for l in ranks]
        flat = sum(seen, [])
        assert len(set(flat)) == len(flat) == 12
    single = TokenLoader(root, batch_size=12, seed=5)
    assert sorted(_ids(single.next_batch())) == sorted(
        sum((_ids(TokenLoader(root, batch_size=4, rank=r, world_size=3, seed=5).next_batch()) for r in range(3)), []))


def test_eval_pass_covers_val_once_in_order(tmp_path):
    root = _artifact(tmp_path / "a")
    batches = list(TokenLoader(root, batch_size=4).iter_eval_batches(4))
    assert [len(b) for b in batches] == [4, 4, 1]
    assert sum((_ids(b) for b in batches), []) == list(range(63, 72))
    halves = [sum((_ids(b) for b in iter_eval_batches(root, 2, rank=r, world_size=2)), []) for r in range(2)]
    assert sorted(halves[0] + halves[1]) == list(range(63, 72)) and not set(halves[0]) & set(halves[1])


def test_missing_and_corrupt_shards_are_named(tmp_path):
    root = _artifact(tmp_path / "a")
    shard = root / "train" / "shard_00001.arrow"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ArtifactError, match="shard_00001.arrow"):
        TokenLoader(root, batch_size=2)
    shard.unlink()
    with pytest.raises(ArtifactError, match="shard missing"):
        TokenLoader(root, batch_size=2)
    with pytest.raises(ArtifactError, match="no manifest"):
        TokenLoader(tmp_path / "nothing", batch_size=2)


def test_describe_splits_checks_window_and_dtype(tmp_path):
    write_shard(tmp_path / "s.arrow", np.zeros((3, 5), dtype=np.uint16))
    with pytest.raises(ShardError, match="expected 6"):
        describe_splits(tmp_path, {"train": [tmp_path / "s.arrow"]}, 6, 49152, 0)
    with pytest.raises(ShardError, match="expected uint32"):
        describe_splits(tmp_path, {"train": [tmp_path / "s.arrow"]}, 5, 100_000, 0)
    rec = describe_splits(tmp_path, {"train": ["s.arrow"]}, 5, 49152, 0)["splits"]["train"][0]
    assert rec["rows"] == 3 and rec["tokens"] == 15 and rec["path"] == "s.arrow"


def test_too_few_windows_for_a_step_is_named(tmp_path):
    root = _artifact(tmp_path / "a")
    loader = TokenLoader(root, split="val", batch_size=10)  # 9 val windows < 10
    assert sum(len(b) for b in loader.iter_eval_batches(4)) == 9
    with pytest.raises(ArtifactError, match="fewer than one step"):
        loader.next_batch()
