"""Give a pretrained model a Titans memory (issue #25), end to end on real text, on 2 CPU cores.

1. **Base**: a byte-level ``LlamaForCausalLM`` (4 layers x 256, grouped-query attention, untied head) trained with
   Transformers' ``Trainer`` on the python-docs training documents at a context of 256 bytes; saved with its (ByT5)
   tokenizer.
2. **Conversion** with ``examples/convert.py``: window 64, a memory in layers 1 and 3 (chunk 64). The exactness
   table compares it, on held-out text, with the base (full attention) and with the base under the same sliding
   window (``MistralForCausalLM`` holding the Llama weights), from a few tokens to 16x the base's context, and
   greedy continuations.
3. **Fine-tuning at equal budget** (the same blocks of 1024 bytes in the same order, the same steps and schedule, the
   ``Trainer``): the memory alone (the base frozen); the memory + LoRA on the base; and the control, LoRA on the
   windowed base with no memory. Half of the blocks carry a pass key written early and asked for at the end.
4. **Evaluation**: bits per byte by position on the held-out documents (their first 4096 bytes, 16x the base's
   context) for the base with its full context, the base with the window and every fine-tuned model; pass-key recall
   by distance, before and after fine-tuning; the cost (parameters, fine-tuning time, decoding memory at 4K and 64K
   tokens against the base's KV cache).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/pretrained_memory.py          # full mode (about 1.5 h on 2 cores)
    python benchmarks/pretrained_memory.py --quick                          # smoke run (well under a minute)

Models go to ``--work`` (default ``outputs/pretrained_memory``; a stage whose folder exists is reused with
``--reuse``); tables are printed and saved with the plots under ``--out`` (default
``benchmarks/results/pretrained_memory``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, format_table, machine, pyplot, save_json, setup, today, torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    ByT5Tokenizer,
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Trainer,
    TrainingArguments,
)

from titans_hf import (  # noqa: E402
    BASE_LORA_TARGETS,
    MEMORY_MODULES,
    TitansCache,
    TitansForCausalLM,
    mark_only_memory_as_trainable,
)

sys.path.insert(0, str(REPO / "examples"))
import convert  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "python-docs"
LN2 = math.log(2.0)
EOS = 1  # ByT5: pad 0, eos 1, unk 2, byte b -> b + 3
STATEMENT = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\nWhat is the pass key? The pass key is "


@dataclasses.dataclass
class Settings:
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 704
    context: int = 256  # the base's training context (max_position_embeddings)
    base_steps: int = 1500
    base_batch: int = 16
    base_lr: float = 2e-3
    window: int = 64
    memory_layers: tuple[int, ...] = (1, 3)
    memory_chunk_size: int = 64
    block: int = 1024  # fine-tuning blocks: 4x the base's context, 16x the window
    ft_batch: int = 4
    ft_steps: int = 300
    ft_lr: float = 2e-3
    lora_r: int = 16
    passkey_fraction: float = 0.5
    eval_tokens: int = 4096  # 16x the base's context
    eval_docs: int = 20
    distances: tuple[int, ...] = (128, 256, 512, 1024, 2048)
    trials: int = 40
    decode_lengths: tuple[int, ...] = (4096, 65536)
    seed: int = 0


QUICK = Settings(
    hidden_size=32,
    num_hidden_layers=2,
    intermediate_size=64,
    context=32,
    base_steps=6,
    base_batch=4,
    window=8,
    memory_layers=(1,),
    memory_chunk_size=8,
    block=96,
    ft_batch=2,
    ft_steps=2,
    lora_r=2,
    eval_tokens=128,
    eval_docs=2,
    distances=(48, 96),
    trials=2,
    decode_lengths=(128, 256),
)

ARMS = {
    "memory": "memory only (base frozen)",
    "memory+lora": "memory + LoRA on the base",
    "lora": "control: LoRA, window, no memory",
}


# --------------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------------


def encode(text: str) -> list[int]:
    """ByT5 ids of ``text`` (checked against the tokenizer in :func:`load_documents`)."""
    return [b + 3 for b in text.encode("utf-8")]


def load_documents(path: Path) -> list[list[int]]:
    docs = [encode(json.loads(line)["text"]) for line in path.read_text(encoding="utf-8").splitlines() if line]
    sample = json.loads(path.read_text(encoding="utf-8").splitlines()[0])["text"][:200]
    assert encode(sample) == ByT5Tokenizer()(sample, add_special_tokens=False)["input_ids"]
    return docs


class Rows(torch.utils.data.Dataset):
    """Fixed rows of token ids and their labels (default: the ids themselves; the model shifts them)."""

    def __init__(self, rows: torch.Tensor, labels: torch.Tensor | None = None):
        self.rows, self.labels = rows, rows if labels is None else labels

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i], "labels": self.labels[i]}


def crops(docs: list[list[int]], count: int, length: int, rng: random.Random) -> list[list[int]]:
    """``count`` random crops of ``length`` tokens, documents picked in proportion to their length."""
    long = [d for d in docs if len(d) >= length]
    weights = [len(d) - length + 1 for d in long]
    picks = rng.choices(long, weights=weights, k=count)
    out = []
    for doc in picks:
        start = rng.randrange(len(doc) - length + 1)
        out.append(doc[start : start + length])
    return out


def passkey(rng: random.Random) -> str:
    return str(rng.randrange(10_000, 100_000))


def with_passkey(filler: list[int], key: str, start: int, gap: int) -> tuple[list[int], list[int]]:
    """``filler[:start]``, the statement of ``key``, ``gap`` more filler tokens, the question and the key's digits;
    returns the ids and the positions of the digits (the answer)."""
    statement, question = encode(STATEMENT.format(key=key)), encode(QUESTION)
    ids = filler[:start] + statement + filler[start : start + gap] + question
    answer = list(range(len(ids), len(ids) + len(key)))
    return ids + encode(key + ".\n"), answer


def finetune_blocks(docs: list[list[int]], s: Settings, rng: random.Random) -> torch.Tensor:
    """``ft_steps x ft_batch`` blocks of real text; a ``passkey_fraction`` of them carry a pass key stated in the first
    quarter and asked for at a random later point beyond the window."""
    blocks = []
    for filler in crops(docs, s.ft_steps * s.ft_batch, s.block, rng):
        if rng.random() < s.passkey_fraction:
            start = rng.randrange(s.block // 4)
            room = s.block - start - len(encode(STATEMENT.format(key="00000") + QUESTION + "00000.\n"))
            gap = rng.randrange(min(s.window, room), room + 1)
            ids, _ = with_passkey(filler, passkey(rng), start, gap)
            filler = (ids + filler[start + gap :])[: s.block]
        blocks.append(filler)
    return torch.tensor(blocks)


def recall_blocks(docs: list[list[int]], count: int, block: int, window: int, rng: random.Random) -> Rows:
    """``count`` blocks that each carry a pass key, scored on the key's digits in the answer only."""
    rows, labels = [], []
    for filler in crops(docs, count, block, rng):
        start = rng.randrange(block // 4)
        room = block - start - len(encode(STATEMENT.format(key="00000") + QUESTION + "00000.\n"))
        gap = rng.randrange(min(window, room), room + 1)
        ids, answer = with_passkey(filler, passkey(rng), start, gap)
        ids = (ids + filler[start + gap :])[:block]
        rows.append(ids)
        labels.append([ids[i] if i in answer else -100 for i in range(block)])
    return Rows(torch.tensor(rows), torch.tensor(labels))


# --------------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------------


def trainer_arguments(s: Settings, output: Path, steps: int, batch: int, lr: float, decay: float) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(output),
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 10),
        weight_decay=decay,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        logging_steps=max(1, steps // 20),
        save_strategy="no",
        report_to="none",
        seed=s.seed,
        data_seed=s.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
        use_cpu=True,
    )


