# Copyright 2026 The titans-hf developers. Licensed under the Apache License, Version 2.0.
"""Data: Hub datasets (streamed by default) or local files, tokenised and packed into blocks (or prompt/response
pairs with the loss on the response only), a held-out split, and the resumable per-process stream of examples."""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import torch
from accelerate import Accelerator
from datasets.distributed import split_dataset_by_node
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

EXAMPLES_DIR = Path(__file__).resolve().parent.parent


DEFAULT_TRAIN_FILE = EXAMPLES_DIR / "data" / "tinyshakespeare.txt"


TEXT_EXTENSIONS = {
    ".txt": "text",
    ".text": "text",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}


@dataclasses.dataclass
class PreparedData:
    """The processed data of a run.

    ``train``: examples (``input_ids`` and, in prompt/response mode, ``labels``) as a ``datasets.Dataset`` or, when
    streaming, a ``datasets.IterableDataset``; ``eval``: the held-out examples, materialised, each with ``num_bytes``
    (UTF-8 bytes of the tokens it is scored on, for bits per byte); ``sample_prompt``: the start of a held-out
    document; ``source``: a description for logs and the model card; ``hub_dataset``: the Hub id, if any.
    """

    train: datasets.Dataset | datasets.IterableDataset
    eval: list[dict[str, Any]]
    streaming: bool
    sample_prompt: str
    source: str
    hub_dataset: str | None
    fingerprint: dict[str, Any]


def data_files(pattern: str, flag: str) -> list[str]:
    files = sorted(glob.glob(os.path.expanduser(pattern)))
    if not files:
        raise ValueError(f"{flag} {pattern}: no such file.")
    suffixes = {Path(f).suffix.lower() for f in files}
    unknown = suffixes - set(TEXT_EXTENSIONS)
    if unknown or len({TEXT_EXTENSIONS[s] for s in suffixes}) != 1:
        raise ValueError(
            f"{flag} {pattern}: files must share one of the formats {sorted(TEXT_EXTENSIONS)}, got {sorted(suffixes)}."
        )
    return files


def load_raw_datasets(args: argparse.Namespace) -> tuple[Any, Any, bool, str]:
    """The raw train and held-out documents (``Dataset`` or ``IterableDataset``), whether they stream, and a
    description. Without a held-out split, one is carved out of the training documents (a seeded random
    ``--validation_split_percentage`` of a prepared dataset, or the first ``--validation_documents`` of a stream)."""
    if args.dataset_name:
        streaming = True if args.streaming is None else args.streaming
        try:
            raw = datasets.load_dataset(
                args.dataset_name, args.dataset_config, streaming=streaming, cache_dir=args.cache_dir
            )
        except Exception as error:  # datasets raises many types (DatasetNotFoundError, ValueError, ConnectionError)
            raise ValueError(
                f"Cannot load --dataset_name {args.dataset_name!r}"
                + (f" --dataset_config {args.dataset_config!r}" if args.dataset_config else "")
                + f": {error}"
            ) from error
        source = args.dataset_name + (f" ({args.dataset_config})" if args.dataset_config else "")
    else:
        train_pattern = args.train_file or str(DEFAULT_TRAIN_FILE)
        files = {"train": data_files(train_pattern, "--train_file")}
        if args.validation_file:
            files["validation"] = data_files(args.validation_file, "--validation_file")
        builders = {TEXT_EXTENSIONS[Path(f).suffix.lower()] for split in files.values() for f in split}
        if len(builders) != 1:
            raise ValueError("--train_file and --validation_file must have the same format.")
        builder = builders.pop()
        kwargs = {"sample_by": args.txt_sample_by} if builder == "text" else {}
        streaming = False if args.streaming is None else args.streaming
        raw = datasets.load_dataset(builder, data_files=files, streaming=streaming, cache_dir=args.cache_dir, **kwargs)
        source = ", ".join(os.path.basename(f) for f in files["train"])
    if args.dataset_split not in raw:
        raise ValueError(f"The dataset has no split {args.dataset_split!r}; its splits: {sorted(raw)}.")
    train = raw[args.dataset_split]
    held_out = args.validation_split or ("validation" if "validation" in raw else None)
    if args.validation_split and args.validation_split not in raw:
        raise ValueError(f"The dataset has no split {args.validation_split!r}; its splits: {sorted(raw)}.")
    if held_out is not None:
        return train, raw[held_out], streaming, source
    if streaming:
        return train.skip(args.validation_documents), train.take(args.validation_documents), streaming, source
    split = train.train_test_split(test_size=args.validation_split_percentage / 100, seed=args.seed)
    return split["train"], split["test"], streaming, source


