"""The memory rules side by side (issue #24): every rule under MAG, trained and evaluated alike.

Two stages, each running ``recall.py`` (MQAR beyond the window, the far sweep, the writes-off ablation) and
``lm_quality.py`` (byte-level language modelling on the python docs, bits per byte at 1x / 4x / 16x the training length)
on MAG models that differ only in ``memory_rule``:

- ``--stage sweep``: the learning-rate bound of the papers' rules (which have no budget: the stable ``theta`` shrinks
  with the chunk). For each rule and ``memory_max_lr`` of ``--lrs``: a short MQAR run and a short LM run, one seed;
  a run whose loss becomes non-finite is reported as diverged. This chose the rules' default ``memory_max_lr``.
- ``--stage evidence`` (default): every rule at its config defaults, MQAR with 3 seeds and the far sweep (256 / 1K /
  4K distractors), LM with 2 seeds, and the training step time of each rule relative to ``titans-hf`` (a MAG of the
  speed shape, 2,048 tokens, rules interleaved, median of rounds).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/memory_rules.py --stage sweep
    OMP_WAIT_POLICY=PASSIVE python benchmarks/memory_rules.py
    python benchmarks/memory_rules.py --quick            # smoke run of both stages (< 2 minutes)

Writes ``results/memory_rules_<stage>.json`` (and each run's own JSON and plots under ``results/memory_rules/``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lm_quality  # noqa: E402
import recall  # noqa: E402
from common import RESULTS, format_table, machine, save_json, setup, today  # noqa: E402

RULES = ("titans-hf", "titans", "moneta", "yaad", "omega")
EQUATIONS = {
    "titans-hf": "Titans eq. 13-14 + budget, momentum as average, unit values, step curvature, retention to W_0",
    "titans": "Titans eq. 12-14 (S = eta S - theta grad ||M(k) - v||^2, W = (1 - alpha) W + S)",
    "moneta": "MIRAS eq. 24-25 (l_3 bias, A = (1 - alpha) A - theta grad, W = A / ||A||_4^2 at chunk ends)",
    "yaad": "MIRAS eq. 26 (Huber bias, threshold gate delta_t, W = (1 - alpha) W - theta grad)",
    "omega": "ATLAS eq. 9-10 on Titans (the loss of the last 4 tokens, gated)",
}


def run_recall(rule: str, extra: str, seeds: list[int], args, tag: str, quick: bool) -> dict:
    argv = ["--tasks", "mqar", "--models", "mag", "--seeds", *map(str, seeds), "--workers", str(args.workers)]
    argv += ["--threads", str(args.threads), "--titans-config", f"memory_rule={rule}{extra}"]
    argv += ["--out", str(args.out / "memory_rules"), "--tag", tag]
    if quick:
        argv.append("--quick")
    elif args.stage == "sweep":
        argv += ["--steps", str(args.sweep_steps), "--sweep", "256"]
    runs = recall.main(argv)["results"][0]["runs"]["mag"]
    return {
        "beyond": [r["beyond"] for r in runs],
        "writes_off": [r["writes_off_beyond"] for r in runs],
        "sweep": {gap: [r["distance_sweep"][gap]["accuracy"] for r in runs] for gap in runs[0]["distance_sweep"]},
        "diverged": [r.get("diverged") for r in runs],
        "train_seconds": [r["train_seconds"] for r in runs],
    }


def run_lm(rule: str, extra: str, seeds: list[int], args, tag: str, quick: bool) -> dict:
    argv = ["--models", "mag", "--seeds", *map(str, seeds), "--titans-config", f"memory_rule={rule}{extra}"]
    argv += ["--threads", str(args.threads), "--out", str(args.out / "memory_rules"), "--tag", tag]
    argv += [] if args.train is None else ["--train", *args.train]
    argv += [] if args.validation is None else ["--validation", *args.validation]
    if quick:
        argv.append("--quick")
    elif args.stage == "sweep":
        argv += ["--steps", str(args.sweep_lm_steps), "--eval-spans", "4"]
    runs = lm_quality.main(argv)["runs"]["mag"]
    return {
        "bpb": [None if "diverged" in r else r["bpb"] for r in runs],
        "diverged": [r.get("diverged") for r in runs],
    }


def step_times(rules: list[str], rounds: int, tokens: int) -> dict[str, float]:
    """Seconds per training step (forward + backward) of a MAG of the speed shape for each rule, the rules
    interleaved round after round; the median over rounds."""
    import torch
    from speed_common import SMALL, TITANS_FIELDS, setup_threads

    from titans_hf import TitansConfig, TitansForCausalLM

    setup_threads()
    ids = torch.randint(0, 256, (1, tokens), generator=torch.Generator().manual_seed(0))
    models = {}
    for rule in rules:
        torch.manual_seed(0)
        config = TitansConfig(variant="mag", memory_rule=rule, **SMALL, **TITANS_FIELDS, bos_token_id=None)
        models[rule] = TitansForCausalLM(config)
    times: dict[str, list[float]] = {rule: [] for rule in rules}
    for _ in range(rounds + 1):  # the first round warms up
        for rule, model in models.items():
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            times[rule].append(time.perf_counter() - start)
    return {rule: statistics.median(values[1:]) for rule, values in times.items()}


def cell(values: list, percent: bool = True) -> str:
    """Mean and range of the values that exist ("-" if none)."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    scale = 100 if percent else 1
    mean, low, high = (scale * statistics.mean(values), scale * min(values), scale * max(values))
    digits = 1 if percent else 3
    return f"{mean:.{digits}f} ({low:.{digits}f}-{high:.{digits}f})" if len(values) > 1 else f"{mean:.{digits}f}"


