#!/usr/bin/env python
# Copyright 2026 The titans-hf developers. Licensed under the Apache License, Version 2.0.
"""Evaluate a Titans checkpoint on long documents: does it use long context?

Three measurements, one JSON + markdown report (and two plots):

1. **Bits per byte, streaming vs window-limited.** Each document is read once, in pieces, with the memory and the
   attention window carried from piece to piece in the model's cache (constant memory at any length); the same model
   then reads the same tokens in independent blocks of its attention span (MAG/MAL: the sliding window, MAC: the
   segment, LMM: its training context), so that nothing beyond the span reaches a prediction. The difference is what
   the long context is worth.
2. **Loss by token position** (log-spaced bins, out to the document length: 64K tokens by default), both ways, as a
   plot: a model that uses its context keeps improving with position.
3. **Passkey retrieval (S-NIAH)**: a five-digit key hidden at a depth of a filler text of a given length, asked for at
   the end and decoded greedily; the accuracy over lengths x depths as a heat-map.

With no data arguments it reads the shipped Tiny Shakespeare (offline) as one long document:

    python examples/evaluate.py --model_name_or_path outputs/titans-small-tinyshakespeare

Long books streamed from the Hub, and the report inserted into the checkpoint's model card:

    python examples/evaluate.py --model_name_or_path you/titans-170m-mac --dataset_name emozilla/pg19 \\
        --dataset_split test --max_documents 8 --max_tokens 131072 --update_model_card
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
from pathlib import Path
from typing import Any

import datasets
import torch
import torch.nn.functional as F
from titans_training import DEFAULT_TRAIN_FILE, TEXT_EXTENSIONS, check_columns, data_files
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

CARD_START, CARD_END = "<!-- long-context-eval -->", "<!-- /long-context-eval -->"
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is"
INTRO = "There is important information hidden inside a lot of irrelevant text. Find it and memorize it. "


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_name_or_path", required=True, help="A checkpoint folder or Hub id.")
    parser.add_argument("--trust_remote_code", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default=None, help="Default: cuda if available, else cpu.")
    data = parser.add_argument_group("documents (default: the shipped Tiny Shakespeare, as one document)")
    data.add_argument("--dataset_name", help="A Hub dataset of long documents, streamed (e.g. emozilla/pg19).")
    data.add_argument("--dataset_config")
    data.add_argument("--dataset_split", default="test")
    data.add_argument(
        "--files", help="Local documents: a glob of .txt (one document per file), .jsonl, .parquet, .csv."
    )
    data.add_argument("--text_column", default="text")
    data.add_argument("--max_documents", type=int, default=4)
    data.add_argument("--max_tokens", type=int, default=65536, help="Tokens read per document (longer ones are cut).")
    data.add_argument("--min_tokens", type=int, default=1024, help="Shorter documents are skipped.")
    run = parser.add_argument_group("reading")
    run.add_argument("--piece_tokens", type=int, default=2048, help="Tokens per forward call while streaming.")
    run.add_argument("--window_tokens", type=int, help="The window-limited block (default: the attention span).")
    run.add_argument("--batch_size", type=int, default=8, help="Blocks per forward call, window-limited.")
    key = parser.add_argument_group("passkey")
    key.add_argument(
        "--passkey_lengths", default="1024,4096,16384,65536", help="Context lengths in tokens ('' skips)."
    )
    key.add_argument("--passkey_depths", default="0,0.25,0.5,0.75,1", help="Needle depths, fractions of the filler.")
    key.add_argument("--passkey_trials", type=int, default=3, help="Random keys per length and depth.")
    out = parser.add_argument_group("output")
    out.add_argument("--output_dir", help="Default: the checkpoint folder if local, else ./outputs/eval-<name>.")
    out.add_argument("--update_model_card", action="store_true", help="Insert the report into <checkpoint>/README.md.")
    out.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("max_documents", "max_tokens", "min_tokens", "piece_tokens", "batch_size", "passkey_trials"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if args.dataset_name and args.files:
        raise ValueError("Give --dataset_name or --files, not both.")
    args.passkey_lengths = _numbers(args.passkey_lengths, int, "--passkey_lengths")
    args.passkey_depths = _numbers(args.passkey_depths, float, "--passkey_depths")
    if any(not 0 <= d <= 1 for d in args.passkey_depths):
        raise ValueError(f"--passkey_depths must lie in [0, 1], got {args.passkey_depths}.")
    return args


def _numbers(text: str, kind: type, flag: str) -> list:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError as error:
        raise ValueError(f"{flag} must be comma-separated numbers, got {text!r}.") from error


# ---------------------------------------------------------------------------------------------------- documents


def load_documents(args: argparse.Namespace, tokenizer: PreTrainedTokenizerBase) -> tuple[list[list[int]], str]:
    """Up to ``--max_documents`` token lists of ``--min_tokens`` to ``--max_tokens`` tokens, and their source."""
    encode = lambda text: tokenizer(text or "", add_special_tokens=False)["input_ids"]  # noqa: E731
    if args.dataset_name or args.files:
        if args.dataset_name:
            source = args.dataset_name
            stream = datasets.load_dataset(source, args.dataset_config, split=args.dataset_split, streaming=True)
        else:
            files = data_files(args.files, "--files")
            builder = TEXT_EXTENSIONS[Path(files[0]).suffix.lower()]
            kwargs = {"sample_by": "document"} if builder == "text" else {}
            stream = datasets.load_dataset(builder, data_files=files, split="train", streaming=True, **kwargs)
            source = ", ".join(os.path.basename(f) for f in files)
        check_columns(stream, [args.text_column], ["--text_column"])
        texts = (example[args.text_column] for example in stream)
        documents = []
        for ids in map(encode, texts):
            if len(ids) >= args.min_tokens:
                documents.append(ids[: args.max_tokens])
            if len(documents) == args.max_documents:
                break
    else:  # the shipped text: one long document, cut into --max_tokens pieces
        source = f"{DEFAULT_TRAIN_FILE.name} (shipped)"
        ids = encode(DEFAULT_TRAIN_FILE.read_text())
        documents = [ids[i : i + args.max_tokens] for i in range(0, len(ids), args.max_tokens)]
        documents = [d for d in documents if len(d) >= args.min_tokens][: args.max_documents]
    if not documents:
        raise ValueError(f"{source}: no document has --min_tokens {args.min_tokens} tokens; lower it.")
    return documents, source


# ---------------------------------------------------------------------------------------------------- reading


def attention_span(config: Any) -> int:
    """How far attention reaches: the window (MAG/MAL), the segment (MAC); LMM has none (its training context)."""
    return {"mac": config.segment_size, "mag": config.sliding_window, "mal": config.sliding_window}.get(
        config.variant, config.training_context_length
    )


def _token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), reduction="none").view(targets.shape)


@torch.no_grad()
def streaming_losses(model: Any, ids: list[int], piece_tokens: int) -> tuple[torch.Tensor, int]:
    """Loss of every token after the first, the whole document read through one cache in pieces (constant memory);
    and the cache's size in bytes at the end."""
    x = torch.tensor([ids], device=model.device)
    cache, losses = None, []
    for start in range(0, x.shape[1] - 1, piece_tokens):
        piece = x[:, start : start + piece_tokens + 1]
        out = model(input_ids=piece[:, :-1], cache=cache, use_cache=True)
        cache = out.cache
        losses.append(_token_losses(out.logits, piece[:, 1:])[0])
    return torch.cat(losses).cpu(), cache.nbytes


