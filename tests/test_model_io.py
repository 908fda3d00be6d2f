"""`.pt.zst` checkpoints: bit-exact round trip, strict loading, clear errors for bad files."""

from __future__ import annotations

import io

import pytest
import torch
import zstandard

from kotodama_core.model import CheckpointError, KotodamaConfig, KotodamaLM, load_model, load_pt_zst, save_pt_zst


def tiny_cfg(**overrides) -> KotodamaConfig:
    base = dict(hidden_size=32, num_layers=3, num_attention_heads=4, num_kv_heads=2, head_dim=8,
                intermediate_size=48, vocab_size=101, max_position_embeddings=64, attn_res_boundaries=[0, 2])
    base.update(overrides)
    return KotodamaConfig(**base)


def test_round_trip_is_bit_exact(tmp_path):
    torch.manual_seed(0)
    model = KotodamaLM(tiny_cfg())
    obj = {"model": model.state_dict(), "bf16": torch.randn(7, 5).bfloat16(), "step": 12,
           "rng": torch.get_rng_state(), "nested": {"x": [1.5, "a"]}}
    path = save_pt_zst(obj, tmp_path / "ck" / "step_0000012.pt.zst")
    assert path.read_bytes()[:4] == b"\x28\xb5\x2f\xfd"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    back = load_pt_zst(path)
    assert back.keys() == obj.keys() and back["step"] == 12 and back["nested"] == obj["nested"]
    for k, v in obj["model"].items():
        assert back["model"][k].dtype == v.dtype and torch.equal(back["model"][k], v), k
    assert torch.equal(back["bf16"], obj["bf16"]) and torch.equal(back["rng"], obj["rng"])


def test_published_layout_loads_into_model(tmp_path):
    """A state dict built from the published key list (not from the model) loads strictly."""
    cfg = tiny_cfg()
    d, hd, inter, v = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size, cfg.vocab_size
    g = torch.Generator().manual_seed(1)
    sd = {"embed_tokens.weight": torch.randn(v, d, generator=g), "norm.weight": torch.rand(d, generator=g),
          "final_res_query": torch.randn(d, generator=g), "final_res_norm.weight": torch.rand(d, generator=g)}
    for i in range(cfg.num_layers):
        shapes = {"attn_norm.weight": (d,), "attn.q_proj.weight": (4 * hd, d), "attn.k_proj.weight": (2 * hd, d),
                  "attn.v_proj.weight": (2 * hd, d), "attn.o_proj.weight": (d, 4 * hd),
                  "attn.q_norm.weight": (hd,), "attn.k_norm.weight": (hd,), "ffn_norm.weight": (d,),
                  "ffn.gate_proj.weight": (inter, d), "ffn.up_proj.weight": (inter, d),
                  "ffn.down_proj.weight": (d, inter), "attn_res_query": (d,), "attn_res_norm.weight": (d,),
                  "mlp_res_query": (d,), "mlp_res_norm.weight": (d,)}
        sd.update({f"layers.{i}.{k}": torch.randn(s, generator=g) for k, s in shapes.items()})
    save_pt_zst(sd, tmp_path / "pub.pt.zst")
    model = load_model(tmp_path / "pub.pt.zst", cfg)
    for k, t in model.state_dict().items():
        assert torch.equal(t, sd[k]), k
    assert model.embed_tokens.weight.data_ptr() == model.head_weight.data_ptr()  # still tied
    ids = torch.randint(0, v, (1, 10))
    assert torch.isfinite(model(ids)).all()
    # the RoPE tables were rebuilt after materialization
    torch.testing.assert_close(model.rope.cos[3, 0], torch.tensor(3.0).cos())
    # a training checkpoint with the weights under "model" loads the same way
    save_pt_zst({"model": sd, "step": 5}, tmp_path / "train.pt.zst")
    assert torch.equal(load_model(tmp_path / "train.pt.zst", cfg).norm.weight, sd["norm.weight"])


