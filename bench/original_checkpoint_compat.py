"""Against the original code itself (a checkout of LuxiaSL/kotodama, path as argv[1]): its CheckpointManager
saves after 3 bf16 steps; this project reads and converts it (logits compared in float64), converts it back
to the original's form, and the original's AsyncCheckpointManager.load_latest loads that (weights, Muon and
AdamW states compared bit for bit).

    git --git-dir=<mirror> archive HEAD src | tar x -C /tmp/orig_repo
    python bench/original_checkpoint_compat.py /tmp/orig_repo
"""
import io
from pathlib import Path
import sys
import tempfile

ORIGINAL_SRC = sys.argv[1] if len(sys.argv) > 1 else "/tmp/orig_repo"  # a checkout of LuxiaSL/kotodama
sys.path.insert(0, ORIGINAL_SRC)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch
from src.model.llama import LuxiaBaseModel, LuxiaModelConfig
from src.training.muon import build_hybrid_optimizer, HybridScheduler
from src.training import checkpoint as oc
from kotodama_core.checkpoint_formats import convert, read_checkpoint
from kotodama_core.model.config import KotodamaConfig
from kotodama_core.model.model import KotodamaLM

shape = dict(hidden_size=32, num_layers=3, num_attention_heads=2, num_kv_heads=1, head_dim=16,
             intermediate_size=64, vocab_size=128, max_position_embeddings=64, rope_theta=10000.0)
ocfg = LuxiaModelConfig(**shape, attn_res=True, attn_res_boundaries=[0, 2], attn_impl="sdpa")
d = Path(tempfile.mkdtemp())
# 1. the original trains 3 steps and saves with its own CheckpointManager (sync .pt)
torch.manual_seed(0)
model = LuxiaBaseModel(ocfg).to(dtype=torch.bfloat16)
muon, adamw = build_hybrid_optimizer(model, muon_lr=0.02)
import inspect
sched_sig = inspect.signature(HybridScheduler)
sched = HybridScheduler(muon, adamw, warmup_steps=2, total_steps=10)
for step in range(3):
    ids = torch.randint(0, 128, (2, 16))
    out = model(ids, labels=ids) if "labels" in inspect.signature(model.forward).parameters else model(ids)
    loss = out["loss"] if isinstance(out, dict) else (out[0] if isinstance(out, tuple) else out.loss)
    loss.backward(); muon.step(); adamw.step(); muon.zero_grad(); adamw.zero_grad()
mgr = oc.CheckpointManager(d / "orig_ckpts")
mgr.save(2, model, muon, adamw, sched, tokens_consumed=96, data_state={"pos": 3})
ck = read_checkpoint(d / "orig_ckpts")
print("read original save:", ck.format, ck.step, ck.updates, ck.tokens)
convert(d / "orig_ckpts", d / "proj", boundaries=[0, 2])
# the project model on those weights gives the original's logits
pm = KotodamaLM(KotodamaConfig(**shape, attn_res_boundaries=[0, 2]))
pm.load_state_dict({k: v.float() for k, v in read_checkpoint(d / "proj").model.items()})
ids = torch.randint(0, 128, (1, 16))
ref = LuxiaBaseModel(ocfg).double(); ref.load_state_dict({k: v.double() for k, v in ck.model.items()})
with torch.no_grad():
    a = pm.double()(ids); a = a[0] if isinstance(a, tuple) else a
    b = ref(ids); b = b["logits"] if isinstance(b, dict) else (b[0] if isinstance(b, tuple) else b.logits)
print("max |logit diff| float64:", float((a - b).abs().max()))
# 2. back to the original's form; the original's own AsyncCheckpointManager.load_latest reads it
convert(d / "proj", d / "back", to="original")
print("files:", sorted(p.name for p in (d / "back").iterdir()))
model2 = LuxiaBaseModel(ocfg).to(dtype=torch.bfloat16)
muon2, adamw2 = build_hybrid_optimizer(model2, muon_lr=0.02)
amgr = oc.AsyncCheckpointManager(d / "back", shm_dir=str(d / "shm"))
state = amgr.load_latest(model2, muon2, adamw2, torch.device("cpu"))
amgr.shutdown() if hasattr(amgr, "shutdown") else None
print("original load_latest: step", state["step"], "tokens", state["tokens_consumed"])
same = all(torch.equal(model.state_dict()[k], model2.state_dict()[k]) for k in model.state_dict())
mo = [muon.state[p]["momentum_buffer"] for p in muon.param_groups[0]["params"]]
m2 = [muon2.state[p]["momentum_buffer"] for p in muon2.param_groups[0]["params"]]
ea = [adamw.state[p]["exp_avg_sq"] for p in adamw.param_groups[0]["params"]]
e2 = [adamw2.state[p]["exp_avg_sq"] for p in adamw2.param_groups[0]["params"]]
print("weights equal:", same, "muon states equal:", all(torch.equal(x, y) for x, y in zip(mo, m2)),
      "adamw states equal:", all(torch.equal(x, y) for x, y in zip(ea, e2)))