def train_base(s: Settings, train_docs: list[list[int]], folder: Path) -> dict:
    """Trains the Llama base with the Trainer on random crops of ``context`` bytes; saves it with its tokenizer."""
    torch.manual_seed(s.seed)
    tokenizer = ByT5Tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=s.hidden_size,
        intermediate_size=s.intermediate_size,
        num_hidden_layers=s.num_hidden_layers,
        num_attention_heads=s.num_attention_heads,
        num_key_value_heads=s.num_key_value_heads,
        max_position_embeddings=s.context,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    rows = torch.tensor(crops(train_docs, s.base_steps * s.base_batch, s.context, random.Random(s.seed)))
    args = trainer_arguments(s, folder.parent / "trainer-base", s.base_steps, s.base_batch, s.base_lr, 0.1)
    trainer = Trainer(model=model, args=args, train_dataset=Rows(rows))
    result = trainer.train()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    last = [h["loss"] for h in trainer.state.log_history if "loss" in h][-1]
    return {
        "seconds": result.metrics["train_runtime"],
        "mean_loss": result.training_loss,
        "last_loss": last,
        "tokens": rows.numel(),
    }


def windowed_base(base: LlamaForCausalLM, window: int) -> MistralForCausalLM:
    """The base with sliding-window attention: a Mistral (a Llama with a window) holding the same weights."""
    c = base.config
    config = MistralConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=c.head_dim,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        rope_parameters=dict(c.rope_parameters),
        tie_word_embeddings=c.tie_word_embeddings,
        sliding_window=window,
        pad_token_id=c.pad_token_id,
        eos_token_id=c.eos_token_id,
        bos_token_id=c.bos_token_id,
    )
    model = MistralForCausalLM(config)
    model.load_state_dict(base.state_dict())
    return model.eval()