def _columns(dataset: Any) -> list[str]:
    """Column names, peeking at the first example of a stream whose features are unknown."""
    if dataset.column_names is not None:
        return list(dataset.column_names)
    first = next(iter(dataset), None)
    return [] if first is None else list(first)


def check_columns(dataset: Any, columns: list[str], flags: list[str]) -> list[str]:
    """Raises if a requested column is missing (naming the flag and the columns there are); returns all columns."""
    present = _columns(dataset)
    for column, flag in zip(columns, flags):
        if column not in present:
            raise ValueError(
                f"{flag} {column!r} is not a column of the dataset; its columns are {present}. "
                f"Pass {flag} with one of them."
            )
    return present


def _document_ids(tokenizer: PreTrainedTokenizerBase, texts: list[Any], column: str) -> list[list[int]]:
    """Token ids of documents: ``[BOS] text EOS`` (BOS only if the tokenizer has one); empty documents dropped."""
    for text in texts:
        if text is not None and not isinstance(text, str):
            raise ValueError(f"Column {column!r} must hold text, found a {type(text).__name__}: {str(text)[:80]!r}.")
    encoded = tokenizer([t or "" for t in texts], add_special_tokens=False)["input_ids"]
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    return [bos + ids + [tokenizer.eos_token_id] for ids in encoded if ids]


def pack_documents(
    dataset: Any,
    tokenizer: PreTrainedTokenizerBase,
    text_column: str,
    block_size: int,
    args: argparse.Namespace,
    desc: str,
) -> Any:
    """Documents tokenised, joined with EOS and cut into ``block_size`` blocks (a batch of 1,000 documents at a
    time; its last partial block is dropped)."""
    columns = _columns(dataset)

    def pack(batch: dict[str, list]) -> dict[str, list[list[int]]]:
        stream = [token for ids in _document_ids(tokenizer, batch[text_column], text_column) for token in ids]
        usable = len(stream) // block_size * block_size
        return {"input_ids": [stream[i : i + block_size] for i in range(0, usable, block_size)]}

    kwargs: dict[str, Any] = dict(batched=True, batch_size=1000, remove_columns=columns)
    if isinstance(dataset, datasets.Dataset):
        kwargs.update(num_proc=args.preprocessing_num_workers, desc=desc)
    return dataset.map(pack, **kwargs)


def pair_examples(
    dataset: Any,
    tokenizer: PreTrainedTokenizerBase,
    args: argparse.Namespace,
    max_length: int,
    desc: str,
) -> Any:
    """Prompt/response pairs as ``[BOS] prompt_template(prompt) response EOS`` with labels -100 on the prompt
    (loss on the response only), truncated to ``max_length``; pairs whose response is cut entirely are dropped."""
    columns = _columns(dataset)
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]

    def encode(batch: dict[str, list]) -> dict[str, list[list[int]]]:
        prompts = [args.prompt_template.replace("{prompt}", p or "") for p in batch[args.prompt_column]]
        responses = [r or "" for r in batch[args.response_column]]
        for value, column in ((prompts, args.prompt_column), (responses, args.response_column)):
            bad = next((v for v in value if not isinstance(v, str)), None)
            if bad is not None:
                raise ValueError(f"Column {column!r} must hold text, found a {type(bad).__name__}.")
        p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
        out: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
        for p, r in zip(p_ids, r_ids):
            if not r:
                continue
            prompt = bos + p
            ids = (prompt + r + [tokenizer.eos_token_id])[:max_length]
            labels = ([-100] * len(prompt) + r + [tokenizer.eos_token_id])[:max_length]
            if all(label == -100 for label in labels[1:]):
                continue
            out["input_ids"].append(ids)
            out["labels"].append(labels)
        return out

    kwargs: dict[str, Any] = dict(batched=True, batch_size=1000, remove_columns=columns)
    if isinstance(dataset, datasets.Dataset):
        kwargs.update(num_proc=args.preprocessing_num_workers, desc=desc)
    return dataset.map(encode, **kwargs)


