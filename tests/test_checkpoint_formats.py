"""The original's checkpoint forms (built here from a tiny model): inspect, convert both ways, init."""

from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from original_fixtures import (TINY_BOUNDARIES, original_load_latest, original_state, tiny_config,  # noqa: E402
                               write_async, write_sync)

from kotodama_core.checkpoint_formats import cli, convert, read_checkpoint  # noqa: E402
from kotodama_core.checkpoint_formats.shape import infer_shape, num_parameters  # noqa: E402
from kotodama_core.config import RunConfig  # noqa: E402
from kotodama_core.model.io import CheckpointError  # noqa: E402
from kotodama_core.model.model import KotodamaLM  # noqa: E402
from kotodama_core.optim.hybrid import build_optimizer  # noqa: E402
from kotodama_core.train.init import load_weights_strict, read_weights, resume_state  # noqa: E402

B = ",".join(map(str, TINY_BOUNDARIES))


@pytest.fixture(scope="module")
def orig():
    return original_state(tiny_config(), step=10)


def _run_cfg(steps: int = 100, **init) -> RunConfig:
    return RunConfig.model_validate({"model": tiny_config().model_dump(mode="json"),
                                     "schedule": {"warmup_steps": 5, "stable_fraction": 0.9, "decay": "cosine"},
                                     "optim": {"muon": {"lr": 0.02}, "adamw": {"lr": 6e-4}},
                                     "train": {"steps": steps, "init": {"mode": "resume", **init}}})


