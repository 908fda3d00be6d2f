"""The report and comparison pages in a real browser (headless Chromium through bench/ui_check.py): every
section heading renders in order, nothing logs an error, and a page without a section fails the check."""

from __future__ import annotations

import re

import pytest

from bench.ui_check import REPORT_SECTIONS, check_report, chromium_binary
from stages import report as report_stage
from tests.test_report import runs  # noqa: F401 - the module fixture: two reports of tiny runs

pytestmark = pytest.mark.skipif(chromium_binary() is None,
                                reason="chromium not installed (Debian: apt-get install -y chromium)")


def test_report_page_renders_every_section_without_errors(tmp_path, runs):  # noqa: F811
    _, _, pages = runs
    result = check_report(pages[0] / "report.html", tmp_path)
    assert result.errors == [] and result.missing == [], (result.errors, result.missing)
    png = result.screenshot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 50_000


def test_comparison_page_renders_every_section_without_errors(tmp_path, runs):  # noqa: F811
    cfg, _, pages = runs
    report_stage.run(cfg, {"a": pages[0], "b": pages[1]}, tmp_path / "cmp")
    result = check_report(tmp_path / "cmp" / "compare.html", tmp_path)
    assert result.ok, (result.errors, result.missing)


def test_a_page_without_a_section_fails_the_check(tmp_path, runs):  # noqa: F811
    _, _, pages = runs
    html = (pages[0] / "report.html").read_text()
    gutted = re.sub(r'<section id="evaluation">.*?</section>', "", html, count=1, flags=re.S)
    assert gutted != html
    page = tmp_path / "gutted.html"
    page.write_text(gutted)
    result = check_report(page, tmp_path)
    assert not result.ok
    assert any("Evaluation" in m for m in result.missing), result.missing
    assert "Evaluation" in REPORT_SECTIONS
