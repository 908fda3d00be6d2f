"""Training checkpoints: atomic files, keep-last-K plus milestones, corrupt newest skipped."""

import pytest
import torch

from kotodama_core.model.io import CheckpointError, load_pt_zst
from kotodama_core.train import checkpoint as ckpt


def state(step: int) -> dict:
    return {"model": {"w": torch.full((3,), float(step))}, "step": step, "rng": ckpt.rng_state()}


def test_keep_last_plus_milestones(tmp_path):
    for step in range(1, 9):
        ckpt.save_checkpoint(tmp_path, step, state(step), keep_last=2, milestones=[3, 5])
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [3, 5, 7, 8]
    assert not list(tmp_path.glob("*.tmp*"))


def test_checkpoint_loads_weights_only(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 4, state(4), keep_last=1)
    loaded = load_pt_zst(path, weights_only=True)
    assert loaded["step"] == 4 and torch.equal(loaded["model"]["w"], torch.full((3,), 4.0))


def test_corrupt_newest_is_skipped_with_warning(tmp_path):
    for step in (1, 2):
        ckpt.save_checkpoint(tmp_path, step, state(step), keep_last=5)
    newest = tmp_path / ckpt.checkpoint_name(2)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated mid-write
    with pytest.warns(UserWarning, match="skipping unreadable checkpoint step_0000002"):
        step, loaded = ckpt.load_latest_checkpoint(tmp_path)
    assert step == 1 and loaded["step"] == 1
    with pytest.raises(CheckpointError):
        load_pt_zst(newest)


def test_no_checkpoint_gives_none(tmp_path):
    assert ckpt.load_latest_checkpoint(tmp_path / "absent") is None


def test_rng_round_trip():
    saved = ckpt.rng_state()
    a = torch.rand(4)
    ckpt.set_rng_state(saved)
    assert torch.equal(a, torch.rand(4))


def test_unreadable_bytes_are_never_published(tmp_path):
    good = ckpt.encode(state(1))
    bad = good[:-8] + bytes(8)  # the zstd content checksum no longer matches
    with pytest.raises(CheckpointError):
        ckpt.publish_verified(bad, tmp_path / ckpt.checkpoint_name(1))
    assert list(tmp_path.iterdir()) == []
    ckpt.publish_verified(good, tmp_path / ckpt.checkpoint_name(1))
    assert load_pt_zst(tmp_path / ckpt.checkpoint_name(1))["step"] == 1
