"""Is the memory's inner loop stable while the model trains? Per training step: the loss, the gradient norm before
clipping, and the largest per-head read of any memory (RMS, before the per-head output norm, which hides a
diverging read from the loss).

The model and data are ``lm_quality.py``'s (byte-level MAG, hidden 128, 4 layers, memory chunk 16, 8 heads x 16,
random 256-byte crops of ``../shared/data/python-docs/train.jsonl``, AdamW lr 3e-3 with warm-up and cosine decay over
``--total`` steps, clip 1.0). ``--no-curvature`` sets every token's step curvature to 1 (the write rule before the
step curvature was added; an ablation done here by patching, not a model option).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/train_stability.py --steps 100                 # about 5 minutes
    OMP_WAIT_POLICY=PASSIVE python benchmarks/train_stability.py --steps 100 --no-curvature

Prints one line per step and a summary; writes ``results/train_stability[_no_curvature].json``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import (  # noqa: E402
    Dims,
    TrainSettings,
    build_model,
    lr_at,
    make_optimizer,
    matched_intermediate_sizes,
    read_texts,
    save_json,
    setup,
)
from lm_quality import DATA, FULL, Crops  # noqa: E402

from titans_hf import memory_ops, neural_memory  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mag", choices=["mag", "mac", "mal", "lmm"])
    parser.add_argument("--steps", type=int, default=100, help="steps to run")
    parser.add_argument("--total", type=int, default=FULL["steps"], help="steps of the learning-rate schedule")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-curvature", action="store_true", help="ablation: every step curvature set to 1")
    parser.add_argument("--train", nargs="+", default=[str(DATA / "train.jsonl")])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the JSON")
    args = parser.parse_args()
    setup(args.threads)
    if args.no_curvature:
        # Every user (the chunks' forward and backward, the one-token step) computes kappa from its terms here; a
        # curvature of 1 is on the clamp's flat side, so the chunks' hand-written backward gives it no gradient.
        memory_ops._curvature = lambda input_norms, delta_norms: torch.ones_like(delta_norms[-1])

    reads: list[float] = []  # the memory's per-head reads go through F.rms_norm: record their largest RMS
    rms_norm = F.rms_norm

    def recording_rms_norm(x, normalized_shape, weight=None, eps=None):
        reads.append(x.detach().float().pow(2).mean(-1).sqrt().max().item())
        return rms_norm(x, normalized_shape, weight, eps)

    neural_memory.F.rms_norm = recording_rms_norm  # F is torch.nn.functional: only the memory calls rms_norm

    dims = Dims(
        vocab_size=256,
        hidden_size=FULL["hidden"],
        num_hidden_layers=FULL["layers"],
        num_attention_heads=4,
        intermediate_size=FULL["intermediate"],
        window=FULL["window"],
        context_length=FULL["seq_len"],
        memory_chunk_size=FULL["chunk"],
        memory_num_heads=FULL["memory_heads"],
        reference="mag",
    )
    size = matched_intermediate_sizes([args.model], dims)[args.model][0]
    model = build_model(args.model, dims, size, args.seed)
    crops = Crops(read_texts(args.train), FULL["seq_len"])
    generator = torch.Generator().manual_seed(20_000 + args.seed)  # lm_quality.py's batches for this seed
    settings = TrainSettings(steps=args.total)
    optimizer = make_optimizer(model, settings)
    model.train()
    rows = []
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, settings)
        ids = crops.batch(generator, FULL["batch"])
        reads.clear()
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip))
        optimizer.step()
        rows.append({"step": step, "loss": loss.item(), "grad_norm": norm, "max_read_rms": max(reads)})
        print(f"step {step:4d}  loss {loss.item():.3f}  grad norm {norm:10.3f}  max read RMS {max(reads):12.4g}")

    norms, peaks = [r["grad_norm"] for r in rows], [r["max_read_rms"] for r in rows]
    after = rows[len(rows) // 5 :]  # past the first fifth (warm-up)
    summary = {
        "model": args.model,
        "seed": args.seed,
        "curvature": not args.no_curvature,
        "steps": args.steps,
        "max_grad_norm_after_warmup": max(r["grad_norm"] for r in after),
        "steps_with_grad_norm_over_10": [r["step"] for r in rows if r["grad_norm"] > 10],
        "max_read_rms": max(peaks),
        "steps_with_read_rms_over_10": [r["step"] for r in rows if r["max_read_rms"] > 10],
        "median_grad_norm": sorted(norms)[len(norms) // 2],
        "mean_loss_last_10": sum(r["loss"] for r in rows[-10:]) / min(10, len(rows)),
    }
    print("\n" + "\n".join(f"{k}: {v}" for k, v in summary.items()))
    name = "train_stability" + ("_no_curvature" if args.no_curvature else "")
    save_json({"summary": summary, "rows": rows, "argv": sys.argv[1:]}, args.out / f"{name}.json")
    assert all(math.isfinite(r["loss"]) for r in rows)


if __name__ == "__main__":
    main()
