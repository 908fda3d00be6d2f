"""Zero-shot lm-eval tasks, read from local llm-foundry-format files when present, else from the hub.

Every local task reproduces the prompt, choices, target and metrics of lm-eval's own task of the same
name (lm_eval/tasks/<name>), so the numbers are comparable with a hub run. Where lm-eval ships the
preprocessing as Python (HellaSwag, WikiText) that code is called, not copied. Imported lazily: this
module imports lm_eval.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

from kotodama_core.errors import UserError

MC_METRICS = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
              {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]
ACC_ONLY = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]


class TaskDataError(UserError, FileNotFoundError):
    """A task's local file is missing or malformed."""


def read_jsonl(path: Path, required: tuple[str, ...]) -> list[dict[str, Any]]:
    if not path.is_file():
        raise TaskDataError(f"task file not found: {path}")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TaskDataError(f"{path}:{n}: not valid JSON ({exc})") from None
        missing = [k for k in required if k not in row]
        if missing:
            raise TaskDataError(f"{path}:{n}: missing field(s) {missing}")
        rows.append(row)
    if not rows:
        raise TaskDataError(f"{path}: no documents")
    return rows


def boolq_fields(row: dict[str, Any]) -> dict[str, Any]:
    """llm-foundry 'Passage: P\\nQuestion: Q?' -> lm-eval's {passage, question, label}."""
    m = re.fullmatch(r"Passage: (.*)\nQuestion: (.*?)\??\s*", row["query"], flags=re.S)
    if m is None:
        raise TaskDataError(f"boolq: query does not look like 'Passage: …\\nQuestion: …': {row['query'][:80]!r}")
    return {"passage": m.group(1), "question": m.group(2), "label": int(row["gold"])}


def wikitext_pages(raw: str) -> list[dict[str, str]]:
    """Split WikiText raw text into articles at top-level headings ' = Title = ', as the document-level
    dataset EleutherAI/wikitext_document_level does."""
    pages, current = [], []
    for line in raw.splitlines(keepends=True):
        if re.match(r"^ = [^=].* = \n?$", line) and current:
            pages.append("".join(current))
            current = []
        current.append(line)
    if current:
        pages.append("".join(current))
    return [{"page": p} for p in pages if p.strip()]


def _dataset(rows: list[dict[str, Any]], **_: Any):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def _jsonl(*required: str) -> Callable[[Path], list[dict[str, Any]]]:
    return lambda path: read_jsonl(path, required)


def _boolq_rows(path: Path) -> list[dict[str, Any]]:
    return [boolq_fields(r) for r in read_jsonl(path, ("query", "choices", "gold"))]


def _wikitext_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise TaskDataError(f"task file not found: {path}")
    return wikitext_pages(path.read_text(encoding="utf-8"))