def _scored_bytes(tokenizer: PreTrainedTokenizerBase, example: dict[str, Any]) -> int:
    """UTF-8 bytes of the tokens an example is scored on (the shifted labels that are not -100)."""
    labels = example.get("labels", example["input_ids"])[1:]
    ids = [t for t in labels if t != -100]
    return len(tokenizer.decode(ids, skip_special_tokens=True).encode("utf-8"))


def _token_count(
    dataset: Any, tokenizer: PreTrainedTokenizerBase, column: str, limit: int = 10_000
) -> tuple[int, int]:
    """(documents, tokens) of the first ``limit`` documents: for error messages only."""
    documents = tokens = 0
    for example in dataset.take(limit) if hasattr(dataset, "take") else dataset:
        documents += 1
        text = example.get(column)
        tokens += len(tokenizer(text, add_special_tokens=False)["input_ids"]) if isinstance(text, str) and text else 0
    return documents, tokens


def prepare_data(
    args: argparse.Namespace,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    accelerator: Accelerator,
    pairs: bool = False,
) -> PreparedData:
    """Loads, checks, tokenises and packs (or pairs) the data; materialises the held-out examples."""
    with accelerator.main_process_first():  # the main process downloads and prepares; the others reuse its cache
        train_raw, eval_raw, streaming, source = load_raw_datasets(args)
    if pairs:
        columns, flags = [args.prompt_column, args.response_column], ["--prompt_column", "--response_column"]
    else:
        columns, flags = [args.text_column], ["--text_column"]
    check_columns(train_raw, columns, flags)
    check_columns(eval_raw, columns, flags)
    if streaming:
        train_raw = train_raw.shuffle(seed=args.seed, buffer_size=args.shuffle_buffer_size)
        train_raw = split_dataset_by_node(
            train_raw, rank=accelerator.process_index, world_size=accelerator.num_processes
        )

    first_eval = next(iter(eval_raw.take(1) if streaming else eval_raw.select(range(min(1, len(eval_raw))))), None)
    prompt_text = "" if first_eval is None else str(first_eval.get(columns[0]) or "")
    if pairs:
        sample_prompt = args.prompt_template.replace("{prompt}", prompt_text)
    else:
        sample_prompt = next((line for line in prompt_text.splitlines() if line.strip()), "")[:64]
        sample_prompt += "\n" if sample_prompt and prompt_text.startswith(sample_prompt + "\n") else ""

    with accelerator.main_process_first():
        if pairs:
            train = pair_examples(train_raw, tokenizer, args, block_size, "Tokenising training pairs")
            held_out = pair_examples(eval_raw, tokenizer, args, block_size, "Tokenising held-out pairs")
        else:
            train = pack_documents(train_raw, tokenizer, args.text_column, block_size, args, "Packing training data")
            held_out = pack_documents(eval_raw, tokenizer, args.text_column, block_size, args, "Packing held-out data")

    empty = len(train) == 0 if isinstance(train, datasets.Dataset) else next(iter(train), None) is None
    if empty:
        what = "prompt/response pair with a non-empty response" if pairs else f"block of --block_size {block_size}"
        documents, tokens = _token_count(train_raw, tokenizer, columns[-1])
        raise ValueError(
            f"The training data ({source}) yields no {what}: its {documents} documents"
            + (" (first 10,000)" if documents == 10_000 else "")
            + f" hold {tokens} tokens in column {columns[-1]!r}"
            + ("." if tokens == 0 else ", fewer than one block; lower --block_size or add data.")
        )
    eval_examples = (
        list(held_out.take(args.max_eval_samples))
        if streaming
        else held_out.select(range(min(args.max_eval_samples, len(held_out)))).to_list()
    )
    if not eval_examples:
        raise ValueError(
            f"The held-out data ({source}) yields no {'pair' if pairs else f'block of {block_size} tokens'}: give "
            "more held-out documents (--validation_split_percentage / --validation_documents / --validation_file) "
            "or lower --block_size."
        )
    for example in eval_examples:
        example["num_bytes"] = _scored_bytes(tokenizer, example)

    fingerprint = {
        "data": args.dataset_name or os.path.abspath(args.train_file or DEFAULT_TRAIN_FILE),
        "dataset_config": args.dataset_config,
        "columns": columns,
        "block_size": block_size,
        "streaming": streaming,
    }
    if isinstance(train, datasets.Dataset):
        fingerprint["train_examples"] = len(train)
    return PreparedData(
        train=train,
        eval=eval_examples,
        streaming=streaming,
        sample_prompt=sample_prompt,
        source=source,
        hub_dataset=args.dataset_name,
        fingerprint=fingerprint,
    )


