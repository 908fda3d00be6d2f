"""The OCR garbage filter against a labelled set (tests/data/ocr): precision and recall at the default
threshold, and the kinds of in-word garbage it must see."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kotodama_core.data.cleaning import OCR_GARBAGE, clean_document, garbage_char_count
from kotodama_core.data.config import DataConfig

DATA = Path(__file__).parent / "data" / "ocr"


def labelled() -> tuple[list[str], list[str]]:
    clean = [line.rstrip("\n").replace("\\n", "\n") for line in (DATA / "clean.txt").read_text("utf-8").splitlines()
             if line.strip()]
    garbled = [json.loads(line) for line in (DATA / "garbled.jsonl").read_text().splitlines() if line.strip()]
    return clean, garbled


def precision_recall(threshold: float) -> tuple[float, float, int, int]:
    """precision = garbled dropped / all dropped; recall = garbled dropped / garbled."""
    clean, garbled = labelled()
    flagged_clean = sum(clean_document(t, threshold)[1] == OCR_GARBAGE for t in clean)
    flagged_garbled = sum(clean_document(t, threshold)[1] == OCR_GARBAGE for t in garbled)
    precision = flagged_garbled / max(flagged_garbled + flagged_clean, 1)
    return precision, flagged_garbled / len(garbled), len(clean), len(garbled)


def test_the_labelled_set_is_large_enough():
    clean, garbled = labelled()
    assert len(clean) >= 40 and len(garbled) >= 40


def test_precision_and_recall_at_the_default_threshold():
    precision, recall, _, _ = precision_recall(DataConfig().ocr_garbage_threshold)
    assert recall >= 0.95 and precision >= 0.98, (precision, recall)


@pytest.mark.parametrize("text, garbage", [
    ("gov¢rnment", 1), ("th½t", 1), ("wo■■rd", 2), ("Agr§ement", 1), ("mo¬ney", 1), ("┤court", 1),
    ("Ηello", 1), ("раssword", 2),
    ("©2024 Brand™ 50€ x² πr μm", 0), ("col·lecció ジョン・スミス", 0), ("Straße Þórr naïve", 0),
    ("a × b ≤ c", 0), ("§ 4(b) ¶ 2", 0),
])
def test_garbage_inside_words(text, garbage):
    assert garbage_char_count(text) == garbage
