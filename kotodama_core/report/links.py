"""Where a run is tracked: its MLflow runs and its Prefect flow run, from the environment the stage ran in.

The Prefect flow passes a stage `MLFLOW_TRACKING_URI` and `KOTODAMA_MLFLOW_RUN_ID` (the stage's nested
run; the UI's address in `KOTODAMA_MLFLOW_UI_URL` when it differs from the tracking URI); a Prefect worker
gives its flow-run processes `PREFECT__FLOW_RUN_ID`, and the UI lives at `PREFECT_UI_URL` (else the API
address without its `/api`). A training stage that created its own nested run keeps its id in
`<artifact>/mlflow_run_id`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping


def _http(url: str | None) -> str | None:
    """A browsable base address, or None (file: and database tracking URIs have no UI)."""
    if url and url.startswith(("http://", "https://")):
        return url.rstrip("/")
    return None


def mlflow_run_url(ui: str, run_id: str) -> str:
    """MLflow's UI resolves a run by its id alone (its `/runs/<id>` route redirects to the experiment)."""
    return f"{ui}/#/runs/{run_id}"


def tracking_links(env: Mapping[str, str], train_dir: Path | None = None) -> dict[str, Any]:
    """{"mlflow": [{label, run_id, url|None}], "mlflow_uri": str|None, "prefect": {flow_run_id, url|None}|None}."""
    uri = env.get("MLFLOW_TRACKING_URI") or None
    ui = _http(env.get("KOTODAMA_MLFLOW_UI_URL")) or _http(uri)
    runs = []
    for label, run_id in (("pipeline run", env.get("KOTODAMA_MLFLOW_PARENT_RUN_ID")),
                          ("report stage run", env.get("KOTODAMA_MLFLOW_RUN_ID"))):
        if uri and run_id:
            runs.append({"label": label, "run_id": run_id, "url": mlflow_run_url(ui, run_id) if ui else None})
    saved = train_dir / "mlflow_run_id" if train_dir is not None else None
    if uri and saved is not None and saved.is_file() and saved.read_text().strip():
        run_id = saved.read_text().strip()
        runs.append({"label": "training stage run", "run_id": run_id,
                     "url": mlflow_run_url(ui, run_id) if ui else None})
    prefect = None
    flow_run_id = env.get("PREFECT__FLOW_RUN_ID") or None
    if flow_run_id:
        api = env.get("PREFECT_API_URL", "").rstrip("/")
        base = _http(env.get("PREFECT_UI_URL")) or _http(api.removesuffix("/api") if api.endswith("/api") else None)
        prefect = {"flow_run_id": flow_run_id, "url": f"{base}/runs/flow-run/{flow_run_id}" if base else None}
    return {"mlflow": runs, "mlflow_uri": uri if runs else None, "prefect": prefect}
