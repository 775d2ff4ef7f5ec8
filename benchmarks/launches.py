"""Operations dispatched per training step and per decoding step, by where they come from (issue #26): the proxy for
kernel launches on a GPU, where each dispatched operation of an eager step is at least one launch (view operations are
counted apart: they launch nothing).

A ``TorchDispatchMode`` counts every ATen operation of one training step (forward and backward of the loss) and of one
cached decoding step. The forward's operations are attributed to the innermost module running them (the memory, its
closed form, attention, the MLP, norms, the rest); the backward's to the autograd node running them (the closed form's
hand-written backward, the convolution's, the rest). Per layer: divided by the layers that hold the component.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/launches.py                 # MAG and MAC of the speed shape, 2K tokens
    python benchmarks/launches.py --variants mag --tokens 512 --quick

Writes ``results/launches.json``.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from speed_common import RESULTS, SMALL, TITANS_FIELDS, setup_threads  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from titans_hf import TitansConfig, TitansForCausalLM  # noqa: E402
from titans_hf.modeling_titans import TitansAttention, TitansMLP, TitansRMSNorm  # noqa: E402
from titans_hf.neural_memory import NeuralMemory  # noqa: E402

# The closed form's functions (eager): their backward nodes.
KERNEL_NODES = ("ChunkScanBackward", "ChunkFunctionBackward")


class Counter(TorchDispatchMode):
    """Counts ATen operations by component: the innermost marked function running (forward, see
    :func:`mark_components`), or the autograd node running (backward)."""

    active: Counter | None = None  # the counter in use (the closed form's markers push onto its stack)

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()
        self.stack: list[str] = []
        self.backward = False

    def __enter__(self):
        Counter.active = self
        return super().__enter__()

    def __exit__(self, *args):
        Counter.active = None
        return super().__exit__(*args)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        view = func._schema.name.split("::")[-1] in VIEWS or torch.Tag.view_copy in func.tags or func.is_view
        if self.backward:
            node = torch._C._current_autograd_node()
            name = "" if node is None else node.name()
            where = "closed form (backward)" if name.startswith(KERNEL_NODES) else "backward, other"
            if name.startswith("CausalConvSiLUBackward"):
                where = "memory conv (backward)"
        else:
            where = self.stack[-1] if self.stack else "embedding, loss, other"
        self.counts[(where, "view" if view else "compute")] += 1
        return func(*args, **(kwargs or {}))


VIEWS = {"view", "_unsafe_view", "t", "transpose", "permute", "expand", "unsqueeze", "squeeze", "select", "slice"}


def marked(function, where: str):
    """``function`` with its dispatched operations attributed to ``where`` (innermost wins)."""

    def wrapped(*args, **kwargs):
        stack = [] if Counter.active is None else Counter.active.stack
        stack.append(where)
        try:
            return function(*args, **kwargs)
        finally:
            stack.pop()

    return wrapped


def mark_components() -> None:
    """Attributes the forward's operations: the memory (its projections, gates, conv, output), its closed form, the
    attention (its methods are called directly by the layers), the MLP, the norms."""
    from titans_hf import neural_memory

    for name in ("chunk_scan", "chunk_update"):
        setattr(neural_memory, name, marked(getattr(neural_memory, name), "closed form (forward)"))
    for cls, methods, where in (
        (NeuralMemory, ("forward", "retrieve"), "memory"),
        (TitansAttention, ("forward_window", "forward_segment", "forward_segment_step"), "attention"),
        (TitansMLP, ("forward",), "mlp"),
        (TitansRMSNorm, ("forward",), "norms"),
    ):
        for method in methods:
            setattr(cls, method, marked(getattr(cls, method), where))


def count(variant: str, tokens: int) -> dict:
    torch.manual_seed(0)
    config = TitansConfig(variant=variant, **SMALL, **TITANS_FIELDS, bos_token_id=None, eos_token_id=None)
    model = TitansForCausalLM(config)
    counter = Counter()
    ids = torch.randint(0, 256, (1, tokens + 1), generator=torch.Generator().manual_seed(0))
    result = {}
    model.train()
    with counter:
        loss = model(input_ids=ids[:, :tokens], labels=ids[:, :tokens], use_cache=False).loss
        counter.backward = True
        loss.backward()
        counter.backward = False
    result["training"] = dict(counter.counts)
    counter.counts.clear()
    model.eval()
    with torch.no_grad():
        cache = model(input_ids=ids[:, :tokens], use_cache=True).cache
        with counter:
            model(input_ids=ids[:, tokens:], cache=cache)
    result["decoding"] = dict(counter.counts)
    return {"variant": variant, "tokens": tokens, "layers": config.num_hidden_layers, **result}


def report(rows: list[dict]) -> str:
    lines = []
    for row in rows:
        layers = row["layers"]
        for step in ("training", "decoding"):
            counts = row[step]
            places = sorted({where for where, _ in counts})
            lines.append(f"\n{row['variant'].upper()} {step} step ({row['tokens']} tokens), {layers} layers")
            lines.append("| from | operations | per layer | of which views |")
            lines.append("|---|---|---|---|")
            for where in places:
                compute, view = counts.get((where, "compute"), 0), counts.get((where, "view"), 0)
                per_layer = "" if "other" in where and "backward" not in where else f"{(compute + view) / layers:.0f}"
                lines.append(f"| {where} | {compute + view} | {per_layer} | {view} |")
            total = sum(counts.values())
            views = sum(v for (_, kind), v in counts.items() if kind == "view")
            lines.append(f"| total | {total} | {total / layers:.0f} | {views} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=["mag", "mac"])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--quick", action="store_true", help="256 tokens")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    setup_threads()
    mark_components()
    rows = []
    for variant in args.variants:
        rows.append(count(variant, 256 if args.quick else args.tokens))
    text = report(rows)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    serialisable = [
        {
            k: ({f"{w} / {kind}": v for (w, kind), v in r[k].items()} if k in ("training", "decoding") else r[k])
            for k in r
        }
        for r in rows
    ]
    (args.out / "launches.json").write_text(json.dumps({"argv": sys.argv[1:], "rows": serialisable}, indent=2))
    return rows


if __name__ == "__main__":
    main()
