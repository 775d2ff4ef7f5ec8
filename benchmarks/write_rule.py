"""Stability of the memory's write rule: where does a fresh memory stay in range, and where does it diverge?

The learning-rate budget (``memory_max_lr``) trades the strength of a write against the stability of a chunk's
summed update. This diagnostic streams tokens through *fresh* models (every memory setting at its default but the
budget) with the weight safeguard **off**, so that nothing hides a divergence, and reports the largest per-head
RMS of ``W - W_0`` seen, or where the stream went non-finite:

- ``text``: the bytes of a real text (default: ``../shared/data/tinyshakespeare.txt``, else the copy shipped in
  ``examples/data``) through a byte-level model of width 128, 2 layers, memory head width ``d`` (``128 / d`` heads);
- ``synthetic``: the adversarial stream of ``tests/test_reliability.py`` (blocks of random tokens, of one token
  repeated 4093 times, of short periods, of repeats) through its width-32 model (memory heads of 16).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/write_rule.py          # about 10 minutes on 2 cores
    python benchmarks/write_rule.py --quick                          # one budget, short streams

Writes ``results/write_rule.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE.parent / "tests"))

from test_reliability import BLOCK, stream, stream_model, text_blocks, text_model  # noqa: E402

SHARED_TEXT = HERE.parents[1] / "shared" / "data" / "tinyshakespeare.txt"
SHIPPED_TEXT = HERE.parent / "examples" / "data" / "tinyshakespeare.txt"


def cell(stats: dict) -> str:
    if not stats["finite"]:
        return f"diverged at {stats['stopped_at']:,}"
    return f"{stats['max_deviation_rms']:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--variants", nargs="+", default=["mag", "mac"])
    parser.add_argument("--budgets", type=float, nargs="+", default=None)
    parser.add_argument("--head-dims", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--text", type=Path, default=SHARED_TEXT if SHARED_TEXT.exists() else SHIPPED_TEXT)
    parser.add_argument("--text-tokens", type=int, default=None)
    parser.add_argument("--synthetic-tokens", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "write_rule.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    budgets = args.budgets or ([1.0] if args.quick else [0.5, 1.0, 2.0, 4.0])
    text_tokens = args.text_tokens or (2 * BLOCK if args.quick else 6 * BLOCK)
    synthetic_tokens = args.synthetic_tokens or (2 * BLOCK if args.quick else 12 * BLOCK)

    print(
        f"Largest per-head RMS(W - W_0) of fresh models with the safeguard off ({text_tokens:,} bytes of "
        f"{args.text.name}; {synthetic_tokens:,} synthetic tokens), or where the stream went non-finite\n"
    )
    columns = [f"text, d={d}" for d in args.head_dims] + ["synthetic, d=16"]
    print("| variant | memory_max_lr | " + " | ".join(columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    rows = []
    start = time.perf_counter()
    for variant in args.variants:
        for budget in budgets:
            cells, record = [], {"variant": variant, "memory_max_lr": budget}
            for d in args.head_dims:
                model = text_model(
                    variant,
                    memory_num_heads=128 // d,
                    memory_head_dim=d,
                    memory_max_lr=budget,
                    memory_max_weight_rms=None,
                )
                stats = stream(model, text_tokens, blocks=text_blocks(args.text, text_tokens))
                record[f"text_d{d}"] = {k: stats[k] for k in ("finite", "stopped_at", "max_deviation_rms")}
                cells.append(cell(stats))
            model = stream_model(variant, memory_max_lr=budget, memory_max_weight_rms=None)
            stats = stream(model, synthetic_tokens)
            record["synthetic_d16"] = {k: stats[k] for k in ("finite", "stopped_at", "max_deviation_rms")}
            cells.append(cell(stats))
            rows.append(record)
            print(f"| {variant} | {budget:g} | " + " | ".join(cells) + " |", flush=True)
    print(f"\n{time.perf_counter() - start:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"args": vars(args) | {"out": str(args.out), "text": str(args.text)}, "rows": rows}, indent=1)
    )


if __name__ == "__main__":
    main()
