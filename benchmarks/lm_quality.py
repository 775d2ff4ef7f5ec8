"""Byte-level language modelling and length extrapolation: Titans (MAC, MAG, MAL, LMM) against Transformers' Llama
(full attention) and Mistral (the same sliding window, attention alone), at one parameter budget, trained alike.

Training: random crops of ``--seq-len`` bytes from the training documents (default
``../shared/data/python-docs/train.jsonl``), the same batches in the same order for every model of a seed; AdamW,
warm-up then cosine decay. The loss curves are reported in bits per byte.

Evaluation (validation documents, default the validation split): spans of ``16 x seq_len`` bytes, each scored three
ways on exactly the same bytes:

- ``1x``: cut into 16 windows of the training length, each read from scratch (the usual validation bits per byte);
- ``4x``: cut into 4 windows of 4 x the training length;
- ``16x``: read as one window of 16 x the training length.

A model that uses (or at least tolerates) longer context gets the same or fewer bits per byte at 4x and 16x; a
model that breaks beyond its training length gets more. Titans models read the long windows with ``TitansCache``,
block by block (exact, constant memory); the baselines read them in one forward pass.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/lm_quality.py       # full mode (< 1 hour on 2 idle cores)
    python benchmarks/lm_quality.py --quick                       # smoke run (< 1 minute), prints the tables

Writes ``results/lm_quality.json``, ``results/lm_quality_curves.png`` and ``results/lm_quality_extrapolation.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    ALL_MODELS,
    BASELINES,
    COLORS,
    LABELS,
    RESULTS,
    TITANS_VARIANTS,
    Dims,
    TrainSettings,
    build_model,
    count_parameters,
    fmt_spread,
    format_table,
    machine,
    matched_intermediate_sizes,
    parameter_table,
    parse_assignments,
    pyplot,
    read_texts,
    save_json,
    setup,
    spread,
    today,
    torch,
    train,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "python-docs"
LN2 = math.log(2.0)
MULTIPLES = (1, 4, 16)


# --------------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------------


class Crops:
    """Random training crops of ``length + 1`` bytes (documents chosen in proportion to their length)."""

    def __init__(self, docs: list[bytes], length: int):
        self.docs = [torch.tensor(list(d), dtype=torch.long) for d in docs if len(d) > length + 1]
        if not self.docs:
            raise ValueError(f"no training document is longer than {length + 1} bytes")
        self.length = length
        weights = torch.tensor([len(d) - length for d in self.docs], dtype=torch.float)
        self.weights = weights / weights.sum()

    def batch(self, generator: torch.Generator, size: int) -> torch.Tensor:
        picks = torch.multinomial(self.weights, size, replacement=True, generator=generator)
        rows = []
        for i in picks.tolist():
            doc = self.docs[i]
            start = int(torch.randint(len(doc) - self.length, (1,), generator=generator))
            rows.append(doc[start : start + self.length])
        return torch.stack(rows)


def eval_spans(docs: list[bytes], span: int, count: int) -> torch.Tensor:
    """Up to ``count`` non-overlapping spans of ``span`` bytes, taken round-robin over the documents long enough
    (the first span of every document, then the second, ...), so that many documents are represented."""
    per_doc = [[d[i : i + span] for i in range(0, len(d) - span + 1, span)] for d in docs]
    spans, depth = [], 0
    while len(spans) < count and any(depth < len(p) for p in per_doc):
        spans.extend(p[depth] for p in per_doc if depth < len(p))
        depth += 1
    if not spans:
        raise ValueError(f"no validation document has {span} bytes (16 x seq_len); lower --seq-len")
    return torch.tensor([list(s) for s in spans[:count]], dtype=torch.long)


# --------------------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def window_nll(model, windows: torch.Tensor, kind: str, block: int, batch: int) -> tuple[float, int]:
    """Summed next-byte negative log-likelihood (nats) over ``windows`` (n, L), each read from its start, and the
    number of predicted bytes. Titans reads windows longer than ``block`` through ``TitansCache``, block by block."""
    model.eval()
    total, count = 0.0, 0
    for rows in windows.split(batch):
        if kind in TITANS_VARIANTS and rows.shape[1] > block:
            from titans_hf import TitansCache

            cache = TitansCache(model.config)
            logits = []
            for piece in rows.split(block, dim=1):
                out = model(input_ids=piece, cache=cache, use_cache=True)
                logits.append(out.logits)
            logits = torch.cat(logits, dim=1)
        else:
            logits = model(input_ids=rows).logits
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), rows[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(nll)
        count += rows[:, 1:].numel()
    return total, count


def extrapolation(model, spans: torch.Tensor, kind: str, seq_len: int, batch: int) -> dict[str, float]:
    """Bits per byte on the same spans read as windows of 1x, 4x and 16x the training length.

    Every multiple scores the same bytes except the first of each window (which has no prediction); to compare like
    with like, each is reported over its own predicted bytes (a difference of at most 15 bytes in 16 x seq_len)."""
    out = {}
    for multiple in MULTIPLES:
        length = multiple * seq_len
        windows = spans.reshape(-1, length)
        rows_per_batch = max(1, batch * seq_len // length)
        nll, count = window_nll(model, windows, kind, block=seq_len, batch=rows_per_batch)
        out[f"{multiple}x"] = nll / count / LN2
    return out


# --------------------------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------------------------


def trained(result: dict) -> dict[str, list[dict]]:
    """The runs of every model that did not diverge (models with none left out)."""
    runs = {name: [r for r in model_runs if "diverged" not in r] for name, model_runs in result["runs"].items()}
    return {name: model_runs for name, model_runs in runs.items() if model_runs}


def summarize(result: dict) -> tuple[str, str, list[str]]:
    """The tables and verdicts, over the runs that trained (a diverged run is counted in the verdicts' lines)."""
    diverged = {
        name: [r["seed"] for r in model_runs if "diverged" in r] for name, model_runs in result["runs"].items()
    }
    runs = trained(result)
    llama = spread([r["bpb"]["1x"] for r in runs["llama"]]) if "llama" in runs else None
    rows = []
    for name, model_runs in runs.items():
        bpb = spread([r["bpb"]["1x"] for r in model_runs])
        rel = f"{100 * (bpb['mean'] / llama['mean'] - 1):+.2f}%" if llama else "-"
        rows.append(
            [
                LABELS[name],
                f"{model_runs[0]['parameters']:,}",
                fmt_spread(bpb, 4),
                rel,
                fmt_spread(spread([r["final_train_bpb"] for r in model_runs]), 4),
                f"{spread([r['train_seconds'] for r in model_runs])['mean']:.0f}",
            ]
        )
    quality = format_table(
        ["model", "parameters", "val bits/byte (1x)", "vs Llama", "final train bits/byte", "train s"], rows
    )
    rows = []
    for name, model_runs in runs.items():
        base = spread([r["bpb"]["1x"] for r in model_runs])["mean"]
        row = [LABELS[name]]
        for m in MULTIPLES:
            s = spread([r["bpb"][f"{m}x"] for r in model_runs])
            row.append(fmt_spread(s, 4) + ("" if m == 1 else f" ({100 * (s['mean'] / base - 1):+.1f}%)"))
        rows.append(row)
    extra = format_table(["model"] + [f"{m}x ({m * result['seq_len']} bytes)" for m in MULTIPLES], rows)

    verdict = []
    if llama:
        for name in TITANS_VARIANTS:
            if name in runs:
                mean = spread([r["bpb"]["1x"] for r in runs[name]])["mean"]
                rel = mean / llama["mean"] - 1
                status = "met" if rel <= 0.02 else "MISSED"
                better = ""
                if name in ("mag", "mac"):
                    better = "; better than Llama: " + ("yes" if rel < 0 else "NO")
                verdict.append(f"- {LABELS[name]}: {100 * rel:+.2f}% bits/byte vs Llama (within 2%: {status}){better}")
    for name, seeds in diverged.items():
        if seeds:
            verdict.append(f"- {LABELS[name]}: DIVERGED in seeds {seeds} (left out of the tables)")
    for name, model_runs in runs.items():
        one = spread([r["bpb"]["1x"] for r in model_runs])["mean"]
        sixteen = spread([r["bpb"]["16x"] for r in model_runs])["mean"]
        verdict.append(
            f"- {LABELS[name]}: 16x vs 1x {100 * (sixteen / one - 1):+.1f}% "
            f"({'no degradation' if sixteen <= one * 1.005 else 'degrades'})"
        )
    return quality, extra, verdict


def plot_curves(result: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, model_runs in trained(result).items():
        steps = [s for s, _ in model_runs[0]["curve"]]
        values = [[v / LN2 for _, v in r["curve"]] for r in model_runs]
        mean = [sum(col) / len(col) for col in zip(*values)]
        lo = [min(col) for col in zip(*values)]
        hi = [max(col) for col in zip(*values)]
        style = "--" if name in BASELINES else "-"
        ax.plot(steps, mean, style, color=COLORS[name], label=LABELS[name])
        ax.fill_between(steps, lo, hi, color=COLORS[name], alpha=0.15)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (bits per byte)")
    ax.set_title(f"Byte-level LM, seeds {result['seeds']} (band: min-max)")
    ax.set_ylim(top=min(8.0, ax.get_ylim()[1]))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_extrapolation(result: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, model_runs in trained(result).items():
        means, lo, hi = [], [], []
        for m in MULTIPLES:
            s = spread([r["bpb"][f"{m}x"] for r in model_runs])
            means.append(s["mean"])
            lo.append(s["mean"] - s["min"])
            hi.append(s["max"] - s["mean"])
        style = "--" if name in BASELINES else "-"
        ax.errorbar(
            MULTIPLES, means, yerr=[lo, hi], ls=style, marker="o", capsize=3, color=COLORS[name], label=LABELS[name]
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(MULTIPLES, [f"{m}x\n({m * result['seq_len']})" for m in MULTIPLES])
    ax.set_xlabel("evaluation window (x training length, bytes)")
    ax.set_ylabel("validation bits per byte")
    ax.set_title("Length extrapolation (same bytes scored)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------------

FULL = dict(
    steps=200,  # Titans trains at about 1 step/s here: 8 Titans runs x 200 steps + evaluation fit the hour
    batch=8,
    seq_len=256,
    hidden=128,
    layers=4,
    intermediate=336,
    window=64,
    chunk=16,
    memory_heads=8,
    eval_spans=12,
    seeds=[0, 1],
)
QUICK = dict(
    steps=8,
    batch=4,
    seq_len=64,
    hidden=64,
    layers=2,
    intermediate=128,
    window=16,
    chunk=8,
    memory_heads=4,
    eval_spans=2,
    seeds=[0],
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny models, few steps, one seed")
    p.add_argument("--train", nargs="+", default=[str(DATA / "train.jsonl")], help=".jsonl (text field) or text files")
    p.add_argument("--validation", nargs="+", default=[str(DATA / "validation.jsonl")])
    p.add_argument("--models", default=",".join(ALL_MODELS))
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None, help="training length (bytes)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=None, help="MLP width of the reference (MAG)")
    p.add_argument("--window", type=int, default=None, help="sliding window (MAG, MAL, Mistral) and MAC segment")
    p.add_argument("--chunk", type=int, default=None, help="memory chunk size")
    p.add_argument("--memory-heads", type=int, default=None, help="memory heads (head_dim = hidden / heads)")
    p.add_argument("--memory-max-lr", type=float, default=None, help="memory_max_lr (default: TitansConfig's)")
    p.add_argument("--memory-init", default="", help="NeuralMemory gate-init overrides, e.g. init_lr_fraction=0.5")
    p.add_argument("--eval-spans", type=int, default=None, help="validation spans of 16 x seq_len bytes")
    p.add_argument("--titans-config", default="", help="other TitansConfig fields, e.g. memory_max_weight_rms=none")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--tag", default="lm_quality")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    setup(args.threads)
    start = time.perf_counter()
    lines: list[str] = []

    def log(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    overrides = parse_assignments(args.memory_init)
    dims = Dims(
        vocab_size=256,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        intermediate_size=args.intermediate,
        window=args.window,
        context_length=args.seq_len,
        memory_chunk_size=args.chunk,
        memory_num_heads=args.memory_heads,
        memory_max_lr=args.memory_max_lr,
        memory_overrides=overrides,
        titans_config=parse_assignments(args.titans_config),
        reference="mag" if "mag" in models else models[0],
    )
    settings = TrainSettings(steps=args.steps, lr=args.lr, log_every=max(1, min(10, args.steps // 20)))
    log(f"# Byte-level LM quality and length extrapolation ({'quick' if args.quick else 'full'} mode), {today()}")
    log(f"machine: {machine()}")
    log(f"command: python benchmarks/lm_quality.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    crops = Crops(read_texts(args.train), args.seq_len)
    spans = eval_spans(read_texts(args.validation), 16 * args.seq_len, args.eval_spans)
    log(
        f"train: {len(crops.docs)} documents, {sum(len(d) for d in crops.docs):,} bytes; validation: {len(spans)} spans"
        f" of {16 * args.seq_len} bytes; {args.steps} steps x {args.batch} x {args.seq_len} bytes, seeds {args.seeds}"
    )
    sizes = matched_intermediate_sizes(models, dims)
    log("\n### Parameters (matched on " + dims.reference + ")\n")
    log(parameter_table(sizes, dims))
    log("")
    runs = {m: [] for m in models}
    for seed in args.seeds:
        for name in models:
            model = build_model(name, dims, sizes[name][0], seed)
            generator = torch.Generator().manual_seed(20_000 + seed)  # same batches for every model of a seed

            def batches(step, generator=generator):
                ids = crops.batch(generator, args.batch)
                return ids, ids

            try:
                result = train(model, batches, settings, desc=f"lm {name} seed {seed}")
            except FloatingPointError as error:  # a memory rule that diverges: recorded, not fatal to the others
                runs[name].append({"seed": seed, "diverged": str(error), "parameters": count_parameters(model)})
                log(f"  {LABELS[name]:<14} seed {seed}: DIVERGED ({error})")
                continue
            tail = result["curve"][-max(1, len(result["curve"]) // 10) :]
            eval_start = time.perf_counter()
            bpb = extrapolation(model, spans, name, args.seq_len, args.batch)
            runs[name].append(
                {
                    "seed": seed,
                    "bpb": bpb,
                    "final_train_bpb": sum(v for _, v in tail) / len(tail) / LN2,
                    "curve": result["curve"],
                    "train_seconds": result["seconds"],
                    "eval_seconds": time.perf_counter() - eval_start,
                    "parameters": count_parameters(model),
                }
            )
            log(
                f"  {LABELS[name]:<14} seed {seed}: bits/byte 1x {bpb['1x']:.4f}  4x {bpb['4x']:.4f}  "
                f"16x {bpb['16x']:.4f}  (train {result['seconds']:.0f}s, eval {runs[name][-1]['eval_seconds']:.0f}s)"
            )

    result = {
        "seq_len": args.seq_len,
        "seeds": args.seeds,
        "dims": dataclasses.asdict(dims),
        "train": dataclasses.asdict(settings) | {"batch": args.batch},
        "parameters": {m: {"intermediate_size": i, "parameters": p} for m, (i, p) in sizes.items()},
        "runs": runs,
    }
    quality, extra, verdict = summarize(result)
    log(
        f"\n### Validation bits per byte at the training length ({args.seq_len} bytes), mean ± half-range over seeds "
        f"{args.seeds}\n"
    )
    log(quality)
    log(
        f"\n### Length extrapolation: the same {len(spans)} spans of {16 * args.seq_len} bytes read in windows of 1x, "
        f"4x, 16x the training length (bits per byte; change vs 1x)\n"
    )
    log(extra)
    log("")
    for line in verdict:
        log(line)

    args.out.mkdir(parents=True, exist_ok=True)
    plot_curves(result, args.out / f"{args.tag}_curves.png")
    plot_extrapolation(result, args.out / f"{args.tag}_extrapolation.png")
    elapsed = time.perf_counter() - start
    log(
        f"\nwrote {args.out / (args.tag + '.json')}, {args.tag}_curves.png, {args.tag}_extrapolation.png in "
        f"{elapsed:.0f}s"
    )
    save_json(
        {
            "date": today(),
            "machine": machine(),
            "argv": sys.argv[1:] if argv is None else list(argv),
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "seconds": elapsed,
            "result": result,
            "log": lines,
        },
        args.out / f"{args.tag}.json",
    )
    return result


if __name__ == "__main__":
    main()
