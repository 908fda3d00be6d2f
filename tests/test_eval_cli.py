"""lm-eval's own command line runs the registered `kotodama` model offline; `kotodama generate` samples."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("lm_eval")
from tests.eval_fixtures import EVAL_DATA, REPO, TOKENIZER, make_train_artifact  # noqa: E402

pytestmark = pytest.mark.skipif(not (TOKENIZER.is_file() and EVAL_DATA.is_dir()), reason="shared data absent")


@pytest.fixture(scope="module")
def train(tmp_path_factory):
    return make_train_artifact(tmp_path_factory.mktemp("cli") / "train", steps=1)


def test_lm_eval_cli_with_kotodama_model_offline(tmp_path, train):
    # A plain YAML task over the local COPA file, so the check needs no hub access.
    (tmp_path / "copa_local.yaml").write_text(
        "task: copa_local\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {EVAL_DATA / 'copa.jsonl'}\noutput_type: multiple_choice\ntest_split: test\n"
        "doc_to_text: '{{query}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: gold\n"
        "metric_list:\n  - metric: acc\nmetadata:\n  version: 1.0\n")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "stages.cli", "lm-eval", "--model", "kotodama",
           "--model_args", f"checkpoint={train},tokenizer={TOKENIZER},max_length=64", "--device", "cpu",
           "--tasks", "copa_local", "--include_path", str(tmp_path), "--limit", "4", "--output_path", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in out.rglob("results_*.json")]
    assert results and 0.0 <= results[0]["results"]["copa_local"]["acc,none"] <= 1.0


def test_generate_command(train):
    cmd = [sys.executable, "-m", "stages.cli", "generate", str(train), "Once upon a time",
           "--max-new-tokens", "6", "--seed", "3", "--tokenizer", str(TOKENIZER)]
    a = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    b = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert a.returncode == 0, a.stderr[-2000:]
    assert a.stdout.startswith("Once upon a time") and a.stdout == b.stdout
    bad = subprocess.run([sys.executable, "-m", "stages.cli", "generate", str(train / "nope.pt.zst"), "x"],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert bad.returncode == 2 and "checkpoint not found" in bad.stderr


def test_documented_lm_eval_command_reads_the_local_task_file_offline(tmp_path, train):
    """`kotodama lm-eval --model kotodama --model_args checkpoint=… --tasks arc_easy` as the README shows it,
    with the hub unreachable: the local ARC-Easy file serves it."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "stages.cli", "lm-eval", "--model", "kotodama",
           "--model_args", f"checkpoint={train},tokenizer={TOKENIZER},max_length=64", "--tasks", "arc_easy,copa",
           "--device", "cpu", "--limit", "4", "--output_path", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                               "HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "arc_easy" in proc.stdout and "acc" in proc.stdout and "local task files" in proc.stdout
    results = json.loads((out / "results.json").read_text())["results"]
    assert 0.0 <= results["arc_easy"]["acc,none"] <= 1.0 and 0.0 <= results["copa"]["acc,none"] <= 1.0