def finetune(s: Settings, arm: str, converted: Path, base: Path, rows: torch.Tensor, work: Path) -> tuple:
    """One fine-tuning arm with the Trainer; returns the (merged) model and its statistics."""
    import peft

    torch.manual_seed(s.seed)
    if arm == "lora":  # the control: the windowed base, no memory
        model = TitansForCausalLM.from_base_model(str(base), sliding_window=s.window, memory_layers=[])
    else:
        model = TitansForCausalLM.from_pretrained(converted)
    if arm == "memory":
        trainable = mark_only_memory_as_trainable(model)
    else:
        config = peft.LoraConfig(
            r=s.lora_r,
            lora_alpha=2 * s.lora_r,
            target_modules=BASE_LORA_TARGETS,
            modules_to_save=MEMORY_MODULES if arm == "memory+lora" else None,
            task_type="CAUSAL_LM",
        )
        model = peft.get_peft_model(model, config)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    args = trainer_arguments(s, work / f"trainer-{arm}", s.ft_steps, s.ft_batch, s.ft_lr, 0.0)
    trainer = Trainer(model=model, args=args, train_dataset=Rows(rows))
    result = trainer.train()
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.save_pretrained(work / f"finetuned-{arm}")
    losses = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    stats = {"seconds": result.metrics["train_runtime"], "trainable": trainable, "losses": losses}
    return model.eval(), stats


# --------------------------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    if model.config.model_type == "titans":  # (also a class loaded as remote code)
        return model(ids, use_cache=False).logits
    return model(ids).logits


@torch.no_grad()
def exactness(s: Settings, base, windowed, converted, text: torch.Tensor) -> list[dict]:
    """Largest logit differences of the converted model against the base and the windowed base, by length."""
    rows = []
    for length in sorted({16, s.window, 2 * s.window, s.context, 4 * s.context, s.eval_tokens}):
        x = text[:, :length]
        got, expected = logits(converted, x), logits(base, x)
        rows.append(
            {
                "length": length,
                "vs_base": (got - expected).abs().max().item(),
                "vs_windowed_base": (got - logits(windowed, x)).abs().max().item(),
                "largest_logit": expected.abs().max().item(),
            }
        )
    return rows


@torch.no_grad()
def greedy_agreement(s: Settings, reference, converted, prompt: torch.Tensor, new: int) -> bool:
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    return torch.equal(reference.generate(prompt, **kwargs), converted.generate(prompt, **kwargs))


def position_edges(s: Settings) -> list[int]:
    edges, edge = [1], s.window
    while edge < s.eval_tokens:
        edges.append(edge)
        edge *= 2
    return edges + [s.eval_tokens]


