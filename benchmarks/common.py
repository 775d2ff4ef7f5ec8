"""Shared pieces of the evidence benchmarks (``recall.py``, ``lm_quality.py``): threads, models with matched
parameter budgets, one training loop for every model, byte-level data, tables, JSON and plots.

Every model of a comparison is built from the same :class:`Dims` (hidden size, layers, heads, vocabulary); the
MLP width (``intermediate_size``) of each one is then solved so that all models have the parameter count of the
reference (MAG), within a fraction of a percent. Training is the same for all: AdamW (0.9, 0.95), weight decay on
matrices, linear warm-up then cosine decay, gradient clipping at 1, the same batches in the same order for the
same seed.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
sys.path.insert(0, str(REPO / "src"))

from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import titans_hf  # noqa: E402,F401  (registers the Auto classes)
from titans_hf import TitansConfig, TitansForCausalLM  # noqa: E402

hf_logging.set_verbosity_error()

try:  # progress bars when tqdm is installed (it is a dev dependency)
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover

    def tqdm(iterable=None, **kwargs):
        return iterable


TITANS_VARIANTS = ("mac", "mag", "mal", "lmm")
BASELINES = ("mistral", "llama")
ALL_MODELS = TITANS_VARIANTS + BASELINES
LABELS = {
    "mac": "Titans MAC",
    "mag": "Titans MAG",
    "mal": "Titans MAL",
    "lmm": "Titans LMM",
    "mistral": "Mistral (SWA)",
    "llama": "Llama (full)",
}


def setup(threads: int = 2) -> None:
    """Two intra-op threads (the machine has two cores) and passive OpenMP waiting (set before torch loads)."""
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process
        pass


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
        f"Python {platform.python_version()}"
    )


def today() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


# --------------------------------------------------------------------------------------------------------------------
# Models with matched parameter budgets
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Dims:
    """What every model of a comparison shares. ``window`` is the sliding window of MAG / MAL / Mistral and MAC's
    segment; ``intermediate_size`` is the MLP width of the reference model (the others are solved to match it)."""

    vocab_size: int = 256
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 128
    window: int = 32
    context_length: int = 4096  # Titans' training_context_length, the baselines' max_position_embeddings
    memory_chunk_size: int = 16
    memory_depth: int = 2
    memory_expansion: int = 4
    memory_num_heads: int | None = None
    memory_max_lr: float | None = None  # None: TitansConfig's default
    num_persistent_tokens: int = 4
    reference: str = "mag"
    memory_overrides: dict = field(default_factory=dict)  # NeuralMemory constructor arguments (ablations only)
    titans_config: dict = field(default_factory=dict)  # any other TitansConfig field (ablations)


def model_config(kind: str, dims: Dims, intermediate_size: int):
    common = dict(
        vocab_size=dims.vocab_size,
        hidden_size=dims.hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=dims.num_hidden_layers,
        num_attention_heads=dims.num_attention_heads,
        num_key_value_heads=dims.num_attention_heads,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    if kind in TITANS_VARIANTS:
        return TitansConfig(
            variant=kind,
            sliding_window=dims.window,
            segment_size=dims.window,
            num_persistent_tokens=0 if kind == "lmm" else dims.num_persistent_tokens,
            memory_chunk_size=dims.memory_chunk_size,
            memory_depth=dims.memory_depth,
            memory_expansion=dims.memory_expansion,
            memory_num_heads=dims.memory_num_heads,
            **({} if dims.memory_max_lr is None else {"memory_max_lr": dims.memory_max_lr}),
            training_context_length=dims.context_length,
            **dims.titans_config,
            **common,
        )
    if kind == "mistral":
        return MistralConfig(sliding_window=dims.window, max_position_embeddings=dims.context_length, **common)
    if kind == "llama":
        return LlamaConfig(max_position_embeddings=dims.context_length, **common)
    raise ValueError(f"unknown model {kind!r}; choose from {ALL_MODELS}")


def _instantiate(kind: str, config) -> torch.nn.Module:
    cls = {"mistral": MistralForCausalLM, "llama": LlamaForCausalLM}.get(kind, TitansForCausalLM)
    return cls(config)


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def apply_memory_overrides(model: torch.nn.Module, overrides: dict) -> None:
    """Ablations of the memory's initialisation: ``init_retention``, ``init_momentum``, ``init_lr_fraction`` are
    constructor arguments of ``NeuralMemory`` that the config does not expose (yet), so they are set on each memory
    module and its parameters re-initialised before training; ``output_scale`` multiplies the initial weights of the
    memory's output projection ``o_proj``."""
    if not overrides:
        return
    from titans_hf.neural_memory import NeuralMemory

    overrides = dict(overrides)
    output_scale = overrides.pop("output_scale", None)  # ablation: scale the memory's output projection at init
    for module in model.modules():
        if isinstance(module, NeuralMemory):
            for name, value in overrides.items():
                if not hasattr(module, name):
                    raise ValueError(f"NeuralMemory has no attribute {name!r}")
                setattr(module, name, value)
            module.reset_parameters()
            if output_scale is not None:
                with torch.no_grad():
                    module.o_proj.weight.mul_(output_scale)


