"""Eval stage: zero-shot lm-eval tasks, val_bpb and a sample generation for a trained checkpoint.

Inputs: `checkpoint` (training artifact), optional `data` (data artifact with a `val/` split).
Outputs: results.json (lm-eval metrics, card rows, errors, val_bpb), results.md (the card's table).
"""

from __future__ import annotations

import json
from pathlib import Path

from kotodama_core.artifacts import ArtifactError, begin, commit, write_manifest
from kotodama_core.config import RunConfig
from kotodama_core.eval.config import resolve_repo_path
from kotodama_core.eval.results import markdown_table
from stages.common import input_manifests, main
from stages.registry import identity


def run(cfg: RunConfig, inputs: dict[str, Path], out: Path) -> Path:
    from kotodama_core.eval.harness import run_tasks
    from kotodama_core.eval.lm_eval_adapter import KotodamaEvalLM
    from kotodama_core.eval.tokenizer import load_eval_tokenizer
    from kotodama_core.eval.val_bpb import val_bpb_for

    if "checkpoint" not in inputs:
        raise ArtifactError("eval stage needs --input checkpoint=<training artifact>")
    manifests = input_manifests(inputs, ("checkpoint", "data"))
    ec = cfg.eval
    lm = KotodamaEvalLM(checkpoint=str(manifests["checkpoint"].root), tokenizer=ec.tokenizer,
                        batch_size=ec.batch_size, max_length=ec.max_length, stride=ec.stride, device=ec.device,
                        dtype=ec.dtype, temperature=ec.temperature, max_gen_tokens=ec.max_gen_tokens, seed=ec.seed)
    if lm.model.cfg != cfg.model:
        raise ArtifactError("the checkpoint's model config differs from this run config's `model` section")
    bpb_tokenizer = None
    if "data" in manifests and ec.val_bpb.enabled and ec.val_bpb.tokenizer:  # refused before the tasks run
        bpb_tokenizer = load_eval_tokenizer(ec.val_bpb.tokenizer, key="eval.val_bpb.tokenizer")
    work = begin(out)
    report = run_tasks(lm, ec.tasks, resolve_repo_path(ec.data_dir), ec.limit, seed=ec.seed)
    metrics = {f"{r['benchmark']}/{r['metric']}": r["value"] for r in report["rows"]}
    if "data" in manifests and ec.val_bpb.enabled:
        vb = val_bpb_for(lm.model, manifests["data"].root, ec.val_bpb, stride=ec.stride, context=lm.max_length,
                         device=lm._device, tokenizer=bpb_tokenizer)
        report["val_bpb"] = vb
        metrics.update(vb)
    (work / "results.json").write_text(json.dumps(report, indent=2, default=str))
    table = markdown_table(report["rows"], report["errors"])
    if "val_bpb" in report:
        table += f"\nval_bpb (held-out training mix): {report['val_bpb']['val_bpb']:.4f}\n"
    (work / "results.md").write_text(table)
    write_manifest(work, stage="eval", **identity("eval", cfg),
                   inputs=manifests, metrics=metrics, extra={"task_errors": report["errors"]})
    return commit(out)


if __name__ == "__main__":
    raise SystemExit(main("eval", run))
