"""Run zero-shot tasks through lm-eval with the `kotodama` model; `main` is lm-eval's own CLI with the
model registered (`kotodama lm-eval --model kotodama --model_args checkpoint=PATH --tasks piqa`)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from kotodama_core.eval.results import card_rows, with_n_and_stderr
from kotodama_core.progress import Progress


def run_tasks(lm, names: list[str], data_dir: Path | None, limit: int | None, seed: int = 1234
              ) -> dict[str, Any]:
    """Evaluate each task on its own so that one missing file or hub outage costs one row, not the run.

    Returns {"results": {task: metrics}, "rows": card rows, "errors": {task: message}, "sources": {task:
    local file or "hub"}, "n": {task: documents scored}}; prints a progress line after each task. Each
    task's metrics carry lm-eval's keys plus `n` and `<metric>_stderr` (results.with_n_and_stderr), and
    each card row its `n` and `stderr`.
    """
    import lm_eval

    from kotodama_core.eval.tasks import build_tasks, TaskDataError

    results: dict[str, Any] = {}
    errors: dict[str, str] = {}
    sources: dict[str, str] = {}
    examples: dict[str, int] = {}
    progress = Progress("eval", len(names), every_s=0.0)
    for i, name in enumerate(names, start=1):
        t0 = time.perf_counter()
        try:
            task = build_tasks([name], data_dir)[name]
            sources[name] = task.config.metadata.get("local_file", "local") if not isinstance(task, str) else "hub"
            out = lm_eval.simple_evaluate(model=lm, tasks=[task], limit=limit, num_fewshot=0,
                                          bootstrap_iters=0, log_samples=False, random_seed=seed,
                                          numpy_random_seed=seed, torch_random_seed=seed,
                                          fewshot_random_seed=seed)
            examples[name] = _examples(out.get("n-samples", {}).get(name))
            results[name] = with_n_and_stderr(out["results"][name], examples[name])
        except (TaskDataError, OSError, ValueError, KeyError, ConnectionError) as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # the hub client raises many types when offline; keep the other tasks
            errors[name] = f"{type(exc).__name__}: {exc}"
        n = examples.get(name, 0)
        progress.update(i, task=name, examples=n, **{"examples/s": round(n / max(time.perf_counter() - t0, 1e-9), 1)
                                                     if n else None, "failed": "yes" if name in errors else None})
    return {"results": results, "rows": card_rows(results), "errors": errors, "sources": sources, "n": examples}


def _examples(n_samples: dict[str, Any] | None) -> int:
    """Documents scored for one task: lm-eval's `n-samples` entry ({"original", "effective"})."""
    if isinstance(n_samples, dict) and isinstance(n_samples.get("effective"), int):
        return n_samples["effective"]
    return 0


def local_front(argv: list[str]) -> argparse.Namespace | None:
    """The arguments of a `kotodama lm-eval` call that the local task files can serve (every task has a
    local file under --data_dir, the model is `kotodama`, no lm-eval-only option), else None."""
    from kotodama_core.eval.config import EvalConfig, resolve_repo_path
    from kotodama_core.eval.tasks import local_task_path

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--model", "-m")
    parser.add_argument("--model_args", "-a", default="")
    parser.add_argument("--tasks", "-t")
    parser.add_argument("--limit", "-L", type=float)
    parser.add_argument("--device")
    parser.add_argument("--batch_size", "-b")
    parser.add_argument("--output_path", "-o")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--data_dir", default=EvalConfig().data_dir)
    args, rest = parser.parse_known_args(argv)
    if rest or args.model != "kotodama" or not args.tasks:
        return None
    args.task_names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    data_dir = resolve_repo_path(args.data_dir) if args.data_dir else None
    if not all(local_task_path(t, data_dir) for t in args.task_names):
        return None
    args.data_path = data_dir
    return args


def run_local(args: argparse.Namespace) -> int:
    """lm-eval's simple_evaluate over the local task files, printed as lm-eval prints its table."""
    import lm_eval
    from lm_eval.utils import make_table

    import kotodama_core.eval.lm_eval_adapter  # noqa: F401  (registers the `kotodama` model)
    from kotodama_core.eval.tasks import build_tasks

    tasks = build_tasks(args.task_names, args.data_path)
    model_args = args.model_args + (f",device={args.device}" if args.device else "") \
        + (f",batch_size={args.batch_size}" if args.batch_size else "")
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    out = lm_eval.simple_evaluate(model="kotodama", model_args=model_args.strip(","), tasks=list(tasks.values()),
                                  limit=limit, num_fewshot=0, log_samples=False, random_seed=args.seed,
                                  numpy_random_seed=args.seed, torch_random_seed=args.seed,
                                  fewshot_random_seed=args.seed)
    print(f"kotodama ({args.model_args}), local task files from {args.data_path}, limit: {args.limit}")
    print(make_table(out))
    if args.output_path:
        path = Path(args.output_path)
        path = path / "results.json" if path.suffix != ".json" else path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({k: out[k] for k in ("results", "versions", "n-samples", "config")
                                    if k in out}, indent=2, default=str))
        print(f"results written to {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`kotodama lm-eval …`: the local task files when they serve every task asked (offline), else
    lm-eval's own command line with the `kotodama` model registered (hub tasks, few-shot, other models)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = local_front(argv)
    if args is not None:
        return run_local(args)
    import kotodama_core.eval.lm_eval_adapter  # noqa: F401  (registers the `kotodama` model)
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *argv]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
