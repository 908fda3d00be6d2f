"""Run zero-shot tasks through lm-eval with the `kotodama` model; `main` is lm-eval's own CLI with the
model registered (`kotodama lm-eval --model kotodama --model_args checkpoint=PATH --tasks piqa`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from kotodama_core.eval.results import card_rows


def run_tasks(lm, names: list[str], data_dir: Path | None, limit: int | None, seed: int = 1234
              ) -> dict[str, Any]:
    """Evaluate each task on its own so that one missing file or hub outage costs one row, not the run.

    Returns {"results": {task: metrics}, "rows": card rows, "errors": {task: message}, "sources": {task:
    local file or "hub"}}.
    """
    import lm_eval

    from kotodama_core.eval.tasks import build_tasks, TaskDataError

    results: dict[str, Any] = {}
    errors: dict[str, str] = {}
    sources: dict[str, str] = {}
    for name in names:
        try:
            task = build_tasks([name], data_dir)[name]
            sources[name] = task.config.metadata.get("local_file", "local") if not isinstance(task, str) else "hub"
            out = lm_eval.simple_evaluate(model=lm, tasks=[task], limit=limit, num_fewshot=0,
                                          bootstrap_iters=0, log_samples=False, random_seed=seed,
                                          numpy_random_seed=seed, torch_random_seed=seed,
                                          fewshot_random_seed=seed)
            results[name] = out["results"][name]
        except (TaskDataError, OSError, ValueError, KeyError, ConnectionError) as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # the hub client raises many types when offline; keep the other tasks
            errors[name] = f"{type(exc).__name__}: {exc}"
    return {"results": results, "rows": card_rows(results), "errors": errors, "sources": sources}


def main(argv: list[str] | None = None) -> int:
    import kotodama_core.eval.lm_eval_adapter  # noqa: F401  (registers the `kotodama` model)
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
