"""Streams a long token sequence through every Titans variant with a ``TitansCache`` and prints a table (issue #7).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/long_stream.py                  # 1M tokens x 4 variants x fp32/bf16
    python benchmarks/long_stream.py --tokens 50000 --variants mag lmm      # a quick look
    python benchmarks/long_stream.py --stress --tokens 100000               # gates at their most aggressive

The model and the stream are those of ``tests/test_reliability.py`` (same code): 2 layers of width 32, a depth-2
memory of 2 heads x 16 per layer, memory chunks of 64, MAC segments / MAG-MAL windows of 128, initial gates (or,
with ``--stress``, the inner learning rate at its bound, almost no forgetting and momentum 0.99), blocks of 4093
tokens cycling through random, constant, periodic and repeated text. Every logit and every cache tensor is checked
after every block.

Columns: max |W|_F and max RMS(W) over every (layer, head) fast-weight matrix (running and chunk-boundary weights,
MAC segment snapshots), max RMS(S) of the momentum, max |logit|, the cache size after the first block and at the
end (bytes), tokens/s of the whole run (2 threads unless --threads), and whether everything stayed finite.
Writes ``long_stream.json`` next to this file (or to ``--out``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE.parent / "tests"))

from test_reliability import BLOCK, stream, stream_model, stress_gates  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--variants", nargs="+", default=["mac", "mag", "mal", "lmm"])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--block", type=int, default=BLOCK)
    parser.add_argument("--stress", action="store_true", help="gates at their most aggressive (see the docstring)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "long_stream.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    header = (
        "| variant | dtype | tokens | max \\|W\\|_F | max RMS(W) | max RMS(S) | max \\|logit\\| "
        "| cache bytes start → end | tokens/s | finite |"
    )
    print(
        f"# {datetime.date.today()} | torch {torch.__version__} | {platform.processor() or platform.machine()} | "
        f"{args.threads} threads | {args.tokens} tokens | block {args.block}"
        + (" | stressed gates" if args.stress else "")
    )
    print(header)
    print("|---" * 10 + "|")
    rows = []
    for variant in args.variants:
        for name in args.dtypes:
            model = stream_model(variant, DTYPES[name])
            if args.stress:
                stress_gates(model)
            stats = stream(model, args.tokens, args.block)
            row = dict(
                variant=variant,
                dtype=name,
                tokens=stats["tokens"],
                max_weight_norm=stats["max_weight_norm"],
                max_weight_rms=stats["max_weight_rms"],
                max_boundary_rms=stats["max_boundary_rms"],
                max_momentum_rms=stats["max_momentum_rms"],
                max_abs_logit=stats["max_abs_logit"],
                bytes_start=stats["bytes_start"],
                bytes_end=stats["bytes_end"],
                tokens_per_second=stats["tokens"] / stats["seconds"],
                finite=stats["finite"],
                stress=args.stress,
            )
            rows.append(row)
            finite = "yes" if row["finite"] else f"NO (at {stats['stopped_at']})"
            print(
                f"| {variant} | {name} | {row['tokens']:,} | {row['max_weight_norm']:.3f} | {row['max_weight_rms']:.4f} "
                f"| {row['max_momentum_rms']:.4f} | {row['max_abs_logit']:.2f} "
                f"| {row['bytes_start']:,} → {row['bytes_end']:,} | {row['tokens_per_second']:,.0f} "
                f"| {finite} |",
                flush=True,
            )
    record = dict(date=str(datetime.date.today()), torch=torch.__version__, args=vars(args) | {"out": str(args.out)})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record | {"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
