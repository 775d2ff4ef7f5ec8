"""Recall beyond the attention window: Titans (MAC, MAG, MAL, LMM) against Transformers' Mistral (the same sliding
window, attention alone) and Llama (full attention, the upper bound), trained alike at one parameter budget.

Two tasks, each trained from scratch for every model and seed, with loss on the answers only:

- ``mqar``: multi-query associative recall. ``N`` key-value pairs, a span of ``D`` distractor tokens, then queries
  of some of the keys; the model must predict each value (see :class:`MQAR` for the token formats). Chance is
  ``1 / num_values``.
- ``passkey``: a passkey in a haystack of real text (byte-level). ``<text> The pass key is 73914. Remember it.
  <D bytes of text> What is the pass key? The pass key is 73914``; the model must produce the 5 digits. Training
  haystacks come from ``--haystack`` (default: ``../shared/data/python-docs/train.jsonl``), evaluation haystacks
  from ``--eval-haystack`` (default: the validation split). Chance is 10% per digit.

Every training batch draws its gap ``D`` uniformly in ``[0, max_gap]``; evaluation uses a fixed set of sequences
(the same for every model) with gaps spread evenly over the same range, and reports accuracy per key-query
distance bin. A stack of ``L`` sliding-window layers of window ``W`` reaches ``L * (W - 1)`` tokens back, so bins
beyond that are out of reach for attention alone; the "beyond" column averages them.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/recall.py --tasks mqar   # full mode, MQAR, 3 seeds: 92 min on 2 shared cores
    OMP_WAIT_POLICY=PASSIVE python benchmarks/recall.py                # both tasks (passkey: 1 seed, 300 steps, ~20 min more)
    python benchmarks/recall.py --quick                            # smoke run (< 1 minute), prints the tables

Writes ``results/recall.json`` and ``results/recall.png`` (``--out`` to change the folder).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import math
import multiprocessing
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

from titans_hf.neural_memory import NeuralMemory  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "python-docs"
IGNORE = -100


# --------------------------------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class MQAR:
    """Multi-query associative recall.

    ``fused`` format (default): each key-value pair is one token ``(k, v)`` (``num_keys * num_values`` pair tokens);
    a query is a key token ``q_k`` followed by its answer, a value token ``v``:
    ``(k1,v1) ... (kN,vN) | D distractors | q_k v q_k' v' ...``.
    ``split`` format (Zoology's MQAR): ``k1 v1 ... kN vN | D distractors | k v k' v' ...``, where a model must first
    bind each value to the token before it (an induction circuit). Within this benchmark's training budget no model,
    Llama included, got past the "copy any value of the context" plateau on it (observed while designing this
    benchmark), so the fused format is the default: it tests the memory's key-value recall, not how fast an induction
    circuit forms.

    ``num_queries`` keys are drawn with replacement among the ``num_pairs`` of the sequence. A repeated key can be
    answered from its earlier query, a few tokens back: that local copy is a curriculum that makes the binding
    learnable within this budget (with distinct queries no model, Llama included, left the "copy any value"
    plateau in 600 steps, observed while designing this benchmark), so repeats are trained on but **not scored**:
    only the first query of each key counts, at its distance to the pair. Chance is ``1 / num_values``; copying a
    value of the context without matching its key gives about ``1 / num_pairs``.
    """

    num_pairs: int = 4
    num_queries: int = 4
    num_keys: int = 8
    num_values: int = 8
    num_distractors: int = 16
    max_gap: int = 64
    format: str = "fused"
    name: str = "mqar"

    def __post_init__(self):
        if self.format not in ("fused", "split"):
            raise ValueError(f"format must be 'fused' or 'split', got {self.format!r}")
        if not (1 <= self.num_pairs <= self.num_keys and self.num_queries >= 1):
            raise ValueError("need 1 <= num_pairs <= num_keys and num_queries >= 1")

    @property
    def vocab_size(self) -> int:
        return self._offsets()[-1]

    def _offsets(self) -> tuple[int, int, int, int, int]:
        """Starts of the pair (or key), query-key, value and distractor tokens, and the vocabulary size."""
        k, v = self.num_keys, self.num_values
        if self.format == "fused":
            pair, query, value = 0, k * v, k * v + k
        else:  # keys are their own queries
            pair, query, value = 0, 0, k
        distractor = value + v
        return pair, query, value, distractor, distractor + self.num_distractors

    @property
    def chance(self) -> float:
        return 1.0 / self.num_values

    def batch(self, generator: torch.Generator, size: int, gap: int, split: str = "train"):
        """``(input_ids, labels, distances)``; ``distances`` (size, seq) holds, at each scored position (the answer
        to the first query of a key), the distance from the pair's key to its query (the token whose next token is
        the answer), and 0 elsewhere."""
        n, m, k, v = self.num_pairs, self.num_queries, self.num_keys, self.num_values
        pair0, query0, value0, distractor0, vocab = self._offsets()
        keys = torch.argsort(torch.rand(size, k, generator=generator), dim=1)[:, :n]
        values = torch.randint(0, v, (size, n), generator=generator)
        order = torch.randint(0, n, (size, m), generator=generator)
        earlier = (order.unsqueeze(2) == order.unsqueeze(1)).tril(-1).any(dim=2)  # key already asked
        answers = value0 + values.gather(1, order)
        queries = torch.stack([query0 + keys.gather(1, order), answers], dim=2).flatten(1)
        if self.format == "fused":
            context, stride = pair0 + keys * v + values, 1
        else:
            context, stride = torch.stack([keys, value0 + values], dim=2).flatten(1), 2
        distractors = torch.randint(distractor0, vocab, (size, gap), generator=generator)
        input_ids = torch.cat([context, distractors, queries], dim=1)
        labels = torch.full_like(input_ids, IGNORE)
        distances = torch.zeros_like(input_ids)
        first = context.shape[1] + gap  # position of the first query key
        labels[:, first + 1 :: 2] = answers
        distances[:, first + 1 :: 2] = torch.where(earlier, 0, first + 2 * torch.arange(m) - stride * order)
        return input_ids, labels, distances


class PassKey:
    """A 5-digit pass key hidden in real text (bytes), asked for after ``gap`` more bytes of text."""

    name = "passkey"
    NEEDLE = (b" The pass key is ", b". Remember it. ")
    QUESTION = b" What is the pass key? The pass key is "
    vocab_size = 256
    chance = 0.1
    digits = 5

    def __init__(
        self,
        train_texts: list[bytes],
        eval_texts: list[bytes],
        max_gap: int = 64,
        max_prefix: int = 8,
        loss: str = "answer",
    ):
        if loss not in ("answer", "all"):
            raise ValueError(f"loss must be 'answer' or 'all', got {loss!r}")
        self.texts = {"train": train_texts, "eval": eval_texts}
        self.max_gap = max_gap
        self.max_prefix = max_prefix
        self.loss = loss  # "all": next-byte loss on the whole sequence (the haystack too); scored: the key digits

    def _crop(self, generator: torch.Generator, split: str, length: int) -> bytes:
        texts = self.texts[split]
        while True:
            doc = texts[int(torch.randint(len(texts), (1,), generator=generator))]
            if len(doc) >= length:
                start = int(torch.randint(len(doc) - length + 1, (1,), generator=generator))
                return doc[start : start + length]

    def batch(self, generator: torch.Generator, size: int, gap: int, split: str = "train"):
        prefix = int(torch.randint(self.max_prefix + 1, (1,), generator=generator))
        rows, labels, distances = [], [], []
        for _ in range(size):
            key = "".join(str(int(d)) for d in torch.randint(10, (self.digits,), generator=generator)).encode()
            head = self._crop(generator, split, prefix) + self.NEEDLE[0]
            text = head + key + self.NEEDLE[1] + self._crop(generator, split, gap) + self.QUESTION + key
            ids = torch.tensor(list(text))
            label = ids.clone() if self.loss == "all" else torch.full_like(ids, IGNORE)
            label[-self.digits :] = ids[-self.digits :]
            dist = torch.zeros_like(ids)
            # Key digit i sits at len(head) + i and is asked at len(text) - digits + i (predicted from the byte
            # before): the distance is the same for every digit.
            dist[-self.digits :] = len(text) - self.digits - len(head)
            rows.append(ids)
            labels.append(label)
            distances.append(dist)
        return torch.stack(rows), torch.stack(labels), torch.stack(distances)


# --------------------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------------------


def eval_set(task, num: int, batch: int, seed: int = 12345) -> list[tuple[torch.Tensor, ...]]:
    """A fixed evaluation set: ``num`` sequences in batches whose gaps are spread evenly over ``[0, max_gap]``."""
    generator = torch.Generator().manual_seed(seed)
    batches = max(1, num // batch)
    gaps = torch.linspace(0, task.max_gap, batches).round().long().tolist()
    return [task.batch(generator, batch, gap, split="eval") for gap in gaps]


@torch.no_grad()
def evaluate(model, batches) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per labelled token: correct (bool), distance, and index of its sequence (for whole-key accuracy)."""
    model.eval()
    correct, dist, seq = [], [], []
    offset = 0
    for input_ids, labels, distances in batches:
        logits = model(input_ids=input_ids).logits[:, :-1]
        target, d = labels[:, 1:], distances[:, 1:]
        mask = d > 0  # scored answers
        correct.append((logits.argmax(-1) == target)[mask])
        dist.append(d[mask])
        seq.append((torch.arange(input_ids.shape[0]).unsqueeze(1).expand_as(mask) + offset)[mask])
        offset += input_ids.shape[0]
    return torch.cat(correct), torch.cat(dist), torch.cat(seq)


