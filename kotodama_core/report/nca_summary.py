"""The NCA pre-pretraining behind a run: rule search, trajectories, NCA training and AttnRes boundaries.

The report stage gets the NCA training artifact (`nca_train`) and the boundaries artifact; the rule search
and trajectory artifacts are found through their manifests' recorded inputs (nca_train's `data` input is
the nca_data artifact, whose `rules` input is the nca_search artifact).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from kotodama_core.eval.results import finite

SEARCH_KEYS = ("tries", "passed", "kept", "pass_rate", "score_median")
DATA_KEYS = ("train_rules", "train_trajectories", "train_tokens", "val_rules", "val_trajectories", "val_tokens")
TRAIN_KEYS = ("final_loss", "val_loss", "steps", "tokens_seen")


def _manifest(path: Path | None, what: str, notes: list[str]) -> dict[str, Any] | None:
    if path is None:
        return None
    file = path if path.name == "manifest.json" else path / "manifest.json"
    if not file.is_file():
        notes.append(f"NCA summary: the {what} artifact's manifest {file} is missing")
        return None
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError:
        notes.append(f"NCA summary: {file} is not valid JSON")
        return None


def _input_path(manifest: dict[str, Any] | None, name: str) -> Path | None:
    rec = ((manifest or {}).get("inputs") or {}).get(name) or {}
    return Path(rec["path"]) if rec.get("path") else None


def _pick(metrics: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: metrics[k] for k in keys if k in metrics}


def nca_summary(nca_train_dir: Path | None, boundaries_dir: Path | None, run_config: dict[str, Any] | None,
                notes: list[str]) -> dict[str, Any] | None:
    """Search (tries, passed, kept, pass rate, score band), data (rules, trajectories, tokens), NCA training
    (loss, steps, tokens), boundaries (found vs the run's model.attn_res_boundaries, the path of the layer
    profile plot).
    None when the report has neither NCA input."""
    if nca_train_dir is None and boundaries_dir is None:
        return None
    bounds = _manifest(boundaries_dir, "boundaries", notes)
    train_path = nca_train_dir or _input_path(bounds, "checkpoint")
    train = _manifest(train_path, "NCA training", notes)
    data = _manifest(_input_path(train, "data") or _input_path(bounds, "data"), "NCA data", notes)
    search = _manifest(_input_path(data, "rules"), "NCA rule search", notes)
    out: dict[str, Any] = {
        "search": _pick((search or {}).get("metrics", {}), SEARCH_KEYS),
        "band": (search or {}).get("band"),
        "data": _pick((data or {}).get("metrics", {}), DATA_KEYS),
        "train": _pick((train or {}).get("metrics", {}), TRAIN_KEYS),
        "train_digest": (train or {}).get("digest"),
        "boundaries": (bounds or {}).get("boundaries"),
        "run_boundaries": ((run_config or {}).get("model") or {}).get("attn_res_boundaries"),
        "gap_scores": None, "profile_png": None,
    }
    if boundaries_dir is not None:
        detail = boundaries_dir / "boundaries.json"
        if detail.is_file():
            scores = json.loads(detail.read_text()).get("gap_scores")
            out["gap_scores"] = [finite(s) for s in scores] if isinstance(scores, list) else None
        png = boundaries_dir / "profile.png"
        if png.is_file():
            out["profile_png"] = str(png)
    return out


def png_data_uri(path: str | None) -> str | None:
    """The PNG at `path` as a data URI (the page stays self-contained), or None when it is gone."""
    if not path or not Path(path).is_file():
        return None
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()
