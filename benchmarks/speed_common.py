"""Shared pieces of the speed benchmarks ``train_speed.py`` and ``decode_speed.py``.

One small model shape for everything (issues #3 and #4): vocabulary 256, hidden 256, 4 layers, 4 heads of 64,
SwiGLU MLP of width 688 (Llama's ``8/3 * hidden`` rounded up to a multiple of 16), tied embeddings. It is built as

- Titans (``TitansForCausalLM``), each variant, with attention window / segment 64 and memory chunk 64 (the memory
  has the configuration defaults otherwise: 4 heads of 64, depth 2, expansion 4, conv 4, momentum, forgetting);
- Transformers' ``LlamaForCausalLM`` of the same width and depth (4 key/value heads, RoPE, full causal attention);
- titans-pytorch's ``MemoryAsContextTransformer`` (when installed) at the matched size given by
  :data:`TITANS_PYTORCH_KWARGS`.

Titans carries extra memory parameters (about 0.47 M per layer here): the benchmarks print every parameter count so
that speed ratios can be read against size. Nothing here downloads anything.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE.parent / "src"))

THREADS = 2
VARIANTS = ("mac", "mag", "mal", "lmm")
LLAMA = "llama"
TITANS_PYTORCH = "titans-pytorch"

#: The shared shape (Llama-style field names).
SMALL = dict(vocab_size=256, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4)
#: Titans-only fields.
TITANS_FIELDS = dict(sliding_window=64, segment_size=64, memory_chunk_size=64)
#: titans-pytorch 0.5.5 ``MemoryAsContextTransformer`` at the matched size. ``ff_mult=4`` gives its GEGLU an inner
#: width of ``int(256 * 4 * 2 / 3) = 682``, close to our 688; the neural memory has 4 heads of 64 and a depth-2 MLP
#: of expansion 4 (as ours), chunk 64 (``neural_memory_segment_len``; its default would be segment_len +
#: num_longterm_mem_tokens = 80); 4 persistent and 16 long-term memory tokens per segment as in its README; the
#: remaining arguments keep their defaults (among them ``num_residual_streams=4`` hyper-connections).
TITANS_PYTORCH_KWARGS = dict(
    num_tokens=256,
    dim=256,
    depth=4,
    heads=4,
    dim_head=64,
    ff_mult=4,
    segment_len=64,
    num_persist_mem_tokens=4,
    num_longterm_mem_tokens=16,
    neural_memory_segment_len=64,
    neural_memory_kwargs=dict(heads=4, dim_head=64, default_model_kwargs=dict(depth=2, expansion_factor=4.0)),
)

LABELS = {
    "mac": "Titans MAC",
    "mag": "Titans MAG",
    "mal": "Titans MAL",
    "lmm": "Titans LMM",
    LLAMA: "Llama",
    TITANS_PYTORCH: "titans-pytorch MAC",
}


def setup_threads(threads: int = THREADS) -> None:
    """``threads`` intra-op threads (the protocol: 2) and one inter-op thread."""
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (e.g. called twice)
        pass


def titans_pytorch_available() -> bool:
    try:
        import titans_pytorch  # noqa: F401
    except ImportError:
        return False
    return True


def build_model(name: str, seed: int = 0) -> torch.nn.Module:
    """A freshly initialised model: a Titans variant (``mac``/``mag``/``mal``/``lmm``), ``llama`` or
    ``titans-pytorch``. Same seed, same shape, float32, default attention implementation (sdpa)."""
    torch.manual_seed(seed)
    if name in VARIANTS:
        from titans_hf import TitansConfig, TitansForCausalLM

        config = TitansConfig(variant=name, **SMALL, **TITANS_FIELDS, bos_token_id=None, eos_token_id=None)
        return TitansForCausalLM(config)
    if name == LLAMA:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            **SMALL,
            num_key_value_heads=SMALL["num_attention_heads"],
            max_position_embeddings=65536,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            bos_token_id=None,
            eos_token_id=None,
        )
        return LlamaForCausalLM(config)
    if name == TITANS_PYTORCH:
        from titans_pytorch import MemoryAsContextTransformer

        model = MemoryAsContextTransformer(**TITANS_PYTORCH_KWARGS)
        # titans-pytorch 0.5.5 makes the per-head initial memory weights of a multi-head memory with
        # ``repeat(p, '... -> h ...')`` - an expanded view, so all heads alias one storage and an in-place optimizer
        # step fails ("more than one element of the written-to tensor refers to a single memory location"). Give
        # each head its own copy (what per-head learned parameters mean); the values and the forward are unchanged.
        with torch.no_grad():
            for parameter in model.parameters():
                if 0 in parameter.stride():
                    parameter.data = parameter.data.contiguous()
        return model
    raise ValueError(f"unknown model {name!r}; expected one of {VARIANTS + (LLAMA, TITANS_PYTORCH)}")


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    seen, total = set(), 0
    for parameter in model.parameters():
        if parameter.data_ptr() not in seen:
            seen.add(parameter.data_ptr())
            total += parameter.numel()
    return total


def memory_parameters(model: torch.nn.Module) -> int:
    """Parameters of the Titans neural memories (0 for other models)."""
    try:
        from titans_hf.neural_memory import NeuralMemory
    except ImportError:  # pragma: no cover
        return 0
    return sum(p.numel() for m in model.modules() if isinstance(m, NeuralMemory) for p in m.parameters())


def attention_implementation(model: torch.nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) or "-"


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process's address space (``VmHWM``).

    Not ``getrusage().ru_maxrss``: Linux carries ``ru_maxrss`` over ``fork``/``exec``, so a child started by a large
    parent reports at least the parent's RSS (measured here: 508 MB in a fresh interpreter started by a 500 MB
    parent, whose own ``VmHWM`` was 14 MB).
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # pragma: no cover (no procfs)


def reset_peak_rss() -> None:
    """Resets ``VmHWM`` to the current RSS (Linux >= 4.0), so that the next peak is that of what follows."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # pragma: no cover
        pass


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def environment() -> dict:
    """What the numbers were measured on: versions, CPU, threads, load average (the machine may be shared)."""
    import transformers

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "load_average_start": os.getloadavg(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if titans_pytorch_available():
        from importlib.metadata import version

        info["titans_pytorch"] = version("titans-pytorch")
    return info


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """A plain, right-aligned text table (first column left-aligned)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        out = [str(cells[0]).ljust(widths[0])]
        out += [str(c).rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return " | ".join(out)

    return "\n".join([line(header), "-+-".join("-" * w for w in widths), *[line(r) for r in rows]])


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """The same table in Markdown (for ``benchmarks/README.md``)."""
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def fmt(value: float | None, digits: int = 0, suffix: str = "") -> str:
    if value is None or value != value:  # None or nan
        return "-"
    return f"{value:,.{digits}f}{suffix}"


def pyplot():
    """``matplotlib.pyplot`` with the Agg backend, or ``None`` when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot.")
        return None
    return plt