def parse_assignments(text: str) -> dict:
    """``"a=0.5,b=none,c=true,d=[0;1],e=titans"`` -> ``{"a": 0.5, "b": None, "c": True, "d": [0, 1], "e": "titans"}``
    (ints stay ints; what is not a number is a string)."""
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, value = item.split("=", 1)
        low = value.strip().lower()
        if low.startswith("["):  # a list: items separated by ";" (e.g. memory_layers=[0;1])
            out[key.strip()] = json.loads(low.replace(";", ","))
        elif low in ("none", "null"):
            out[key.strip()] = None
        elif low in ("true", "false"):
            out[key.strip()] = low == "true"
        else:
            try:
                out[key.strip()] = int(value)
            except ValueError:
                try:
                    out[key.strip()] = float(value)
                except ValueError:
                    out[key.strip()] = value.strip()
    return out


def matched_intermediate_sizes(kinds: Iterable[str], dims: Dims) -> dict[str, tuple[int, int]]:
    """For each model, the MLP width that brings its parameter count closest to the reference's, and that count.

    Parameters are affine in ``intermediate_size`` (``3 * hidden * layers`` per unit), so two probes solve it.
    """
    target = count_parameters(_instantiate(dims.reference, model_config(dims.reference, dims, dims.intermediate_size)))
    out = {}
    for kind in kinds:
        a, b = dims.intermediate_size, dims.intermediate_size + 8
        pa = count_parameters(_instantiate(kind, model_config(kind, dims, a)))
        pb = count_parameters(_instantiate(kind, model_config(kind, dims, b)))
        slope = (pb - pa) / (b - a)
        size = max(1, round(a + (target - pa) / slope))
        out[kind] = (size, int(pa + slope * (size - a)))
    return out


def build_model(kind: str, dims: Dims, intermediate_size: int, seed: int) -> torch.nn.Module:
    seed_everything(seed)
    model = _instantiate(kind, model_config(kind, dims, intermediate_size))
    apply_memory_overrides(model, dims.memory_overrides if kind in TITANS_VARIANTS else {})
    return model


def parameter_table(sizes: dict[str, tuple[int, int]], dims: Dims) -> str:
    ref = sizes.get(dims.reference, next(iter(sizes.values())))[1]
    rows = [[LABELS.get(k, k), str(i), f"{p:,}", f"{100 * (p / ref - 1):+.2f}%"] for k, (i, p) in sizes.items()]
    return format_table(["model", "intermediate_size", "parameters", "vs reference"], rows)


# --------------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class TrainSettings:
    steps: int = 500
    lr: float = 3e-3
    warmup: float = 0.1  # fraction of steps
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    clip: float = 1.0
    log_every: int = 10


def lr_at(step: int, settings: TrainSettings) -> float:
    warmup = max(1, int(settings.warmup * settings.steps))
    if step < warmup:
        return settings.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, settings.steps - warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return settings.lr * (settings.min_lr_ratio + (1 - settings.min_lr_ratio) * cosine)


def make_optimizer(model: torch.nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr,
        betas=(0.9, 0.95),
    )


def train(
    model: torch.nn.Module,
    batches: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    settings: TrainSettings,
    desc: str = "",
    callback: Callable[[int], None] | None = None,
) -> dict:
    """Trains ``model`` on ``batches(step) -> (input_ids, labels)`` (labels as for Transformers: -100 ignored,
    shifted inside the model). Returns the loss curve (mean over each ``log_every`` steps) and the wall time."""
    model.train()
    optimizer = make_optimizer(model, settings)
    curve, window = [], []
    start = time.perf_counter()
    bar = tqdm(range(settings.steps), desc=desc, leave=False, mininterval=2.0, disable=None)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, settings)
        input_ids, labels = batches(step)
        loss = model(input_ids=input_ids, labels=labels).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: loss is {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip)
        optimizer.step()
        window.append(loss.item())
        if len(window) == settings.log_every or step == settings.steps - 1:
            curve.append((step + 1, sum(window) / len(window)))
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{curve[-1][1]:.3f}")
            window = []
        if callback is not None:
            callback(step)
    model.eval()
    return {"curve": curve, "seconds": time.perf_counter() - start}


# --------------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------------


def read_texts(paths: Iterable[str | Path], min_bytes: int = 1) -> list[bytes]:
    """UTF-8 bytes of every document: one per line of a ``.jsonl`` file (its ``"text"`` field), one per other file."""
    docs = []
    for path in paths:
        path = Path(path)
        if path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        docs.append(json.loads(line)["text"].encode("utf-8"))
        else:
            docs.append(path.read_bytes())
    docs = [d for d in docs if len(d) >= min_bytes]
    if not docs:
        raise ValueError(f"no document of at least {min_bytes} bytes in {list(map(str, paths))}")
    return docs


# --------------------------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------------------------


def spread(values: list[float]) -> dict:
    values = [float(v) for v in values]
    return {
        "mean": statistics.fmean(values),
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
        "values": values,
    }


def fmt_spread(s: dict, digits: int = 3, percent: bool = False) -> str:
    scale, suffix = (100.0, "") if percent else (1.0, "")
    mean = s["mean"] * scale
    if s["n"] < 2:
        return f"{mean:.{digits}f}{suffix}"
    half = (s["max"] - s["min"]) * scale / 2
    return f"{mean:.{digits}f} ± {half:.{digits}f}{suffix}"


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table (readable in a terminal too)."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def save_json(data: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=_json_default) + "\n")


def _json_default(obj):
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)
    raise TypeError(type(obj))


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


COLORS = {
    "mac": "tab:blue",
    "mag": "tab:orange",
    "mal": "tab:green",
    "lmm": "tab:purple",
    "mistral": "tab:gray",
    "llama": "black",
}