@pytest.mark.parametrize("writer,fmt", [(write_async, "original-async"), (write_sync, "original-sync")])
def test_inspect_original_forms(tmp_path, orig, writer, fmt, capsys):
    writer(orig, tmp_path)
    writer({**orig, "step": 4}, tmp_path)  # an older step: the folder gives the newest
    assert cli.main(["inspect", str(tmp_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == fmt and info["step"] == 10 and info["updates"] == 11
    assert info["tokens"] == orig["tokens_consumed"]
    cfg = tiny_config()
    for k in ("num_layers", "hidden_size", "num_attention_heads", "num_kv_heads", "head_dim",
              "intermediate_size", "vocab_size", "attn_res"):
        assert info[k] == getattr(cfg, k) and info["model"][k] == getattr(cfg, k)
    assert info["num_parameters"] == sum(p.numel() for p in KotodamaLM(cfg).parameters())
    assert info["dtypes"] == {"bfloat16": len(orig["model"])}
    assert info["optimizers"] == ["adamw_optimizer", "muon_optimizer"] and info["data_state"]
    assert cli.main(["inspect", str(tmp_path), "--step", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 4


def test_tied_weights_counted_once():
    cfg = tiny_config()
    sd = KotodamaLM(cfg).state_dict()
    tied = {**sd, "lm_head.weight": sd["embed_tokens.weight"]}
    assert num_parameters(tied) == num_parameters(sd)
    assert infer_shape(tied)["tie_word_embeddings"]
    untied = {**sd, "lm_head.weight": sd["embed_tokens.weight"].clone()}
    assert num_parameters(untied) == num_parameters(sd) + sd["embed_tokens.weight"].numel()


@pytest.mark.parametrize("prefix", ["_orig_mod.", "module.", "module._orig_mod."])
def test_wrapper_prefixes_stripped(tmp_path, orig, prefix):
    path = write_sync({**orig, "model": {prefix + k: v for k, v in orig["model"].items()}}, tmp_path)
    sd = read_weights(path, tiny_config())
    assert set(sd) == set(orig["model"])
    model = KotodamaLM(tiny_config())
    load_weights_strict(model, sd, str(path))
    assert torch.equal(model.state_dict()["norm.weight"], orig["model"]["norm.weight"].float())


def test_numpy_scalars_allowed_but_code_refused(tmp_path, orig):
    path = write_async(orig, tmp_path)
    ck = read_checkpoint(path)
    assert ck.state["data"]["position"] == 20 and isinstance(ck.state["data"]["position"], np.integer)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    bad = tmp_path / "evil" / "step_00000001.pt"
    bad.parent.mkdir()
    torch.save({**orig, "data": Evil()}, bad)
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        read_checkpoint(bad)


@pytest.mark.parametrize("damage", ["truncate", "random", "empty", "pickle"])
@pytest.mark.parametrize("writer", [write_async, write_sync])
def test_damaged_files_one_line(tmp_path, orig, damage, writer, capsys):
    path = writer(orig, tmp_path)
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(pickle.dumps({"a": 1}))
    assert cli.main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and "Traceback" not in err


def test_attn_res_layout_refused_without_boundaries(tmp_path, orig, capsys):
    src = write_async(orig, tmp_path / "src")
    out = tmp_path / "out"
    assert cli.main(["convert", str(src), "--out", str(out)]) == 2
    assert "--attn-res-boundaries" in capsys.readouterr().err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_preset_shape_gives_boundaries(tmp_path):
    from kotodama_core.checkpoint_formats.shape import model_config_for, presets
    tiny = presets()["tiny"]
    shape = infer_shape(KotodamaLM(tiny, device="meta").state_dict())
    cfg, origin = model_config_for(shape, None)
    assert cfg.block_starts() == tiny.block_starts() and origin == "preset tiny"


def _assert_same_tensors(a, b):
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert set(a) == set(b)
        for k in a:
            _assert_same_tensors(a[k], b[k])


def test_round_trip_original_project_original(tmp_path, orig):
    src = write_async(orig, tmp_path / "src")
    proj, orig2 = tmp_path / "proj", tmp_path / "orig2"
    assert cli.main(["convert", str(src), "--out", str(proj), "--attn-res-boundaries", B]) == 0
    assert cli.main(["convert", str(proj), "--out", str(orig2), "--to", "original"]) == 0
    back = original_load_latest(orig2)
    assert (orig2 / "step_00000010.pt.zst").is_file()
    assert back["step"] == 10 and back["tokens_consumed"] == orig["tokens_consumed"]
    _assert_same_tensors(orig["model"], back["model"])
    for key in ("muon_optimizer", "adamw_optimizer"):
        _assert_same_tensors(orig[key]["state"], back[key]["state"])
    assert back["scheduler"]["total_steps"] == 100 and back["scheduler"]["decay_start_step"] == 90


def test_project_to_original_loads_in_original_layout(tmp_path, orig):
    """Project → original → project is exact at bf16; the original's loader takes the file into a bf16
    model and optimizers built the original's way (one AdamW group, Muon over 2-D hidden matrices)."""
    cfg = tiny_config()
    src = write_sync(orig, tmp_path / "src")
    proj = tmp_path / "proj"
    convert(src, proj, boundaries=TINY_BOUNDARIES)
    out = tmp_path / "o"
    convert(proj, out, to="original")
    back = original_load_latest(out)
    assert all(v.dtype == torch.bfloat16 for v in back["model"].values())
    model = KotodamaLM(cfg).to(torch.bfloat16)
    model.load_state_dict(back["model"])
    named = list(model.named_parameters())
    muon_p = [p for n, p in named if p.ndim == 2 and "embed" not in n]
    adamw_p = [p for n, p in named if not (p.ndim == 2 and "embed" not in n)]
    muon = torch.optim.SGD(muon_p, lr=0.02, momentum=0.95)
    adamw = torch.optim.AdamW(adamw_p)
    back["muon_optimizer"].pop("ns_coefficients")
    muon.load_state_dict(back["muon_optimizer"])
    adamw.load_state_dict(back["adamw_optimizer"])
    again = tmp_path / "again"
    convert(out, again, boundaries=TINY_BOUNDARIES)
    _assert_same_tensors(read_checkpoint(proj).model, read_checkpoint(again).model)


def test_convert_again_onto_existing_out(tmp_path, orig):
    src = write_async(orig, tmp_path / "src")
    out = tmp_path / "out"
    convert(src, out, boundaries=TINY_BOUNDARIES)
    (out / "stale.txt").write_text("x")
    convert(src, out, boundaries=TINY_BOUNDARIES)
    assert not (out / "stale.txt").exists()
    from kotodama_core.eval.loading import load_checkpoint_model
    model, cfg = load_checkpoint_model(out)
    assert cfg.block_starts() == TINY_BOUNDARIES
    assert torch.equal(model.state_dict()["norm.weight"], orig["model"]["norm.weight"].float())


def test_weights_init_from_each_form_and_shape_mismatch(tmp_path, orig):
    a = write_async(orig, tmp_path / "a")
    s = write_sync(orig, tmp_path / "s")
    for path in (a, s, tmp_path / "a"):
        model = KotodamaLM(tiny_config())
        load_weights_strict(model, read_weights(path, tiny_config()), str(path))
    wider = tiny_config(hidden_size=48, num_layers=2, attn_res_boundaries=[0, 1])
    with pytest.raises(CheckpointError) as exc:
        read_weights(a, wider)
    assert "hidden_size: checkpoint 32 vs config 48" in str(exc.value)
    assert "num_layers: checkpoint 3 vs config 2" in str(exc.value)


def test_resume_from_original_maps_step_tokens_optimizers(tmp_path, orig):
    path = write_async(orig, tmp_path)
    with pytest.raises(CheckpointError, match="allow_unmapped.*") as exc:
        resume_state(path, _run_cfg())
    assert "data position" in str(exc.value)
    with pytest.warns(UserWarning, match="data position"):
        state = resume_state(path, _run_cfg(allow_unmapped=True))
    assert state["step"] == 11 and state["tokens_seen"] == orig["tokens_consumed"]
    cfg = _run_cfg(allow_unmapped=True)
    model = KotodamaLM(cfg.model)
    load_weights_strict(model, state["model"], "x")
    opt = build_optimizer(model, cfg.optim)
    opt.load_state_dict(state["optimizer"])
    names = {id(p): n for n, p in model.named_parameters()}
    orig_adam_names = [n for n, p in model.named_parameters() if not (p.ndim == 2 and "embed" not in n)]
    p_embed = dict(model.named_parameters())["embed_tokens.weight"]
    i = orig_adam_names.index("embed_tokens.weight")
    assert torch.equal(opt.optimizers["adamw"].state[p_embed]["exp_avg"],
                       orig["adamw_optimizer"]["state"][i]["exp_avg"].float())
    p_q = dict(model.named_parameters())["layers.1.attn.q_proj.weight"]
    assert torch.equal(opt.optimizers["muon"].state[p_q]["momentum_buffer"],
                       orig["muon_optimizer"]["state"][7]["momentum_buffer"].float())
    assert names[id(p_q)] == "layers.1.attn.q_proj.weight"


def test_resume_refuses_other_schedule(tmp_path, orig):
    path = write_async(orig, tmp_path)
    cfg = _run_cfg(steps=200, allow_unmapped=True)
    with pytest.raises(CheckpointError, match="total_steps: checkpoint 100 vs run 200"):
        resume_state(path, cfg)


def test_bare_state_dict_converts_to_original_step_zero(tmp_path, orig):
    from kotodama_core.model.io import save_pt_zst

    src = save_pt_zst({k: v.float() for k, v in orig["model"].items()}, tmp_path / "model.pt.zst")
    assert read_checkpoint(src).format == "state-dict"
    convert(src, tmp_path / "o", to="original", boundaries=TINY_BOUNDARIES)
    back = original_load_latest(tmp_path / "o")
    assert back["step"] == 0 and "muon_optimizer" not in back
    _assert_same_tensors(orig["model"], back["model"])


def test_resume_from_converted_project_folder(tmp_path, orig):
    src = write_async(orig, tmp_path / "src")
    convert(src, tmp_path / "proj", boundaries=TINY_BOUNDARIES)
    with pytest.raises(CheckpointError, match="allow_unmapped"):
        resume_state(tmp_path / "proj", _run_cfg())
    with pytest.raises(CheckpointError, match="total_steps: checkpoint 100 vs run 50"):
        resume_state(tmp_path / "proj", _run_cfg(steps=50, allow_unmapped=True))
    with pytest.warns(UserWarning):
        state = resume_state(tmp_path / "proj", _run_cfg(allow_unmapped=True))
    assert state["step"] == 11 and state["loader"] is None and "model_digest" not in state
    cfg = _run_cfg(allow_unmapped=True)
    model = KotodamaLM(cfg.model)
    load_weights_strict(model, state["model"], "x")
    build_optimizer(model, cfg.optim).load_state_dict(state["optimizer"])


def test_init_from_a_folder_of_original_checkpoints(tmp_path, orig):
    """train.init.step names the file (`step_00000010` holds 11 updates); the digest is that file's sha256."""
    from kotodama_core.artifacts import ArtifactError, sha256_file
    from kotodama_core.train.checkpoint import init_checkpoint_file
    from stages.train import resolve_init

    folder = tmp_path / "orig"
    older = write_sync({**orig, "step": 4}, folder)
    newer = write_async(orig, folder)
    assert init_checkpoint_file(folder, 4) == older
    assert init_checkpoint_file(folder, None) == newer
    with pytest.raises(CheckpointError, match=r"no checkpoint for step 7; it holds steps \[4, 10\]"):
        init_checkpoint_file(folder, 7)
    with pytest.raises(ArtifactError, match="does not exist"):
        init_checkpoint_file(tmp_path / "nowhere", 4)

    cfg = _run_cfg(step=4, allow_unmapped=True)
    file, manifests = resolve_init(cfg, {"init": folder})
    assert file == older and manifests["init"].digest == sha256_file(older)
    by_key = _run_cfg(step=10, checkpoint=str(folder), allow_unmapped=True)
    assert resolve_init(by_key, {}) == (newer, {})
    state = resume_state(file, cfg)
    assert state["step"] == 5  # the original's step 4 = 5 updates


def test_bcpt_plan_from_a_folder_of_original_checkpoints(tmp_path, monkeypatch):
    """The bcpt deployment takes the original's checkpoint folder: its step file is the init input."""
    from flows.pipelines import build_plan
    from kotodama_core.config import ConfigError
    from stages.graph import resolve

    monkeypatch.setenv("KOTODAMA_HOME", str(tmp_path / "home"))
    cfg = resolve("bcpt", "tiny")
    state = original_state(cfg.model, step=cfg.train.init.step)
    file = write_async(state, tmp_path / "orig")
    write_sync({**state, "step": cfg.train.init.step + 5}, tmp_path / "orig")  # a later one: not chosen
    steps = build_plan("bcpt", "tiny", init_checkpoint=str(tmp_path / "orig"))
    train = next(s for s in steps if s.key == "train")
    assert train.inputs["init"] == file
    wrong = original_state(tiny_config(), step=cfg.train.init.step)
    write_async(wrong, tmp_path / "other")
    with pytest.raises(ConfigError, match="does not fit the tiny model"):
        build_plan("bcpt", "tiny", init_checkpoint=str(tmp_path / "other"))
    later = build_plan("bcpt", "tiny", init_checkpoint=str(tmp_path / "orig"), init_step=cfg.train.init.step + 5)
    assert next(s for s in later if s.key == "train").inputs["init"].suffix == ".pt"
