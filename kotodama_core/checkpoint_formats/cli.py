"""`kotodama checkpoint inspect|convert`: read the original's and this project's checkpoints."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from kotodama_core.checkpoint_formats.convert import convert, unmapped_parts
from kotodama_core.checkpoint_formats.formats import read_checkpoint
from kotodama_core.checkpoint_formats.shape import dtypes, infer_shape, matching_preset, num_parameters
from kotodama_core.errors import UserError
from kotodama_core.model.io import CheckpointError


def describe(path: str, step: int | None = None) -> dict[str, Any]:
    """Everything `inspect` reports, as one JSON-able dict."""
    ck = read_checkpoint(path, step)
    shape = infer_shape(ck.model)
    preset = matching_preset(shape)
    sched = ck.state.get("scheduler")
    return {
        "path": str(ck.path),
        "format": ck.format,
        "step": ck.step,
        "updates": ck.updates,
        "tokens": ck.tokens,
        "num_parameters": num_parameters(ck.model),
        "model": shape,
        **{k: shape[k] for k in shape},
        "matching_preset": preset[0] if preset else None,
        "dtypes": dtypes(ck.model),
        "optimizers": sorted(k for k in ("muon_optimizer", "adamw_optimizer") if k in ck.state)
        or sorted((ck.state.get("optimizer") or {}).keys()),
        "scheduler": sched if isinstance(sched, dict) else None,
        "data_state": "data" in ck.state or bool(ck.state.get("loader")),
        "probe_batch": "probe_batch" in ck.state,
        "unmapped_on_resume": unmapped_parts(ck),
    }


def _print_text(info: dict[str, Any]) -> None:
    m = info["model"]
    print(f"{info['path']}")
    print(f"  format      {info['format']}")
    print(f"  step        {info['step']} ({info['updates']} updates)   tokens {info['tokens']}")
    print(f"  shape       layers {m['num_layers']} · hidden {m['hidden_size']} · heads {m['num_attention_heads']}"
          f"/{m['num_kv_heads']} kv · head_dim {m['head_dim']} · ffn {m['intermediate_size']} · vocab "
          f"{m['vocab_size']} · attn_res {m['attn_res']} · tied {m['tie_word_embeddings']}")
    print(f"  parameters  {info['num_parameters']:,} (tied weights once)   preset {info['matching_preset']}")
    print(f"  dtypes      {', '.join(f'{k} ×{v}' for k, v in info['dtypes'].items())}")
    print(f"  optimizers  {', '.join(info['optimizers']) or 'none'}   scheduler "
          f"{'yes' if info['scheduler'] else 'no'}   data state {'yes' if info['data_state'] else 'no'}")


def _boundaries(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CheckpointError(f"--attn-res-boundaries takes comma-separated layer indices, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kotodama checkpoint",
                                description="Inspect or convert checkpoints of the original Kotodama code "
                                            "(step_XXXXXXXX.pt / .pt.zst) and of this project.")
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("inspect", help="format, step, tokens, inferred shape, parameter count, states present")
    i.add_argument("path", help="a .pt / .pt.zst file or a folder of checkpoints (newest step unless --step)")
    i.add_argument("--step", type=int, default=None, help="which step of a folder")
    i.add_argument("--json", action="store_true", help="print one JSON object")
    c = sub.add_parser("convert", help="write the checkpoint in this project's form or the original's")
    c.add_argument("path", help="a .pt / .pt.zst file or a folder of checkpoints")
    c.add_argument("--out", required=True, help="output folder (replaced atomically)")
    c.add_argument("--to", choices=("project", "original"), default="project")
    c.add_argument("--step", type=int, default=None, help="which step of a folder")
    c.add_argument("--attn-res-boundaries", default=None,
                   help="AttnRes block starts, e.g. 0,3,7,12,21,25 (needed when no preset has the shape)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "inspect":
            info = describe(args.path, args.step)
            if args.json:
                print(json.dumps(info, default=str))
            else:
                _print_text(info)
            return 0
        files, cfg, layout = convert(args.path, args.out, args.to, args.step, _boundaries(args.attn_res_boundaries))
        for f in files:
            print(f"wrote {f}")
        if cfg.attn_res:
            print(f"AttnRes boundaries {cfg.block_starts()} (from {layout})")
        return 0
    except (CheckpointError, UserError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
