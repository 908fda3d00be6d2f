"""Strict YAML configs: extends, overrides, unknown keys, digest."""

from pathlib import Path

import pytest

from kotodama_core.config import ConfigError, apply_overrides, digest, load_config, load_tree, validate

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_extends_merges_and_child_wins(tmp_path):
    write(tmp_path, "base.yaml", "model: {hidden_size: 64, num_layers: 4}\ntrain: {steps: 10}\n")
    child = write(tmp_path, "child.yaml", "extends: [base]\nmodel: {num_layers: 2}\n")
    cfg = load_config(child)
    assert cfg.model.hidden_size == 64 and cfg.model.num_layers == 2 and cfg.train.steps == 10


def test_extends_resolves_against_configs_root(tmp_path):
    child = write(tmp_path, "run.yaml", "extends: presets/proxy-108m\ntrain: {steps: 3}\n")
    cfg = load_config(child)
    assert cfg.model.attn_res_boundaries == [0, 3, 7, 12, 21, 25] and cfg.preset == "proxy-108m"


def test_unknown_key_is_an_error_naming_it(tmp_path):
    p = write(tmp_path, "bad.yaml", "train: {stpes: 10}\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'train.stpes'"):
        load_config(p)
    with pytest.raises(ConfigError, match="unknown config key 'modle'"):
        load_config(ROOT / "configs/presets/tiny.yaml", ["modle.hidden_size=3"])


def test_overrides_parse_yaml_values():
    cfg = load_config(ROOT / "configs/presets/tiny.yaml", ["train.steps=7", "model.attn_res_boundaries=[0,1]"])
    assert cfg.train.steps == 7 and cfg.model.attn_res_boundaries == [0, 1]
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(ROOT / "configs/presets/tiny.yaml", ["train.steps"])


@pytest.mark.parametrize("bounds, message", [([0, 2, 2], "strictly increasing"), ([3, 1], "strictly increasing"),
                                             ([0, 4], "out of range"), ([-1, 2], "out of range")])
def test_bad_boundaries(bounds, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "configs/presets/tiny.yaml", {"model.attn_res_boundaries": bounds})


def test_extends_cycle_and_missing_file(tmp_path):
    write(tmp_path, "a.yaml", "extends: b\n")
    write(tmp_path, "b.yaml", "extends: a\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_digest_is_order_independent_and_sensitive():
    assert digest({"a": 1, "b": [1, 2]}) == digest({"b": [1, 2], "a": 1})
    assert digest({"a": 1}) != digest({"a": 2})
    tree = load_tree(ROOT / "configs/presets/tiny.yaml")
    a = validate(tree)
    b = validate(apply_overrides(tree, {"eval.limit": 5}))
    assert digest(a.section("model")) == digest(b.section("model"))
    assert digest(a.section("eval")) != digest(b.section("eval"))


def test_grad_accum_must_divide():
    cfg = load_config(ROOT / "configs/presets/tiny.yaml",
                      {"train.seq_len": 64, "train.micro_batch": 4, "train.global_batch_tokens": 1024})
    assert cfg.train.grad_accum_steps(1) == 4 and cfg.train.grad_accum_steps(2) == 2
    with pytest.raises(ValueError, match="not a multiple"):
        cfg.train.grad_accum_steps(3)


def test_attn_res_mix_dtype_reaches_the_model_runtime_and_a_wrong_value_is_named():
    from kotodama_core.train.engine import attn_res_runtime

    preset = ROOT / "configs/presets/tiny.yaml"
    assert attn_res_runtime(load_config(preset).train).mix_precision == "float32"
    cfg = load_config(preset, ["train.attn_res_mix_dtype=activation", "train.attn_res_kernels=false"])
    runtime = attn_res_runtime(cfg.train)
    assert (runtime.mix_precision, runtime.kernels) == ("activation", False)
    with pytest.raises(ConfigError, match="attn_res_mix_dtype"):
        load_config(preset, ["train.attn_res_mix_dtype=bfloat16"])
