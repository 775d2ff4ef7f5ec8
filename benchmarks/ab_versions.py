"""A/B of two versions of titans-hf on the same steps: does a change (a refactor, a kernel) make the model slower?

Checks out both revisions into temporary git worktrees and times, in subprocesses that alternate between the two
(so that a noisy machine hits both alike), a training step (forward + backward) and cached decoding steps of the
speed shape (``speed_common.SMALL``: hidden 256, 4 layers, window / segment / chunk 64), float32, batch 1, 2 threads:

    python benchmarks/ab_versions.py --base a9c64d8                 # base vs the working tree's HEAD
    python benchmarks/ab_versions.py --base a9c64d8 --head main --rounds 5 --variants mag mac

Prints one row per measurement: the median over rounds of each version (each round: the median of ``--repeats``
timed runs after a warm-up), every round's value, and head / base. Saves ``results/ab_versions.json``.

``--outputs`` checks instead that the two revisions compute the same numbers, bit for bit: logits of full, padded
and cached calls (in pieces and token by token), every parameter gradient and every cache tensor, for every variant
and several memory settings (chunk size 1 among them), in float64 and float32 (the tiny models of ``tests/tiny.py``):

    python benchmarks/ab_versions.py --base a9c64d8 --outputs
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def train_step(model, ids) -> None:
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()


def decode_step_seconds(model, ids, prompt: int, steps: int) -> float:
    """Seconds per greedy one-token step from the cache, after a prompt of ``prompt`` tokens (not timed)."""
    import torch

    with torch.inference_mode():
        result = model(input_ids=ids[:, :prompt], use_cache=True, logits_to_keep=1)
        cache, token = result.cache, result.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(steps):
            token = model(input_ids=token, cache=cache).logits[:, -1:].argmax(-1)
        return (time.perf_counter() - start) / steps


def median_of(run, repeats: int) -> float:
    """Median of ``run()`` (seconds) over ``repeats`` runs after a warm-up."""
    run()
    return statistics.median(run() for _ in range(repeats))


def timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def measure(src: Path, variants: list[str], tokens: int, prompt: int, steps: int, repeats: int) -> dict[str, float]:
    """Seconds per training step and per decoding step of each variant, with the titans_hf found in ``src``."""
    sys.path.insert(0, str(HERE))
    import speed_common  # sets the offline and thread environment

    sys.path.insert(0, str(src))  # before speed_common's own src entry
    import torch

    import titans_hf

    assert Path(titans_hf.__file__).resolve().is_relative_to(src.resolve()), titans_hf.__file__
    speed_common.setup_threads()
    ids = torch.randint(0, 256, (1, tokens), generator=torch.Generator().manual_seed(0))
    out = {}
    for variant in variants:
        model = speed_common.build_model(variant)
        out[f"{variant} train step"] = median_of(lambda m=model: timed(lambda: train_step(m, ids)), repeats)
        out[f"{variant} decode step"] = median_of(lambda m=model: decode_step_seconds(m, ids, prompt, steps), repeats)
    return out


def outputs(src: Path, path: Path) -> None:
    """Saves to ``path`` every number the titans_hf of ``src`` computes on the fingerprint cases."""
    sys.path.insert(0, str(src))
    sys.path.insert(1, str(REPO / "tests"))
    import torch
    from tiny import VARIANTS, tiny_model

    import titans_hf

    assert Path(titans_hf.__file__).resolve().is_relative_to(src.resolve()), titans_hf.__file__
    torch.set_num_threads(2)
    out = {}
    ids = torch.randint(1, 64, (2, 37), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[1, 30:] = 0
    schedules = {"steps": list(range(1, 20)), "pieces": [3, 7, 8, 16, 17, 25, 30, 37]}
    for dtype in (torch.float64, torch.float32):
        for variant in VARIANTS:
            extra = {"mac_memory_input": "attention"} if variant == "mac" else {"num_persistent_tokens": 0}
            for overrides in ({}, {"memory_momentum": False}, {"memory_depth": 1}, {"memory_chunk_size": 1}, extra):
                tag = f"{dtype}-{variant}-{sorted(overrides.items())}"
                model = tiny_model(variant, dtype=dtype, **overrides)
                logits = model(ids).logits
                logits.float().pow(2).mean().backward()
                out[f"{tag}/full"] = logits.detach()
                out.update({f"{tag}/grad/{n}": p.grad for n, p in model.named_parameters() if p.grad is not None})
                with torch.no_grad():
                    out[f"{tag}/masked"] = model(ids, attention_mask=mask).logits
                    for (name, cuts), masked in itertools.product(schedules.items(), (True, False)):
                        cache, start, pieces = titans_hf.TitansCache(model.config), 0, []
                        for end in cuts:
                            kwargs = {"attention_mask": mask[:, :end]} if masked else {}
                            pieces.append(model(ids[:, start:end], cache=cache, **kwargs).logits)
                            start = end
                        key = f"{tag}/cached-{name}-{'masked' if masked else 'unpadded'}"
                        out[key] = torch.cat(pieces, dim=1)
                        out.update({f"{key}/cache/{k}": v for k, v in cache.state_dict().items()})
    torch.save(out, path)


#: Cache snapshot entries renamed since earlier revisions (old -> new), so that both sides compare under one name.
RENAMED = {".memory.slots.": ".memory.matrices."}


def same_outputs(base: Path, head: Path) -> list[str]:
    """The keys whose tensors differ (cache entries compared under their current names)."""
    import torch

    def current(key: str) -> str:
        for old, new in RENAMED.items():
            key = key.replace(old, new)
        return key

    a = {current(k): v for k, v in torch.load(base).items()}
    b = {current(k): v for k, v in torch.load(head).items()}
    differ = sorted(set(a) ^ set(b))
    differ += [k for k in a.keys() & b.keys() if a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]
    print(f"{len(a)} tensors compared: {'all equal, bit for bit' if not differ else f'{len(differ)} differ'}")
    worst: dict[str, tuple[float, str]] = {}  # per dtype: the largest relative difference and where
    for key in sorted(k for k in a.keys() & b.keys() if a[k].shape == b[k].shape and not torch.equal(a[k], b[k])):
        if not a[key].is_floating_point():
            worst.setdefault("integer", (math.inf, key))
            continue
        relative = ((a[key] - b[key]).abs().max() / a[key].abs().max().clamp(min=1e-30)).item()
        dtype = str(a[key].dtype).removeprefix("torch.")
        if relative > worst.get(dtype, (-1.0, ""))[0]:
            worst[dtype] = (relative, key)
    for dtype, (relative, key) in worst.items():
        print(f"  {dtype}: largest relative difference {relative:.3g} ({key})")
    kinds = sorted({key.split("/")[1] for key in differ if key.count("/") >= 1})
    if differ:
        print(f"  the differing tensors are of: {', '.join(kinds)}")
    return differ


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="The revision to compare against (a commit, tag or branch).")
    parser.add_argument("--head", default="HEAD", help="The revision under test.")
    parser.add_argument("--variants", nargs="+", default=["mag", "mac"])
    parser.add_argument("--tokens", type=int, default=2048, help="Tokens of the training step.")
    parser.add_argument("--prompt", type=int, default=256, help="Prompt before the timed decoding steps.")
    parser.add_argument("--steps", type=int, default=64, help="Decoding steps per timed run.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--outputs", action="store_true", help="Compare the numbers computed, not the speed.")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--save_outputs", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.save_outputs is not None:
        outputs(args.worker, args.save_outputs)
        return
    if args.worker is not None:
        result = measure(args.worker, args.variants, args.tokens, args.prompt, args.steps, args.repeats)
        print("RESULT " + json.dumps(result))
        return

    runs: dict[str, list[dict[str, float]]] = {"base": [], "head": []}
    with tempfile.TemporaryDirectory() as tmp:
        trees = {}
        for side in ("base", "head"):
            trees[side] = Path(tmp) / side
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(trees[side]), getattr(args, side)],
                check=True,
            )
        try:
            if args.outputs:
                env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONPATH="")
                for side in ("base", "head"):
                    command = [sys.executable, __file__, "--base", args.base, "--worker", str(trees[side] / "src")]
                    subprocess.run([*command, "--save_outputs", str(Path(tmp) / f"{side}.pt")], check=True, env=env)
                differ = same_outputs(Path(tmp) / "base.pt", Path(tmp) / "head.pt")
                if differ:
                    raise SystemExit("differ: " + ", ".join(differ[:20]))
                return
            for round_ in range(args.rounds):
                for side in ("base", "head") if round_ % 2 == 0 else ("head", "base"):
                    command = [sys.executable, __file__, "--base", args.base, "--worker", str(trees[side] / "src")]
                    command += [
                        "--variants",
                        *args.variants,
                        "--tokens",
                        str(args.tokens),
                        "--prompt",
                        str(args.prompt),
                    ]
                    command += ["--steps", str(args.steps), "--repeats", str(args.repeats)]
                    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONPATH="")
                    done = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
                    runs[side].append(json.loads(done.stdout.split("RESULT ", 1)[1]))
                    print(f"round {round_ + 1}/{args.rounds} {side}: {runs[side][-1]}", flush=True)
        finally:
            for tree in trees.values():
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)

    rows = []
    for key in runs["base"][0]:
        base = [r[key] for r in runs["base"]]
        head = [r[key] for r in runs["head"]]
        rows.append(
            {
                "measurement": key,
                "base_s": statistics.median(base),
                "head_s": statistics.median(head),
                "head_over_base": statistics.median(head) / statistics.median(base),
                "base_rounds": base,
                "head_rounds": head,
            }
        )
    print(
        f"\nbase {args.base} vs head {args.head}: seconds, median of {args.rounds} rounds (each a median of "
        f"{args.repeats}); training step of {args.tokens} tokens, decoding after a {args.prompt}-token prompt\n"
    )
    print(f"{'measurement':<20} {'base':>10} {'head':>10} {'head/base':>10}   rounds (base | head)")
    for row in rows:
        rounds = (
            " ".join(f"{v:.4f}" for v in row["base_rounds"]) + " | " + " ".join(f"{v:.4f}" for v in row["head_rounds"])
        )
        print(
            f"{row['measurement']:<20} {row['base_s']:>10.4f} {row['head_s']:>10.4f} {row['head_over_base']:>10.3f}"
            f"   {rounds}"
        )
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    (results / "ab_versions.json").write_text(
        json.dumps({"base": args.base, "head": args.head, "rows": rows}, indent=2)
    )


if __name__ == "__main__":
    main()
