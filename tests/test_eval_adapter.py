"""The lm-eval adapter on a tiny model: hand-computed log-likelihoods and perplexities equal the adapter's."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")
from tests.eval_fixtures import EVAL_DATA, TOKENIZER, make_train_artifact, tiny_model  # noqa: E402

from kotodama_core.eval.lm_eval_adapter import KotodamaEvalLM  # noqa: E402
from kotodama_core.eval.scoring import strided_windows  # noqa: E402
from kotodama_core.model import CheckpointError, save_pt_zst  # noqa: E402

pytestmark = pytest.mark.skipif(not TOKENIZER.is_file(), reason="shared tokenizer absent")


class Req:
    def __init__(self, *args):
        self.args = args


@pytest.fixture(scope="module")
def lm():
    return KotodamaEvalLM(model=tiny_model(), tokenizer=str(TOKENIZER), batch_size=3, max_length=64,
                          stride=8, device="cpu")


@torch.no_grad()
def manual_logprob(model, ids: list[int], n_cont: int) -> float:
    logits = model(torch.tensor([ids[:-1]]))[0]
    logp = F.log_softmax(logits.double(), -1)
    return sum(float(logp[t, ids[t + 1]]) for t in range(len(ids) - 1 - n_cont, len(ids) - 1))


def test_loglikelihood_matches_hand_computation(lm):
    reqs = [Req("The cat sat on the", " mat"), Req("Question: 2+2?\nAnswer:", " four apples"),
            Req("", "hello world")]
    got = lm.loglikelihood(reqs, disable_tqdm=True)
    for req, (value, greedy) in zip(reqs, got):
        ctx, cont = req.args
        ctx_ids = lm.tok_encode(ctx) if ctx else [lm.eot_token_id]
        cont_ids = lm.tok_encode(ctx + cont)[len(ctx_ids):] if ctx else lm.tok_encode(cont)
        assert value == pytest.approx(manual_logprob(lm.model, ctx_ids + cont_ids, len(cont_ids)), abs=1e-4)
        assert isinstance(greedy, bool)


def test_rolling_perplexity_equals_hand_computed_sliding_window():
    lm = KotodamaEvalLM(model=tiny_model(), tokenizer=str(TOKENIZER), batch_size=4, max_length=16, stride=1,
                        device="cpu")
    text = "Robert Boulter is an English film, television and theatre actor who had a guest role in 2000."
    ids = [lm.eot_token_id] + lm.tok_encode(text)
    assert len(ids) > 20
    manual = 0.0
    with torch.no_grad():
        for t in range(1, len(ids)):              # each target sees at most 16 previous tokens
            ctx = ids[max(0, t - 16):t]
            manual += float(F.log_softmax(lm.model(torch.tensor([ctx]))[0, -1].double(), -1)[ids[t]])
    (got,) = lm.loglikelihood_rolling([Req(text)], disable_tqdm=True)
    assert got == pytest.approx(manual, abs=1e-3)
    ppl_manual = math.exp(-manual / (len(ids) - 1))
    assert math.exp(-got / (len(ids) - 1)) == pytest.approx(ppl_manual, rel=1e-5)


def test_strided_windows_score_every_target_once():
    for n, length, stride in [(100, 16, 4), (17, 16, 16), (5, 16, 64 // 8), (300, 64, 64)]:
        windows = strided_windows(n, length, stride)
        covered = [t for w in windows for t in range(w.end - w.scored, w.end)]
        assert covered == list(range(n - 1))
        assert all(w.end - w.start <= length for w in windows)
    with pytest.raises(ValueError, match="stride"):
        strided_windows(10, 4, 8)


def test_generate_until_stops_and_is_seeded(lm):
    req = Req("Once upon a time", {"until": ["\n"], "max_gen_toks": 8, "temperature": 1.0})
    a = lm.generate_until([req], disable_tqdm=True)
    b = lm.generate_until([req], disable_tqdm=True)
    assert a == b and "\n" not in a[0]
    assert len(lm.tok_encode(a[0])) <= 9


def test_simple_evaluate_on_local_tasks_gives_card_rows(lm, capsys):
    from kotodama_core.eval.harness import run_tasks
    from kotodama_core.eval.results import markdown_table
    from kotodama_core.progress import parse_progress_line

    out = run_tasks(lm, ["copa", "lambada_openai", "winogrande"], EVAL_DATA, limit=3)
    assert out["errors"] == {} and out["n"] == {"copa": 3, "lambada_openai": 3, "winogrande": 3}
    lines = [parse_progress_line(x) for x in capsys.readouterr().out.splitlines()]
    progress = [x for x in lines if x and x["stage"] == "eval"]
    assert [(x["done"], x["total"], x["fields"]["task"], x["fields"]["examples"]) for x in progress] == [
        (1, 3, "copa", "3"), (2, 3, "lambada_openai", "3"), (3, 3, "winogrande", "3")]
    assert all(float(x["fields"]["examples/s"]) > 0 for x in progress)
    rows = {(r["benchmark"], r["metric"]): r["value"] for r in out["rows"]}
    assert 0.0 <= rows[("COPA", "acc")] <= 1.0
    assert rows[("LAMBADA", "ppl")] > 1.0
    copa = out["results"]["copa"]
    assert copa["n"] == 3 and math.isclose(copa["acc_stderr"], math.sqrt(copa["acc,none"] * (1 - copa["acc,none"]) / 2))
    assert all(r["n"] == 3 for r in out["rows"])
    assert ("Winogrande", "acc") in rows
    table = markdown_table(out["rows"])
    assert table.startswith("| Benchmark | Metric | value |") and "| COPA | acc |" in table


def test_missing_task_file_is_a_clear_error(tmp_path, lm):
    from kotodama_core.eval.tasks import TaskDataError, local_task_config

    with pytest.raises(TaskDataError, match="task file not found"):
        local_task_config("copa", tmp_path / "copa.jsonl")
    (tmp_path / "copa.jsonl").write_text('{"query": "x", "choices": ["a"]}\n')
    with pytest.raises(TaskDataError, match="missing field"):
        local_task_config("copa", tmp_path / "copa.jsonl")


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    art = make_train_artifact(tmp_path / "train", steps=1)
    lm = KotodamaEvalLM(checkpoint=str(art), tokenizer=str(TOKENIZER), device="cpu", max_length=32)
    assert lm.model.cfg.hidden_size == 64
    bad = tiny_model(**{"model.hidden_size": 32, "model.head_dim": 8}).state_dict()
    save_pt_zst({"model": bad}, tmp_path / "other.pt.zst")
    with pytest.raises(CheckpointError, match="another architecture|does not fit"):
        KotodamaEvalLM(checkpoint=str(tmp_path / "other.pt.zst"), config="configs/presets/tiny.yaml",
                       tokenizer=str(TOKENIZER), device="cpu")
