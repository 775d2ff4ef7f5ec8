"""Training workflows: Trainer, examples/pretrain.py and examples/finetune.py (Accelerate), checkpoints and exact
resumption, two processes, Hub push, clear errors on bad input. Everything runs offline on tiny settings."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import torch
import transformers
import yaml
from safetensors.torch import load_file

from titans_hf import TitansConfig, TitansForCausalLM

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))

import finetune  # noqa: E402
import pretrain  # noqa: E402
import titans_training  # noqa: E402

SHAKESPEARE = EXAMPLES / "data" / "tinyshakespeare.txt"


def _load_example(name: str, module: str):
    """An example script imported under another module name (``evaluate`` would shadow the Hugging Face library)."""
    spec = importlib.util.spec_from_file_location(module, EXAMPLES / f"{name}.py")
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


evaluate = _load_example("evaluate", "titans_evaluate")

# A fresh interpreter in which `titans_hf` cannot be imported: saved folders must carry their own code.
FRESH_LOAD = textwrap.dedent(
    """
    import importlib.abc, json, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "titans_hf" or name.startswith("titans_hf."):
                raise ImportError("titans_hf is blocked in this process")
    sys.meta_path.insert(0, Block())
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    report = {}
    for folder, expected in json.loads(sys.argv[1]).items():
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        ref = torch.load(expected)
        with torch.no_grad():
            logits = model(ref["input_ids"]).logits
        report[folder] = {
            "module": type(model).__module__,
            "max_diff": (logits - ref["logits"]).abs().max().item(),
            "vocab": len(tokenizer),
        }
    try:
        import titans_hf  # noqa: F401
        report["blocked"] = False
    except ImportError:
        report["blocked"] = True
    print("REPORT" + json.dumps(report))
    """
)


def python_env(threads: int = 2) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        OMP_NUM_THREADS=str(threads),
        OMP_WAIT_POLICY="PASSIVE",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each in-process run starts from a clean Accelerate state, as a new process would."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("training")


@pytest.fixture(scope="module")
def corpus(workdir) -> Path:
    """The first 40 KB of the shipped text: a few hundred paragraphs."""
    text = SHAKESPEARE.read_text()[:40_000]
    path = workdir / "corpus.txt"
    path.write_text(text[: text.rfind("\n\n") + 1])
    return path


def tiny_args(workdir: Path, corpus: Path, output: str, *extra: str) -> list[str]:
    return [
        "--config", "tiny",
        "--train_file", str(corpus),
        "--output_dir", str(workdir / output),
        "--cache_dir", str(workdir / "cache"),
        "--per_device_train_batch_size", "2",
        "--per_device_eval_batch_size", "4",
        "--max_eval_samples", "6",
        "--block_size", "64",
        "--learning_rate", "5e-3",
        "--num_warmup_steps", "2",
        "--sample_max_new_tokens", "12",
        "--seed", "7",
        *extra,
    ]  # fmt: skip


def expected_logits(model: torch.nn.Module, path: Path) -> Path:
    """Logits of a model on fixed tokens, for comparison in a fresh process."""
    input_ids = torch.randint(3, 200, (2, 37), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        logits = model(input_ids).logits
    torch.save({"input_ids": input_ids, "logits": logits}, path)
    return path


class LocalHub:
    """Stands in for `transformers.utils.hub.hf_api()`: repositories are folders under `root`."""

    def __init__(self, root: Path):
        self.root = root
        self.calls: list[str] = []

    def create_repo(self, repo_id, private=None, token=None, exist_ok=False, **kwargs):
        self.calls.append(f"create_repo {repo_id}")
        (self.root / repo_id).mkdir(parents=True, exist_ok=exist_ok)
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, repo_id, folder_path, ignore_patterns=None, **kwargs):
        from huggingface_hub.utils import filter_repo_objects

        self.calls.append(f"upload_folder {repo_id}")
        folder = Path(folder_path)
        files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
        for name in filter_repo_objects(files, ignore_patterns=ignore_patterns):
            target = self.root / repo_id / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes((folder / name).read_bytes())
        return SimpleNamespace(commit_url="local")


# --------------------------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trainer_run(workdir, corpus):
    """Trainer on a tiny Titans model: gradient checkpointing, accumulation (num_items_in_batch), eval, save_model."""
    from transformers import ByT5Tokenizer, DataCollatorForLanguageModeling, Trainer, TrainingArguments

    tokenizer = ByT5Tokenizer()
    ids = tokenizer(corpus.read_text(), add_special_tokens=False)["input_ids"]
    blocks = [ids[i : i + 64] for i in range(0, len(ids) - 64, 64)]
    train_set = datasets.Dataset.from_dict({"input_ids": blocks[:-16]})
    eval_set = datasets.Dataset.from_dict({"input_ids": blocks[-16:]})
    config = TitansConfig(
        **titans_training.BUILTIN_PRESETS["tiny"],
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    model = TitansForCausalLM(config)
    args = TrainingArguments(
        output_dir=str(workdir / "trainer"),
        max_steps=12,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        gradient_accumulation_steps=2,
        learning_rate=5e-3,
        lr_scheduler_type="constant",
        logging_steps=10,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        # Transformers >= 5.24 calls it activation checkpointing; gradient_checkpointing is its deprecated alias.
        **{"activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
           else "gradient_checkpointing": True},
    )  # fmt: skip
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        processing_class=tokenizer,
    )
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    folder = workdir / "trainer" / "final"
    trainer.save_model(str(folder))
    return SimpleNamespace(
        trainer=trainer,
        before=before,
        after=after,
        folder=folder,
        expected=expected_logits(trainer.model, workdir / "trainer_logits.pt"),
    )


def test_trainer_trains_evaluates_and_saves(trainer_run):
    trainer = trainer_run.trainer
    assert trainer.model_accepts_loss_kwargs  # Trainer passes num_items_in_batch to the model
    assert getattr(trainer.model, "is_activation_checkpointing", None) or trainer.model.is_gradient_checkpointing
    assert trainer.state.global_step == 12
    assert trainer_run.after < trainer_run.before - 0.5, (trainer_run.before, trainer_run.after)
    files = {p.name for p in trainer_run.folder.iterdir()}
    assert {"model.safetensors", "config.json", "configuration_titans.py", "modeling_titans.py"} <= files
    assert "tokenizer_config.json" in files
    assert json.loads((trainer_run.folder / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"]


def test_num_items_in_batch_sums_token_losses():
    config = TitansConfig(**titans_training.BUILTIN_PRESETS["tiny"], vocab_size=64)
    model = TitansForCausalLM(config).eval()
    input_ids = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(1))
    labels = input_ids.clone()
    labels[0, :5] = -100
    with torch.no_grad():
        logits = model(input_ids).logits
        total = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, 64), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
        )
        loss = model(input_ids, labels=labels, num_items_in_batch=torch.tensor(100)).loss
    torch.testing.assert_close(loss, total / 100)


# --------------------------------------------------------------------------------------------------------------------
# examples/pretrain.py and examples/finetune.py
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pretrain_run(workdir, corpus):
    """pretrain.py end to end on the tiny preset, with evaluation, checkpoints, final save and a (local) Hub push."""
    hub = LocalHub(workdir / "hub")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(transformers.utils.hub, "hf_api", lambda: hub)
        results = pretrain.main(
            tiny_args(
                workdir, corpus, "pretrain",
                "--max_train_steps", "8", "--eval_steps", "4", "--checkpointing_steps", "3",
                "--checkpoints_total_limit", "2", "--logging_steps", "2",
                "--push_to_hub", "--hub_model_id", "someone/titans-tiny",
            )
        )  # fmt: skip
    folder = workdir / "pretrain"
    model = TitansForCausalLM.from_pretrained(folder)
    return SimpleNamespace(
        results=results,
        folder=folder,
        hub=hub,
        pushed=workdir / "hub" / "someone" / "titans-tiny",
        expected=expected_logits(model, workdir / "pretrain_logits.pt"),
    )


def test_pretrain_end_to_end(pretrain_run):
    results, folder = pretrain_run.results, pretrain_run.folder
    assert [h["step"] for h in results["eval_history"]] == [0, 4, 8]
    first, last = results["eval_history"][0], results["eval_history"][-1]
    assert last["eval_bits_per_byte"] < first["eval_bits_per_byte"]
    # Byte-level tokens: every scored token is one byte except the EOS separators.
    assert first["eval_bits_per_byte"] >= first["eval_loss"] / torch.log(torch.tensor(2.0)).item()
    assert results["train_steps"] == 8 and results["num_processes"] == 1
    assert [p.name for p in titans_training.list_checkpoints(folder)] == ["step_3", "step_6"]  # total limit 2
    state = json.loads((folder / "checkpoints" / "step_6" / "training_state.json").read_text())
    assert state["step"] == 6 and state["position"] == 6 * 2
    files = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "config.json", "modeling_titans.py", "tokenizer_config.json", "README.md"} <= files
    # The checkpoint tells clients no false length limit: the training length is a record, the tokenizer's
    # model_max_length (what lm-evaluation-harness and pipelines read) is the verified context.
    config = json.loads((folder / "config.json").read_text())
    assert config["training_context_length"] == 64 and "max_position_embeddings" not in config
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tokenizer_config["model_max_length"] == titans_training.VERIFIED_CONTEXT_LENGTH == 1 << 20
    saved = json.loads((folder / "all_results.json").read_text())
    assert saved["eval_bits_per_byte"] == pytest.approx(results["eval_bits_per_byte"])
    assert results["sample"].startswith("First Citizen") or len(results["sample"]) > 0
    card = (folder / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: transformers" in card and "- titans" in card
    assert f"{results['eval_bits_per_byte']:.4f}" in card and '"variant": "mag"' in card


LONG_TASKS = {
    "multiple_choice": "doc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: 0\n"
    "metric_list:\n  - metric: acc\n",
    "loglikelihood_rolling": "doc_to_text: ''\ndoc_to_target: '{{context}}'\nmetric_list:\n  - metric: bits_per_byte\n",
    "generate_until": "doc_to_text: '{{context}}'\ndoc_to_target: '{{choices[0]}}'\n"
    "generation_kwargs:\n  until: ['\\n\\n']\n  max_gen_toks: 5\n  do_sample: false\nmetric_list:\n  - metric: exact_match\n",
}


def test_lm_evaluation_harness_sees_the_whole_context(workdir, pretrain_run):
    """lm-evaluation-harness (hf model, remote code, local YAML tasks) on the pretrain checkpoint: contexts of 2,300
    bytes (the training length is 64, the harness's fallback 2,048) reach the model whole, for loglikelihood,
    rolling loglikelihood and generate_until: each result equals the model's own on the untruncated input."""
    lm_eval = pytest.importorskip("lm_eval", reason="the `eval` extra (lm-eval) is part of the dev install")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    text = SHAKESPEARE.read_text()
    rows = [{"context": text[i : i + 2300], "choices": [text[i + 2300 : i + 2400], text[i + 9000 : i + 9100]]}
            for i in (0, 3000)]  # fmt: skip
    tasks = workdir / "lm_eval_tasks"
    tasks.mkdir()
    (tasks / "long.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    for kind, body in LONG_TASKS.items():
        header = f"task: titans_long_{kind}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tasks / 'long.jsonl'}\n"
        (tasks / f"{kind}.yaml").write_text(header + f"test_split: test\noutput_type: {kind}\n" + body)
    lm = HFLM(pretrained=str(pretrain_run.folder), trust_remote_code=True, dtype="float32", device="cpu", batch_size=1)
    assert lm.max_length == titans_training.VERIFIED_CONTEXT_LENGTH
    out = lm_eval.simple_evaluate(
        model=lm, tasks=[f"titans_long_{kind}" for kind in LONG_TASKS], task_manager=TaskManager(include_path=str(tasks)),
        log_samples=True,
    )  # fmt: skip
    model, tokenizer = lm.model, lm.tokenizer
    assert len(lm.tok_encode(rows[0]["context"])) > 2048

    def loglikelihood(context: list[int], continuation: list[int]) -> float:
        ids = torch.tensor([context + continuation])
        with torch.no_grad():
            logprobs = model(ids).logits.log_softmax(-1)[0, len(context) - 1 : -1]
        return logprobs.gather(-1, torch.tensor(continuation)[:, None]).sum().item()

    # The inputs as the harness encodes them (its own _encode_pair: with this byte tokenizer each part ends in EOS),
    # scored by the model on the whole, untruncated sequence.
    for sample in out["samples"]["titans_long_multiple_choice"]:
        for (context, continuation), response in zip(sample["arguments"], sample["resps"]):
            context_ids, continuation_ids = lm._encode_pair(context, continuation)
            assert len(context_ids) > 2048
            assert response[0][0] == pytest.approx(loglikelihood(context_ids, continuation_ids), rel=1e-5)
    for sample in out["samples"]["titans_long_loglikelihood_rolling"]:
        document = lm.tok_encode(sample["doc"]["context"])
        assert len(document) > 2048
        expected = loglikelihood([lm.prefix_token_id], document)
        assert sample["resps"][0][0] == pytest.approx(expected, rel=1e-5)
    for sample in out["samples"]["titans_long_generate_until"]:
        context = torch.tensor([lm.tok_encode(sample["doc"]["context"])])
        generated = model.generate(context, max_new_tokens=5, do_sample=False)[0, context.shape[1] :]
        expected = tokenizer.decode(generated, skip_special_tokens=True).split("\n\n")[0]
        assert sample["resps"][0][0] == expected


def test_long_context_evaluation(workdir, pretrain_run):
    """examples/evaluate.py on the pretrain checkpoint (shipped text, tiny sizes): streamed losses equal one full
    forward pass, window-limited ones equal each block read alone; JSON, markdown, plots and the model card."""
    folder = workdir / "evaluated"
    shutil.copytree(pretrain_run.folder, folder, ignore=shutil.ignore_patterns("checkpoints"))
    model = TitansForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(3, 200, (150,), generator=torch.Generator().manual_seed(0)).tolist()
    streamed, cache_bytes = evaluate.streaming_losses(model, ids, piece_tokens=40)
    loss = torch.nn.functional.cross_entropy
    with torch.no_grad():
        full = loss(model(torch.tensor([ids])).logits[0, :-1], torch.tensor(ids[1:]), reduction="none")
        blocks = [torch.tensor(ids[s : s + 17]) for s in range(0, 149, 16)]  # 16 inputs, 16 targets each
        alone = [loss(model(b[None, :-1]).logits[0], b[1:], reduction="none") for b in blocks]
    torch.testing.assert_close(streamed, full, rtol=0, atol=1e-5)
    torch.testing.assert_close(
        evaluate.window_losses(model, ids, window=16, batch_size=4), torch.cat(alone), rtol=0, atol=1e-5
    )
    assert cache_bytes > 0

    card = (folder / "README.md").read_text()
    results = evaluate.main([
        "--model_name_or_path", str(folder), "--output_dir", str(workdir / "eval"), "--max_documents", "2",
        "--max_tokens", "600", "--min_tokens", "100", "--piece_tokens", "128", "--passkey_lengths", "256,400",
        "--passkey_depths", "0,1", "--passkey_trials", "1", "--update_model_card",
    ])  # fmt: skip
    assert (
        results["documents"] == 2 and results["tokens"] == 1200 and results["window_tokens"] == 16
    )  # tiny: window 16
    assert results["by_position"][-1]["end"] == 600 and results["by_position"][-1]["documents"] == 2
    assert set(results["passkey"]) >= {"lengths", "depths", "accuracy"} and len(results["passkey"]["accuracy"]) == 2
    for name in ("long_context_eval.json", "long_context_eval.md", "loss_by_position.png", "passkey.png"):
        assert (workdir / "eval" / name).exists(), name
    path = folder / "README.md"
    updated = path.read_text()
    assert updated.index("## Long-context evaluation") < updated.index("## Configuration") and "| streaming" in updated
    evaluate.update_model_card(path, "## Long-context evaluation\nagain\n")  # a second run replaces the section
    again = path.read_text()
    assert again.count(evaluate.CARD_START) == 1 and "again" in again and "| streaming" not in again
    start, end = again.index(evaluate.CARD_START), again.index(evaluate.CARD_END) + len(evaluate.CARD_END) + 2
    assert again[:start] + again[end:] == card  # the rest of the card is untouched
    with pytest.raises(ValueError, match=r"--passkey_lengths 100 is too short for the prompt \(192 tokens at least\)"):
        evaluate.main(["--model_name_or_path", str(folder), "--passkey_lengths", "100,256"])
    with pytest.raises(ValueError, match=r"--passkey_depths must lie in \[0, 1\]"):
        evaluate.main(["--model_name_or_path", str(folder), "--passkey_depths", "0,2"])


def test_push_to_hub_uploads_the_final_folder(pretrain_run):
    assert pretrain_run.hub.calls == ["create_repo someone/titans-tiny", "upload_folder someone/titans-tiny"]
    pushed = {p.relative_to(pretrain_run.pushed).as_posix() for p in pretrain_run.pushed.rglob("*") if p.is_file()}
    assert {"README.md", "model.safetensors", "config.json", "modeling_titans.py", "tokenizer_config.json"} <= pushed
    assert not any(name.startswith("checkpoints/") for name in pushed)
    card = (pretrain_run.pushed / "README.md").read_text()
    assert "someone/titans-tiny" in card and "trust_remote_code=True" in card


def test_saved_and_pushed_folders_load_in_a_fresh_process(trainer_run, pretrain_run):
    folders = {
        str(trainer_run.folder): str(trainer_run.expected),
        str(pretrain_run.pushed): str(pretrain_run.expected),
    }
    out = subprocess.run(
        [sys.executable, "-c", FRESH_LOAD, json.dumps(folders)],
        capture_output=True, text=True, env=python_env(), timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.split("REPORT", 1)[1])
    assert report.pop("blocked")
    for folder, entry in report.items():
        assert entry["module"].startswith("transformers_modules"), (folder, entry)  # the folder's own code
        assert entry["max_diff"] < 1e-5, (folder, entry)
        assert entry["vocab"] == 384


def test_finetune_prompt_response_end_to_end(workdir, pretrain_run):
    pairs = workdir / "pairs.jsonl"
    rows = [{"question": f"What is {i} plus {i}?", "answer": f"It is {2 * i}."} for i in range(40)]
    pairs.write_text("\n".join(json.dumps(r) for r in rows))
    results = finetune.main(
        [
            "--model_name_or_path", str(pretrain_run.folder),
            "--train_file", str(pairs),
            "--prompt_column", "question", "--response_column", "answer",
            "--output_dir", str(workdir / "finetune"),
            "--cache_dir", str(workdir / "cache"),
            "--per_device_train_batch_size", "4", "--max_eval_samples", "4",
            "--max_train_steps", "4", "--eval_steps", "2", "--checkpointing_steps", "2",
            "--learning_rate", "3e-3", "--validation_split_percentage", "10",
            "--sample_max_new_tokens", "8",
        ]
    )  # fmt: skip
    folder = workdir / "finetune"
    assert [h["step"] for h in results["eval_history"]] == [0, 2, 4]
    assert results["eval_loss"] < results["eval_history"][0]["eval_loss"]
    # Loss on the response only: 4 held-out pairs, each scored on "It is N." + EOS (9 or 10 tokens).
    assert 4 * 9 <= results["eval_tokens"] <= 4 * 10
    assert (folder / "checkpoints" / "step_4" / "training_state.json").is_file()
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer_config.json").is_file()
    card = (folder / "README.md").read_text()
    assert "base_model:" in card and "fine-tuned" in card
    assert results["sample"].startswith("What is")


def test_local_file_formats(workdir):
    """Parquet and CSV files (json/jsonl and txt run end to end above), with a given held-out file."""
    rows = {"content": [f"Document number {i}." for i in range(30)]}
    for suffix in ("parquet", "csv"):
        train, held_out = workdir / f"train.{suffix}", workdir / f"held_out.{suffix}"
        writer = "to_parquet" if suffix == "parquet" else "to_csv"
        getattr(datasets.Dataset.from_dict(rows), writer)(str(train))
        getattr(datasets.Dataset.from_dict({"content": ["Held out."] * 3}), writer)(str(held_out))
        args = pretrain.parse_args(
            ["--train_file", str(train), "--validation_file", str(held_out), "--cache_dir", str(workdir / "cache")]
        )
        train_set, eval_set, streaming, source = titans_training.load_raw_datasets(args)
        assert (len(train_set), len(eval_set), streaming, source) == (30, 3, False, f"train.{suffix}")
        assert train_set[0]["content"] == "Document number 0."
    args = pretrain.parse_args(["--train_file", str(workdir / "train.parquet"), "--validation_file", str(held_out)])
    with pytest.raises(ValueError, match="same format"):
        titans_training.load_raw_datasets(args)
    with pytest.raises(ValueError, match="--train_file .*nothing.txt: no such file"):
        titans_training.load_raw_datasets(pretrain.parse_args(["--train_file", str(workdir / "nothing.txt")]))


def test_prompt_tokens_carry_no_loss():
    tokenizer = transformers.ByT5Tokenizer()
    raw = datasets.Dataset.from_dict({"p": ["Hi", "Long prompt " * 10], "r": ["yo", "cut"]})
    args = SimpleNamespace(
        prompt_column="p", response_column="r", prompt_template="Q: {prompt}\nA: ", preprocessing_num_workers=None
    )
    out = titans_training.pair_examples(raw, tokenizer, args, max_length=40, desc="pairs")
    assert len(out) == 1  # the second response is cut away by max_length: dropped
    ids, labels = out[0]["input_ids"], out[0]["labels"]
    prompt = len("Q: Hi\nA: ")
    assert labels[:prompt] == [-100] * prompt
    assert labels[prompt:] == ids[prompt:] and tokenizer.decode(ids[prompt:], skip_special_tokens=True) == "yo"
    assert ids[-1] == tokenizer.eos_token_id


# --------------------------------------------------------------------------------------------------------------------
# Kill and resume
# --------------------------------------------------------------------------------------------------------------------


def test_killed_run_resumes_exactly(workdir, corpus):
    """A run killed after its step-3 checkpoint and resumed ends with exactly the parameters and losses of an
    uninterrupted run: model, optimizer, schedule, random state and data stream all continue where they were."""
    common = ("--max_train_steps", "8", "--checkpointing_steps", "3", "--eval_steps", "0", "--logging_steps", "3",
              "--gradient_accumulation_steps", "2")  # fmt: skip
    straight = pretrain.main(tiny_args(workdir, corpus, "straight", *common))

    killed_dir = workdir / "killed"
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "pretrain.py"), *tiny_args(workdir, corpus, "killed", *common)],
        env=python_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    checkpoint = killed_dir / "checkpoints" / "step_3"
    deadline = time.time() + 240
    while not (checkpoint / "training_state.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    _, stderr = proc.communicate(timeout=60)
    print(f"run stopped by SIGKILL: {proc.returncode == -signal.SIGKILL}")
    assert (checkpoint / "training_state.json").exists(), stderr[-3000:]

    resumed = pretrain.main(tiny_args(workdir, corpus, "killed", *common, "--resume_from_checkpoint", str(checkpoint)))
    assert resumed["train_steps"] == straight["train_steps"] == 8
    assert resumed["train_loss"] == straight["train_loss"]
    assert resumed["eval_loss"] == straight["eval_loss"]
    a, b = load_file(workdir / "straight" / "model.safetensors"), load_file(killed_dir / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_streamed_data_resumes_exactly(workdir, corpus):
    """--streaming (the default for Hub datasets) on local JSON lines: held-out documents from the head of the
    stream, a seeded shuffle buffer, and a resumed run that continues the stream where its checkpoint left it."""
    docs = workdir / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"body": p}) for p in corpus.read_text().split("\n\n") if p.strip()))
    common = ["--streaming", "--text_column", "body", "--validation_documents", "20", "--shuffle_buffer_size", "50",
              "--max_train_steps", "6", "--checkpointing_steps", "3", "--eval_steps", "0", "--logging_steps", "3"]  # fmt: skip

    def args(output: str, *extra: str) -> list[str]:
        values = tiny_args(workdir, corpus, output, *common, *extra)
        values[values.index("--train_file") + 1] = str(docs)
        return values

    straight = pretrain.main(args("stream_a"))
    resumed = pretrain.main(args("stream_b", "--resume_from_checkpoint", str(workdir / "stream_a/checkpoints/step_3")))
    assert straight["eval_tokens"] > 0 and resumed["train_loss"] == straight["train_loss"]
    a, b = load_file(workdir / "stream_a" / "model.safetensors"), load_file(workdir / "stream_b" / "model.safetensors")
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_example_stream_resumes_at_any_position():
    data = datasets.Dataset.from_dict({"input_ids": [[i] for i in range(10)]})
    stream = titans_training.ExampleStream(data, rank=1, world_size=3, seed=0)
    full = [next(it)["input_ids"][0] for it in [stream.iterate()] for _ in range(14)]
    assert len(set(full[:3])) == len(set(full[3:6])) == 3  # 10 // 3 = 3 distinct examples per epoch
    assert [e["input_ids"][0] for e, _ in zip(stream.iterate(5), range(9))] == full[5:]
    other = titans_training.ExampleStream(data, rank=0, world_size=3, seed=0)
    assert not set(full[:3]) & {e["input_ids"][0] for e, _ in zip(other.iterate(), range(3))}  # disjoint shares
    streamed = datasets.Dataset.from_dict({"input_ids": [[i] for i in range(7)]}).to_iterable_dataset()
    s = titans_training.ExampleStream(streamed, rank=0, world_size=1, seed=0)
    full = [e["input_ids"][0] for e, _ in zip(s.iterate(), range(16))]
    assert [e["input_ids"][0] for e, _ in zip(s.iterate(9), range(7))] == full[9:]


