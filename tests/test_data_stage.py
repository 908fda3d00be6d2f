import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from kotodama_core.artifacts import partial_dir, read_manifest
from kotodama_core.config import load_config
from kotodama_core.data.loader import TokenLoader
from kotodama_core.data.shards import read_shard
from stages.data import run
from tests.data_helpers import REPO, needs_corpus, write_run_config

pytestmark = needs_corpus
BODY = "data: {seq_len: 128, total_tokens: 160000, dask: {chunk_chars: 20000, progress: false}}\n"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The corpus-mix table built with 1 and with 2 Dask workers."""
    tmp = tmp_path_factory.mktemp("data")
    cfg_path = write_run_config(tmp / "run.yaml", BODY)
    outs = {}
    for workers in (1, 2):
        cfg = load_config(cfg_path, [f"data.dask.workers={workers}"])
        outs[workers] = run(cfg, {}, tmp / f"w{workers}")
    return outs


def test_output_is_byte_identical_across_worker_counts(built):
    one, two = (json.loads(built[w].read_text()) for w in (1, 2))
    assert one["splits"] == two["splits"] and one["digest"] == two["digest"]
    assert one["outputs"] == two["outputs"] and one["sources"] == two["sources"]
    assert one["executor"]["workers"] == 1 and two["executor"]["workers"] == 2


def test_each_source_hits_its_share_within_one_percent(built):
    m = json.loads(built[2].read_text())
    total = sum(s["tokens"] for s in m["sources"].values())
    shard_tokens = sum(r["tokens"] for split in m["splits"].values() for r in split)
    assert total == shard_tokens and total == (160000 // 129) * 129
    for name, s in m["sources"].items():
        assert abs(s["tokens"] - s["share_target"] * total) <= 0.01 * s["share_target"] * total, name
        assert s["docs_in"] == s["docs_out"] + sum(d["docs"] for d in s["dropped"].values())
    assert m["sources"]["code"]["repeat_factor"] > 1  # HumanEval is smaller than its 21 % quota


def test_manifest_fields_and_shards(built):
    root = built[2].parent
    m = read_manifest(root).data
    assert m["window"] == 129 and m["dtype"] == "uint16" and m["vocab_size"] == 49152 and m["eos_id"] == 0
    assert len(m["splits"]["val"]) == 1 and m["splits"]["val"][0]["rows"] == round(0.005 * (160000 // 129))
    assert 2.0 < m["bytes_per_token"]["train"] < 6.0
    assert m["tokenizer"]["sha256"] and "dask" not in m["config"]
    windows = np.concatenate([read_shard(root / r["path"]) for r in m["splits"]["train"]])
    assert windows.shape[1] == 129 and (windows == 0).any()  # EOS between documents
    loader = TokenLoader(root, batch_size=4)
    assert loader.next_batch().shape == (4, 129)


def test_killed_stage_leaves_no_output_and_a_rerun_completes(tmp_path):
    cfg = write_run_config(tmp_path / "run.yaml", "data: {seq_len: 128, total_tokens: 200000, "
                                                  "dask: {workers: 0, chunk_chars: 5000, progress: false}}\n")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "stages.data", "--config", str(cfg), "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    spill = partial_dir(out) / ".spill.bin"
    deadline = time.time() + 60
    while not (spill.is_file() and spill.stat().st_size > 0) and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the stage finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists() and partial_dir(out).exists()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (out / "manifest.json").is_file() and not partial_dir(out).exists()
    assert not (out / ".spill.bin").exists()


def test_missing_tokenizer_is_a_clear_stage_error(tmp_path):
    cfg = write_run_config(tmp_path / "run.yaml", "data: {seq_len: 128, total_tokens: 1000, "
                                                  "tokenizer: ./no/such/tokenizer.json}\n")
    done = subprocess.run([sys.executable, "-m", "stages.data", "--config", str(cfg), "--out", str(tmp_path / "o")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "tokenizer not found" in done.stderr
    assert not (tmp_path / "o").exists()