@torch.no_grad()
def bits_by_position(model, spans: torch.Tensor, edges: list[int], batch: int = 4) -> dict:
    """Bits per byte (one byte per token) of the held-out spans, by position of the predicted byte."""
    nll = []
    for rows in spans.split(batch):
        out = logits(model, rows).float()
        nll.append(torch.nn.functional.cross_entropy(out[:, :-1].transpose(1, 2), rows[:, 1:], reduction="none"))
    nll = torch.cat(nll) / LN2  # (docs, positions - 1): position p predicts byte p
    bins = [nll[:, lo - 1 : hi - 1].mean().item() for lo, hi in zip(edges[:-1], edges[1:])]
    beyond = nll[:, edges[1] - 1 :]
    return {"bins": bins, "all": nll.mean().item(), "beyond_window": beyond.mean().item(),
            "beyond_window_per_document": beyond.mean(dim=1).tolist()}  # fmt: skip


@torch.no_grad()
def recall(model, s: Settings, docs: list[list[int]], distance: int) -> dict:
    """Pass-key recall at ``distance`` bytes between the statement and the answer: per-digit accuracy of the
    greedy (argmax) prediction with the earlier digits given, and the share of keys with every digit right."""
    rng = random.Random(1000 + distance)
    question = len(encode(QUESTION))
    rows, answers = [], None
    for filler in crops(docs, s.trials, distance + 256, rng):
        ids, answers = with_passkey(filler, passkey(rng), 32, distance - question)
        rows.append(ids)
    x = torch.tensor(rows)
    predicted = logits(model, x).argmax(-1)
    positions = torch.tensor(answers)
    correct = predicted[:, positions - 1] == x[:, positions]
    return {"digits": correct.float().mean().item(), "keys": correct.all(dim=1).float().mean().item()}


@torch.no_grad()
def decoding_memory(s: Settings, titans: TitansForCausalLM, base: LlamaForCausalLM, stream: torch.Tensor) -> dict:
    """Bytes of the decoding state after reading L tokens: Titans' cache (streamed in blocks) and the base's KV cache
    (measured at the shortest L, the formula 2 x layers x kv_heads x head_dim x L x 4 bytes beyond)."""
    out = {}
    for length in s.decode_lengths:
        cache = TitansCache(titans.config)
        for block in stream[:, :length].split(4096, dim=1):
            titans(block, cache=cache, logits_to_keep=1)
        c = base.config
        kv = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * length * 4
        out[length] = {"titans": cache.nbytes, "base_kv": kv}
    first = s.decode_lengths[0]
    cache = DynamicCache(config=base.config)
    base(stream[:, :first], cache=cache, use_cache=True, logits_to_keep=1)
    measured = sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values))
    assert measured == out[first]["base_kv"], (measured, out[first]["base_kv"])
    return out


# --------------------------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------------------------