# --------------------------------------------------------------------------------------------------------------------
# Two processes
# --------------------------------------------------------------------------------------------------------------------


def test_two_processes_train_one_model(workdir, corpus):
    """`accelerate launch --multi_gpu --num_processes 2` with ACCELERATE_USE_CPU=true: 2 gloo ranks, each on its own
    share of the data, ending with identical parameters."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = python_env(threads=1)
    env["ACCELERATE_USE_CPU"] = "true"
    out = subprocess.run(
        [
            sys.executable, "-m", "accelerate.commands.launch",
            "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", str(port),
            str(EXAMPLES / "pretrain.py"),
            *tiny_args(workdir, corpus, "ddp", "--max_train_steps", "4", "--eval_steps", "2",
                       "--checkpointing_steps", "2", "--gradient_accumulation_steps", "2"),
        ],
        capture_output=True, text=True, env=env, timeout=400,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    results = json.loads((workdir / "ddp" / "all_results.json").read_text())
    assert results["num_processes"] == 2
    digests = results["parameter_sha256_per_process"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert (workdir / "ddp" / "checkpoints" / "step_4" / "random_states_1.pkl").is_file()
    assert "processes 2" in out.stdout

    # The two ranks read disjoint halves of the same examples one process reads with twice the batch, and the loss
    # is normalised by the tokens of all processes: the same training, up to the order of float additions.
    single = pretrain.main(
        tiny_args(workdir, corpus, "single", "--max_train_steps", "4", "--eval_steps", "2", "--checkpointing_steps", "0",
                  "--gradient_accumulation_steps", "2", "--per_device_train_batch_size", "4")
    )  # fmt: skip
    assert single["eval_loss"] == pytest.approx(results["eval_loss"], rel=1e-5)
    a, b = load_file(workdir / "single" / "model.safetensors"), load_file(workdir / "ddp" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


# --------------------------------------------------------------------------------------------------------------------
# Clear errors on bad input
# --------------------------------------------------------------------------------------------------------------------


def test_missing_text_column(workdir, corpus):
    data = workdir / "docs.jsonl"
    data.write_text("\n".join(json.dumps({"content": "To be or not to be " * 5}) for _ in range(30)))
    args = tiny_args(workdir, corpus, "bad_column", "--max_train_steps", "1")
    args[args.index("--train_file") + 1] = str(data)
    with pytest.raises(
        ValueError, match=r"--text_column 'text' is not a column of the dataset; its columns are \['content'\]"
    ):
        pretrain.main(args)


def test_block_size_longer_than_the_training_context_is_recorded(workdir, corpus):
    args = tiny_args(workdir, corpus, "long_block", "--max_train_steps", "1", "--eval_steps", "0")
    args[args.index("--block_size") + 1] = "128"  # the tiny preset records 64
    assert titans_training.resolve_config("tiny")[0].training_context_length == 64
    pretrain.main(args)
    assert TitansConfig.from_pretrained(workdir / "long_block").training_context_length == 128


@pytest.mark.slow
def test_torch_compile_flag_trains_the_same_model(workdir, corpus):
    """--torch_compile (through Accelerate's dynamo plugin; AOTAutograd here, see README 'torch.compile') ends with the
    parameters of the eager run."""
    common = ("--max_train_steps", "3", "--eval_steps", "0", "--checkpointing_steps", "0")
    pretrain.main(tiny_args(workdir, corpus, "eager_run", *common))
    pretrain.main(
        tiny_args(workdir, corpus, "compiled_run", *common, "--torch_compile", "--torch_compile_backend", "aot_eager")
    )
    eager, compiled = (load_file(workdir / run / "model.safetensors") for run in ("eager_run", "compiled_run"))
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-4, atol=1e-6, msg=name)


def test_inductor_on_cpu_is_refused_for_mac(workdir, corpus):
    with pytest.raises(
        ValueError,
        match=r"--torch_compile_backend inductor on CPU with variant='mac'.*Use --torch_compile_backend aot_eager",
    ):
        args = tiny_args(workdir, corpus, "inductor_cpu", "--max_train_steps", "1", "--torch_compile")
        pretrain.main([*args, "--config_overrides", "variant=mac"])


def test_fsdp_config_on_cpu_is_refused(workdir, corpus, monkeypatch):
    """Accelerate runs CPU processes as DDP whatever the config says: a run that asked for FSDP stops, not silently
    trains unsharded."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(RuntimeError, match=r"asks for FSDP but Accelerate runs NO.*GPUs and other accelerators only"):
        pretrain.main(tiny_args(workdir, corpus, "fsdp_cpu", "--max_train_steps", "1"))


def test_resume_from_another_run(workdir, corpus, pretrain_run):
    checkpoint = str(pretrain_run.folder / "checkpoints" / "step_6")
    other = tiny_args(workdir, corpus, "other_run", "--max_train_steps", "8", "--resume_from_checkpoint", checkpoint)
    other[other.index("--learning_rate") + 1] = "1e-3"
    with pytest.raises(ValueError, match=r"comes from another run; these settings differ: learning_rate"):
        pretrain.main(other)
    with pytest.raises(ValueError, match=r"is not a checkpoint of these scripts"):
        pretrain.main(tiny_args(workdir, corpus, "x", "--resume_from_checkpoint", str(pretrain_run.folder)))


def test_dataset_without_tokens(workdir, corpus):
    empty = workdir / "empty.jsonl"
    empty.write_text("\n".join(json.dumps({"text": ""}) for _ in range(20)))
    args = tiny_args(workdir, corpus, "empty", "--max_train_steps", "1")
    args[args.index("--train_file") + 1] = str(empty)
    with pytest.raises(ValueError, match=r"yields no block of --block_size 64: its \d+ documents hold 0 tokens"):
        pretrain.main(args)


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ValueError, match=r"neither a JSON file nor a preset. Presets: tiny, small"):
        titans_training.resolve_config("enormous")