@torch.no_grad()
def window_losses(model: Any, ids: list[int], window: int, batch_size: int) -> torch.Tensor:
    """Loss of every token after the first, each block of ``window`` tokens read alone (nothing before it)."""
    x = torch.tensor(ids, device=model.device)
    starts = list(range(0, len(ids) - 1, window))
    losses = []
    for i in range(0, len(starts), batch_size):
        blocks = [x[s : s + window + 1] for s in starts[i : i + batch_size]]
        width = max(len(b) for b in blocks) - 1
        inputs = torch.zeros(len(blocks), width, dtype=torch.long, device=x.device)
        mask = torch.zeros_like(inputs)
        for row, block in enumerate(blocks):  # right-padded; the pads' losses are dropped
            inputs[row, : len(block) - 1], mask[row, : len(block) - 1] = block[:-1], 1
        logits = model(input_ids=inputs, attention_mask=mask, use_cache=False).logits
        for row, block in enumerate(blocks):
            losses.append(_token_losses(logits[row, : len(block) - 1], block[1:]))
    return torch.cat(losses).cpu()


def position_bins(length: int) -> list[tuple[int, int]]:
    """Token positions (of the predicted token) in bins [1, 2), [2, 4), ... up to ``length``."""
    bins, low = [], 1
    while low < length:
        bins.append((low, min(2 * low, length)))
        low *= 2
    return bins


