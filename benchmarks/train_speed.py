"""Training-step speed and peak memory of every Titans variant beside Llama (and titans-pytorch's MAC when installed).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/train_speed.py           # full table (41 min here on 2 shared, busy cores)
    python benchmarks/train_speed.py --quick                           # seq 256, 2 steps: a smoke test (< 1 min)
    python benchmarks/train_speed.py --lengths 1024 --variants mag lmm # a subset

Issue #3. One training step = forward + backward + ``AdamW.step()`` (+ ``zero_grad``) of a causal LM on random tokens,
batch 2, float32, 2 threads. Models (``speed_common.py``): the small shape (vocab 256, hidden 256, intermediate 688,
4 layers, 4 heads) as Titans MAC / MAG / MAL / LMM (window / segment 64, memory chunk 64), as Transformers'
``LlamaForCausalLM`` and, when ``titans-pytorch`` is importable, as its ``MemoryAsContextTransformer`` at a matched
size. All models live in one process; every round runs one step of each, in turn, so drift on a shared machine hits
them alike; tokens/s is ``batch * seq`` over the median step time after ``--warmup`` steps. Ratios ("x Llama",
"x t-pt") are the median over rounds of the ratio of step times within each round. Peak memory: median over ``--memory-runs`` fresh subprocesses of the
peak RSS growth of one training step (model, optimizer and batch built first; the step's growth includes the
gradients, the AdamW state created by the first step and the activations).

At lengths >= ``--long-from`` (8192) only ``--long-variants`` (MAG, MAL, LMM) and Llama run (MAC too if listed);
titans-pytorch runs up to ``--tp-max-length``. Saves ``results/train_speed.json`` and ``results/train_speed.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed_common import (  # noqa: E402
    LABELS,
    LLAMA,
    RESULTS,
    TITANS_PYTORCH,
    VARIANTS,
    attention_implementation,
    build_model,
    count_parameters,
    environment,
    fmt,
    format_table,
    markdown_table,
    median,
    memory_parameters,
    peak_rss_bytes,
    pyplot,
    reset_peak_rss,
    rss_bytes,
    setup_threads,
    titans_pytorch_available,
)

BATCH = 2


class Trainer:
    """One model, its AdamW optimizer and a fixed random batch per length; :meth:`step` runs one training step."""

    def __init__(self, name: str, lr: float = 1e-4):
        self.name = name
        self.model = build_model(name).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=0.1)
        self.batches: dict[int, torch.Tensor] = {}

    def batch(self, length: int) -> torch.Tensor:
        if length not in self.batches:
            generator = torch.Generator().manual_seed(length)
            # titans-pytorch's ``return_loss`` predicts x[1:] from x[:-1]: give it one more token, so that every model
            # reads ``length`` tokens.
            extra = 1 if self.name == TITANS_PYTORCH else 0
            self.batches[length] = torch.randint(0, 256, (BATCH, length + extra), generator=generator)
        return self.batches[length]

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        if self.name == TITANS_PYTORCH:
            return self.model(ids, return_loss=True)
        return self.model(input_ids=ids, labels=ids).loss

    def step(self, length: int) -> float:
        """One training step on ``BATCH x length`` tokens; returns its wall time in seconds."""
        ids = self.batch(length)
        start = time.perf_counter()
        loss = self.loss(ids)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        if not torch.isfinite(loss):
            raise RuntimeError(f"{self.name}: non-finite loss {loss.item()} at seq {length}")
        return elapsed


def models_at(length: int, args: argparse.Namespace, with_tp: bool) -> list[str]:
    """The models measured at ``length`` (see ``--long-from``, ``--long-variants``, ``--tp-max-length``)."""
    long = length >= args.long_from
    names = [v for v in args.variants if not long or v in args.long_variants]
    if args.llama:
        names.append(LLAMA)
    if with_tp and length <= args.tp_max_length:
        names.append(TITANS_PYTORCH)
    return names


def measure_speed(trainers: dict[str, Trainer], length: int, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Step times of every trainer at ``length``: ``warmup`` untimed steps each, then ``repeats`` interleaved rounds."""
    for trainer in trainers.values():
        for _ in range(warmup):
            trainer.step(length)
    times: dict[str, list[float]] = {name: [] for name in trainers}
    for r in range(repeats):
        for name, trainer in trainers.items():
            times[name].append(trainer.step(length))
        summary = "  ".join(f"{n} {BATCH * length / t[-1]:,.0f}" for n, t in times.items())
        print(f"    round {r + 1}/{repeats} tok/s: {summary}", flush=True)
    return times


