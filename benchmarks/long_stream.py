"""Streams a long token sequence through every Titans variant with a ``TitansCache`` and prints a table.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/long_stream.py --text ../shared/data/tinyshakespeare.txt  # real text
    OMP_WAIT_POLICY=PASSIVE python benchmarks/long_stream.py                  # 1M synthetic tokens x 4 variants x fp32/bf16
    python benchmarks/long_stream.py --tokens 50000 --variants mag lmm      # a quick look
    python benchmarks/long_stream.py --stress --tokens 100000               # gates at their most aggressive

Two streams:

- ``--text FILE``: the bytes of a real text (read cyclically to ``--tokens``) through a *fresh default* byte-level model
  of the shape ``TitansConfig(variant=v, vocab_size=256, hidden_size=128, intermediate_size=384,
  num_hidden_layers=2, num_attention_heads=4)`` (every memory setting at its default). Does an untrained memory
  stay alive over a million tokens, or fade to zero?
- default: the model and stream of ``tests/test_reliability.py`` (same code): 2 layers of width 32, a depth-2 memory
  of 2 heads x 16 per layer, memory chunks of 64, MAC segments / MAG-MAL windows of 128, initial gates (or, with
  ``--stress``, the inner learning rate at its bound, almost no forgetting and momentum 0.99), blocks of 4093
  tokens cycling through random, constant, periodic and repeated text.

Every logit and every cache tensor is checked after every block. Columns: max RMS(W - W_0) over every (layer, head)
fast-weight matrix (running and chunk-boundary weights, MAC segment snapshots: what the safeguard bounds), max RMS(S)
of the momentum, RMS(W) / RMS(W_0) at the end (the smallest over layers and heads) and the smallest over the run,
max |logit|, the cache size after the first block and at the end (bytes), tokens/s of the whole run, and whether
everything stayed finite. Writes ``long_stream.json`` next to this file (or to ``--out``).
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

from test_reliability import BLOCK, stream, stream_model, stress_gates, text_blocks, text_model  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--variants", nargs="+", default=["mac", "mag", "mal", "lmm"])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--block", type=int, default=BLOCK)
    parser.add_argument("--text", type=Path, default=None, help="stream the bytes of this text file (see above)")
    parser.add_argument("--stress", action="store_true", help="gates at their most aggressive (see the docstring)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "long_stream.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    header = (
        "| variant | dtype | tokens | max RMS(W - W_0) | max RMS(S) | RMS(W) / RMS(W_0) end (min over run) "
        "| max \\|logit\\| | cache bytes start → end | tokens/s | finite |"
    )
    source = (
        f"text {args.text.name}" if args.text else "synthetic stream" + (", stressed gates" if args.stress else "")
    )
    print(
        f"# {datetime.date.today()} | torch {torch.__version__} | {platform.processor() or platform.machine()} | "
        f"{args.threads} threads | {args.tokens} tokens | block {args.block} | {source}"
    )
    print(header)
    print("|---" * 10 + "|")
    rows = []
    for variant in args.variants:
        for name in args.dtypes:
            if args.text:
                model = text_model(variant, DTYPES[name])
                blocks = text_blocks(args.text, args.tokens, args.block)
            else:
                model, blocks = stream_model(variant, DTYPES[name]), None
                if args.stress:
                    stress_gates(model)
            stats = stream(model, args.tokens, args.block, blocks=blocks)
            row = dict(
                variant=variant,
                dtype=name,
                tokens=stats["tokens"],
                max_deviation_rms=stats["max_deviation_rms"],
                max_boundary_rms=stats["max_boundary_rms"],
                max_momentum_rms=stats["max_momentum_rms"],
                alive_end=stats.get("alive"),
                alive_min=stats["min_alive"],
                max_abs_logit=stats["max_abs_logit"],
                bytes_start=stats["bytes_start"],
                bytes_end=stats["bytes_end"],
                tokens_per_second=stats["tokens"] / stats["seconds"],
                finite=stats["finite"],
                stress=args.stress,
                text=str(args.text) if args.text else None,
            )
            rows.append(row)
            finite = "yes" if row["finite"] else f"NO (at {stats['stopped_at']})"
            alive = "-" if row["alive_end"] is None else f"{row['alive_end']:.3f} ({row['alive_min']:.3f})"
            print(
                f"| {variant} | {name} | {row['tokens']:,} | {row['max_deviation_rms']:.4f} "
                f"| {row['max_momentum_rms']:.4f} | {alive} | {row['max_abs_logit']:.2f} "
                f"| {row['bytes_start']:,} → {row['bytes_end']:,} | {row['tokens_per_second']:,.0f} "
                f"| {finite} |",
                flush=True,
            )
    record = dict(date=str(datetime.date.today()), torch=torch.__version__, args=vars(args) | {"out": str(args.out)})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record | {"rows": rows}, indent=1, default=str))


if __name__ == "__main__":
    main()