def plot(report: dict, path: Path) -> None:
    plt = pyplot()
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(17, 4.5))
    edges, s = report["position_edges"], report["settings"]
    centres = [math.sqrt(lo * hi) for lo, hi in zip(edges[:-1], edges[1:])]
    reference = report["bits_by_position"]["base, window"]["bins"]
    for name, result in report["bits_by_position"].items():
        left.plot(centres, result["bins"], marker="o", label=name)
        if name != "base, full context":
            change = [a - b for a, b in zip(result["bins"], reference)]
            middle.plot(centres, change, marker="o", label=name, color=left.lines[-1].get_color())
    for axis in (left, middle):
        for x, label in ((s["window"], "window"), (s["context"], "base context")):
            axis.axvline(x, color="gray", linestyle=":")
            axis.text(x, axis.get_ylim()[1], label, rotation=90, va="top", ha="right", fontsize=8)
        axis.set_xscale("log", base=2)
        axis.set_xlabel("position of the predicted byte")
        axis.legend(fontsize=7)
    left.set_ylabel("bits per byte (held-out python-docs)")
    left.set_title("Language modelling by position")
    middle.axhline(0, color="black", linewidth=0.8)
    middle.set_ylabel("bits per byte minus the base with the window")
    middle.set_title("Change against the windowed base")
    names = list(report["recall"])
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [report["recall"][name][str(d)]["digits"] * 100 for d in s["distances"]]
        right.bar([j + i * width for j in range(len(values))], values, width, label=name)
    right.axhline(10, color="gray", linestyle=":", label="chance (10%)")
    right.set_xticks([j + 0.4 - width / 2 for j in range(len(s["distances"]))], [str(d) for d in s["distances"]])
    right.set_xlabel("distance from the pass key to its question (bytes)")
    right.set_ylabel("digits recalled (%)")
    right.set_title("Pass-key recall")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def tables(report: dict) -> str:
    s = report["settings"]
    lines = [f"### Conversion exact ({report['base']['parameters']:,}-parameter base, window {s['window']})", ""]
    rows = [
        [str(r["length"]), f"{r['vs_base']:.2e}", f"{r['vs_windowed_base']:.2e}", f"{r['largest_logit']:.1f}"]
        for r in report["exactness"]
    ]
    header = ["tokens", "max |logit diff| vs base", "vs base with the window", "max |logit| of the base"]
    lines += [format_table(header, rows), ""]
    greedy = report["greedy"]
    lines += [
        f"Greedy: {greedy['within_window_new']} new tokens within the window = the base's: {greedy['base']}; "
        f"{greedy['beyond_new']} new tokens (beyond the window) = the windowed base's: {greedy['windowed_base']}.",
        "",
        "### Bits per byte by position (held-out documents, first "
        f"{s['eval_tokens']} bytes of {report['eval_documents']} documents)",
        "",
    ]
    edges = report["position_edges"]
    header = ["model"] + [f"{lo}-{hi}" for lo, hi in zip(edges[:-1], edges[1:])]
    header += ["all", f"> {s['window']}", "documents better than the windowed base"]
    reference = report["bits_by_position"]["base, window"]["beyond_window_per_document"]
    rows = []
    for name, r in report["bits_by_position"].items():
        better = sum(a < b for a, b in zip(r["beyond_window_per_document"], reference))
        rows.append(
            [name] + [f"{v:.3f}" for v in r["bins"]] + [f"{r['all']:.3f}", f"{r['beyond_window']:.3f}"]
            + ["-" if name == "base, window" else f"{better} / {len(reference)}"]
        )  # fmt: skip
    lines += [format_table(header, rows), "", "### Pass-key recall: digits right (%) / whole keys right (%)", ""]
    rows = [
        [name] + [f"{r[str(d)]['digits'] * 100:.0f} / {r[str(d)]['keys'] * 100:.0f}" for d in s["distances"]]
        for name, r in report["recall"].items()
    ]
    lines += [format_table(["model"] + [f"{d} bytes" for d in s["distances"]], rows), "", "### Cost", ""]
    base_parameters = report["base"]["parameters"]
    rows = [
        [
            ARMS[arm],
            f"{st['trainable']:,} ({st['trainable'] / base_parameters:.1%})",
            f"{st['added']:,} ({st['added'] / base_parameters:.1%})",
            f"{st['seconds'] / 60:.1f}",
            f"{s['ft_steps'] * s['ft_batch'] * s['block'] / st['seconds']:.0f}",
        ]
        for arm, st in report["finetune"].items()
    ]
    lines += [
        format_table(["fine-tuning", "trained parameters", "parameters added", "minutes", "tokens/s"], rows),
        "",
    ]
    rows = [
        [
            str(length),
            f"{m['titans'] / 2**20:.2f}",
            f"{m['base_kv'] / 2**20:.2f}",
            f"{m['base_kv'] / m['titans']:.1f}x",
        ]
        for length, m in report["decoding_memory"].items()
    ]
    lines += [format_table(["tokens read", "Titans cache (MiB)", "base KV cache (MiB)", "ratio"], rows)]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------------


