"""CPU check of bench/checkpoint_stall.py: both modes run the real engine and report every save's stall;
the background writer blocks the loop less than writing in the loop."""

from __future__ import annotations

import json

from bench import checkpoint_stall


def test_bench_reports_sync_and_async_stalls(tmp_path, capsys):
    out = tmp_path / "stall.jsonl"
    assert checkpoint_stall.main(["--preset", "tiny", "--device", "cpu", "--saves", "2", "--every", "2",
                                  "--json", str(out)]) == 0
    sync, async_ = (json.loads(line) for line in out.read_text().splitlines())
    assert (sync["mode"], async_["mode"]) == ("sync", "async")
    assert sync["saves"] == async_["saves"] == 2 and sync["checkpoint_mb"] > 1
    assert async_["stall_s_max"] < sync["stall_s_max"]
    assert "per-save blocking, max: sync" in capsys.readouterr().out
