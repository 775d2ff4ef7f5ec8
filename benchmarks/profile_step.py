"""Where a training step's time goes: ``torch.profiler`` over training steps of one model, top ops by self time.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/profile_step.py                      # MAG at 8K tokens, batch 1
    python benchmarks/profile_step.py --model llama --length 8192                   # the baseline, same shape
    python benchmarks/profile_step.py --model mag --length 1024 --steps 3 --top 25

Issue #12. The small shape of ``speed_common.py`` (hidden 256, 4 layers, memory chunk 64), float32, 2 threads; one step
= forward + backward + ``AdamW.step()``. One untimed warm-up step, then ``--steps`` profiled ones. Prints the table of
the ``--top`` ops by self CPU time (with their share of the total) and saves it, with the step times, to
``results/profile_<model>_<length>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from speed_common import LLAMA, RESULTS, VARIANTS, build_model, setup_threads  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mag", choices=[*VARIANTS, LLAMA])
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2, help="profiled steps after one warm-up step")
    parser.add_argument("--top", type=int, default=20, help="ops shown")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON (default: results/)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    setup_threads(args.threads)
    model = build_model(args.model).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, 256, (args.batch, args.length), generator=torch.Generator().manual_seed(0))

    def step() -> float:
        start = time.perf_counter()
        loss = model(x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    step()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        times = [step() for _ in range(args.steps)]
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[: args.top]
    table = [
        {
            "op": e.key,
            "self_ms_per_step": e.self_cpu_time_total / 1e3 / args.steps,
            "share": e.self_cpu_time_total / total,
            "calls_per_step": e.count / args.steps,
        }
        for e in rows
    ]
    print(
        f"{args.model} training step, {args.batch} x {args.length} tokens, {args.threads} threads: "
        f"{sorted(times)[len(times) // 2]:.2f} s per step (profiled; {args.steps} steps)"
    )
    print(f"{'op':<44} {'self ms/step':>13} {'share':>7} {'calls/step':>11}")
    for row in table:
        print(
            f"{row['op'][:44]:<44} {row['self_ms_per_step']:>13.1f} {row['share']:>7.1%} {row['calls_per_step']:>11.0f}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"profile_{args.model}_{args.length}.json"
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    out.write_text(json.dumps({"args": settings, "step_seconds": times, "top_ops": table}, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
