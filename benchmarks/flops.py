"""How much arithmetic a training step does and how fast it does it: GFLOP per step, achieved GFLOP/s and its share of
this machine's matmul peak, for Titans variants beside Llama (8K tokens) and for the neural memory beside
titans-pytorch's (4K tokens, batch 2), with the rate each target of issue #12 would need.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/flops.py              # MAG, MAC, Llama at 8,192; memories at 4,096
    python benchmarks/flops.py --quick                              # 512 / 256 tokens, one timed step

Counted: the matmuls (``torch.utils.flop_counter.FlopCounterMode``: mm, bmm, addmm, baddbmm, ...) and the CPU flash
attention, which that counter does not know: ``4 * batch * heads * queries * keys * head_dim`` per forward (``QK^T``
and ``PV``; half with ``is_causal``, whose kernel skips the blocks above the diagonal) and twice that per backward
(the counter's convention for the GPU kernels). Elementwise work is not counted: a model whose time goes into
elementwise passes shows a low rate. Time: the median of ``--repeats`` forward + backward steps after a warm-up (the
training step without the optimizer), float32, 2 threads. Peak: in the same process, a 2,048 x 2,048 matmul and
the memory's typical block product, a batch of 64 (64 x 64) @ (64 x 256). Saves ``results/flops.json``.
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
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_speed import CONFIG as MEMORY_CONFIG  # noqa: E402
from memory_speed import build as build_memory  # noqa: E402
from speed_common import (  # noqa: E402
    LLAMA,
    RESULTS,
    VARIANTS,
    build_model,
    environment,
    format_table,
    markdown_table,
    median,
    setup_threads,
    titans_pytorch_available,
)

aten = torch.ops.aten


def _attention_flops(query_shape, key_shape, is_causal: bool) -> int:
    batch, heads, queries, head_dim = query_shape
    flops = 4 * batch * heads * queries * key_shape[2] * head_dim
    return flops // 2 if is_causal else flops


if aten._scaled_dot_product_flash_attention_for_cpu not in flop_registry:

    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
    def _cpu_flash_flops(query_shape, key_shape, value_shape, dropout_p=0.0, is_causal=False, *args, **kwargs) -> int:
        return _attention_flops(query_shape, key_shape, is_causal)

    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def _cpu_flash_backward_flops(grad_shape, query_shape, key_shape, *args, **kwargs) -> int:
        is_causal = args[4] if len(args) > 4 else kwargs.get("is_causal", False)
        return 2 * _attention_flops(query_shape, key_shape, is_causal)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=8192, help="tokens per model step (batch 1)")
    parser.add_argument("--memory-length", type=int, default=4096, help="tokens per memory step (batch 2)")
    parser.add_argument("--variants", nargs="+", default=["mag", "mac"], choices=VARIANTS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="512 / 256 tokens, one timed step")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.quick:
        args.length, args.memory_length, args.repeats = 512, 256, 1
    return args


def measure(step, repeats: int) -> tuple[float, float]:
    """GFLOP of one call of ``step`` and the median seconds of ``repeats`` more after a warm-up."""
    with FlopCounterMode(display=False) as counter:
        step()
    step()  # the warm-up (the counted call runs under a dispatch mode)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return counter.get_total_flops() / 1e9, median(times)


def peak_rates() -> dict[str, float]:
    """GFLOP/s of a large matmul and of the memory's block product, medians of 5."""
    rates = {}
    for name, a, b in (
        ("matmul 2048^3", torch.randn(2048, 2048), torch.randn(2048, 2048)),
        ("bmm 64 x (64x64)(64x256)", torch.randn(64, 64, 64), torch.randn(64, 64, 256)),
    ):
        flops = 2 * a.shape[-2] * a.shape[-1] * b.shape[-1] * (a.shape[0] if a.dim() == 3 else 1)
        calls = max(1, int(2e9 // flops))
        times = []
        for _ in range(6):
            start = time.perf_counter()
            for _ in range(calls):
                a @ b
            times.append((time.perf_counter() - start) / calls)
        rates[name] = flops / median(times[1:]) / 1e9
    return rates


def model_step(name: str, length: int):
    model = build_model(name).train()
    ids = torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(0))

    def step():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()

    return step


def memory_step(impl: str, length: int):
    memory = build_memory(impl)
    x = torch.randn(MEMORY_CONFIG["batch"], length, MEMORY_CONFIG["hidden"], requires_grad=True)

    def step():
        memory.zero_grad(set_to_none=True)
        out = memory(x)
        (out[0] if isinstance(out, tuple) else out).sum().backward()

    return step


def main() -> None:
    args = parse_args()
    setup_threads()
    peaks = peak_rates()
    peak = peaks["matmul 2048^3"]
    rows, results = [], {"environment": environment(), "peaks_gflops": peaks, "rows": []}

    def record(group: str, name: str, tokens: int, gflop: float, seconds: float) -> dict:
        row = dict(group=group, name=name, tokens=tokens, gflop=gflop, seconds=seconds, rate=gflop / seconds)
        results["rows"].append(row)
        print(f"  {name}: {gflop:.1f} GFLOP in {seconds:.2f} s", flush=True)
        return row

    models = {}
    for name in [*args.variants, LLAMA]:
        models[name] = record("model", name, args.length, *measure(model_step(name, args.length), args.repeats))
    memories = {}
    for impl in ["titans-hf", "titans-pytorch"] if titans_pytorch_available() else ["titans-hf"]:
        tokens = MEMORY_CONFIG["batch"] * args.memory_length
        name = f"{impl} memory"
        memories[impl] = record("memory", name, tokens, *measure(memory_step(impl, args.memory_length), args.repeats))

    # The rate each target needs: the same arithmetic in the time the target allows.
    targets = {
        "mag": ("1.0x Llama", models[LLAMA]["seconds"] / 1.0),
        "mac": ("0.7x Llama", models[LLAMA]["seconds"] / 0.7),
    }
    targets.update({v: ("1.0x Llama", models[LLAMA]["seconds"]) for v in ("mal", "lmm")})
    if "titans-pytorch" in memories:
        targets["titans-hf memory"] = ("1.5x titans-pytorch", memories["titans-pytorch"]["seconds"] / 1.5)
    for row in results["rows"]:
        label, allowed = targets.get(row["name"], ("", None))
        row["target"], row["needed_rate"] = label, None if allowed is None else row["gflop"] / allowed
        rows.append(
            [
                row["name"],
                f"{row['tokens']:,}",
                f"{row['gflop']:.1f}",
                f"{row['gflop'] / row['tokens'] * 1e3:.1f}",
                f"{row['seconds']:.2f}",
                f"{row['rate']:.1f}",
                f"{row['rate'] / peak:.0%}",
                label,
                "" if row["needed_rate"] is None else f"{row['needed_rate']:.1f} ({row['needed_rate'] / peak:.0%})",
            ]
        )
    header = ["step", "tokens", "GFLOP", "MFLOP/token", "s", "GFLOP/s", "of peak", "target", "GFLOP/s needed"]
    print("\npeaks: " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in peaks.items()))
    print(format_table(header, rows))
    results["markdown"] = markdown_table(header, rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "flops.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
