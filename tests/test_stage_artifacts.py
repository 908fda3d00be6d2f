"""flows/stage_artifacts: the progress artifact follows a stage's progress lines; headline cards."""

from __future__ import annotations

from kotodama_core.progress import format_line

from flows.stage_artifacts import ProgressFollower, artifact_key, headline_markdown


class Recorder:
    def __init__(self, fail: bool = False):
        self.calls: list[tuple] = []
        self.fail = fail

    def create(self, progress, key, description):
        if self.fail:
            raise ConnectionError("prefect api down")
        self.calls.append(("create", progress, key, description))
        return "artifact-1"

    def update(self, artifact_id, progress, description):
        self.calls.append(("update", artifact_id, progress, description))


def test_follows_progress_lines_into_one_artifact_and_ignores_other_output():
    rec = Recorder()
    follow = ProgressFollower("nca_train", every_s=0.0, create=rec.create, update=rec.update)
    follow("loading shards ...")
    follow(format_line("train", 10, 40, {"loss": 3.25, "lr": 3e-4}))
    follow(format_line("train", 40, 40, {"loss": 2.5}))
    assert [c[0] for c in rec.calls] == ["create", "update"]
    assert rec.calls[0][1:3] == (25.0, "progress-nca-train")
    assert "10/40" in rec.calls[0][3] and "loss 3.25" in rec.calls[0][3]
    assert rec.calls[1][1:3] == ("artifact-1", 100.0) and follow.percent == 100.0


def test_updates_are_throttled_but_the_last_line_goes_through():
    rec = Recorder()
    follow = ProgressFollower("train", every_s=3600.0, create=rec.create, update=rec.update)
    for done in range(1, 11):
        follow(format_line("train", done, 10, {"loss": 1.0}))
    assert [(c[0], c[-2] if c[0] == "update" else c[1]) for c in rec.calls] == [("create", 10.0), ("update", 100.0)]


def test_unknown_total_makes_no_artifact_and_a_broken_api_never_raises():
    rec = Recorder()
    follow = ProgressFollower("data", create=rec.create, update=rec.update)
    follow(format_line("data", 5, None, {"docs": 12}))
    assert rec.calls == []
    broken = ProgressFollower("data", create=Recorder(fail=True).create, update=rec.update)
    broken(format_line("data", 5, 10, {}))  # logged, not raised
    broken(format_line("data", 10, 10, {}))
    assert broken.artifact_id is None and rec.calls == []


def test_headline_card_lists_the_metrics_and_whether_it_was_cached():
    md = headline_markdown("train", "train", "ab" * 32, "/a/train/abab", {"train/loss": 3.14159, "train/tokens_seen": 16384.0},
                           cached=True)
    assert "served from the cache" in md and "`abababababababab`" in md
    assert "| `train/loss` | 3.142 |" in md and "| `train/tokens_seen` | 16,384 |" in md
    assert "no headline metrics" in headline_markdown("x", "report", "0" * 64, "/o", {}, cached=False)
    assert artifact_key("stage", "P3_Muon.train") == "stage-p3-muon-train"
