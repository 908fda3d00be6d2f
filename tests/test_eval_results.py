"""Eval results carry, per task, n and the standard error of each metric (binomial for accuracies)."""

from __future__ import annotations

import math

from kotodama_core.eval.results import binomial_stderr, card_rows, with_n_and_stderr


def test_binomial_stderr_is_the_sample_stddev_over_sqrt_n():
    outcomes = [1, 0, 1, 1, 0, 1, 1, 0]
    n, p = len(outcomes), sum(outcomes) / len(outcomes)
    sample_sd = math.sqrt(sum((x - p) ** 2 for x in outcomes) / (n - 1))
    assert math.isclose(binomial_stderr(p, n), sample_sd / math.sqrt(n))
    assert math.isclose(binomial_stderr(0.5, 101), 0.05)
    assert binomial_stderr(0.5, 1) is None and binomial_stderr(1.5, 10) is None and binomial_stderr(None, 10) is None


def test_task_result_gains_n_and_stderr_and_keeps_lm_eval_keys():
    lm_eval_result = {"alias": "copa", "acc,none": 0.6, "acc_stderr,none": "N/A",
                      "acc_norm,none": 0.7, "acc_norm_stderr,none": 0.0123,
                      "perplexity,none": 12.5, "perplexity_stderr,none": "N/A"}
    out = with_n_and_stderr(lm_eval_result, 101)
    assert {k: out[k] for k in lm_eval_result} == lm_eval_result
    assert out["n"] == 101
    assert math.isclose(out["acc_stderr"], math.sqrt(0.6 * 0.4 / 100))   # binomial, lm-eval gave none
    assert out["acc_norm_stderr"] == 0.0123                               # lm-eval's own value kept
    assert "perplexity_stderr" not in out                                  # no binomial error for a perplexity


def test_card_rows_carry_task_n_and_stderr():
    results = {"copa": with_n_and_stderr({"acc,none": 0.6, "acc_stderr,none": "N/A"}, 101),
               "lambada_openai": with_n_and_stderr({"perplexity,none": 30.0, "acc,none": 0.2}, 26)}
    rows = {(r["task"], r["metric"]): r for r in card_rows(results)}
    assert rows[("copa", "acc")]["n"] == 101 and math.isclose(rows[("copa", "acc")]["stderr"], 0.04898979485566356)
    assert rows[("lambada_openai", "ppl")]["stderr"] is None and rows[("lambada_openai", "ppl")]["n"] == 26
    assert math.isclose(rows[("lambada_openai", "acc")]["stderr"], math.sqrt(0.2 * 0.8 / 25))
