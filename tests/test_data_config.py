import pytest

from tests.data_helpers import needs_corpus, write_run_config
from kotodama_core.config import ConfigError, load_config, validate


def _tree(**data):
    return {"data": {"tokenizer": "x.json", **data}}


def test_shares_must_sum_to_one():
    srcs = [{"name": "a", "share": 0.5, "files": ["a.jsonl"]}, {"name": "b", "share": 0.4, "files": ["b.jsonl"]}]
    with pytest.raises(ConfigError, match="shares sum to 0.900000"):
        validate(_tree(sources=srcs))


def test_source_needs_exactly_one_origin_and_known_fields():
    with pytest.raises(ConfigError, match="exactly one of hf_id or files"):
        validate(_tree(sources=[{"name": "a", "share": 1.0}]))
    with pytest.raises(ConfigError, match="exactly one of hf_id or files"):
        validate(_tree(sources=[{"name": "a", "share": 1.0, "hf_id": "x/y", "files": ["a.jsonl"]}]))
    with pytest.raises(ConfigError, match="has no field"):
        validate(_tree(sources=[{"name": "a", "share": 1.0, "files": ["a"], "fields": {"question": "q"}}]))
    with pytest.raises(ConfigError, match="unknown config key"):
        validate(_tree(sources=[{"name": "a", "share": 1.0, "files": ["a"], "text_feild": "t"}]))


def test_source_tables_load(tmp_path):
    for table, n in (("fullcorpus", 13), ("books-cpt", 3), ("corpus-mix", 8)):
        p = tmp_path / f"{table}.yaml"
        p.write_text(f"extends: [sources/{table}]\ndata: {{seq_len: 128, total_tokens: 5000}}\n")
        cfg = load_config(p)
        assert len(cfg.data.sources) == n and cfg.data.seq_len == 128 and cfg.data.total_tokens == 5000
        assert abs(sum(s.share for s in cfg.data.sources) - 1) < 1e-4


@needs_corpus
def test_relative_paths_resolve_against_repo_root(tmp_path):
    cfg = load_config(write_run_config(tmp_path / "run.yaml", "data: {seq_len: 128}\n"))
    assert cfg.data.resolve_path(cfg.data.sources[0].files[0]).is_file()


def test_executor_settings_stay_out_of_the_digest(tmp_path):
    a = validate({"data": {"dask": {"workers": 1}}}).data.digest_section()
    b = validate({"data": {"dask": {"workers": 2}}}).data.digest_section()
    assert a == b and "dask" not in a
