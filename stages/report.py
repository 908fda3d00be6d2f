"""Report stage: a self-contained HTML page for one run, or a comparison page for several.

One run:      --input train=<training artifact> [--input eval=<eval artifact>] [--input export=<export
              artifact>] [--input nca_train=<NCA training artifact>] [--input boundaries=<boundaries
              artifact>]  -> report.html: headline curves, eval with n and stderr, config and overrides,
              NCA summary, MLflow / Prefect links (from the environment the stage runs in), geometry
Comparison:   --input fc=<report artifact> --input bcpt=<report artifact> ...   -> compare.html
              (every input is a report artifact; the input names label the columns: the ablation
              deployment names them by arm)
Both write summary.json (the numbers behind the page). Missing or bad data shows as a note on the page.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from kotodama_core.artifacts import ArtifactError, begin, commit, write_manifest
from kotodama_core.config import RunConfig
from kotodama_core.report.html import compare_page, run_page
from kotodama_core.report.links import tracking_links
from kotodama_core.report.summary import restore_layer_keys, summarize_run
from stages.common import input_manifests, main
from stages.registry import identity

SINGLE_INPUTS = ("train", "eval", "export", "nca_train", "boundaries")


def run(cfg: RunConfig, inputs: dict[str, Path], out: Path) -> Path:
    if not inputs:
        raise ArtifactError("report stage needs --input train=… (one run) or several report artifacts")
    manifests = input_manifests(inputs)
    rc = cfg.report
    if "train" in manifests or "eval" in manifests:
        extra = set(manifests) - set(SINGLE_INPUTS)
        if extra:
            raise ArtifactError(f"report: unexpected input(s) {sorted(extra)} beside train/eval")
        root = {name: m.root for name, m in manifests.items()}
        summary = summarize_run(root.get("train"), root.get("eval"), export_dir=root.get("export"),
                                nca_train_dir=root.get("nca_train"), boundaries_dir=root.get("boundaries"),
                                report_config=cfg.model_dump(mode="json"),
                                links=tracking_links(os.environ, root.get("train")))
        body, page_name, summaries = run_page(summary, rc.title, rc.smoothing), "report.html", [summary]
    else:
        summaries = []
        for name, m in manifests.items():
            path = m.root / "summary.json"
            if m.stage != "report" or not path.is_file():
                raise ArtifactError(f"report: input {name!r} is not a report artifact ({m.root})")
            s = restore_layer_keys(json.loads(path.read_text())[0])
            s["name"] = name
            summaries.append(s)
        if len(summaries) < 2:
            raise ArtifactError("a comparison page needs at least two report artifacts")
        body, page_name = compare_page(summaries, rc.title + " — comparison", rc.highlight_rel_diff), "compare.html"
    work = begin(out)
    (work / page_name).write_text(body, encoding="utf-8")
    (work / "summary.json").write_text(json.dumps(summaries, default=_jsonable, indent=1))
    write_manifest(work, stage="report", **identity("report", cfg), inputs=manifests,
                   metrics={"notes": sum(len(s["notes"]) for s in summaries)}, extra={"page": page_name})
    return commit(out)


def _jsonable(x):
    return str(x)


if __name__ == "__main__":
    raise SystemExit(main("report", run))