@contextlib.contextmanager
def memory_writes_off(model):
    """The ablation "memory never written": every neural memory of ``model`` reads its initial weights ``W_0`` and
    writes nothing (``NeuralMemory.forward(..., write=False)``) while the context is open."""
    memories = [m for m in model.modules() if isinstance(m, NeuralMemory)]
    for memory in memories:
        memory.forward = functools.partial(NeuralMemory.forward, memory, write=False)
    try:
        yield
    finally:
        for memory in memories:
            del memory.forward


def sweep_sets(task, gaps: list[int], num: int, batch: int, seed: int = 54321) -> dict[int, list]:
    """Evaluation sets at fixed distractor spans ``gaps`` (every scored query lies beyond them)."""
    generator = torch.Generator().manual_seed(seed)
    return {
        gap: [task.batch(generator, batch, gap, split="eval") for _ in range(max(1, num // batch))] for gap in gaps
    }


def accuracy(correct: torch.Tensor) -> float | None:
    return float(correct.float().mean()) if correct.numel() else None


def bin_edges(max_distance: int, reach: int) -> list[int]:
    """Bins: [1, reach] (attention can reach), then doubling ranges beyond."""
    edges = [1, reach + 1]
    while edges[-1] <= max_distance:
        edges.append(max(edges[-1] * 2, edges[-1] + 1))
    return edges


def bin_accuracy(correct: torch.Tensor, dist: torch.Tensor, edges: list[int]) -> list[float | None]:
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (dist >= lo) & (dist < hi)
        out.append(float(correct[sel].float().mean()) if bool(sel.any()) else None)
    return out


# --------------------------------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Job:
    """One model of one seed: trained from scratch, then evaluated (the unit of work of a worker process)."""

    task: object
    name: str
    seed: int
    dims: Dims
    intermediate_size: int
    settings: TrainSettings
    batch: int
    reach: int
    edges: list[int]
    evaluation: list
    far: dict
    threads: int


def run_job(job: Job) -> dict:
    """Trains and evaluates one model; the same seed gives the same batches for every model and any worker."""
    setup(job.threads)
    task, name, seed, reach = job.task, job.name, job.seed, job.reach
    model = build_model(name, job.dims, job.intermediate_size, seed)
    generator = torch.Generator().manual_seed(10_000 + seed)  # same batches for every model of a seed

    def batches(step):
        gap = int(torch.randint(task.max_gap + 1, (1,), generator=generator))
        input_ids, labels, _ = task.batch(generator, job.batch, gap, split="train")
        return input_ids, labels

    cpu = time.process_time()
    try:
        result = train(model, batches, job.settings, desc=f"{task.name} {name} seed {seed}")
    except FloatingPointError as error:  # a memory rule that diverges: recorded, not fatal to the other runs
        return diverged_run(job, str(error), time.process_time() - cpu, count_parameters(model))
    correct, dist, seq = evaluate(model, job.evaluation)
    beyond, within = accuracy(correct[dist > reach]), accuracy(correct[dist <= reach])
    writes_off = None
    if name not in BASELINES:  # the same trained model, its memory never written: is the recall in the memory?
        with memory_writes_off(model):
            off, off_dist, _ = evaluate(model, job.evaluation)
        writes_off = accuracy(off[off_dist > reach])
    distance_sweep = {}
    for gap, sets in job.far.items():
        far_correct, _, far_seq = evaluate(model, sets)
        distance_sweep[str(gap)] = {"accuracy": accuracy(far_correct)}
        if task.name == "passkey":
            distance_sweep[str(gap)]["whole_key"] = whole_key_accuracy(far_correct, None, far_seq, None)
    run = {
        "model": name,
        "seed": seed,
        "bins": bin_accuracy(correct, dist, job.edges),
        "beyond": beyond,
        "within": within,
        "whole_key_beyond": whole_key_accuracy(correct, dist, seq, reach) if task.name == "passkey" else None,
        "writes_off_beyond": writes_off,
        "distance_sweep": distance_sweep,
        "final_loss": result["curve"][-1][1],
        "curve": result["curve"],
        "train_seconds": result["seconds"],
        "cpu_seconds": time.process_time() - cpu,
        "parameters": count_parameters(model),
    }
    swept = "  ".join(f"@{gap}: {_pct(v['accuracy'])}" for gap, v in distance_sweep.items())
    run["line"] = (
        f"  {task.name} {LABELS[name]:<14} seed {seed}: beyond {_pct(beyond)}  within {_pct(within)}  "
        f"writes off {_pct(writes_off)}  {swept}  loss {run['final_loss']:.3f}  {result['seconds']:.0f}s"
    )
    return run


def diverged_run(job: Job, error: str, cpu_seconds: float, parameters: int) -> dict:
    """The record of a run whose training loss became non-finite: no accuracy, the error kept."""
    task = job.task
    return {
        "model": job.name,
        "seed": job.seed,
        "bins": [None] * (len(job.edges) - 1),
        "beyond": None,
        "within": None,
        "whole_key_beyond": None,
        "writes_off_beyond": None,
        "distance_sweep": {str(gap): {"accuracy": None} for gap in job.far},
        "final_loss": math.nan,
        "curve": [],
        "train_seconds": None,
        "cpu_seconds": cpu_seconds,
        "parameters": parameters,
        "diverged": error,
        "line": f"  {task.name} {LABELS[job.name]:<14} seed {job.seed}: DIVERGED ({error})",
    }


def run_task(
    task,
    models,
    dims: Dims,
    settings: TrainSettings,
    seeds,
    batch: int,
    eval_num: int,
    sweep: list[int],
    sweep_num: int,
    workers: int,
    threads: int,
    log,
) -> dict:
    """Every (seed, model) job, in ``workers`` processes of ``threads`` torch threads each (1 worker: in process)."""
    sizes = matched_intermediate_sizes(models, dims)
    log(f"\n### {task.name}: parameters (matched on {dims.reference})\n")
    log(parameter_table(sizes, dims))
    reach = dims.num_hidden_layers * (dims.window - 1)
    evaluation = eval_set(task, eval_num, min(batch * 2, eval_num))
    far = sweep_sets(task, sweep, sweep_num, batch=8)
    edges = bin_edges(max(int(d.max()) for _, _, d in evaluation), reach)
    common = dict(dims=dims, settings=settings, batch=batch, reach=reach, edges=edges, evaluation=evaluation, far=far)
    slow_first = sorted(models, key=lambda m: ("mac", "mag", "mal", "lmm", "mistral", "llama").index(m))
    jobs = [
        Job(task=task, name=m, seed=seed, intermediate_size=sizes[m][0], threads=threads, **common)
        for seed in seeds
        for m in slow_first
    ]
    runs = {m: [] for m in models}
    if workers <= 1:
        done = map(run_job, jobs)
    else:  # forked workers: every job seeds itself, so the results do not depend on the schedule
        pool = multiprocessing.get_context("fork").Pool(workers, maxtasksperchild=1)
        done = pool.imap_unordered(run_job, jobs)
    for run in done:
        log(run.pop("line"))
        runs[run.pop("model")].append(run)
    if workers > 1:
        pool.close()
        pool.join()
    for name in runs:
        runs[name].sort(key=lambda r: r["seed"])
    return {
        "task": task.name,
        "task_settings": _task_settings(task),
        "chance": task.chance,
        "reach": reach,
        "edges": edges,
        "sweep_gaps": list(sweep),
        "parameters": {m: {"intermediate_size": i, "parameters": p} for m, (i, p) in sizes.items()},
        "runs": runs,
    }


def whole_key_accuracy(correct, dist, seq, reach) -> float | None:
    """Passkey: the fraction of sequences (with a key beyond ``reach``; all when ``dist`` is None) whose every digit is
    right under teacher forcing, i.e. greedy decoding reproduces the whole key."""
    wrong = torch.zeros(int(seq.max()) + 1).index_add_(0, seq, (~correct).float())
    scored = seq if dist is None else seq[dist > reach]
    chosen = torch.zeros(len(wrong), dtype=torch.bool).index_fill_(0, scored, True)
    return float((wrong[chosen] == 0).float().mean()) if bool(chosen.any()) else None


def _task_settings(task) -> dict:
    if dataclasses.is_dataclass(task):
        return dataclasses.asdict(task)
    return {"max_gap": task.max_gap, "max_prefix": task.max_prefix, "digits": task.digits}


def _pct(x) -> str:
    return "  -  " if x is None else f"{100 * x:5.1f}%"


def _cell(values: list) -> str:
    values = [v for v in values if v is not None]
    return fmt_spread(spread(values), 1, percent=True) if values else "-"


def summarize(result: dict) -> tuple[str, str, dict]:
    """Tables (accuracy % per distance bin, and at the swept distractor spans; mean ± half-range over seeds) and the
    target verdicts (per seed: every seed must meet them)."""
    edges, reach = result["edges"], result["reach"]
    header = ["model"] + [f"{lo}-{hi - 1}" for lo, hi in zip(edges[:-1], edges[1:])] + [f"beyond {reach}"]
    header.append("writes off, beyond")
    if result["task"] == "passkey":
        header.append("whole key beyond")
    rows = []
    for name, runs in result["runs"].items():
        row = [LABELS[name]] + [_cell([r["bins"][b] for r in runs]) for b in range(len(edges) - 1)]
        row.append(_cell([r["beyond"] for r in runs]))
        row.append(_cell([r.get("writes_off_beyond") for r in runs]))
        if result["task"] == "passkey":
            row.append(_cell([r["whole_key_beyond"] for r in runs]))
        rows.append(row)
    table = format_table(header, rows)

    gaps = result.get("sweep_gaps", [])
    sweep_rows = []
    for name, runs in result["runs"].items():
        row = [LABELS[name], _cell([r["beyond"] for r in runs])]
        for gap in gaps:
            row.append(_cell([r["distance_sweep"][str(gap)]["accuracy"] for r in runs]))
        sweep_rows.append(row)
    sweep_table = format_table(["model", "trained spans (beyond)"] + [f"{g} distractors" for g in gaps], sweep_rows)

    def per_seed(name: str, key=lambda r: r["beyond"]) -> list[float | None]:
        return [key(r) for r in result["runs"].get(name, [])]

    verdict = {}
    llama = per_seed("llama")
    for name, need in (("mac", 0.9), ("mag", 0.9), ("mal", 0.9), ("lmm", 0.8)):
        if name in result["runs"] and llama:
            ratios = [a / max(b, 1e-9) for a, b in zip(per_seed(name), llama) if a is not None and b is not None]
            verdict[name] = {
                "ratios_to_llama": ratios,
                "need": need,
                "target_met": bool(ratios) and min(ratios) >= need,
            }
            offs = [v for v in per_seed(name, lambda r: r.get("writes_off_beyond")) if v is not None]
            verdict[name]["writes_off"] = offs
    if "mistral" in result["runs"]:
        mistral = [v for v in per_seed("mistral") if v is not None]
        verdict["mistral"] = {"beyond": mistral, "near_chance": all(v - result["chance"] < 0.05 for v in mistral)}
        for name in ("mac", "mag", "mal", "lmm"):
            if name in verdict and verdict[name]["writes_off"]:
                verdict[name]["writes_off_at_mistral_level"] = max(verdict[name]["writes_off"]) < max(mistral) + 0.05
    for name in ("mac", "mag", "mal", "lmm", "mistral"):
        if name not in result["runs"] or not gaps:
            continue
        kept = {}
        for gap in gaps:
            pairs = [(r["distance_sweep"][str(gap)]["accuracy"], r["beyond"]) for r in result["runs"][name]]
            kept[gap] = [a / max(b, 1e-9) for a, b in pairs if a is not None and b is not None]
        verdict.setdefault(name, {})["sweep_kept"] = kept
    return table, sweep_table, verdict


def verdict_lines(result: dict, verdict: dict) -> list[str]:
    lines = []
    for name in ("mac", "mag", "mal", "lmm"):
        if name not in verdict or "ratios_to_llama" not in verdict[name]:
            continue
        v = verdict[name]
        ratios = ", ".join(f"{100 * r:.0f}%" for r in v["ratios_to_llama"])
        status = "met" if v["target_met"] else "MISSED"
        lines.append(
            f"- {LABELS[name]}: {ratios} of Llama's accuracy beyond reach, per seed "
            f"(target >= {100 * v['need']:.0f}% in every seed: {status})"
        )
        if v.get("writes_off"):
            level = v.get("writes_off_at_mistral_level")
            lines.append(
                f"  writes off at evaluation: {', '.join(f'{100 * x:.1f}%' for x in v['writes_off'])}"
                + ("" if level is None else f" ({'at' if level else 'NOT at'} Mistral's level)")
            )
    if "mistral" in verdict and "beyond" in verdict["mistral"]:
        v = verdict["mistral"]
        lines.append(
            f"- Mistral (SWA): {', '.join(f'{100 * x:.1f}%' for x in v['beyond'])} beyond reach, chance "
            f"{100 * result['chance']:.1f}% ({'near chance' if v['near_chance'] else 'NOT near chance'})"
        )
    for name in ("mac", "mag", "mal", "lmm", "mistral"):
        kept = verdict.get(name, {}).get("sweep_kept")
        if kept:
            parts = [f"{gap}: {', '.join(f'{100 * k:.0f}%' for k in ks)}" for gap, ks in kept.items()]
            lines.append(
                f"- {LABELS[name]} at long distractor spans, share of its trained-span accuracy: {'; '.join(parts)}"
            )
    return lines


def plot(results: list[dict], path: Path) -> None:
    """Per task: accuracy by key-query distance within the trained spans (top), and at the swept spans (bottom)."""
    plt = pyplot()
    fig, axes = plt.subplots(2, len(results), figsize=(5.5 * len(results), 8), squeeze=False)
    for ax, result in zip(axes[1], results):
        gaps = result.get("sweep_gaps", [])
        for name, runs in result["runs"].items():
            xs, ys, lo, hi = [], [], [], []
            for gap in [None, *gaps]:
                if gap is None:
                    values, x = [r["beyond"] for r in runs], result["task_settings"]["max_gap"] / 2
                else:
                    values = [r["distance_sweep"][str(gap)]["accuracy"] for r in runs]
                    x = gap
                values = [v for v in values if v is not None]
                if values:
                    sp = spread(values)
                    xs.append(x)
                    ys.append(100 * sp["mean"])
                    lo.append(100 * (sp["mean"] - sp["min"]))
                    hi.append(100 * (sp["max"] - sp["mean"]))
            style = "--" if name in BASELINES else "-"
            if xs:  # (a model whose runs all diverged has no point)
                ax.errorbar(
                    xs, ys, yerr=[lo, hi], label=LABELS[name], color=COLORS[name], ls=style, marker="o", capsize=3
                )
        ax.axhline(100 * result["chance"], color="gray", lw=0.8, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("distractor span (tokens); first point: the trained spans")
        ax.set_ylabel("accuracy beyond the window (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"{result['task']}: recall far beyond the training distances")
        ax.grid(alpha=0.3)
    for ax, result in zip(axes[0], results):
        edges = result["edges"]
        centers = [(lo + hi - 1) / 2 for lo, hi in zip(edges[:-1], edges[1:])]
        for name, runs in result["runs"].items():
            xs, ys, lo, hi = [], [], [], []
            for b, c in enumerate(centers):
                values = [r["bins"][b] for r in runs if r["bins"][b] is not None]
                if values:
                    s = spread(values)
                    xs.append(c)
                    ys.append(100 * s["mean"])
                    lo.append(100 * (s["mean"] - s["min"]))
                    hi.append(100 * (s["max"] - s["mean"]))
            style = "--" if name in BASELINES else "-"
            if xs:  # (a model whose runs all diverged has no point)
                ax.errorbar(
                    xs, ys, yerr=[lo, hi], label=LABELS[name], color=COLORS[name], ls=style, marker="o", capsize=3
                )
        ax.axvline(result["reach"] + 0.5, color="red", lw=0.8, ls=":")
        ax.axhline(100 * result["chance"], color="gray", lw=0.8, ls=":")
        ax.text(result["reach"] + 1, 100 * result["chance"] + 1, "SWA reach / chance", fontsize=7, color="gray")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("key-query distance (tokens)")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 100)
        ax.set_title({"mqar": "Multi-query associative recall", "passkey": "Pass key in real text"}[result["task"]])
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------------

FULL = dict(
    steps=600,
    batch=32,
    eval_num=512,
    seeds=[0, 1, 2],
    passkey_seeds=[0],
    passkey_steps=300,
    passkey_batch=16,
    mqar_gap=64,
    passkey_gap=64,
    hidden=128,
    intermediate=256,
    memory_heads=8,
    sweep=[256, 1024, 4096],
    sweep_num=64,
)
QUICK = dict(
    steps=12,
    batch=8,
    eval_num=32,
    seeds=[0],
    passkey_seeds=[0],
    passkey_steps=12,
    passkey_batch=8,
    mqar_gap=32,
    passkey_gap=32,
    hidden=64,
    intermediate=128,
    memory_heads=4,
    sweep=[64, 128],
    sweep_num=8,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smoke run: few steps, one seed, short gaps")
    p.add_argument("--tasks", default="mqar,passkey")
    p.add_argument("--models", default=",".join(ALL_MODELS))
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds of the MQAR runs")
    p.add_argument("--passkey-seeds", type=int, nargs="+", default=None, help="seeds of the passkey runs")
    p.add_argument("--steps", type=int, default=None, help="training steps of the MQAR runs")
    p.add_argument("--batch", type=int, default=None, help="batch size of the MQAR runs")
    p.add_argument("--passkey-steps", type=int, default=None, help="training steps of the passkey runs")
    p.add_argument("--passkey-batch", type=int, default=None, help="batch size of the passkey runs")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-num", type=int, default=None, help="evaluation sequences per task")
    p.add_argument("--mqar-gap", type=int, default=None, help="largest distractor span (tokens)")
    p.add_argument(
        "--sweep", type=int, nargs="*", default=None, help="distractor spans of the far evaluation (after training)"
    )
    p.add_argument("--sweep-num", type=int, default=None, help="evaluation sequences per swept span")
    p.add_argument("--passkey-gap", type=int, default=None, help="largest haystack span after the key (bytes)")
    p.add_argument("--pairs", type=int, default=4, help="MQAR key-value pairs per sequence")
    p.add_argument("--queries", type=int, default=4, help="MQAR queries per sequence (keys drawn with replacement)")
    p.add_argument("--keys", type=int, default=8, help="MQAR key (and value) vocabulary")
    p.add_argument("--mqar-format", default="fused", choices=["fused", "split"])
    p.add_argument(
        "--passkey-loss",
        default="answer",
        choices=["answer", "all"],
        help="train on the key digits only, or on every byte (language modelling of the haystack too)",
    )
    p.add_argument("--haystack", nargs="+", default=[str(DATA / "train.jsonl")], help="training haystack files")
    p.add_argument("--eval-haystack", nargs="+", default=[str(DATA / "validation.jsonl")])
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=None, help="MLP width of the reference (MAG)")
    p.add_argument("--window", type=int, default=8, help="sliding window (MAG, MAL, Mistral) and MAC segment")
    p.add_argument("--chunk", type=int, default=8, help="memory chunk size")
    p.add_argument("--memory-max-lr", type=float, default=None, help="memory_max_lr (default: TitansConfig's)")
    p.add_argument("--memory-depth", type=int, default=2)
    p.add_argument("--memory-heads", type=int, default=None, help="memory heads (head_dim = hidden / heads)")
    p.add_argument(
        "--memory-init",
        default="",
        help="NeuralMemory gate-init overrides for ablations, e.g. init_lr_fraction=0.5,init_retention=0.999",
    )
    p.add_argument("--titans-config", default="", help="other TitansConfig fields, e.g. memory_max_weight_rms=none")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--tag", default="recall", help="file name stem of the JSON and PNG")
    p.add_argument(
        "--workers",
        type=int,
        default=2,
        help="processes training models side by side (each with --threads torch threads); 1: all in this process",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    args = p.parse_args(argv)
    mode = QUICK if args.quick else FULL
    for key, value in mode.items():
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

    overrides = parse_assignments(args.memory_init)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    log(f"# Recall beyond the window ({'quick' if args.quick else 'full'} mode), {today()}")
    log(f"machine: {machine()}")
    log(f"command: python benchmarks/recall.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    results = []
    for task_name in [t.strip() for t in args.tasks.split(",") if t.strip()]:
        seeds, steps, batch = (
            (args.seeds, args.steps, args.batch)
            if task_name == "mqar"
            else (args.passkey_seeds, args.passkey_steps, args.passkey_batch)
        )
        settings = TrainSettings(steps=steps, lr=args.lr, log_every=max(1, min(10, steps // 10)))
        if task_name == "mqar":
            task = MQAR(
                num_pairs=args.pairs,
                num_queries=args.queries,
                num_keys=args.keys,
                num_values=args.keys,
                max_gap=args.mqar_gap,
                format=args.mqar_format,
            )
        elif task_name == "passkey":
            task = PassKey(
                read_texts(args.haystack, 256),
                read_texts(args.eval_haystack, 256),
                args.passkey_gap,
                loss=args.passkey_loss,
            )
        else:
            raise SystemExit(f"unknown task {task_name!r} (mqar, passkey)")
        dims = Dims(
            vocab_size=task.vocab_size,
            hidden_size=args.hidden,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
            intermediate_size=args.intermediate,
            window=args.window,
            memory_chunk_size=args.chunk,
            memory_depth=args.memory_depth,
            memory_num_heads=args.memory_heads,
            memory_max_lr=args.memory_max_lr,
            memory_overrides=overrides,
            titans_config=parse_assignments(args.titans_config),
            reference="mag" if "mag" in models else models[0],
        )
        result = run_task(
            task,
            models,
            dims,
            settings,
            seeds,
            batch,
            args.eval_num,
            args.sweep,
            args.sweep_num,
            args.workers,
            args.threads,
            log,
        )
        result["dims"] = dataclasses.asdict(dims)
        result["train"] = dataclasses.asdict(settings) | {"batch": batch, "seeds": seeds}
        table, sweep_table, verdict = summarize(result)
        result["verdict"] = verdict
        log(f"\n### {task_name}: accuracy (%) by key-query distance, mean ± half-range over seeds {seeds}")
        log(
            f"(window {args.window}, {args.layers} layers: sliding-window attention reaches {result['reach']} tokens; "
            f"chance {100 * task.chance:.1f}%)\n"
        )
        log(table)
        if result["sweep_gaps"]:
            log(f"\n### {task_name}: accuracy (%) at long distractor spans (trained on spans up to {task.max_gap})\n")
            log(sweep_table)
        log("")
        for line in verdict_lines(result, verdict):
            log(line)
        results.append(result)

    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / f"{args.tag}.png"
    plot(results, png)
    elapsed = time.perf_counter() - start
    log(f"\nwrote {args.out / (args.tag + '.json')} and {png} in {elapsed:.0f}s")
    report = {
        "date": today(),
        "machine": machine(),
        "argv": sys.argv[1:] if argv is None else list(argv),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "seconds": elapsed,
        "results": results,
        "log": lines,
    }
    save_json(report, args.out / f"{args.tag}.json")
    return report


if __name__ == "__main__":
    main()
