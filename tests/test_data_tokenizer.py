import json

import pytest

from tests.data_helpers import REPO, TOKENIZER, needs_corpus
from kotodama_core.data.tokenizer import TokenizerError, load_tokenizer, token_byte_lengths, tokenizer_sha256


@needs_corpus
def test_reference_encodings_match_exactly():
    cases = json.loads((TOKENIZER / "hf_reference_cases.json").read_text())["cases"]
    assert len(cases) == 205
    tok = load_tokenizer(TOKENIZER / "tokenizer.json")
    mismatches = [c["text"] for c in cases if tok.encode(c["text"], add_special_tokens=False).ids != c["ids"]]
    assert mismatches == []


@needs_corpus
def test_folder_and_relative_path_load_the_same_file():
    a = load_tokenizer(TOKENIZER)
    b = load_tokenizer("../shared/data/smollm2-tokenizer/tokenizer.json", root=REPO)
    assert a.to_str() == b.to_str() and a.get_vocab_size() == 49152
    assert tokenizer_sha256(str(TOKENIZER)) == tokenizer_sha256(str(TOKENIZER / "tokenizer.json"))


@needs_corpus
def test_token_byte_lengths_sum_to_utf8_bytes():
    tok = load_tokenizer(TOKENIZER)
    lengths = token_byte_lengths(tok)
    text = "Héllo wörld, 日本語 😀 3.14159\n\tend"
    assert lengths[tok.encode(text, add_special_tokens=False).ids].sum() == len(text.encode("utf-8"))
    assert lengths[0] == 0  # <|endoftext|> is not text


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer not found"):
        load_tokenizer(tmp_path / "nope" / "tokenizer.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="^data.tokenizer: tokenizer folder .* holds no tokenizer.json"):
        load_tokenizer(tmp_path / "empty")
    # eval's tokenizers name their own keys
    from kotodama_core.eval.tokenizer import load_eval_tokenizer
    with pytest.raises(TokenizerError, match="^eval.val_bpb.tokenizer: tokenizer not found: .*nope"):
        load_eval_tokenizer(str(tmp_path / "nope" / "tokenizer.json"), key="eval.val_bpb.tokenizer")
    with pytest.raises(TokenizerError, match="^eval.tokenizer: tokenizer not found"):
        load_eval_tokenizer(str(tmp_path / "nope" / "tokenizer.json"))


def test_a_hub_id_goes_to_the_hub_client_and_offline_names_the_key_and_the_setting(tmp_path, monkeypatch):
    """`HuggingFaceTB/SmolLM2-135M` is a hub id, not a path under the repository: offline and without a
    cached copy the error names data.tokenizer, the path tried and HF_HUB_OFFLINE."""
    from kotodama_core.data.tokenizer import TokenizerError, load_tokenizer, tokenizer_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert tokenizer_file("HuggingFaceTB/SmolLM2-135M", tmp_path) is None  # a hub id
    with pytest.raises(TokenizerError) as err:
        load_tokenizer("HuggingFaceTB/SmolLM2-135M", tmp_path)
    message = str(err.value)
    assert message.startswith("data.tokenizer 'HuggingFaceTB/SmolLM2-135M'")
    assert str(tmp_path / "HuggingFaceTB/SmolLM2-135M") in message and "HF_HUB_OFFLINE=1" in message
    with pytest.raises(TokenizerError, match="tokenizer not found"):
        tokenizer_file("./missing/tokenizer.json", tmp_path)