def probe(s: Settings, args: argparse.Namespace, work: Path, train_docs, held_out) -> dict:
    """The recall probe: the converted model's memory alone, fine-tuned on pass-key blocks scored on the answer's
    digits only (no language-modelling loss), then recall by distance. Separates "the recall signal was too diluted
    in the mixed data" from "the memory cannot learn recall through the frozen base"."""
    block, batch = args.probe_block, 8
    rows = recall_blocks(train_docs, args.probe_steps * batch, block, s.window, random.Random(s.seed + 2))
    distances = [d for d in s.distances if d < block] + [2 * block]
    model = TitansForCausalLM.from_pretrained(work / "converted")
    before = {str(d): recall(model, dataclasses.replace(s, trials=args.probe_trials), held_out, d) for d in distances}
    mark_only_memory_as_trainable(model)
    train_args = trainer_arguments(s, work / "trainer-probe", args.probe_steps, batch, args.probe_lr, 0.0)
    trainer = Trainer(model=model, args=train_args, train_dataset=rows)
    seconds = trainer.train().metrics["train_runtime"]
    model.eval()
    after = {str(d): recall(model, dataclasses.replace(s, trials=args.probe_trials), held_out, d) for d in distances}
    losses = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    result = {
        "steps": args.probe_steps, "block": block, "batch": batch, "lr": args.probe_lr, "seconds": seconds,
        "losses": losses, "before": before, "after": after,
    }  # fmt: skip
    rows = [
        [str(d), f"{before[str(d)]['digits'] * 100:.0f} / {before[str(d)]['keys'] * 100:.0f}",
         f"{after[str(d)]['digits'] * 100:.0f} / {after[str(d)]['keys'] * 100:.0f}"]
        for d in distances
    ]  # fmt: skip
    print(f"### Recall probe: memory only, {args.probe_steps} steps of {batch} x {block} bytes, answer-only loss "
          f"({seconds / 60:.1f} min; loss {losses[0][1]:.3f} -> {losses[-1][1]:.3f})\n")  # fmt: skip
    print(format_table(["distance (bytes)", "before: digits / keys (%)", "after"], rows))
    return result


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="A smoke run: tiny models, a few steps.")
    parser.add_argument("--train", type=Path, default=DATA / "train.jsonl", help="Training documents (JSONL).")
    parser.add_argument("--validation", type=Path, default=DATA / "validation.jsonl", help="Held-out documents.")
    parser.add_argument("--work", type=Path, default=REPO / "outputs" / "pretrained_memory", help="Model folders.")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "pretrained_memory")
    parser.add_argument("--reuse", action="store_true", help="Reuse the base / fine-tuned folders found in --work.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--probe-steps", type=int, default=0, help="Run only the recall probe (on --work's converted model) this long."
    )
    parser.add_argument("--probe-block", type=int, default=512, help="Recall probe: bytes per block.")
    parser.add_argument("--probe-lr", type=float, default=2e-3, help="Recall probe: peak learning rate.")
    parser.add_argument("--probe-trials", type=int, default=40, help="Recall probe: keys per distance.")
    return parser.parse_args(argv)


def text_documents(path: Path) -> list[list[int]]:
    """JSONL documents, or any other text file as one document (for machines without the shared data)."""
    if path.suffix == ".jsonl":
        return load_documents(path)
    return [encode(path.read_text(encoding="utf-8"))]


