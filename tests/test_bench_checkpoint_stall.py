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
    # the first save: the background writer has no write of its own to wait for, so it blocks for the copy only
    assert async_["stall_s"][0] < sync["stall_s"][0]
    assert "per-save blocking, max: sync" in capsys.readouterr().out


def test_bench_thread_mode_and_host_probe(tmp_path, capsys):
    out = tmp_path / "stall.jsonl"
    assert checkpoint_stall.main(["--preset", "tiny", "--device", "cpu", "--saves", "2", "--every", "2",
                                  "--modes", "thread,probe", "--probe-mb", "8", "--json", str(out)]) == 0
    thread, probe = (json.loads(line) for line in out.read_text().splitlines())
    assert thread["mode"] == "thread" and thread["saves"] == 2
    assert probe["mode"] == "probe" and probe["state_mb"] == 8 and probe["loop_ms_alone"] > 0
    for kind in ("thread", "process"):
        assert probe[kind]["loops"] >= 1 and probe[kind]["slowdown"] > 0 and probe[kind]["write_s"] > 0
    assert "host loop while a background write runs: thread x" in capsys.readouterr().out
