"""`kotodama`: the project's command line. `kotodama --help` lists the commands; each has its own `--help`.

The commands are thin: each parses its arguments and calls the library (kotodama_core) or the stage
graph (stages/graph.py). Errors a user can fix print one line and exit 2; `--debug` before the command
shows the full traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from kotodama_core.errors import UserError


@dataclass(frozen=True)
class Command:
    name: str
    summary: str
    target: str            # "module:function", imported only when the command runs (keeps --help fast)

    def load(self) -> Callable[[list[str]], int]:
        module, _, function = self.target.partition(":")
        return getattr(importlib.import_module(module), function)


COMMANDS: tuple[Command, ...] = (
    Command("graph", "print a pipeline's stage graph: each stage, its inputs and its digest", "stages.cli:graph_main"),
    Command("presets", "list the model presets with shape, parameter count and token budgets",
            "stages.cli:presets_main"),
    Command("keys", "list every config key with its type and default (optionally under a prefix)",
            "stages.cli:keys_main"),
    Command("check", "validate a run config (with --set overrides) and print what it resolves to",
            "stages.cli:check_main"),
    Command("generate", "sample text from a checkpoint (temperature sampling with a KV cache)",
            "stages.cli:generate_main"),
    Command("lm-eval", "lm-eval's own command line with the `kotodama` model registered",
            "kotodama_core.eval.harness:main"),
    Command("checkpoint", "inspect or convert checkpoints of the original Kotodama code and of this project",
            "kotodama_core.checkpoint_formats.cli:main"),
    Command("runs", "the flow runs tracked in MLflow as a table of their headline metrics", "flows.runs_table:main"),
)


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=f"kotodama {prog}", description=description)


# -- graph ---------------------------------------------------------------------------------------------

def graph_main(argv: list[str]) -> int:
    from kotodama_core.config import parse_overrides
    from stages.graph import DEFAULT_PRESET, PIPELINES, build, describe, plan

    parser = _parser("graph", "Print the ordered stage graph of a pipeline for a preset's run configs: each "
                              "stage, where its inputs come from, its digest and whether its artifact exists.")
    parser.add_argument("pipeline", choices=sorted(PIPELINES))
    parser.add_argument("--preset", default=DEFAULT_PRESET, help=f"run configs to use (default {DEFAULT_PRESET})")
    parser.add_argument("--config", help="a run config file instead of the preset's (pipeline `arm`: required)")
    parser.add_argument("--nca-config", help="the NCA run config of an `arm` that starts by nca_transfer")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--nca-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the NCA run config (fullcorpus)")
    parser.add_argument("--init", help="bcpt: the checkpoint to start from (default: the preset's fullcorpus "
                                       "training step, predicted)")
    parser.add_argument("--json", action="store_true", help="one JSON object per step")
    args = parser.parse_args(argv)
    if args.config or args.pipeline == "arm":
        from kotodama_core.config import load_config

        if not args.config:
            parser.error("pipeline `arm` needs --config (and --nca-config when it starts by nca_transfer)")
        cfg = load_config(args.config, args.set)
        nca = load_config(args.nca_config, args.nca_set) if args.nca_config else None
        init = Path(args.init).expanduser().resolve() if args.init else None
        steps = build(args.pipeline, cfg, nca, init=init)
    else:
        init = Path(args.init).expanduser().resolve() if args.init else None
        steps = plan(args.pipeline, args.preset, parse_overrides(args.set), parse_overrides(args.nca_set) or None,
                     init=init)
    if args.json:
        for s in steps:
            print(json.dumps({"key": s.key, "stage": s.stage, "digest": s.digest, "out": str(s.out),
                              "done": s.manifest.is_file(),
                              "inputs": {k: (v.key if hasattr(v, "key") else str(v)) for k, v in s.inputs.items()}}))
    else:
        print(describe(args.pipeline, steps))
    return 0


# -- presets, keys, check ------------------------------------------------------------------------------

def presets_main(argv: list[str]) -> int:
    from kotodama_core.config import CONFIGS_ROOT, load_config, validate
    from kotodama_core.config_tree import load_tree

    parser = _parser("presets", "The model presets (configs/presets) and the run configs that use them.")
    parser.parse_args(argv)
    runs: dict[str, list[str]] = {}
    for path in sorted((CONFIGS_ROOT / "runs").glob("*.yaml")):
        cfg = load_config(path)
        t = cfg.train
        runs.setdefault(cfg.preset, []).append(f"{path.stem} {t.steps:,} steps × {t.global_batch_tokens:,} = "
                                               f"{_tokens(t.steps * t.global_batch_tokens)} tokens")
    for path in sorted((CONFIGS_ROOT / "presets").glob("*.yaml")):
        tree = load_tree(path)
        cfg = validate(tree, origin=str(path))
        m = cfg.model
        head = (f"{cfg.preset}: {m.num_layers} layers × {m.hidden_size} hidden, {m.num_attention_heads} heads "
                f"({m.num_kv_heads} kv) × {m.head_dim}, MLP {m.intermediate_size}, vocab {m.vocab_size:,}, "
                f"AttnRes {'on ' + str(m.attn_res_boundaries) if m.attn_res else 'off'}; "
                f"{_count_parameters(m):,} parameters")
        print(head)
        for line in runs.get(cfg.preset, []) or ["(no run config uses it)"]:
            print(f"    {line}")
    return 0


def _tokens(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _count_parameters(model_cfg) -> int:
    """Unique parameters of the model built on the meta device (a tied head counts once)."""
    from kotodama_core.model import KotodamaLM

    return KotodamaLM(model_cfg, device="meta").num_parameters()


def keys_main(argv: list[str]) -> int:
    from kotodama_core.config import RunConfig

    parser = _parser("keys", "Every config key, its type and default; an unknown key in a config is an error.")
    parser.add_argument("prefix", nargs="?", default="", help="only keys under this dotted prefix, e.g. train.init")
    args = parser.parse_args(argv)
    rows = [r for r in _key_rows(RunConfig) if r[0].startswith(args.prefix)]
    if not rows:
        raise _config_error(f"no config key starts with {args.prefix!r}")
    width = max(len(r[0]) for r in rows)
    for key, kind, default in rows:
        print(f"{key:<{width}}  {kind:<28}  {default}")
    return 0


def _config_error(message: str) -> UserError:
    from kotodama_core.schema import ConfigError

    return ConfigError(message)


def _key_rows(model, prefix: str = "") -> list[tuple[str, str, str]]:
    rows = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if hasattr(annotation, "model_fields"):
            rows += _key_rows(annotation, f"{prefix}{name}.")
            continue
        kind = getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
        default = field.get_default(call_default_factory=True)
        rows.append((f"{prefix}{name}", kind[:28], json.dumps(default, default=str)[:60]))
    return rows


def check_main(argv: list[str]) -> int:
    from kotodama_core.config import load_config

    parser = _parser("check", "Validate a run config: unknown keys and bad values are named, with the file.")
    parser.add_argument("config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.set)
    t = cfg.train
    print(f"{args.config}: ok — {cfg.name} (preset {cfg.preset}), {t.steps:,} steps × "
          f"{t.global_batch_tokens:,} tokens, init {t.init.mode}, optimizer {cfg.optim.kind}")
    return 0


# -- generate ------------------------------------------------------------------------------------------

def generate_main(argv: list[str]) -> int:
    parser = _parser("generate", "Sample text from a checkpoint (pure temperature sampling, KV cache; no top-p)")
    parser.add_argument("checkpoint", help="training artifact folder or .pt.zst file")
    parser.add_argument("prompt")
    parser.add_argument("--config", help="run config YAML (only for a bare state dict without config)")
    parser.add_argument("--tokenizer", default="../shared/data/smollm2-tokenizer/tokenizer.json")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--samples", type=int, default=1)
    args = parser.parse_args(argv)
    if args.temperature < 0:
        parser.error("--temperature must be >= 0")

    from kotodama_core.config import load_config
    from kotodama_core.eval.generate import generate_tokens
    from kotodama_core.eval.loading import load_checkpoint_model, select_device, select_dtype
    from kotodama_core.eval.tokenizer import eos_id, load_eval_tokenizer

    device = select_device(args.device)
    model, _ = load_checkpoint_model(args.checkpoint, load_config(args.config).model if args.config else None,
                                     device=device, dtype=select_dtype("auto", device))
    tok = load_eval_tokenizer(args.tokenizer)
    eos = eos_id(tok)
    prompt = tok.encode(args.prompt, add_special_tokens=False).ids or [eos]
    for n in range(args.samples):
        ids = generate_tokens(model, prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              stop_ids={eos}, seed=args.seed + n)
        if args.samples > 1:
            print(f"--- sample {n + 1}")
        print(args.prompt + tok.decode(ids))
    return 0


# -- the entry point -----------------------------------------------------------------------------------

def _usage() -> str:
    width = max(len(c.name) for c in COMMANDS)
    lines = ["usage: kotodama [--debug] COMMAND [ARGS...]", "",
             "The Kotodama pipeline's command line. Stages run as `python -m stages.<name>`; flows as Prefect "
             "deployments.", "", "commands:"]
    lines += [f"  {c.name:<{width}}  {c.summary}" for c in COMMANDS]
    lines += ["", "`kotodama COMMAND --help` shows a command's options; --debug shows tracebacks."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv[:1]
    if debug:
        argv = argv[1:]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    command = next((c for c in COMMANDS if c.name == argv[0]), None)
    if command is None:
        import difflib

        near = difflib.get_close_matches(argv[0], [c.name for c in COMMANDS], n=1)
        print(f"error: unknown command {argv[0]!r}" + (f" (did you mean {near[0]!r}?)" if near else "")
              + f"; the commands are {', '.join(c.name for c in COMMANDS)}", file=sys.stderr)
        return 2
    try:
        return command.load()(argv[1:])
    except UserError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