def main(argv=None) -> dict:
    args = parse_args(argv)
    setup(args.threads)
    s = QUICK if args.quick else Settings()
    work = args.work / ("quick" if args.quick else "full")
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    train_docs, held_out = text_documents(args.train), text_documents(args.validation)
    print(f"## Pretrained base + Titans memory ({'quick' if args.quick else 'full'}), {today()}\n{machine()}\n")
    if args.probe_steps:
        result = probe(s, args, work, train_docs, held_out)
        args.out.mkdir(parents=True, exist_ok=True)
        name = f"probe_{args.probe_steps}_{args.probe_block}_{args.probe_lr:g}.json"
        save_json({"date": today(), "machine": machine(), **result}, args.out / name)
        return result

    # 1. The base.
    base_folder = work / "base"
    base_stats = (
        json.loads((base_folder / "training.json").read_text()) if args.reuse and base_folder.is_dir() else None
    )
    if base_stats is None:
        base_stats = train_base(s, train_docs, base_folder)
        (base_folder / "training.json").write_text(json.dumps(base_stats))
    print(f"base: trained in {base_stats['seconds'] / 60:.1f} min, last training loss {base_stats['last_loss']:.3f}")
    base = LlamaForCausalLM.from_pretrained(base_folder).eval()
    windowed = windowed_base(base, s.window)

    # 2. Conversion (the script), and how exact it is on held-out text.
    converted_folder = work / "converted"
    memory_layers = ",".join(map(str, s.memory_layers))
    convert.main(
        [
            "--base_model", str(base_folder), "--output_dir", str(converted_folder),
            "--sliding_window", str(s.window), "--memory_layers", memory_layers,
            "--config_overrides", f"memory_chunk_size={s.memory_chunk_size}",
        ]
    )  # fmt: skip
    converted = AutoModelForCausalLM.from_pretrained(converted_folder, trust_remote_code=True).eval()
    spans = [d[: s.eval_tokens] for d in held_out if len(d) >= s.eval_tokens][: s.eval_docs]
    if not spans:  # one long text (the fallback): cut it into spans
        spans = [held_out[0][i : i + s.eval_tokens] for i in range(0, s.eval_docs * s.eval_tokens, s.eval_tokens)]
    spans = torch.tensor(spans)
    exact = exactness(s, base, windowed, converted, spans[:2])
    prompt = spans[:1, : s.window // 4]
    greedy = {
        "within_window_new": s.window - prompt.shape[1],
        "base": greedy_agreement(s, base, converted, prompt, s.window - prompt.shape[1]),
        "beyond_new": 4 * s.window,
        "windowed_base": greedy_agreement(s, windowed, converted, prompt, 4 * s.window),
    }

    # 3. Fine-tuning at equal budget.
    rows = finetune_blocks(train_docs, s, random.Random(s.seed + 1))
    models = {"base, full context": base, "base, window": windowed}
    stats = {}
    added = sum(p.numel() for n, p in converted.named_parameters() if ".memory." in n)
    for arm in ARMS:
        folder = work / f"finetuned-{arm}"
        if args.reuse and (folder / "stats.json").is_file():
            model, st = (
                TitansForCausalLM.from_pretrained(folder).eval(),
                json.loads((folder / "stats.json").read_text()),
            )
        else:
            model, st = finetune(s, arm, converted_folder, base_folder, rows, work)
            (folder / "stats.json").write_text(json.dumps(st))
        st["added"] = 0 if arm == "lora" else added
        stats[arm] = st
        models[ARMS[arm]] = model
        print(f"fine-tuned {arm}: {st['seconds'] / 60:.1f} min, last loss {st['losses'][-1][1]:.3f}")

    # 4. Evaluation.
    edges = position_edges(s)
    by_position = {name: bits_by_position(model, spans, edges) for name, model in models.items()}
    recalled = {
        name: {str(d): recall(model, s, held_out, d) for d in s.distances}
        for name, model in {"converted, before fine-tuning": converted, **models}.items()
    }
    stream = torch.tensor([sum(held_out, [])[: max(s.decode_lengths)]])
    memory = decoding_memory(s, models[ARMS["memory+lora"]], base, stream)

    report = {
        "date": today(),
        "machine": machine(),
        "settings": dataclasses.asdict(s),
        "base": {**base_stats, "parameters": sum(p.numel() for p in base.parameters())},
        "exactness": exact,
        "greedy": greedy,
        "finetune": stats,
        "eval_documents": len(spans),
        "position_edges": edges,
        "bits_by_position": by_position,
        "recall": recalled,
        "decoding_memory": memory,
        "seconds": time.perf_counter() - started,
    }
    text = tables(report)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    save_json(report, args.out / "pretrained_memory.json")
    (args.out / "pretrained_memory.md").write_text(text + "\n")
    plot(report, args.out / "pretrained_memory.png")
    print(f"\nwall time {report['seconds'] / 60:.1f} min; results in {args.out}")
    return report


if __name__ == "__main__":
    main()
