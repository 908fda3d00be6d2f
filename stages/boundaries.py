"""Stage boundaries: profile an NCA checkpoint per layer and pick AttnRes block boundaries.

Inputs: `checkpoint` = a training artifact (its manifest's `model_file`, model config from its
manifest config), `data` = an NCA data artifact whose first windows of `nca.boundaries.probe_split`
form the probe batch. Outputs: boundaries.json ({"boundaries", "gap_scores", "profile", ...}) and
profile.png. A later run takes `boundaries` as model.attn_res_boundaries.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from kotodama_core.artifacts import ArtifactError, begin, commit, write_manifest
from kotodama_core.config import ConfigError, RunConfig
from kotodama_core.data.shards import read_shard
from kotodama_core.model import load_model
from kotodama_core.model.config import KotodamaConfig
from kotodama_core.nca.boundaries import PROFILE_METRICS, gap_scores, layer_profile, select_boundaries
from stages.common import input_manifests, main
from stages.registry import identity

STAGE = "boundaries"


def probe_batch(data_root: Path, splits: dict, split: str, batch: int, seq_len: int) -> torch.Tensor:
    rows, have = [], 0
    for record in splits.get(split, []):
        windows = read_shard(data_root / record["path"])
        rows.append(np.asarray(windows[: batch - have, :seq_len], dtype=np.int64))
        have += len(rows[-1])
        if have >= batch:
            break
    if have < batch:
        raise ConfigError(f"probe needs {batch} windows from split {split!r}; the data artifact holds {have}")
    return torch.from_numpy(np.concatenate(rows))


def plot_profile(path: Path, profile: dict, scores: np.ndarray, boundaries: list[int]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(PROFILE_METRICS) + ["gap score"]
    fig, axes = plt.subplots(len(names), 1, figsize=(8, 1.6 * len(names)), sharex=True)
    layers = np.arange(len(profile[PROFILE_METRICS[0]]))
    for ax, name in zip(axes, names):
        if name == "gap score":
            ax.bar(layers[1:] - 0.5, scores, width=0.8, color="grey")
        else:
            ax.plot(layers, profile[name], marker="o", ms=3)
        for b in boundaries:
            ax.axvline(b - 0.5, color="red", lw=0.8, ls="--")
        ax.set_ylabel(name, fontsize=7)
    axes[-1].set_xlabel("layer (red: block starts)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(cfg: RunConfig, inputs: dict[str, Path], out: Path) -> Path:
    missing = {"checkpoint", "data"} - inputs.keys()
    if missing:
        raise ConfigError(f"boundaries needs --input checkpoint=<train artifact> and data=<nca_data artifact>; "
                          f"missing {sorted(missing)}")
    manifests = input_manifests(inputs, ("checkpoint", "data"))
    ckpt, data = manifests["checkpoint"], manifests["data"]
    model_cfg = ckpt.data.get("config", {}).get("model")
    if model_cfg is None:
        raise ArtifactError(f"{ckpt.path}: manifest config holds no model section")
    model_path = ckpt.output(ckpt.data.get("model_file", "model.pt.zst"))
    if not model_path.is_file():
        raise ArtifactError(f"{model_path}: the checkpoint artifact holds no final weights")
    b = cfg.nca.boundaries
    model = load_model(model_path, KotodamaConfig(**model_cfg))
    model.eval()
    ids = probe_batch(data.root, data.data.get("splits", {}), b.probe_split, b.probe_batch, b.probe_seq_len)
    if int(ids.max()) >= model.cfg.vocab_size:
        raise ConfigError(f"probe tokens reach {int(ids.max())} but the model vocabulary is {model.cfg.vocab_size}")
    profile = layer_profile(model, ids, dead_threshold=b.dead_threshold)
    scores = gap_scores({k: profile[k] for k in PROFILE_METRICS})
    boundaries = select_boundaries(scores, b.max_boundaries, b.min_block)
    work = begin(out)
    (work / "boundaries.json").write_text(json.dumps({
        "boundaries": boundaries, "gap_scores": scores.tolist(), "profile": profile,
        "layer0_head_entropy": profile["attn_entropy_heads"][0], "probe_tokens": int(ids.numel())}, indent=1))
    plot_profile(work / "profile.png", profile, scores, boundaries)
    write_manifest(work, stage=STAGE, **identity(STAGE, cfg), inputs=manifests,
                   metrics={"num_boundaries": len(boundaries),
                            "layer0_head_entropy_std": float(np.std(profile["attn_entropy_heads"][0]))},
                   extra={"boundaries": boundaries})
    return commit(out)


if __name__ == "__main__":
    raise SystemExit(main(STAGE, run))
