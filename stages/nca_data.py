"""Stage nca_data: NCA trajectories of a rule bank as token shards the text loader reads unchanged.

Input `rules`: an nca_search artifact. Output: train/shard_*.arrow and val/shard_*.arrow (windows of
seq_len + 1 tokens, `shards.write_shard`), and a manifest with window, vocab_size, dtype, eos_id and
per-split shard records (`describe_splits`). The last nca.data.val_rules rules of the bank are held out
for val, so validation measures in-context inference of unseen rules. eos_id is the frame END token.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kotodama_core.artifacts import ArtifactError, begin, commit, write_manifest
from kotodama_core.config import ConfigError, RunConfig
from kotodama_core.data.manifest_fields import describe_splits
from kotodama_core.data.shards import token_dtype, write_shard
from kotodama_core.nca.rules import load_rule_bank
from kotodama_core.nca.simulate import STREAM_TRAIN, STREAM_VAL
from kotodama_core.nca.tokenizer import frame_tokens
from kotodama_core.nca.trajectories import WindowCounts, trajectory_windows
from kotodama_core.progress import Progress
from stages.common import input_manifests, main
from stages.nca_search import default_device
from stages.registry import identity

STAGE = "nca_data"


def _write_split(work: Path, split: str, batches, shard_windows: int) -> list[Path]:
    (work / split).mkdir()
    paths, pending, rows = [], [], 0

    def flush() -> None:
        nonlocal pending, rows
        path = work / split / f"shard_{len(paths):05d}.arrow"
        write_shard(path, np.concatenate(pending))
        paths.append(path)
        pending, rows = [], 0

    for windows in batches:
        while len(windows):
            take = windows[: shard_windows - rows]
            pending.append(take)
            rows += len(take)
            windows = windows[len(take):]
            if rows == shard_windows:
                flush()
    if rows:
        flush()
    return paths


def _with_progress(batches, progress: Progress, counts: WindowCounts, window: int):
    """Pass the window batches through, reporting tokens (windows × window) and trajectories."""
    for batch in batches:
        yield batch
        progress.update(counts.windows * window, tokens=counts.windows * window,
                        trajectories=counts.trajectories)


def run(cfg: RunConfig, inputs: dict[str, Path], out: Path) -> Path:
    if "rules" not in inputs:
        raise ConfigError("nca_data needs --input rules=<nca_search artifact>")
    manifests = input_manifests(inputs, ("rules",))
    bank_path = manifests["rules"].output("rule_bank.pt")
    if not bank_path.is_file():
        raise ArtifactError(f"{bank_path}: the rules input holds no rule bank")
    nca = cfg.nca
    header, rules = load_rule_bank(bank_path)
    if (header["states"], header["channels"]) != (nca.states, nca.channels):
        raise ConfigError(f"rule bank has {header['states']} states x {header['channels']} channels, config says "
                          f"nca.states={nca.states}, nca.channels={nca.channels}")
    if nca.data.val_rules >= len(rules):
        raise ConfigError(f"nca.data.val_rules ({nca.data.val_rules}) must be smaller than the bank's "
                          f"{len(rules)} rules, so some remain for train")
    train_rules, val_rules = rules[: -nca.data.val_rules], rules[-nca.data.val_rules:]
    dtype = token_dtype(nca.vocab_size)
    device = default_device()
    work = begin(out)
    counts = {"train": WindowCounts(), "val": WindowCounts()}
    splits = {}
    for split, split_rules, stream, target in (("train", train_rules, STREAM_TRAIN, nca.data.train_tokens),
                                               ("val", val_rules, STREAM_VAL, nca.data.val_tokens)):
        batches = _with_progress(trajectory_windows(split_rules, nca, stream=stream, target_tokens=target,
                                                    dtype=dtype, device=device, counts=counts[split]),
                                 Progress(f"{STAGE}:{split}", target), counts[split], nca.data.seq_len + 1)
        splits[split] = _write_split(work, split, batches, nca.data.shard_windows)
    window = nca.data.seq_len + 1
    _, end = frame_tokens(nca.states, nca.patch)
    extra = describe_splits(work, splits, window=window, vocab_size=nca.vocab_size, eos_id=end)
    metrics = {}
    for split, c in counts.items():
        metrics.update({f"{split}_tokens": c.windows * window, f"{split}_windows": c.windows,
                        f"{split}_trajectories": c.trajectories, f"{split}_rules": len(c.rules_used),
                        f"{split}_dropped_tokens": c.dropped_tokens})
    write_manifest(work, stage=STAGE, **identity(STAGE, cfg), inputs=manifests, metrics=metrics, extra=extra)
    return commit(out)


if __name__ == "__main__":
    raise SystemExit(main(STAGE, run))