# ---------------------------------------------------------------------------------------------------- passkey


def passkey_prompt(tokenizer: PreTrainedTokenizerBase, length: int, depth: float, key: str) -> list[int]:
    """About ``length`` tokens: the instruction, filler sentences with the needle at ``depth``, the question."""
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    head, needle, question, sentence = encode(INTRO), encode(NEEDLE.format(key=key)), encode(QUESTION), encode(FILLER)
    room = length - len(bos) - len(head) - len(needle) - len(question)
    if room < 0:
        raise ValueError(f"--passkey_lengths {length} is too short for the prompt ({length - room} tokens at least).")
    sentences = max(room // len(sentence), 0)
    at = round(depth * sentences)
    return bos + head + sentence * at + needle + sentence * (sentences - at) + question


@torch.no_grad()
def greedy(model: Any, ids: list[int], new_tokens: int, piece_tokens: int) -> list[int]:
    """Greedy continuation; the prompt is read in pieces through the cache (constant memory at any length)."""
    x = torch.tensor([ids], device=model.device)
    cache = None
    for start in range(0, x.shape[1], piece_tokens):
        out = model(input_ids=x[:, start : start + piece_tokens], cache=cache, use_cache=True)
        cache = out.cache
    tokens = []
    for _ in range(new_tokens):
        token = out.logits[:, -1:].argmax(-1)
        tokens.append(token.item())
        out = model(input_ids=token, cache=out.cache, use_cache=True)
    return tokens


def passkey_accuracy(model: Any, tokenizer: PreTrainedTokenizerBase, args: argparse.Namespace, bar: tqdm) -> list:
    """Exact-match accuracy of the decoded key, per (depth, length): rows depths, columns lengths."""
    rng = random.Random(args.seed)
    grid = []
    for depth in args.passkey_depths:
        row = []
        for length in args.passkey_lengths:
            hits = 0
            for _ in range(args.passkey_trials):
                key = str(rng.randint(10000, 99999))
                answer = tokenizer(" " + key, add_special_tokens=False)["input_ids"]
                tokens = greedy(model, passkey_prompt(tokenizer, length, depth, key), len(answer), args.piece_tokens)
                hits += tokenizer.decode(tokens, skip_special_tokens=True).strip() == key
                bar.update(length)
            row.append(hits / args.passkey_trials)
        grid.append(row)
    return grid


# ---------------------------------------------------------------------------------------------------- report


def scored_bytes(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> int:
    """UTF-8 bytes of the scored tokens (all but the first): what bits per byte divide by."""
    return len(tokenizer.decode(ids[1:], skip_special_tokens=True).encode("utf-8"))


def markdown(results: dict[str, Any]) -> str:
    s, w = results["streaming"], results["window_limited"]
    lines = [
        "## Long-context evaluation",
        "",
        f"`examples/evaluate.py` on {results['documents']} documents of {results['source']} ({results['tokens']:,} "
        f"tokens, up to {results['max_document_tokens']:,} per document).",
        "",
        "| reading | bits per byte | loss (nats/token) |",
        "|---|---|---|",
        f"| streaming: the whole document through the memory (cache {results['cache_bytes'] / 2**20:.1f} MiB) | "
        f"{s['bits_per_byte']:.4f} | {s['loss']:.4f} |",
        f"| window-limited: blocks of {results['window_tokens']} tokens read alone | {w['bits_per_byte']:.4f} | "
        f"{w['loss']:.4f} |",
        "",
        "Loss by token position (nats/token, mean over documents):",
        "",
        "| positions | streaming | window-limited |",
        "|---|---|---|",
    ]
    for b in results["by_position"]:
        lines.append(f"| {b['start']:,}-{b['end'] - 1:,} | {b['streaming']:.4f} | {b['window_limited']:.4f} |")
    passkey = results.get("passkey")
    if passkey:
        lines += ["", f"Passkey retrieval (exact match over {passkey['trials']} keys):", ""]
        lines.append("| depth \\ tokens | " + " | ".join(f"{n:,}" for n in passkey["lengths"]) + " |")
        lines.append("|---" * (len(passkey["lengths"]) + 1) + "|")
        for depth, row in zip(passkey["depths"], passkey["accuracy"]):
            lines.append(f"| {depth:.0%} | " + " | ".join(f"{a:.0%}" for a in row) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], output_dir: Path) -> list[str]:
    """``loss_by_position.png`` and ``passkey.png``; none without matplotlib (the ``eval`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'titans-hf[eval]'): no plots.", file=sys.stderr)
        return []
    centers = [math.sqrt(b["start"] * b["end"]) for b in results["by_position"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in ("streaming", "window_limited"):
        ax.plot(centers, [b[name] for b in results["by_position"]], marker="o", label=name.replace("_", "-"))
    ax.axvline(results["window_tokens"], color="grey", linestyle=":", label="attention span")
    ax.set(xscale="log", xlabel="token position", ylabel="loss (nats/token)", title="Loss by position")
    ax.legend()
    fig.tight_layout()
    fig.savefig(output_dir / "loss_by_position.png", dpi=120)
    saved = ["loss_by_position.png"]
    passkey = results.get("passkey")
    if passkey:
        fig, ax = plt.subplots(figsize=(1.2 * len(passkey["lengths"]) + 2, 0.5 * len(passkey["depths"]) + 2))
        image = ax.imshow(passkey["accuracy"], vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(passkey["lengths"])), [f"{n:,}" for n in passkey["lengths"]])
        ax.set_yticks(range(len(passkey["depths"])), [f"{d:.0%}" for d in passkey["depths"]])
        for i, row in enumerate(passkey["accuracy"]):
            for j, value in enumerate(row):
                ax.text(j, i, f"{value:.0%}", ha="center", va="center")
        ax.set(xlabel="context length (tokens)", ylabel="needle depth", title="Passkey retrieval")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        fig.savefig(output_dir / "passkey.png", dpi=120)
        saved.append("passkey.png")
    plt.close("all")
    return saved


def update_model_card(card: Path, report: str) -> None:
    """Inserts (or replaces) the report in a model card, between markers, before its configuration section."""
    text = card.read_text() if card.exists() else ""
    block = f"{CARD_START}\n{report}{CARD_END}\n"
    if CARD_START in text and CARD_END in text:
        text = text[: text.index(CARD_START)] + block + text[text.index(CARD_END) + len(CARD_END) + 1 :]
    elif "\n## Configuration" in text:
        at = text.index("\n## Configuration") + 1
        text = text[:at] + block + "\n" + text[at:]
    else:
        text = text + ("\n" if text else "") + block
    card.write_text(text)


# ---------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        args.model_name_or_path, trust_remote_code=args.trust_remote_code, dtype=getattr(torch, args.dtype)
    )
    model = model.to(device).eval()
    if model.config.model_type != "titans":
        raise ValueError(f"{args.model_name_or_path} is a {model.config.model_type!r} model, not a Titans model.")
    local = Path(args.model_name_or_path).is_dir()
    name = Path(args.model_name_or_path.rstrip("/")).name
    output_dir = Path(args.output_dir or (args.model_name_or_path if local else f"outputs/eval-{name}"))
    output_dir.mkdir(parents=True, exist_ok=True)
    window = args.window_tokens or attention_span(model.config)

    for length in args.passkey_lengths:  # too short a length fails now, not after the documents
        passkey_prompt(tokenizer, length, 0.0, "00000")
    documents, source = load_documents(args, tokenizer)
    work = 2 * sum(len(d) for d in documents) + args.passkey_trials * len(args.passkey_depths) * sum(
        args.passkey_lengths
    )
    bar = tqdm(total=work, unit="tok", unit_scale=True, desc="Evaluating")
    totals = {"streaming": [0.0, 0, 0], "window_limited": [0.0, 0, 0]}  # nats, tokens, bytes
    sums = {key: torch.zeros(len(position_bins(args.max_tokens))) for key in totals}
    counts = torch.zeros(len(position_bins(args.max_tokens)))
    cache_bytes = 0
    for ids in documents:
        stream, cache_bytes = streaming_losses(model, ids, args.piece_tokens)
        bar.update(len(ids))
        alone = window_losses(model, ids, window, args.batch_size)
        bar.update(len(ids))
        for key, losses in (("streaming", stream), ("window_limited", alone)):
            totals[key][0] += losses.double().sum().item()
            totals[key][1] += len(losses)
            totals[key][2] += scored_bytes(tokenizer, ids)
            for i, (low, high) in enumerate(position_bins(len(ids))):
                sums[key][i] += losses[low - 1 : high - 1].double().mean().item()
        for i, _ in enumerate(position_bins(len(ids))):
            counts[i] += 1
    used = int((counts > 0).sum())
    results: dict[str, Any] = {
        "model": args.model_name_or_path,
        "variant": model.config.variant,
        "source": source,
        "documents": len(documents),
        "tokens": sum(len(d) for d in documents),
        "max_document_tokens": max(len(d) for d in documents),
        "window_tokens": window,
        "piece_tokens": args.piece_tokens,
        "cache_bytes": cache_bytes,
        "dtype": args.dtype,
    }
    for key, (nats, tokens, num_bytes) in totals.items():
        results[key] = {"loss": nats / tokens, "bits_per_byte": nats / math.log(2) / num_bytes}
    results["by_position"] = [
        {"start": low, "end": high, "documents": int(counts[i]), **{k: (sums[k][i] / counts[i]).item() for k in sums}}
        for i, (low, high) in enumerate(position_bins(args.max_tokens)[:used])
    ]
    if args.passkey_lengths:
        results["passkey"] = {
            "lengths": args.passkey_lengths,
            "depths": args.passkey_depths,
            "trials": args.passkey_trials,
            "accuracy": passkey_accuracy(model, tokenizer, args, bar),
        }
    bar.close()
    report = markdown(results)
    results["plots"] = plot(results, output_dir)
    (output_dir / "long_context_eval.json").write_text(json.dumps(results, indent=2))
    (output_dir / "long_context_eval.md").write_text(report)
    if args.update_model_card:
        if not local:
            raise ValueError("--update_model_card needs a local checkpoint folder (push it again afterwards).")
        update_model_card(Path(args.model_name_or_path) / "README.md", report)
    print(report)
    print(
        f"Saved long_context_eval.json, long_context_eval.md and {', '.join(results['plots']) or 'no plots'} to "
        f"{output_dir}"
    )
    return results


if __name__ == "__main__":
    main()
