"""Inner-loop recall of the memory rule alone: can ``NeuralMemory`` hold key -> value pairs across distractors, at
a given inner learning rate, with no outer training?

A diagnostic for ``recall.py``. The projections are fixed so that the memory sees the keys, values and queries
directly (``q = k = key``, ``v = value``; no conv), the gates sit at their initialisation (retention 0.995,
momentum 0.9, ``theta = max_lr / 10``): the memory writes ``N`` pairs, then ``D`` distractor tokens (random keys and
values), and is read with each stored key. Recall = the read is closer (cosine) to its own value than to the other
``N - 1`` stored values (chance ``1 / N``). This is what the memory offers an untrained model at the start of
training: if it is near chance, the outer training gets no signal to learn to use it.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/memory_capacity.py    # about 10 s
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from titans_hf.neural_memory import NeuralMemory, memory_mlp  # noqa: E402


def recall(theta: float, depth: int, gap: int, chunk: int, dim: int, pairs: int, trials: int, seed: int = 0) -> float:
    generator = torch.Generator().manual_seed(seed)
    memory = NeuralMemory(
        hidden_size=3 * dim, num_heads=1, head_dim=dim, depth=depth, chunk_size=chunk, conv_kernel=0, max_lr=10 * theta
    ).double()
    with torch.no_grad():  # input = [key | value | 0]: q and k read the key, v the value
        eye = torch.eye(dim, dtype=torch.float64)
        weight = torch.zeros(3 * dim, 3 * dim, dtype=torch.float64)
        weight[:dim, :dim], weight[dim : 2 * dim, :dim], weight[2 * dim :, dim : 2 * dim] = eye, eye, eye
        memory.qkv_proj.weight.copy_(weight)

    def unit(*shape: int) -> torch.Tensor:
        return F.normalize(torch.randn(*shape, dim, generator=generator, dtype=torch.float64), dim=-1)

    keys, values = unit(trials, pairs), unit(trials, pairs) * dim**0.5
    x = torch.cat([keys, values, torch.zeros_like(keys)], dim=-1)
    if gap:
        noise = torch.cat([unit(trials, gap), unit(trials, gap) * dim**0.5, torch.zeros(trials, gap, dim)], dim=-1)
        x = torch.cat([x, noise.double()], dim=1)
    with torch.no_grad():
        _, state = memory(x)
        read = memory_mlp(state.weights, keys.unsqueeze(1), memory.residual)[:, 0]
    similarity = torch.einsum("tpd,tqd->tpq", F.normalize(read, dim=-1), F.normalize(values, dim=-1))
    return (similarity.argmax(-1) == torch.arange(pairs)).double().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--thetas", type=float, nargs="+", default=[1e-3, 1e-2, 1e-1])
    parser.add_argument("--gaps", type=int, nargs="+", default=[0, 16, 64])
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--chunk", type=int, default=8)
    parser.add_argument("--dim", type=int, default=16, help="memory head dimension")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--trials", type=int, default=400)
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(
        f"Recall (%) of {args.pairs} stored pairs after D distractors, head dim {args.dim}, chunk {args.chunk}, "
        f"gates at init, {args.trials} trials (chance {100 / args.pairs:.0f}%)\n"
    )
    print("| depth | theta | " + " | ".join(f"D = {g}" for g in args.gaps) + " |")
    print("|---|---|" + "---|" * len(args.gaps))
    for depth in args.depths:
        for theta in args.thetas:
            cells = [recall(theta, depth, g, args.chunk, args.dim, args.pairs, args.trials) for g in args.gaps]
            print(f"| {depth} | {theta:g} | " + " | ".join(f"{100 * c:.1f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
