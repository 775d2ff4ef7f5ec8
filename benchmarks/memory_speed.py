"""Speed and peak memory of the neural memory (``NeuralMemory``), beside titans-pytorch when it is installed.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/memory_speed.py            # full table (a few minutes)
    python benchmarks/memory_speed.py --quick                            # one short length

Configuration (issue #2): hidden 256, 4 heads x 64, depth 2, expansion 4, chunk 64, batch 2, float32, 2 threads.
Prints forward and forward+backward tokens/s (median of ``--repeats`` runs after a warm-up), peak memory of one
forward+backward (median of 3 fresh subprocesses: peak RSS minus RSS before the step), the ratio to titans-pytorch
(``pip install -e .[bench]``) run in the same process, and the speed-up over the per-token slow twin.
Saves ``results/memory_speed.json`` and ``results/memory_speed.png`` (or in ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

from speed_common import peak_rss_bytes, reset_peak_rss, rss_bytes  # noqa: E402

CONFIG = dict(hidden=256, heads=4, head_dim=64, depth=2, expansion=4, chunk=64, batch=2)


def build(impl: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if impl == "titans-hf":
        from titans_hf.neural_memory import NeuralMemory

        return NeuralMemory(
            CONFIG["hidden"],
            CONFIG["heads"],
            CONFIG["head_dim"],
            depth=CONFIG["depth"],
            expansion=CONFIG["expansion"],
            chunk_size=CONFIG["chunk"],
        )
    from titans_pytorch import NeuralMemory as ReferenceMemory

    return ReferenceMemory(
        dim=CONFIG["hidden"],
        chunk_size=CONFIG["chunk"],
        heads=CONFIG["heads"],
        dim_head=CONFIG["head_dim"],
        default_model_kwargs=dict(depth=CONFIG["depth"], expansion_factor=float(CONFIG["expansion"])),
    )


def step(module: torch.nn.Module, x: torch.Tensor, backward: bool) -> None:
    if backward:
        out = module(x)[0]
        out.float().pow(2).mean().backward()
    else:
        with torch.no_grad():
            module(x)


def tokens_per_second(modules: dict, length: int, backward: bool, repeats: int) -> dict[str, float]:
    """Median tokens/s of each module; the modules take turns in every round, so drift on a shared machine hits
    them alike."""
    x = torch.randn(CONFIG["batch"], length, CONFIG["hidden"], requires_grad=backward)
    for module in modules.values():
        step(module, x, backward)  # warm-up
    times = {impl: [] for impl in modules}
    for _ in range(repeats):
        for impl, module in modules.items():
            start = time.perf_counter()
            step(module, x, backward)
            times[impl].append(time.perf_counter() - start)
    return {impl: CONFIG["batch"] * length / statistics.median(t) for impl, t in times.items()}


def peak_memory_child(impl: str, length: int) -> None:
    """Runs in a subprocess: prints the peak RSS growth (bytes) of one forward+backward (``VmHWM``, reset just
    before the step: ``ru_maxrss`` would carry the parent's RSS over ``fork``/``exec``)."""
    torch.set_num_threads(2)
    module = build(impl)
    x = torch.randn(CONFIG["batch"], length, CONFIG["hidden"], requires_grad=True)
    reset_peak_rss()
    before = rss_bytes()
    step(module, x, backward=True)
    print(max(0, peak_rss_bytes() - before))


def peak_memory(impl: str, length: int, runs: int = 3) -> float:
    """Median over ``runs`` fresh subprocesses of the peak RSS growth of one forward+backward."""
    peaks = []
    for _ in range(runs):
        out = subprocess.run(
            [sys.executable, __file__, "--child", impl, str(length)], capture_output=True, text=True, check=True
        )
        peaks.append(int(out.stdout.strip().splitlines()[-1]))
    return statistics.median(peaks)


def twin_speed(length: int) -> float:
    """Forward tokens/s of the per-token autograd twin (tests/reference_memory.py), one sequence."""
    from reference_memory import reference_forward

    module = build("titans-hf")
    x = torch.randn(length, CONFIG["hidden"])
    start = time.perf_counter()
    reference_forward(module, x)
    return length / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="seq 256 only, 3 repeats, no twin")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--lengths", type=int, nargs="*", default=[256, 1024, 4096])
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        peak_memory_child(args.child[0], int(args.child[1]))
        return
    if args.quick:
        args.lengths, args.repeats = [256], 3
    torch.set_num_threads(2)

    impls = ["titans-hf"]
    try:
        import titans_pytorch  # noqa: F401

        impls.append("titans-pytorch")
    except ImportError:
        print("titans-pytorch is not installed (pip install -e .[bench]); measuring titans-hf alone.\n")

    modules = {impl: build(impl) for impl in impls}
    rows = []
    for length in args.lengths:
        row = {"seq": length}
        for backward, name in ((False, "fwd"), (True, "fwd+bwd")):
            for impl, speed in tokens_per_second(modules, length, backward, args.repeats).items():
                row[f"{impl} {name}"] = speed
        for impl in impls:
            row[f"{impl} peak MB"] = peak_memory(impl, length) / 2**20
        rows.append(row)

    header = f"{'seq':>6}"
    for impl in impls:
        header += f" | {impl + ' fwd':>22} {impl + ' fwd+bwd':>26} {'peak MB':>9}"
    if len(impls) == 2:
        header += f" | {'fwd+bwd ratio':>13} {'memory ratio':>12}"
    print(header)
    print("-" * len(header))
    for row in rows:
        line = f"{row['seq']:>6}"
        for impl in impls:
            line += f" | {row[impl + ' fwd']:>18,.0f} t/s {row[impl + ' fwd+bwd']:>22,.0f} t/s {row[impl + ' peak MB']:>9.0f}"
        if len(impls) == 2:
            speed = row["titans-hf fwd+bwd"] / row["titans-pytorch fwd+bwd"]
            memory = row["titans-hf peak MB"] / max(row["titans-pytorch peak MB"], 1e-9)
            row["fwd+bwd ratio"], row["memory ratio"] = speed, memory
            line += f" | {speed:>12.2f}x {memory:>11.2f}x"
        print(line)

    result = {"config": CONFIG, "threads": 2, "rows": rows}
    if not args.quick and 1024 in args.lengths:
        twin = twin_speed(1024)
        fast = next(r for r in rows if r["seq"] == 1024)["titans-hf fwd"]
        result["twin fwd tok/s"] = twin
        print(
            f"\nslow twin (per-token autograd loop), seq 1024 forward: {twin:,.0f} tok/s; chunked: {fast / twin:,.0f}x faster"
        )

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memory_speed.json").write_text(json.dumps(result, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for impl in impls:
            ax.plot(args.lengths, [r[f"{impl} fwd+bwd"] for r in rows], marker="o", label=f"{impl} fwd+bwd")
            ax.plot(args.lengths, [r[f"{impl} fwd"] for r in rows], marker="x", linestyle="--", label=f"{impl} fwd")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length")
        ax.set_ylabel("tokens / s (batch 2, 2 threads)")
        ax.set_title("Neural memory throughput")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.out / "memory_speed.png", dpi=120)
    except ImportError:
        print("matplotlib is not installed: no plot.")


if __name__ == "__main__":
    main()
