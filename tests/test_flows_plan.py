"""flows/: run configs are the card's recipes, plans predict digests, bad input fails before any work."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest


from flows.pipelines import build_plan  # noqa: E402
from flows.launch import StageFailed, run_streaming, stage_command  # noqa: E402
from stages.graph import downstream_of, resolve  # noqa: E402
from kotodama_core.artifacts import ArtifactError, write_manifest  # noqa: E402
from kotodama_core.config import ConfigError  # noqa: E402


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("KOTODAMA_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def by_key(steps):
    return {s.key: s for s in steps}


# -- the published recipes -------------------------------------------------------------------------

def test_nca_recipe():
    c = resolve("nca", "proxy-108m")
    assert (c.train.seed, c.nca.seed, c.train.global_batch_tokens) == (17, 17, 131_072)
    assert c.train.steps * c.train.global_batch_tokens == 851_968_000  # 852M tokens
    assert c.model.attn_res and c.model.attn_res_boundaries == [0, 3, 7, 12, 21, 25]  # DD-v1
    assert (c.optim.kind, c.optim.muon.lr, c.optim.adamw.lr) == ("hybrid", 0.02, 6e-4)
    assert c.model.vocab_size == c.nca.vocab_size


def test_fullcorpus_recipe():
    c = resolve("fullcorpus", "proxy-108m")
    t = c.train
    assert (t.steps, t.global_batch_tokens, t.micro_batch, t.seq_len, t.nproc) == (81_252, 2_097_152, 16, 4096, 8)
    assert t.grad_accum_steps(8) == 4 and round(t.steps * t.global_batch_tokens / 1e9, 1) == 170.4
    assert (c.schedule.warmup_steps, c.schedule.stable_fraction, c.schedule.decay) == (5000, 0.9, "cosine")
    assert (t.grad_clip, t.precision, t.compile) == (1.0, "bf16", True)
    assert (t.monitor.every_steps, t.monitor.layers) == (75, [0, 7, 14, 21, 27])
    assert 72_000 in t.checkpoint.milestones and t.init.mode == "nca_transfer"
    assert c.preset == "proxy-108m" and c.model.num_layers == 28


def test_bcpt_recipe():
    c = resolve("bcpt", "proxy-108m")
    t = c.train
    assert (t.init.mode, t.init.step, t.steps) == ("weights", 72_000, 17_337)
    assert round(t.steps * t.global_batch_tokens / 1e9, 1) == 36.4
    assert (c.schedule.warmup_steps, c.schedule.stable_fraction, c.schedule.decay) == (500, 0.9, "cosine")
    assert c.data.ocr_garbage_threshold == 0.05 and c.data.sources


def test_tiny_chain_is_small_and_keeps_a_pre_decay_milestone():
    fc, bc, nca = (resolve(p, "tiny") for p in ("fullcorpus", "bcpt", "nca"))
    assert fc.train.steps + bc.train.steps + nca.train.steps <= 300
    (milestone,) = fc.train.checkpoint.milestones
    assert milestone < fc.train.steps * fc.schedule.stable_fraction  # before the decay, like 72000
    assert bc.train.init.step == milestone and bc.train.init.mode == "weights"
    assert all(c.train.nproc == 1 and c.preset == "tiny" for c in (fc, bc, nca))


# -- config errors before any work -----------------------------------------------------------------

def test_unknown_override_key_is_rejected(home):
    with pytest.raises(ConfigError, match="unknown config key 'eval.bogus'"):
        build_plan("fullcorpus", "tiny", {"eval.bogus": 1})
    with pytest.raises(ConfigError, match="must be dotted"):
        build_plan("fullcorpus", "tiny", {"steps": 1})
    with pytest.raises(ConfigError, match="unknown config key 'train.nope'"):
        build_plan("fullcorpus", "tiny", nca_overrides={"train.nope": 1})
    with pytest.raises(ConfigError, match="no run config"):
        build_plan("fullcorpus", "huge")
    with pytest.raises(ConfigError, match="bcpt pipeline only"):
        build_plan("nca", "tiny", init_step=3)
    assert not home.exists()  # nothing was written


# -- digests and what reruns -----------------------------------------------------------------------

def test_fullcorpus_plan_order_and_inputs():
    steps = build_plan("fullcorpus", "tiny")
    keys = [s.key for s in steps]
    assert keys[:4] == ["data", "nca_search", "nca_data", "nca_train"] and keys[-3:] == ["train", "eval", "report"]
    s = by_key(steps)
    assert s["train"].inputs["init"] is s["nca_train"] and s["train"].inputs["data"] is s["data"]
    assert s["nca_train"].cfg.model.vocab_size != s["train"].cfg.model.vocab_size
    assert len({x.digest for x in steps}) == len(steps)
    assert [x.digest for x in build_plan("fullcorpus", "tiny")] == [x.digest for x in steps]  # deterministic


def test_changing_one_eval_key_changes_only_eval_and_report():
    before = by_key(build_plan("fullcorpus", "tiny"))
    after = by_key(build_plan("fullcorpus", "tiny", {"eval.limit": 3}))
    changed = {k for k in before if before[k].digest != after[k].digest}
    assert changed == {"eval", "report"} == downstream_of(list(after.values()), "eval")


def test_changing_the_nca_search_reruns_everything_downstream_of_it():
    before = by_key(build_plan("fullcorpus", "tiny"))
    after = by_key(build_plan("fullcorpus", "tiny", nca_overrides={"nca.search.band_high": 0.69}))
    changed = {k for k in before if before[k].digest != after[k].digest}
    assert changed == downstream_of(list(after.values()), "nca_search")
    assert "data" not in changed and {"nca_train", "train", "eval", "report"} <= changed


# -- the bcpt source checkpoint --------------------------------------------------------------------

def _fake_training_artifact(root: Path, cfg, step: int) -> Path:
    """A training artifact folder holding one real checkpoint of `cfg.model` at `step`."""
    import torch

    from kotodama_core.model import KotodamaLM, save_pt_zst
    from kotodama_core.train.checkpoint import checkpoint_name

    torch.manual_seed(0)
    model = KotodamaLM(cfg.model)
    (root / "checkpoints").mkdir(parents=True)
    save_pt_zst({"model": model.state_dict()}, root / "checkpoints" / checkpoint_name(step))
    write_manifest(root, stage="train", config={"model": cfg.section("model")}, inputs={})
    return root


def test_bcpt_default_source_is_the_fullcorpus_milestone(home):
    with pytest.raises(ArtifactError, match="no such training artifact.*run the fullcorpus deployment first"):
        build_plan("bcpt", "tiny")


def test_bcpt_source_must_exist_hold_the_step_and_fit_the_model(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        build_plan("bcpt", "tiny", init_checkpoint=str(tmp_path / "nowhere"))
    cfg = resolve("bcpt", "tiny")
    art = _fake_training_artifact(tmp_path / "fc", cfg, step=cfg.train.init.step)
    steps = by_key(build_plan("bcpt", "tiny", init_checkpoint=str(art)))
    assert steps["train"].inputs["init"] == art.resolve()
    with pytest.raises(ArtifactError, match=r"no checkpoint for step 7; it keeps steps \[30\]"):
        build_plan("bcpt", "tiny", init_checkpoint=str(art), init_step=7)
    wrong = resolve("bcpt", "tiny", {"model.intermediate_size": 96})
    bad = _fake_training_artifact(tmp_path / "other", wrong, step=cfg.train.init.step)
    shapes = r"does not fit the tiny model: layers.0.ffn.gate_proj.weight: checkpoint \(96, 64\) vs model \(176, 64\)"
    with pytest.raises(ConfigError, match=shapes):
        build_plan("bcpt", "tiny", init_checkpoint=str(bad))


# -- launching -------------------------------------------------------------------------------------

def test_stage_command(monkeypatch, tmp_path):
    cfg, out = tmp_path / "c.yaml", tmp_path / "o"
    assert stage_command("train", cfg, out, {"data": Path("/d")}, nproc=1)[:3] == [sys.executable, "-m", "stages.train"]
    multi = stage_command("train", cfg, out, {"data": Path("/d")}, nproc=8)
    assert multi[1:3] == ["-m", "torch.distributed.run"] and "--standalone" in multi
    assert multi[multi.index("--nproc_per_node") + 1] == "8" and "data=/d" in multi
    monkeypatch.setenv("KOTODAMA_NNODES", "4")
    with pytest.raises(ValueError, match="KOTODAMA_RDZV_ENDPOINT"):
        stage_command("train", cfg, out, {}, nproc=8)
    monkeypatch.setenv("KOTODAMA_RDZV_ENDPOINT", "node0:29400")
    monkeypatch.setenv("KOTODAMA_LAUNCH_PREFIX", "srun --ntasks-per-node=1")
    cmd = stage_command("train", cfg, out, {}, nproc=8, run_id="abc")
    assert cmd[:2] == ["srun", "--ntasks-per-node=1"]
    assert cmd[cmd.index("--rdzv_backend") + 1] == "c10d" and cmd[cmd.index("--nnodes") + 1] == "4"
    assert stage_command("eval", cfg, out, {})[:3] == [sys.executable, "-m", "stages.eval"]


def test_run_streaming_streams_lines_and_fails_on_nonzero_exit(tmp_path):
    lines: list[str] = []
    run_streaming([sys.executable, "-c", "print('a'); print('b')"], env={"PATH": "/usr/bin"},
                  on_line=lines.append, log_file=tmp_path / "log")
    assert lines == ["a", "b"] and "a\nb\n" in (tmp_path / "log").read_text()
    with pytest.raises(StageFailed, match=r"exited with code 3; last lines:\nboom"):
        run_streaming([sys.executable, "-c", "print('boom'); raise SystemExit(3)"], env={}, on_line=lambda _: None)
