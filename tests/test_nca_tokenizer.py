"""Patch tokenizer: the token formula, vocabulary, and round trips in both directions."""

from __future__ import annotations

import pytest
import torch

from kotodama_core.nca.tokenizer import (TokenizerError, decode_trajectory, encode_trajectories, frame_tokens,
                                         patchify, unpatchify, vocab_size)


def test_patch_token_is_the_base_d_number_of_the_row_major_patch():
    grid = torch.tensor([[1, 2, 0, 0], [3, 4, 0, 9]])
    tokens = patchify(grid, 10, 2)
    assert tokens.tolist() == [1 + 2 * 10 + 3 * 100 + 4 * 1000, 9 * 1000]
    assert vocab_size(10, 2) == 10_002 and frame_tokens(10, 2) == (10_000, 10_001)


def test_tokens_to_grid_to_tokens_round_trip():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 10 ** 4, (3, 64), generator=g)
    grids = unpatchify(tokens, 10, 2, 16, 16)
    assert grids.shape == (3, 16, 16) and int(grids.max()) < 10
    assert torch.equal(patchify(grids, 10, 2), tokens)


def test_trajectory_stream_round_trip_with_frames():
    g = torch.Generator().manual_seed(1)
    traj = torch.randint(0, 7, (5, 3, 6, 6), generator=g, dtype=torch.uint8)  # T, G, H, W
    stream = encode_trajectories(traj, 7, 3)
    start, end = frame_tokens(7, 3)
    assert stream.shape == (5 * 3 * (4 + 2),)
    assert stream[0] == start and stream[5] == end and int(stream.max()) == end
    assert torch.equal(decode_trajectory(stream, 7, 3, 3, 6, 6), traj.long())
    assert torch.equal(encode_trajectories(decode_trajectory(stream, 7, 3, 3, 6, 6), 7, 3), stream)


def test_tokenizer_errors_name_the_problem():
    with pytest.raises(TokenizerError, match="not divisible"):
        patchify(torch.zeros(5, 6, dtype=torch.long), 10, 2)
    with pytest.raises(TokenizerError, match="START"):
        decode_trajectory(torch.zeros(6, dtype=torch.long), 10, 2, 1, 4, 4)
    with pytest.raises(TokenizerError, match="must lie in"):
        unpatchify(torch.tensor([10_000]), 10, 2, 2, 2)
