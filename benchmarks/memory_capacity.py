"""Inner-loop recall of the memory rule alone: can ``NeuralMemory`` at its *default* settings hold key -> value pairs
across distractors, with no outer training?

A diagnostic for ``recall.py``: what the memory offers an untrained model at the start of training (if its reads are
near chance, the outer training gets no signal to learn to use it). The projections are fixed so that every head
sees the keys, values and queries directly (``q = k = SiLU(key)``, ``v = SiLU(value)``; no conv); everything else is
``NeuralMemory``'s default, the gates at their initialisation (learning rate half of ``max_lr``, momentum 0.9, and
per head a retention half-life spread from 32 to 32768 tokens). The memory writes ``N`` pairs, then ``D`` distractor
tokens (random keys and values), and is read with each stored key. Recall = the read is closer (cosine) to its own
value than to the other ``N - 1`` stored values (chance ``1 / N``); one column per head (its half-life at init).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/memory_capacity.py    # about 1 minute
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from titans_hf.memory_ops import memory_mlp  # noqa: E402
from titans_hf.neural_memory import NeuralMemory  # noqa: E402


def build(dim: int, heads: int, depth: int, chunk: int, max_lr: float | None) -> NeuralMemory:
    """A default memory whose projections show it the keys and values directly and whose gates sit at their init."""
    extra = {} if max_lr is None else {"max_lr": max_lr}
    memory = NeuralMemory(
        hidden_size=2 * dim, num_heads=heads, head_dim=dim, depth=depth, chunk_size=chunk, conv_kernel=0, **extra
    ).double()
    with torch.no_grad():  # input = [key | value]: q and k of every head read the key, v the value
        eye = torch.eye(dim, dtype=torch.float64)
        weight = torch.zeros(3, heads, dim, 2 * dim, dtype=torch.float64)
        weight[0, :, :, :dim] = weight[1, :, :, :dim] = eye
        weight[2, :, :, dim:] = eye
        memory.qkv_proj.weight.copy_(weight.reshape(3 * heads * dim, 2 * dim))
        for gate in (memory.lr_proj, memory.momentum_proj, memory.retention_proj):
            gate.weight.zero_()  # exactly the initial gate values, whatever the input
    return memory


def recall(memory: NeuralMemory, gap: int, pairs: int, trials: int, seed: int = 0) -> torch.Tensor:
    """Recall per head (heads,) of ``pairs`` stored pairs read after ``gap`` distractors."""
    dim = memory.head_dim
    generator = torch.Generator().manual_seed(seed)
    length = pairs + gap
    keys = F.normalize(torch.randn(trials, length, dim, generator=generator, dtype=torch.float64), dim=-1) * 3
    values = torch.randn(trials, length, dim, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        state = memory(torch.cat([keys, values], dim=-1)).state
        stored = F.normalize(F.silu(keys[:, :pairs]), dim=-1)
        read = memory_mlp(state.weights, stored.unsqueeze(1).expand(-1, memory.num_heads, -1, -1), memory.residual)
    targets = F.normalize(F.silu(values[:, :pairs]), dim=-1)
    similarity = torch.einsum("thpd,tqd->thpq", F.normalize(read, dim=-1), targets)
    return (similarity.argmax(-1) == torch.arange(pairs)).double().mean(dim=(0, 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gaps", type=int, nargs="+", default=[0, 16, 64, 256, 1024])
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--chunks", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--max-lr", type=float, default=None, help="memory max_lr (default: NeuralMemory's)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=16, help="memory head dimension")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--trials", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(2)
    probe = build(args.dim, args.heads, 1, 8, args.max_lr)
    lives = [f"{h:.0f}" for h in probe.initial_half_lives().tolist()]
    print(
        f"Recall (%) of {args.pairs} stored pairs after D distractors, head dim {args.dim}, max_lr {probe.max_lr}, "
        f"gates at init, {args.trials} trials (chance {100 / args.pairs:.0f}%); one column per head, titled by its "
        f"retention half-life at init (tokens)\n"
    )
    print("| depth | chunk | D | " + " | ".join(f"head {i} ({h})" for i, h in enumerate(lives)) + " |")
    print("|---|---|---|" + "---|" * len(lives))
    for depth in args.depths:
        for chunk in args.chunks:
            torch.manual_seed(0)  # the initial weights W_0: the same for every run
            memory = build(args.dim, args.heads, depth, chunk, args.max_lr)
            for gap in args.gaps:
                cells = recall(memory, gap, args.pairs, args.trials)
                print(
                    f"| {depth} | {chunk} | {gap} | " + " | ".join(f"{100 * c:.1f}" for c in cells) + " |", flush=True
                )


if __name__ == "__main__":
    main()