class ExampleStream:
    """This process's endless, deterministic stream of training examples, resumable at any position.

    A prepared dataset is reshuffled every epoch (permutation seeded by ``seed + epoch``) and dealt round-robin to the
    processes (each gets ``len // world_size`` examples per epoch), so position ``n`` of a process is found by index
    arithmetic. A streamed dataset (already split between processes by ``split_dataset_by_node`` and shuffled with a
    seeded buffer) is re-iterated with ``set_epoch``; resuming skips the examples already read.
    """

    def __init__(self, dataset: Any, rank: int, world_size: int, seed: int):
        self.dataset, self.rank, self.world_size, self.seed = dataset, rank, world_size, seed
        self.prepared = isinstance(dataset, datasets.Dataset)
        if self.prepared:
            self.per_epoch = len(dataset) // world_size
            if self.per_epoch == 0:
                raise ValueError(
                    f"The training data has {len(dataset)} examples, fewer than the {world_size} processes: add data "
                    "or lower --block_size."
                )

    def epoch_of(self, position: int) -> float:
        """Epochs completed at a position (prepared data only, else NaN)."""
        return position / self.per_epoch if self.prepared else float("nan")

    def iterate(self, start: int = 0, show_skip: bool = False) -> Iterator[dict[str, Any]]:
        """Examples from position ``start`` on."""
        if self.prepared:
            position = start
            while True:
                epoch, offset = divmod(position, self.per_epoch)
                order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + epoch))
                mine = order[self.rank :: self.world_size][: self.per_epoch]
                for index in mine[offset:].tolist():
                    yield self.dataset[index]
                position = (epoch + 1) * self.per_epoch
        else:
            skip = tqdm(total=start, desc="Skipping examples already trained on", disable=not (show_skip and start))
            seen, epoch = 0, 0
            while True:
                self.dataset.set_epoch(epoch)
                produced = 0
                for example in self.dataset:
                    produced += 1
                    if seen < start:
                        seen += 1
                        skip.update()
                        if seen == start:
                            skip.close()
                        continue
                    yield example
                if produced == 0:
                    raise ValueError(f"Process {self.rank} received no training examples from the stream.")
                epoch += 1


def collate(examples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """A batch: ``input_ids``, ``labels`` (the inputs where none are given; -100 on padding) and, only when some
    example is shorter, a right-padding ``attention_mask``."""
    length = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.tensor(example["input_ids"])
        labels[row, :n] = torch.tensor(example.get("labels", example["input_ids"]))
        mask[row, :n] = 1
    batch = {"input_ids": input_ids, "labels": labels}
    if not bool(mask.all()):
        batch["attention_mask"] = mask
    return batch


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
