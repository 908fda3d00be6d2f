"""`kotodama` command line: `generate` (checkpoint + prompt -> text) and `lm-eval` (lm-eval's CLI with the
`kotodama` model registered)."""

from __future__ import annotations

import argparse
import sys


def generate_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kotodama generate",
                                     description="Sample text from a checkpoint (pure temperature sampling, "
                                                 "KV cache; no top-p)")
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

    from kotodama_core.config import load_config
    from kotodama_core.eval.generate import generate_tokens
    from kotodama_core.eval.loading import load_checkpoint_model, select_device, select_dtype
    from kotodama_core.eval.tokenizer import eos_id, load_eval_tokenizer
    from kotodama_core.model import CheckpointError

    if args.temperature < 0:
        parser.error("--temperature must be >= 0")
    device = select_device(args.device)
    try:
        model, _ = load_checkpoint_model(args.checkpoint, load_config(args.config).model if args.config else None,
                                         device=device, dtype=select_dtype("auto", device))
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"generate": generate_main}
    if argv and argv[0] == "lm-eval":
        from kotodama_core.eval.harness import main as lm_eval_main

        return lm_eval_main(argv[1:])
    if not argv or argv[0] not in commands:
        print("usage: kotodama {generate,lm-eval} ...", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