def _choices_from_query(suffix: str, metrics: list[dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    return lambda: dict(output_type="multiple_choice", doc_to_text="{{query}}" + suffix,
                        doc_to_choice="{{choices}}", doc_to_target="{{gold}}", metric_list=metrics)


def _copa_prompt() -> dict[str, Any]:
    # lm-eval: premise minus '.' + connector; choices " " + lower-first
    return dict(output_type="multiple_choice", doc_to_text="{{query}}",
                doc_to_choice=lambda d: [" " + c[0].lower() + c[1:] for c in d["choices"]],
                doc_to_target="{{gold}}", metric_list=ACC_ONLY)


def _boolq_prompt() -> dict[str, Any]:
    return dict(output_type="multiple_choice", doc_to_text="{{passage}}\nQuestion: {{question}}?\nAnswer:",
                doc_to_choice=["no", "yes"], doc_to_target="label", metric_list=ACC_ONLY)


def _hellaswag_prompt() -> dict[str, Any]:
    from lm_eval.tasks.hellaswag.utils import process_docs

    return dict(output_type="multiple_choice", process_docs=process_docs, doc_to_text="{{query}}",
                doc_to_choice="choices", doc_to_target="{{label}}", metric_list=MC_METRICS)


def _lambada_prompt() -> dict[str, Any]:
    return dict(output_type="loglikelihood", doc_to_text="{{context}}", doc_to_target="{{' ' + continuation}}",
                metric_list=[{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                             {"metric": "acc", "aggregation": "mean", "higher_is_better": True}])


def _winogrande_prompt() -> dict[str, Any]:
    # partial evaluation: the contexts are the choices, the gold index as text
    return dict(output_type="multiple_choice", doc_to_text=lambda d: int(d["gold"]),
                doc_to_choice="{{context_options}}", doc_to_target="{{continuation}}", metric_list=ACC_ONLY)


def _wikitext_prompt() -> dict[str, Any]:
    from lm_eval.tasks.wikitext.preprocess_wikitext import process_results, wikitext_detokenizer

    return dict(output_type="loglikelihood_rolling", doc_to_text="", doc_to_target=wikitext_detokenizer,
                process_results=process_results,
                metric_list=[{"metric": "word_perplexity"}, {"metric": "byte_perplexity"},
                             {"metric": "bits_per_byte"}])


@dataclass(frozen=True)
class LocalTask:
    """One evaluation task read from a local file: its name (lm-eval's task of the same name), the file
    under the eval data folder, how to read its rows, and the lm-eval prompt and metrics (the scorer)."""

    name: str
    file: str
    rows: Callable[[Path], list[dict[str, Any]]]
    prompt: Callable[[], dict[str, Any]]


# Adding a task is one entry here.
TASKS: dict[str, LocalTask] = {t.name: t for t in (
    LocalTask("arc_easy", "arc_easy.jsonl", _jsonl("query", "choices", "gold"),  # query holds "Question: …"
              _choices_from_query("\nAnswer:", MC_METRICS)),
    LocalTask("piqa", "piqa.jsonl", _jsonl("query", "choices", "gold"),          # query is "Question: {goal}\n"
              _choices_from_query("Answer:", MC_METRICS)),
    LocalTask("copa", "copa.jsonl", _jsonl("query", "choices", "gold"), _copa_prompt),
    LocalTask("boolq", "boolq.jsonl", _boolq_rows, _boolq_prompt),
    LocalTask("hellaswag", "hellaswag_val_subset1000.jsonl",
              _jsonl("activity_label", "ctx_a", "ctx_b", "endings", "label"), _hellaswag_prompt),
    LocalTask("lambada_openai", "lambada_openai.jsonl", _jsonl("context", "continuation"), _lambada_prompt),
    LocalTask("winogrande", "winogrande.jsonl", _jsonl("context_options", "continuation", "gold"),
              _winogrande_prompt),
    LocalTask("wikitext", "wikitext-2-raw/wiki.test.raw", _wikitext_rows, _wikitext_prompt),
)}
# lm-eval tasks without a local file here: always read from the Hugging Face hub.
HUB_TASKS = ("sciq",)
KNOWN_TASKS = tuple(sorted((*TASKS, *HUB_TASKS)))


def local_task_config(name: str, path: Path) -> dict[str, Any]:
    """An lm-eval task config (dict) reading `path` instead of the hub."""
    task = TASKS[name]
    loader: Callable[..., Any] = partial(_dataset, task.rows(path))
    return {"task": name, "custom_dataset": loader, "test_split": "test", "num_fewshot": 0,
            "metadata": {"version": 1.0, "local_file": str(path)}, **task.prompt()}


def local_task_path(name: str, data_dir: Path | None) -> Path | None:
    """The local file of task `name` under `data_dir`, when the task has one and it exists."""
    task = TASKS.get(name)
    if task is None or data_dir is None:
        return None
    path = data_dir / task.file
    return path if path.exists() else None


def build_tasks(names: list[str], data_dir: Path | None) -> dict[str, Any]:
    """name -> lm-eval Task (local file) or the task's name (lm-eval loads it from the hub)."""
    from lm_eval.api.task import ConfigurableTask

    out: dict[str, Any] = {}
    for name in names:
        path = local_task_path(name, data_dir)
        if path is not None:
            out[name] = ConfigurableTask(config=local_task_config(name, path))
        else:
            out[name] = name
    return out