def diverged_note(result: dict) -> str:
    count = sum(d is not None for d in result["diverged"])
    return f"diverged in {count} of {len(result['diverged'])}" if count else ""


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", choices=["sweep", "evidence"], default="evidence")
    p.add_argument("--quick", action="store_true", help="smoke run: the scripts' quick modes, two rules")
    p.add_argument("--rules", nargs="+", default=None, help="rules to run (default: all; sweep: the papers')")
    p.add_argument("--lrs", type=float, nargs="+", default=[0.1, 0.01, 0.001], help="sweep: memory_max_lr values")
    p.add_argument("--sweep-steps", type=int, default=200, help="sweep: MQAR training steps")
    p.add_argument("--sweep-lm-steps", type=int, default=60, help="sweep: LM training steps")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="evidence: MQAR seeds (LM: the first two)")
    p.add_argument("--speed-rounds", type=int, default=5)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--train", nargs="+", default=None, help="LM training text (default: lm_quality.py's)")
    p.add_argument("--validation", nargs="+", default=None, help="LM validation text (default: lm_quality.py's)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    setup(args.threads)
    quick = args.quick
    start = time.perf_counter()
    lines = [f"# Memory rules under MAG, stage {args.stage}{' (quick)' if quick else ''}, {today()}", machine()]
    lines.append(f"command: python benchmarks/memory_rules.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    report: dict = {"date": today(), "machine": machine(), "argv": sys.argv[1:] if argv is None else list(argv)}
    if args.stage == "sweep":
        rules = args.rules or (["titans", "omega"] if quick else [r for r in RULES if r != "titans-hf"])
        lrs = args.lrs[:1] if quick else args.lrs
        rows, results = [], {}
        for rule in rules:
            for lr in lrs:
                tag = f"sweep_{rule}_{lr:g}"
                extra = f",memory_max_lr={lr}"
                mqar = run_recall(rule, extra, [0], args, tag + "_mqar", quick)
                lm = run_lm(rule, extra, [0], args, tag + "_lm", quick)
                results[tag] = {"rule": rule, "max_lr": lr, "mqar": mqar, "lm": lm}
                far = next(iter(mqar["sweep"].values()))
                one = [None if b is None else b["1x"] for b in lm["bpb"]]
                rows.append(
                    [rule, f"{lr:g}", diverged_note(mqar) or cell(mqar["beyond"]), cell(far)]
                    + [diverged_note(lm) or cell(one, percent=False)]
                )
        table = format_table(["rule", "memory_max_lr", "MQAR beyond (%)", "far (%)", "LM bits/byte (1x)"], rows)
        report["results"] = results
    else:
        rules = args.rules or (["titans-hf", "titans"] if quick else list(RULES))
        seeds = args.seeds or ([0] if quick else [0, 1, 2])
        times = step_times(rules, 1 if quick else args.speed_rounds, 256 if quick else 2048)
        rows, results = [], {}
        for rule in rules:
            mqar = run_recall(rule, "", seeds, args, f"evidence_{rule}_mqar", quick)
            lm = run_lm(rule, "", seeds[:2], args, f"evidence_{rule}_lm", quick)
            results[rule] = {"mqar": mqar, "lm": lm, "step_seconds": times[rule]}
            gaps = list(mqar["sweep"])
            bpb = {m: [None if b is None else b[m] for b in lm["bpb"]] for m in ("1x", "16x")}
            rows.append(
                [rule, EQUATIONS.get(rule, ""), cell(mqar["beyond"])]
                + [cell(mqar["sweep"][g]) for g in gaps]
                + [cell(mqar["writes_off"]), cell(bpb["1x"], percent=False), cell(bpb["16x"], percent=False)]
                + [f"{times[rule] / times[rules[0]]:.2f}x", diverged_note(mqar) + " " + diverged_note(lm)]
            )
        header = ["rule", "equation", "MQAR beyond (%)"] + [f"@{g} (%)" for g in gaps]
        header += ["writes off (%)", "bits/byte 1x", "bits/byte 16x", f"step vs {rules[0]}", "notes"]
        table = format_table(header, rows)
        report["results"] = results
        report["step_seconds"] = times
    lines += ["", table, f"\n{time.perf_counter() - start:.0f}s"]
    print("\n".join(lines))
    report["table"] = table
    report["log"] = lines
    save_json(report, args.out / f"memory_rules_{args.stage}{'_quick' if quick else ''}.json")
    return report


if __name__ == "__main__":
    main()
