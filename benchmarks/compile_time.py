"""What ``torch.compile`` costs against sequence length and depth (issue #26): the first call's compile time and the
steady step time, for training (forward and backward of the language-modelling loss) and decoding (one cached token
after an eager prompt).

Every measurement runs in a fresh process with the compile caches off (dynamo's in memory; inductor's FX graph and
AOTAutograd caches on disk), so each first call compiles from scratch:

- ``compile s``: the first compiled call's seconds minus a steady step's (what compiling cost);
- ``step s``: the median of the following steps; ``eager s``: the same step uncompiled, in the same process;
- ``graphs``: the graphs dynamo captured (a layer compiled once serves every layer: 1);
- ``2x``: then a call at twice the tokens (decoding: a step after a prompt twice as long): its seconds (dynamo's
  automatic dynamic shapes compile once more, with the length symbolic, where a shape changed), and whether a call at
  three times the tokens compiled again (it should not).

The model is the issue's tiny MAG (hidden 64, 4 heads, 4 memory heads, memory chunk 16, window 64, byte vocabulary),
compiled per decoder layer (regional compilation, ``--whole``: the whole model), ``fullgraph=True``, ``dynamic`` left to
dynamo (static first, dynamic where a shape changes).
``--preset 170m`` measures ``examples/configs/titans-170m-mag.json`` instead (training, 4K tokens by default).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/compile_time.py                              # the grid below
    OMP_WAIT_POLICY=PASSIVE python benchmarks/compile_time.py --preset 170m --tokens 4096 --layers 12 --modes train
    python benchmarks/compile_time.py --quick                                            # smoke run (< 1 minute)

Default grid: backends aot_eager and inductor; training and decoding; (tokens, layers) in (1K, 2), (4K, 2), (16K, 2),
(1K, 12). Writes ``results/compile_time.json`` and ``results/compile_time.png``.
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

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TINY = dict(
    variant="mag",
    vocab_size=256,
    hidden_size=64,
    intermediate_size=172,
    num_attention_heads=4,
    memory_num_heads=4,
    memory_chunk_size=16,
    sliding_window=64,
    segment_size=64,
    bos_token_id=None,
    eos_token_id=None,
)
GRID = [(1024, 2), (4096, 2), (16384, 2), (1024, 12)]
QUICK_GRID = [(64, 1), (128, 1)]
NO_CACHES = {"TORCHINDUCTOR_FX_GRAPH_CACHE": "0", "TORCHINDUCTOR_AUTOGRAD_CACHE": "0", "OMP_WAIT_POLICY": "PASSIVE"}


def build(preset: str | None, layers: int):
    import torch

    from titans_hf import TitansConfig, TitansForCausalLM

    torch.manual_seed(0)
    if preset is None:
        config = TitansConfig(**TINY, num_hidden_layers=layers)
    else:
        path = HERE.parent / "examples" / "configs" / f"titans-{preset}-mag.json"
        config = TitansConfig.from_dict(dict(json.loads(path.read_text()), num_hidden_layers=layers))
    return TitansForCausalLM(config)


def measure(
    backend: str, mode: str, tokens: int, layers: int, whole: bool, preset: str | None, steps: int, longer: bool
) -> dict:
    """One measurement, in this process (see the module docstring)."""
    import torch
    from torch._dynamo.utils import counters

    torch.set_num_threads(2)
    model = build(preset, layers)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, 3 * tokens + 1), generator=torch.Generator().manual_seed(0))
    if mode == "train":
        model.train()

        def step(module, length):
            module.zero_grad(set_to_none=True)
            x = ids[:, :length]
            module(input_ids=x, labels=x, use_cache=False).loss.backward()

    else:
        model.eval()
        with torch.no_grad():
            prompts = {n: model(input_ids=ids[:, :n], use_cache=True).cache for n in (tokens, 2 * tokens, 3 * tokens)}

        def step(module, length):
            with torch.no_grad():
                cache = prompts[length].copy()
                module(input_ids=ids[:, length : length + 1], cache=cache)

    def timed(run) -> float:
        start = time.perf_counter()
        run()
        return time.perf_counter() - start

    timed(lambda: step(model, tokens))  # eager warm-up
    eager = statistics.median(timed(lambda: step(model, tokens)) for _ in range(steps))
    kwargs = dict(backend=backend, fullgraph=True)
    if whole:
        compiled = torch.compile(model, **kwargs)
    else:  # regional: every decoder layer compiled; one graph serves them all
        for layer in model.model.layers:
            layer.compile(**kwargs)
        compiled = model
    counters.clear()
    first = timed(lambda: step(compiled, tokens))
    times = [timed(lambda: step(compiled, tokens)) for _ in range(steps)]
    graphs = counters["stats"]["unique_graphs"]
    twice, after_twice = None, graphs
    if longer:
        twice = timed(lambda: step(compiled, 2 * tokens))
        after_twice = counters["stats"]["unique_graphs"]
        timed(lambda: step(compiled, 3 * tokens))
    step_s = statistics.median(times)
    return {
        "backend": backend,
        "mode": mode,
        "tokens": tokens,
        "layers": layers,
        "whole": whole,
        "preset": preset,
        "first_s": first,
        "compile_s": first - step_s,
        "step_s": step_s,
        "eager_s": eager,
        "graphs": graphs,
        "twice_s": twice,
        "twice_recompiled": after_twice > graphs if longer else None,
        "thrice_recompiled": counters["stats"]["unique_graphs"] > after_twice if longer else None,
    }


def in_subprocess(**job) -> dict:
    command = [sys.executable, __file__, "--worker", json.dumps(job)]
    env = dict(os.environ, **NO_CACHES)
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        return dict(job, error=(done.stderr or done.stdout).strip().splitlines()[-1][:300])
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    header = "| backend | mode | tokens | layers | compile s | step s | eager s | graphs | 2x: s (compiled again) | 3x: compiles again |"
    lines = [header, "|" + "---|" * 10]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['backend']} | {r['mode']} | {r['tokens']} | {r['layers']} | failed: {r['error']} |")
            continue
        lines.append(
            f"| {r['backend']} | {r['mode']} | {r['tokens']} | {r['layers']} | {r['compile_s']:.1f} | {r['step_s']:.3f} "
            f"| {r['eager_s']:.3f} | {r['graphs']} | {_longer(r)} |"
        )
    return "\n".join(lines)


def _longer(row: dict) -> str:
    """The two cells of the longer calls (``-`` when not measured)."""
    if row["twice_s"] is None:
        return "- | -"
    twice = f"{row['twice_s']:.1f} ({'yes' if row['twice_recompiled'] else 'no'})"
    return f"{twice} | {'yes' if row['thrice_recompiled'] else 'no'}"


def ratios(rows: list[dict]) -> list[str]:
    """The targets: compile time at the most tokens over the fewest (<= 1.3x), at the most layers over the fewest at
    the same tokens (<= 2x), per backend and mode."""
    out = []
    ok = [r for r in rows if "error" not in r]
    for backend in sorted({r["backend"] for r in ok}):
        for mode in sorted({r["mode"] for r in ok}):
            mine = [r for r in ok if r["backend"] == backend and r["mode"] == mode]
            shallow = sorted(
                (r for r in mine if r["layers"] == min(x["layers"] for x in mine)), key=lambda r: r["tokens"]
            )
            if len(shallow) >= 2:
                ratio = shallow[-1]["compile_s"] / shallow[0]["compile_s"]
                out.append(
                    f"- {backend} {mode}: compile at {shallow[-1]['tokens']} tokens / at {shallow[0]['tokens']}: "
                    f"{ratio:.2f}x (target <= 1.3x: {'met' if ratio <= 1.3 else 'MISSED'})"
                )
            deep = [r for r in mine if r["layers"] > shallow[0]["layers"] and r["tokens"] == shallow[0]["tokens"]]
            for r in deep:
                ratio = r["compile_s"] / shallow[0]["compile_s"]
                out.append(
                    f"- {backend} {mode}: compile with {r['layers']} layers / {shallow[0]['layers']}: {ratio:.2f}x "
                    f"(target <= 2x: {'met' if ratio <= 2 else 'MISSED'})"
                )
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ok = [r for r in rows if "error" not in r and r["layers"] == min(x["layers"] for x in rows if "error" not in x)]
    for key in sorted({(r["backend"], r["mode"]) for r in ok}):
        mine = sorted((r for r in ok if (r["backend"], r["mode"]) == key), key=lambda r: r["tokens"])
        ax.plot([r["tokens"] for r in mine], [r["compile_s"] for r in mine], marker="o", label=" ".join(key))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens")
    ax.set_ylabel("compile time (s)")
    ax.set_title("torch.compile of a Titans MAG: compile time vs length")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--backends", nargs="+", default=["aot_eager", "inductor"])
    p.add_argument("--modes", nargs="+", default=["train", "decode"], choices=["train", "decode"])
    p.add_argument("--tokens", type=int, nargs="+", default=None, help="with --layers: one point per combination")
    p.add_argument("--layers", type=int, nargs="+", default=None)
    p.add_argument("--preset", default=None, help="a preset of examples/configs, e.g. 170m (MAG)")
    p.add_argument("--whole", action="store_true", help="compile the whole model instead of each layer")
    p.add_argument("--steps", type=int, default=3, help="steady steps timed after the first")
    p.add_argument("--no-longer", action="store_true", help="skip the calls at 2x and 3x the tokens")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--tag", default="compile_time")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(**json.loads(args.worker))))
        return []
    if args.tokens or args.layers:
        grid = [(t, n) for t in (args.tokens or [1024]) for n in (args.layers or [2])]
    else:
        grid = QUICK_GRID if args.quick else GRID
    backends = ["aot_eager"] if args.quick else args.backends
    rows = []
    for backend in backends:
        for mode in args.modes:
            for tokens, layers in grid:
                job = dict(backend=backend, mode=mode, tokens=tokens, layers=layers, whole=args.whole)
                steps = 1 if args.quick else args.steps
                rows.append(in_subprocess(**job, preset=args.preset, steps=steps, longer=not args.no_longer))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    print("\n" + table(rows) + "\n")
    lines = ratios(rows)
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.tag}.json").write_text(
        json.dumps({"argv": sys.argv[1:], "rows": rows, "verdict": lines}, indent=2)
    )
    if any("error" not in r for r in rows):
        plot(rows, args.out / f"{args.tag}.png")
    return rows


if __name__ == "__main__":
    main()