def test_vocab_mismatch_names_key_and_shapes(tmp_path):
    torch.manual_seed(2)
    save_pt_zst(KotodamaLM(tiny_cfg(vocab_size=49152, num_layers=1, attn_res_boundaries=[0])).state_dict(),
                tmp_path / "big.pt.zst")
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "big.pt.zst", tiny_cfg(vocab_size=10002, num_layers=1, attn_res_boundaries=[0]))
    assert "embed_tokens.weight: checkpoint (49152, 32) vs model (10002, 32)" in str(err.value)


def test_missing_and_unexpected_keys_are_named(tmp_path):
    torch.manual_seed(3)
    sd = KotodamaLM(tiny_cfg()).state_dict()
    sd.pop("layers.1.mlp_res_query")
    sd["layers.0.attn.bias"] = torch.zeros(3)
    save_pt_zst(sd, tmp_path / "odd.pt.zst")
    with pytest.raises(CheckpointError, match=r"missing keys: layers\.1\.mlp_res_query.*unexpected keys: "
                                              r"layers\.0\.attn\.bias"):
        load_model(tmp_path / "odd.pt.zst", tiny_cfg())
    # a model without AttnRes refuses an AttnRes checkpoint, naming the extra tensors
    save_pt_zst(KotodamaLM(tiny_cfg()).state_dict(), tmp_path / "ar.pt.zst")
    with pytest.raises(CheckpointError, match="unexpected keys: .*final_res_query"):
        load_model(tmp_path / "ar.pt.zst", tiny_cfg(attn_res=False))
    ddp = {"module." + k: v for k, v in KotodamaLM(tiny_cfg()).state_dict().items()}
    save_pt_zst(ddp, tmp_path / "ddp.pt.zst")
    with pytest.raises(CheckpointError, match="DDP 'module.'"):
        load_model(tmp_path / "ddp.pt.zst", tiny_cfg())


@pytest.fixture()
def good_file(tmp_path):
    torch.manual_seed(4)
    return save_pt_zst(KotodamaLM(tiny_cfg()).state_dict(), tmp_path / "good.pt.zst")


def test_truncated_file(good_file, tmp_path):
    raw = good_file.read_bytes()
    cut = tmp_path / "cut.pt.zst"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_pt_zst(cut)
    cut.write_bytes(raw[:-3])  # only the checksum trailer missing
    with pytest.raises(CheckpointError, match="truncated"):
        load_pt_zst(cut)


def test_corrupt_file(good_file, tmp_path):
    raw = bytearray(good_file.read_bytes())
    for i in range(len(raw) // 2, len(raw) // 2 + 16):
        raw[i] ^= 0xFF
    bad = tmp_path / "bad.pt.zst"
    bad.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="corrupt zstd stream"):
        load_pt_zst(bad)


def test_other_bad_inputs(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_pt_zst(tmp_path / "nope.pt.zst")
    empty = tmp_path / "empty.pt.zst"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_pt_zst(empty)
    plain = tmp_path / "plain.pt.zst"
    buf = io.BytesIO()
    torch.save({"a": torch.ones(2)}, buf)
    plain.write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError, match="not a zstd stream"):
        load_pt_zst(plain)
    junk = tmp_path / "junk.pt.zst"
    junk.write_bytes(zstandard.ZstdCompressor().compress(b"hello, not a pickle" * 10))
    with pytest.raises(CheckpointError, match="not a loadable torch checkpoint"):
        load_pt_zst(junk)


def test_failed_save_keeps_previous_file(good_file):
    before = good_file.read_bytes()
    with pytest.raises(Exception):
        save_pt_zst({"f": lambda x: x}, good_file)  # torch.save cannot pickle a lambda
    assert good_file.read_bytes() == before
    assert [p.name for p in good_file.parent.iterdir() if p.name.startswith(".")] == []
