"""Training step time with the geometric monitor every K steps vs without, measured in the same run.

python bench/monitor_overhead.py [--preset proxy-108m] [--steps 150] [--every 75] [--batch 8] [--seq 1024]
Prints the overhead ratio (target < 2 % at K = 75).
"""

from __future__ import annotations

import argparse
import time

import torch

from kotodama_core.config import CONFIGS_ROOT, load_config
from kotodama_core.model import KotodamaLM
from kotodama_core.train.monitor import monitor_metrics


def timed_steps(model, opt, steps, every, batch, seq, probe, layers, device) -> float:
    gen = torch.Generator().manual_seed(0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        x = torch.randint(0, model.cfg.vocab_size, (batch, seq + 1), generator=gen).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss, _ = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if every and step % every == 0:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                monitor_metrics(model, probe, layers)
    sync()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="proxy-108m")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--every", type=int, default=75)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--probe-batch", type=int, default=4)
    ap.add_argument("--probe-seq", type=int, default=512)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = load_config(CONFIGS_ROOT / "presets" / f"{args.preset}.yaml").model
    torch.manual_seed(0)
    model = KotodamaLM(cfg, device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    layers = sorted({0, cfg.num_layers // 4, cfg.num_layers // 2, 3 * cfg.num_layers // 4, cfg.num_layers - 1})
    probe = torch.randint(0, cfg.vocab_size, (args.probe_batch, args.probe_seq)).to(device)
    timed_steps(model, opt, 5, 0, args.batch, args.seq, probe, layers, device)          # warm-up
    monitor_metrics(model, probe, layers)
    base = timed_steps(model, opt, args.steps, 0, args.batch, args.seq, probe, layers, device)
    with_mon = timed_steps(model, opt, args.steps, args.every, args.batch, args.seq, probe, layers, device)
    t0 = time.perf_counter()
    monitor_metrics(model, probe, layers)
    if device.type == "cuda":
        torch.cuda.synchronize()
    one = time.perf_counter() - t0
    print(f"device={device} preset={args.preset} layers={layers} batch={args.batch}x{args.seq} steps={args.steps}")
    print(f"step time without monitor: {base / args.steps * 1e3:.1f} ms; with monitor every {args.every}: "
          f"{with_mon / args.steps * 1e3:.1f} ms; one monitor call {one * 1e3:.0f} ms")
    print(f"overhead = {(with_mon / base - 1) * 100:+.2f} % (target < 2 %); "
          f"amortised estimate one_call/(K*step) = {one / (args.every * base / args.steps) * 100:.2f} %")


if __name__ == "__main__":
    main()
