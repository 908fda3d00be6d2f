"""Progress lines: cadence, ETA, and the parser the flow uses to follow them."""

import io

from kotodama_core.progress import Progress, format_duration, format_line, parse_progress_line


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_lines_follow_the_cadence_and_end_with_the_total():
    clock, out = FakeClock(), io.StringIO()
    p = Progress("train", 100, every_s=10, stream=out, bar=False, clock=clock)
    assert p.update(0, loss=5.0) is not None          # the first update always prints
    clock.t = 5
    assert p.update(10, loss=4.0) is None             # inside the cadence
    clock.t = 12
    line = p.update(20, loss=3.5)
    assert line.startswith("[train] 20/100 20.0% | loss 3.5")
    # 20 units in 12 s since the first update -> 80 remaining take 48 s
    assert "eta 48s" in line and "elapsed 12s" in line
    clock.t = 13
    assert p.update(100, loss=3.0) is not None        # the last unit always prints, without an ETA
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and "eta" not in lines[-1]


def test_parse_round_trips_a_line():
    line = format_line("data:books", 3, 12, {"docs": 1200, "tokens/s": 51234.5, "lr": 3e-4})
    parsed = parse_progress_line(line)
    assert parsed == {"stage": "data:books", "done": 3, "total": 12,
                      "fields": {"docs": "1,200", "tokens/s": "51,234", "lr": "3.00e-04"}}
    assert parse_progress_line("[nca_search] 7/? | accepted 2")["total"] is None
    assert parse_progress_line("some other log line") is None


def test_durations():
    assert format_duration(9) == "9s"
    assert format_duration(75) == "1m15s"
    assert format_duration(3725) == "1h02m"
    assert format_duration(float("nan")) == "?"


def test_data_progress_reports_tokens_and_each_finished_source(capsys):
    from types import SimpleNamespace

    from kotodama_core.data.build import TokenProgress

    p = TokenProgress(1000)
    p.update(400)
    p.source_done("books", SimpleNamespace(docs_in=12, docs_out=10, tokens=400))
    p.update(600)
    p.close()
    lines = [parse_progress_line(x) for x in capsys.readouterr().out.splitlines()]
    assert lines[0]["stage"] == "data" and lines[0]["done"] == 400 and "tokens/s" in lines[0]["fields"]
    books = next(x for x in lines if x["fields"].get("source") == "books")
    assert (books["fields"]["docs in"], books["fields"]["docs out"], books["fields"]["source tokens"]) == (
        "12", "10", "400")
    assert lines[-1]["done"] == lines[-1]["total"] == 1000
