"""Greedy decoding speed and cache size after long prompts: every Titans variant beside Llama (and titans-pytorch's
MAC cached sampler when installed).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/decode_speed.py             # prompts of 1K, 4K, 16K (about 15 min)
    python benchmarks/decode_speed.py --quick                             # prompts of 128 and 512, 16 new tokens
    python benchmarks/decode_speed.py --lengths 1024 4096 --variants mag  # a subset

Issue #4. Batch 1, float32, 2 threads, the small shape of ``speed_common.py`` (vocab 256, hidden 256, 4 layers, 4
heads; Titans window / segment 64, memory chunk 64). For each prompt length and model:

- **prefill**: one forward pass over the random prompt with an empty cache (``use_cache=True, logits_to_keep=1``);
- **cache**: the bytes the cache holds after the prompt - ``TitansCache.nbytes`` for Titans, the sum of the key and
  value tensors of every layer of Llama's default ``DynamicCache``;
- **decode**: ``--new-tokens`` (128) greedy steps from that cache, each a forward pass of the last token
  (``model(input_ids=token, cache=cache)``) and an ``argmax``; tokens/s = steps / their total time.

Both Transformers models run the same hand-written loop: it is ``generate(do_sample=False)`` without its per-step
bookkeeping (logits processors, stopping criteria, mask growth), which would add the same overhead to every model;
the script checks on a short prompt that the loop yields the same tokens as ``generate``. titans-pytorch runs its own
cached sampler, ``MemoryAsContextTransformer.sample(prompt, len + 1 + new_tokens, use_cache=True)``, made greedy by a
``filter_fn`` that keeps only the top logit and records when each token's logits arrive: prefill = time to the first
token, decode = time from the first to the last of the ``new_tokens + 1`` tokens over ``new_tokens``.

Every round runs each model once, in turn (interleaved, so drift on a shared machine hits them alike); speeds are
medians over ``--repeats`` rounds, ratios ("x Llama", "x t-pt") the median of the ratios within each round. Saves ``results/decode_speed.json`` and ``results/decode_speed.png``.
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
    pyplot,
    setup_threads,
    titans_pytorch_available,
)


def cache_nbytes(cache) -> int:
    """Bytes held by a cache: ``TitansCache.nbytes``, or the keys and values of every layer of a Transformers cache."""
    if hasattr(cache, "nbytes"):
        return int(cache.nbytes)
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


@torch.inference_mode()
def hf_decode(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> dict:
    """Prefill ``prompt`` (1, L), then ``new_tokens`` greedy single-token steps from the cache."""
    start = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    prefill = time.perf_counter() - start
    cache = out.cache
    cache_bytes = cache_nbytes(cache)
    tokens = [token]
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=token, cache=cache, use_cache=True)
        cache = out.cache
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token)
    decode = time.perf_counter() - start
    return {
        "prefill_s": prefill,
        "decode_s": decode,
        "cache_bytes": cache_bytes,
        "cache_bytes_end": cache_nbytes(cache),
        "cache_type": type(cache).__name__,
        "tokens": torch.cat(tokens, dim=1),
    }


def tp_decode(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> dict:
    """titans-pytorch's cached sampler, greedy, with the arrival time of every token's logits."""
    stamps: list[float] = []

    def greedy(logits: torch.Tensor, **_) -> torch.Tensor:
        stamps.append(time.perf_counter())
        top = logits.argmax(dim=-1, keepdim=True)
        return torch.full_like(logits, float("-inf")).scatter(-1, top, logits.gather(-1, top))

    start = time.perf_counter()
    tokens = model.sample(
        prompt,
        prompt.shape[1] + 1 + new_tokens,
        filter_fn=greedy,
        filter_kwargs={},
        show_progress=False,
        use_cache=True,
    )
    return {
        "prefill_s": stamps[0] - start,
        "decode_s": stamps[-1] - stamps[0],
        "cache_bytes": None,
        "cache_bytes_end": None,
        "cache_type": "titans-pytorch tuple",
        "tokens": tokens,
    }


def decode(name: str, model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> dict:
    run = tp_decode if name == TITANS_PYTORCH else hf_decode
    return run(model, prompt, new_tokens)


@torch.inference_mode()
def check_against_generate(name: str, model: torch.nn.Module, length: int = 100, new_tokens: int = 12) -> bool:
    """The hand loop's tokens equal ``generate(do_sample=False)``'s on a short prompt."""
    prompt = torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(1))
    mine = hf_decode(model, prompt, new_tokens - 1)["tokens"]
    theirs = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=0,
    )[:, length:]
    return bool(torch.equal(mine, theirs))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke test: prompts 128 and 512, 16 new tokens, 1 round")
    parser.add_argument(
        "--lengths", type=int, nargs="+", default=[1024, 4096, 16384], help="prompt lengths (default: 1024 4096 16384)"
    )
    parser.add_argument(
        "--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, help="Titans variants (default: all four)"
    )
    parser.add_argument("--no-llama", dest="llama", action="store_false", help="leave out the Llama baseline")
    parser.add_argument("--no-titans-pytorch", dest="tp", action="store_false", help="leave out titans-pytorch")
    parser.add_argument(
        "--new-tokens", type=int, default=128, help="greedy decoding steps after the prompt (default: 128)"
    )
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds per length; median (default: 2)")
    parser.add_argument(
        "--tp-max-length", type=int, default=16384, help="longest prompt for titans-pytorch (default: 16384)"
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
    args = parser.parse_args()
    if args.quick:
        args.lengths, args.new_tokens, args.repeats = [128, 512], 16, 1
    return args


def main() -> None:
    args = parse_args()
    if args.from_json:
        report(json.loads(args.from_json.read_text()), args.from_json.with_suffix(""))
        return
    setup_threads(args.threads)
    started = time.perf_counter()
    env = environment()
    with_tp = args.tp and titans_pytorch_available()
    if args.tp and not with_tp:
        print("titans-pytorch is not installed (pip install -e .[bench]): measuring without it.\n")
    names = list(args.variants) + ([LLAMA] if args.llama else []) + ([TITANS_PYTORCH] if with_tp else [])
    models = {name: build_model(name).eval() for name in names}

    info = {}
    print("Parameters (tied embeddings counted once; Titans includes its neural-memory parameters):")
    for name, model in models.items():
        info[name] = {
            "parameters": count_parameters(model),
            "memory_parameters": memory_parameters(model),
            "attention": attention_implementation(model),
        }
        extra = (
            f" (of which memory {info[name]['memory_parameters'] / 1e6:.2f} M)"
            if info[name]["memory_parameters"]
            else ""
        )
        print(
            f"  {LABELS[name]:<20} {info[name]['parameters'] / 1e6:6.2f} M{extra}   attention: {info[name]['attention']}"
        )

    print("\nHand loop == generate(do_sample=False) on a 100-token prompt, 12 new tokens:")
    for name, model in models.items():
        if name != TITANS_PYTORCH:
            info[name]["loop_equals_generate"] = same = check_against_generate(name, model)
            print(f"  {LABELS[name]:<20} {'yes' if same else 'NO - the loop does not measure what generate does'}")

    # Warm-up (first-call allocations, lazy initialisations) on a short prompt.
    warm = torch.randint(0, 256, (1, 128), generator=torch.Generator().manual_seed(2))
    for name, model in models.items():
        decode(name, model, warm, 4)
    print()

    rows = []
    for length in args.lengths:
        prompt = torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(length))
        here = [n for n in names if n != TITANS_PYTORCH or length <= args.tp_max_length]
        runs: dict[str, list[dict]] = {name: [] for name in here}
        for r in range(args.repeats):
            for name in here:
                runs[name].append(decode(name, models[name], prompt, args.new_tokens))
                last = runs[name][-1]
                print(
                    f"  prompt {length:>6} round {r + 1}/{args.repeats} {LABELS[name]:<20} prefill {last['prefill_s']:7.2f} s"
                    f"  decode {args.new_tokens / last['decode_s']:7.1f} tok/s",
                    flush=True,
                )
        for name, items in runs.items():
            decode_s = median([i["decode_s"] for i in items])
            rows.append(
                {
                    "model": name,
                    "prompt": length,
                    "prefill_s": median([i["prefill_s"] for i in items]),
                    "prefill_tokens_per_s": length / median([i["prefill_s"] for i in items]),
                    "decode_tokens_per_s": args.new_tokens / decode_s,
                    "ms_per_token": 1000 * decode_s / args.new_tokens,
                    "decode_s": [i["decode_s"] for i in items],
                    "cache_mb": None if items[0]["cache_bytes"] is None else items[0]["cache_bytes"] / 2**20,
                    "cache_mb_end": None
                    if items[0]["cache_bytes_end"] is None
                    else items[0]["cache_bytes_end"] / 2**20,
                    "cache_type": items[0]["cache_type"],
                }
            )

    result = {
        "benchmark": "decode_speed",
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "batch": 1,
        "dtype": "float32",
        "new_tokens": args.new_tokens,
        "protocol": {"repeats": args.repeats, "interleaved": True, "loop": "hand loop (HF), sample(use_cache) (t-pt)"},
        "environment": {**env, "load_average_end": os.getloadavg()},
        "models": info,
        "rows": rows,
        "wall_s": time.perf_counter() - started,
    }
    stem = "decode_speed_quick" if args.quick else "decode_speed"
    report(result, args.out / stem)


def report(result: dict, stem: Path) -> None:
    """Adds the ratios, prints the table and the targets of a run, and writes ``stem.json`` and ``stem.png``."""
    rows, info, env = result["rows"], result["models"], result["environment"]
    shortest = min(r["prompt"] for r in rows)
    for row in rows:
        same = {r["model"]: r for r in rows if r["prompt"] == row["prompt"]}
        base = next((r for r in rows if r["model"] == row["model"] and r["prompt"] == shortest), None)
        row["growth"] = row["ms_per_token"] / base["ms_per_token"] if base else None
        # Speed ratios: the median over rounds of the ratio within each round (models are interleaved in a round,
        # so this cancels most of the drift of a shared machine).
        for key, baseline in (("x_llama", LLAMA), ("x_titans_pytorch", TITANS_PYTORCH)):
            if baseline in same:
                row[f"{key}_rounds"] = [b / t for b, t in zip(same[baseline]["decode_s"], row["decode_s"])]
        row["x_llama"] = paired_ratio(same[LLAMA]["decode_s"], row["decode_s"]) if LLAMA in same else None
        row["x_titans_pytorch"] = (
            paired_ratio(same[TITANS_PYTORCH]["decode_s"], row["decode_s"]) if TITANS_PYTORCH in same else None
        )

    header = [
        "model",
        "prompt",
        "params (M)",
        "prefill s",
        "decode tok/s",
        "ms/token",
        f"vs {shortest}",
        "x Llama",
        "x t-pt",
        "cache MB",
    ]
    table_rows = [
        [
            LABELS[r["model"]],
            str(r["prompt"]),
            f"{info[r['model']]['parameters'] / 1e6:.2f}",
            fmt(r["prefill_s"], 2),
            fmt(r["decode_tokens_per_s"], 1),
            fmt(r["ms_per_token"], 1),
            fmt(r["growth"], 2, "x"),
            fmt(r["x_llama"], 2, "x"),
            fmt(r["x_titans_pytorch"], 2, "x"),
            fmt(r["cache_mb"], 2),
        ]
        for r in rows
    ]
    print(f"\nGreedy decoding, batch 1, {result['new_tokens']} new tokens, float32, {env['threads']} threads:")
    print(format_table(header, table_rows))
    result["targets"] = check_targets(rows, shortest)
    if result["targets"]:
        print("\nTargets (issue #4):")
        for item in result["targets"]:
            print(f"  [{'met' if item['met'] else 'MISSED'}] {item['target']}: {item['detail']}")
    print(
        f"\n1-min load average at start {env['load_average_start'][0]:.2f}, at end {env['load_average_end'][0]:.2f} "
        f"({env['cpu_count']} CPUs); {result['wall_s']:.0f} s"
    )
    result["markdown"] = markdown_table(header, table_rows)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot(rows, stem.with_suffix(".png"), result["new_tokens"])
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.png')}")


def paired_ratio(baseline_times: list[float], times: list[float]) -> float:
    """Median over rounds of ``baseline time / time`` (> 1: faster than the baseline), round by round."""
    return median([b / t for b, t in zip(baseline_times, times)])


def check_targets(rows: list[dict], shortest: int) -> list[dict]:
    """Issue #4's targets on the measured lengths."""
    out = []
    longest = max(r["prompt"] for r in rows)
    by = {(r["model"], r["prompt"]): r for r in rows}
    for variant in VARIANTS:
        mine = sorted((r for r in rows if r["model"] == variant), key=lambda r: r["prompt"])
        if len(mine) < 2:
            continue
        growth = mine[-1]["ms_per_token"] / mine[0]["ms_per_token"]
        out.append(
            {
                "target": f"{LABELS[variant]} time per token grows <= 1.3x from {shortest} to {longest}",
                "met": growth <= 1.3,
                "detail": f"{growth:.3f}x",
            }
        )
        sizes = {r["cache_mb"] for r in mine} | {r["cache_mb_end"] for r in mine}
        out.append(
            {
                "target": f"{LABELS[variant]} cache size constant",
                "met": len(sizes) == 1,
                "detail": ", ".join(f"{s:.3f} MB" for s in sorted(sizes)),
            }
        )
        if (LLAMA, longest) in by and (variant, longest) in by:
            ratio = by[(variant, longest)]["x_llama"]
            out.append(
                {
                    "target": f"{LABELS[variant]} decodes faster than Llama at {longest}",
                    "met": ratio > 1.0,
                    "detail": f"{ratio:.3f}x",
                }
            )
        for r in mine:
            if (TITANS_PYTORCH, r["prompt"]) in by:
                ratio = r["x_titans_pytorch"]
                out.append(
                    {
                        "target": f"{LABELS[variant]} >= 5x titans-pytorch's cached sampler at {r['prompt']}",
                        "met": ratio >= 5.0,
                        "detail": f"{ratio:.3f}x",
                    }
                )
    return out


def plot(rows: list[dict], path: Path, new_tokens: int) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, (speed_ax, cache_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = sorted((r for r in rows if r["model"] == model), key=lambda r: r["prompt"])
        style = dict(marker="o", linestyle="--" if model in (LLAMA, TITANS_PYTORCH) else "-", label=LABELS[model])
        speed_ax.plot([r["prompt"] for r in mine], [r["decode_tokens_per_s"] for r in mine], **style)
        if mine[0]["cache_mb"] is not None:
            cache_ax.plot([r["prompt"] for r in mine], [r["cache_mb"] for r in mine], **style)
    speed_ax.set_ylabel(f"decode tokens / s ({new_tokens} greedy steps)")
    speed_ax.set_title(f"Greedy decoding after the prompt, batch 1, {torch.get_num_threads()} threads")
    cache_ax.set_ylabel("cache after the prompt (MB)")
    cache_ax.set_yscale("log")
    cache_ax.set_title("Cache size")
    for ax in (speed_ax, cache_ax):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt length")
        ax.grid(alpha=0.3)
    speed_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