# --------------------------------------------------------------------------------------------------------------------
# Presets and Accelerate configs
# --------------------------------------------------------------------------------------------------------------------


def test_presets_resolve():
    config, name = titans_training.resolve_config("small")
    assert name == "small" and config.variant == "mag" and config.training_context_length == 256
    files = {k: v for k, v in titans_training.available_presets().items() if v != "built-in"}
    for stem in files:
        config, name = titans_training.resolve_config(stem)
        assert isinstance(config, TitansConfig) and name == stem
    if "titans-170m-mac" in files:  # examples/configs: by a unique part of the name; ambiguous parts are refused
        assert titans_training.resolve_config("170M-MAC")[1] == "titans-170m-mac"
        with pytest.raises(ValueError, match="matches several presets"):
            titans_training.resolve_config("170m")
    with pytest.raises(ValueError, match="no such file"):
        titans_training.resolve_config("missing.json")


def test_accelerate_configs_are_valid():
    from accelerate.commands.config.config_args import load_config_from_file

    folder = EXAMPLES / "accelerate_configs"
    expected = {"cpu.yaml": "NO", "multi_cpu.yaml": "MULTI_GPU", "multi_gpu.yaml": "MULTI_GPU", "fsdp.yaml": "FSDP",
                "deepspeed_zero2.yaml": "DEEPSPEED"}  # fmt: skip
    assert {p.name for p in folder.glob("*.yaml")} == set(expected)
    for name, kind in expected.items():
        raw = yaml.safe_load((folder / name).read_text())
        config = load_config_from_file(str(folder / name))
        assert config.distributed_type.value == kind == raw["distributed_type"], name
    assert yaml.safe_load((folder / "deepspeed_zero2.yaml").read_text())["deepspeed_config"]["zero_stage"] == 2
    fsdp = yaml.safe_load((folder / "fsdp.yaml").read_text())["fsdp_config"]
    assert fsdp["fsdp_transformer_layer_cls_to_wrap"] == "TitansDecoderLayer"