def peak_memory_child(name: str, length: int) -> None:
    """Runs in a fresh subprocess: prints the peak RSS growth (bytes) of one training step."""
    trainer = Trainer(name)
    trainer.batch(length)
    reset_peak_rss()
    before = rss_bytes()
    trainer.step(length)
    print(max(0, peak_rss_bytes() - before))


def peak_memory(name: str, length: int, runs: int, threads: int) -> float:
    """Median over ``runs`` fresh subprocesses of the peak RSS growth (bytes) of one training step."""
    peaks = []
    for _ in range(runs):
        out = subprocess.run(
            [sys.executable, __file__, "--child", name, str(length), "--threads", str(threads)],
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode != 0:
            print(f"    peak memory of {name} at seq {length} failed:\n{out.stderr[-2000:]}")
            return float("nan")
        peaks.append(int(out.stdout.strip().splitlines()[-1]))
    return median(peaks)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke test: seq 256, 1 warm-up + 2 steps, 1 memory run")
    parser.add_argument(
        "--lengths", type=int, nargs="+", default=[1024, 4096, 8192], help="sequence lengths (default: 1024 4096 8192)"
    )
    parser.add_argument(
        "--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, help="Titans variants (default: all four)"
    )
    parser.add_argument("--no-llama", dest="llama", action="store_false", help="leave out the Llama baseline")
    parser.add_argument("--no-titans-pytorch", dest="tp", action="store_false", help="leave out titans-pytorch")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per model and length (default: 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per length; median reported (default: 3)")
    parser.add_argument(
        "--memory-runs", type=int, default=3, help="fresh subprocesses per peak-memory value; 0 skips (default: 3)"
    )
    parser.add_argument(
        "--long-from", type=int, default=8192, help="lengths from here on run only --long-variants (default: 8192)"
    )
    parser.add_argument(
        "--long-variants",
        nargs="*",
        default=["mag", "mal", "lmm"],
        choices=VARIANTS,
        help="Titans variants run at the long lengths (default: mag mal lmm; add mac if time allows)",
    )
    parser.add_argument(
        "--tp-max-length", type=int, default=4096, help="longest length for titans-pytorch (default: 4096)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="intra-op threads (default: 2, the protocol; on an overloaded machine "
        "1 thread avoids waiting at every op for a descheduled second thread)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON and PNG (default: results/)")
    parser.add_argument(
        "--from-json", type=Path, help="re-print the table, targets and plot of a saved run (no measurement)"
    )
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.lengths, args.warmup, args.repeats, args.memory_runs = [256], 1, 2, 1
    return args


def main() -> None:
    args = parse_args()
    if args.child:
        setup_threads(args.threads)
        peak_memory_child(args.child[0], int(args.child[1]))
        return
    if args.from_json:
        report(json.loads(args.from_json.read_text()), args.from_json.with_suffix(""))
        return
    setup_threads(args.threads)
    started = time.perf_counter()
    env = environment()
    with_tp = args.tp and titans_pytorch_available()
    if args.tp and not with_tp:
        print("titans-pytorch is not installed (pip install -e .[bench]): measuring without it.\n")

    names = list(dict.fromkeys(n for length in args.lengths for n in models_at(length, args, with_tp)))
    trainers = {name: Trainer(name) for name in names}
    info = {}
    for name, trainer in trainers.items():
        info[name] = {
            "parameters": count_parameters(trainer.model),
            "memory_parameters": memory_parameters(trainer.model),
            "attention": attention_implementation(trainer.model),
        }
    print("Parameters (tied embeddings counted once; Titans includes its neural-memory parameters):")
    for name, item in info.items():
        extra = f" (of which memory {item['memory_parameters'] / 1e6:.2f} M)" if item["memory_parameters"] else ""
        print(f"  {LABELS[name]:<20} {item['parameters'] / 1e6:6.2f} M{extra}   attention: {item['attention']}")
    print()

    rows = []
    for length in args.lengths:
        here = {name: trainers[name] for name in models_at(length, args, with_tp)}
        print(f"seq {length}: {', '.join(here)}", flush=True)
        times = measure_speed(here, length, args.warmup, args.repeats)
        for trainer in here.values():
            trainer.batches.pop(length, None)
        peaks = {}
        if args.memory_runs:
            for name in here:
                peaks[name] = peak_memory(name, length, args.memory_runs, args.threads)
        for name, step_times in times.items():
            rows.append(
                {
                    "model": name,
                    "seq": length,
                    "tokens_per_s": BATCH * length / median(step_times),
                    "step_s": step_times,
                    "peak_mb": peaks.get(name, float("nan")) / 2**20,
                }
            )
    result = {
        "benchmark": "train_speed",
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "batch": BATCH,
        "dtype": "float32",
        "protocol": {
            "warmup": args.warmup,
            "repeats": args.repeats,
            "memory_runs": args.memory_runs,
            "interleaved": True,
        },
        "environment": {**env, "load_average_end": os.getloadavg()},
        "models": info,
        "rows": rows,
        "wall_s": time.perf_counter() - started,
    }
    stem = "train_speed_quick" if args.quick else "train_speed"
    report(result, args.out / stem)


def report(result: dict, stem: Path) -> None:
    """Prints the table and the targets of a run, and writes ``stem.json`` and ``stem.png``."""
    rows, info, env = result["rows"], result["models"], result["environment"]
    add_ratios(rows)
    header = ["model", "seq", "params (M)", "tok/s", "x Llama", "x t-pt", "peak MB"]
    table_rows = [
        [
            LABELS[r["model"]],
            str(r["seq"]),
            f"{info[r['model']]['parameters'] / 1e6:.2f}",
            fmt(r["tokens_per_s"]),
            fmt(r["x_llama"], 2, "x"),
            fmt(r["x_titans_pytorch"], 2, "x"),
            fmt(r["peak_mb"]),
        ]
        for r in rows
    ]
    print()
    print(f"Training step (fwd + bwd + AdamW), batch {result['batch']}, float32, {env['threads']} threads:")
    print(format_table(header, table_rows))
    result["targets"] = check_targets(rows)
    if result["targets"]:
        print("\nTargets (issue #3):")
        for item in result["targets"]:
            print(f"  [{'met' if item['met'] else 'MISSED'}] {item['target']}: {item['detail']}")
    print(
        f"\n1-min load average at start {env['load_average_start'][0]:.2f}, at end {env['load_average_end'][0]:.2f} "
        f"({env['cpu_count']} CPUs); {result['wall_s']:.0f} s"
    )
    result["markdown"] = markdown_table(header, table_rows)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot(rows, stem.with_suffix(".png"))
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.png')}")


def paired_ratio(baseline_times: list[float], times: list[float]) -> float:
    """Median over rounds of ``baseline step time / step time`` (> 1: faster than the baseline), round by round."""
    return median([b / t for b, t in zip(baseline_times, times)])


def add_ratios(rows: list[dict]) -> None:
    """``x_llama`` and ``x_titans_pytorch`` of every row: the median of the ratios within each round (the models are
    interleaved in a round, so this cancels most of the drift of a shared machine)."""
    for row in rows:
        same = {r["model"]: r["step_s"] for r in rows if r["seq"] == row["seq"]}
        for key, baseline in (("x_llama", LLAMA), ("x_titans_pytorch", TITANS_PYTORCH)):
            if baseline in same:
                row[f"{key}_rounds"] = [b / t for b, t in zip(same[baseline], row["step_s"])]
        row["x_llama"] = paired_ratio(same[LLAMA], row["step_s"]) if LLAMA in same else None
        row["x_titans_pytorch"] = paired_ratio(same[TITANS_PYTORCH], row["step_s"]) if TITANS_PYTORCH in same else None


def check_targets(rows: list[dict]) -> list[dict]:
    """Issue #3's targets, on the lengths where both sides were measured."""
    out = []
    by = {(r["model"], r["seq"]): r for r in rows}
    for (model, seq), row in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if model in VARIANTS and row["x_titans_pytorch"] is not None:
            ratio = row["x_titans_pytorch"]
            out.append(
                {
                    "target": f"{LABELS[model]} >= 1.5x titans-pytorch MAC at seq {seq}",
                    "met": ratio >= 1.5,
                    "detail": f"{ratio:.3f}x",
                }
            )
    for (model, seq), row in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if model in ("mag", "mal", "lmm") and seq >= 8192 and row["x_llama"] is not None:
            ratio = row["x_llama"]
            out.append(
                {
                    "target": f"{LABELS[model]} faster than Llama at seq {seq}",
                    "met": ratio > 1.0,
                    "detail": f"{ratio:.3f}x",
                }
            )
    return out


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, (speed_ax, memory_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = sorted((r for r in rows if r["model"] == model), key=lambda r: r["seq"])
        style = dict(marker="o", linestyle="--" if model in (LLAMA, TITANS_PYTORCH) else "-", label=LABELS[model])
        speed_ax.plot([r["seq"] for r in mine], [r["tokens_per_s"] for r in mine], **style)
        memory_ax.plot([r["seq"] for r in mine], [r["peak_mb"] for r in mine], **style)
    for ax, label in ((speed_ax, "tokens / s"), (memory_ax, "peak RSS growth of one step (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    speed_ax.set_title(f"Training step (fwd+bwd+AdamW), batch {BATCH}, {torch.get_num_threads()} threads")
    memory_ax.set_title("Peak memory of one training step")
    speed_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
