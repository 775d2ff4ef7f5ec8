"""One prepared GPU check (issue #12), for a session that is lent a CUDA device; about 5-8 minutes on one GPU.

    python benchmarks/device_check.py                     # everything, JSON to results/device_check.json
    python benchmarks/device_check.py --quick             # short lengths, fewer steps (a smoke test, ~1 min)

1. **Compiled = eager on the device**: a float32 training step of a small MAG (and MAC) model, eager vs
   ``torch.compile(fullgraph=True)`` with inductor (Triton) and with AOTAutograd: loss and every gradient compared
   (max relative difference). (The memory's closed form is an opaque operation: inductor compiles the rest; on CPU
   it compiles MAG and fails on MAC's masks, README "torch.compile".)
2. **No host synchronisation**: ``torch.cuda.set_sync_debug_mode("error")`` around an unpadded training step and a
   decoding step (any device-to-host copy raises).
3. **Training throughput**, bf16 autocast, batch 1, the small shape of ``speed_common.py``: tokens/s of MAG and Llama
   (sdpa) at 4K and 16K tokens, eager, compiled (regional: each decoder layer, inductor) and compiled with
   ``mode="reduce-overhead"`` (CUDA graphs) (median of timed steps after warm-up; the first step, with compilation,
   reported).
4. **Decoding**: tokens/s of greedy cached decoding after a 16K-token prompt, MAG and Llama, eager, and MAG's step
   compiled (inductor, and ``mode="reduce-overhead"``).

Prints a table per part and saves everything to ``results/device_check.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import traceback

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from speed_common import LLAMA, RESULTS, build_model  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(RESULTS / "device_check.json"))
    return parser.parse_args()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def grads_of(forward, model, x) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = forward(x, labels=x).loss
    loss.backward()
    return loss.item(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def compiled_equals_eager(device: str, quick: bool) -> list[dict]:
    rows = []
    for name in ("mag", "mac"):
        for backend in ("inductor", "aot_eager"):
            torch._dynamo.reset()
            model = build_model(name).to(device).train()
            x = torch.randint(0, 256, (2, 256 if quick else 1024), device=device)
            loss, grads = grads_of(model, model, x)
            start = time.perf_counter()
            try:
                compiled_loss, compiled_grads = grads_of(
                    torch.compile(model, fullgraph=True, backend=backend), model, x
                )
            except Exception as error:  # report and go on: the other checks still run
                rows.append({"model": name, "backend": backend, "error": f"{type(error).__name__}: {error}"[:500]})
                continue
            worst = max(
                ((compiled_grads[n] - g).abs().max() / g.abs().max().clamp(min=1e-12)).item() for n, g in grads.items()
            )
            rows.append(
                {
                    "model": name,
                    "backend": backend,
                    "loss_diff": abs(compiled_loss - loss),
                    "max_rel_grad_diff": worst,
                    "compile_and_step_s": time.perf_counter() - start,
                }
            )
            print(rows[-1], flush=True)
    return rows


def no_host_sync(device: str) -> dict:
    if device != "cuda":
        return {"skipped": "no CUDA device"}
    model = build_model("mag").to(device)
    x = torch.randint(0, 256, (2, 300), device=device)
    result = {}
    try:
        torch.cuda.set_sync_debug_mode("error")
        model.train()
        model(x, labels=x).loss.backward()
        result["training_step"] = "no synchronisation"
    except RuntimeError as error:
        result["training_step"] = f"synchronised: {error}"[:500]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    model.eval()
    with torch.no_grad():
        cache = model(x[:, :299], use_cache=True).cache
        try:
            torch.cuda.set_sync_debug_mode("error")
            model(x[:, 299:], cache=cache, use_cache=True)
            result["decoding_step"] = "no synchronisation"
        except RuntimeError as error:
            result["decoding_step"] = f"synchronised: {error}"[:500]
        finally:
            torch.cuda.set_sync_debug_mode("default")
    print(result, flush=True)
    return result


def train_step(forward, optimizer: torch.optim.Optimizer, x: torch.Tensor, device: str) -> float:
    """One bf16-autocast training step; its wall time (synchronised)."""
    sync()
    start = time.perf_counter()
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = forward(x, labels=x).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync()
    return time.perf_counter() - start


def training_throughput(device: str, quick: bool) -> list[dict]:
    rows = []
    lengths = (1024,) if quick else (4096, 16384)
    steps = 2 if quick else 5
    for length in lengths:
        for name in ("mag", LLAMA):
            for compiled in (None, "default", "reduce-overhead"):
                torch._dynamo.reset()
                model = build_model(name).to(device).train()
                optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
                forward = model
                if compiled is not None:  # regional: every decoder layer compiled, one graph serving all
                    for layer in model.model.layers:
                        layer.compile(mode=compiled)
                x = torch.randint(0, 256, (1, length), device=device)

                try:
                    first = train_step(forward, optimizer, x, device)  # includes compilation
                    train_step(forward, optimizer, x, device)
                    times = [train_step(forward, optimizer, x, device) for _ in range(steps)]
                except Exception as error:
                    rows.append({"model": name, "length": length, "compiled": compiled, "error": str(error)[:500]})
                    traceback.print_exc()
                    continue
                rows.append(
                    {
                        "model": name,
                        "length": length,
                        "compiled": compiled,
                        "tokens_per_s": length / statistics.median(times),
                        "first_step_s": first,
                    }
                )
                print(rows[-1], flush=True)
    return rows


@torch.no_grad()
def decoding(device: str, quick: bool) -> list[dict]:
    rows = []
    prompt_length, new_tokens = (2048, 32) if quick else (16384, 128)
    for name, compiled in (("mag", None), ("mag", "default"), ("mag", "reduce-overhead"), (LLAMA, None)):
        torch._dynamo.reset()
        model = build_model(name).to(device).eval()
        if compiled is not None:
            for layer in model.model.layers:
                layer.compile(mode=compiled)
        prompt = torch.randint(0, 256, (1, prompt_length), device=device)
        with torch.autocast(device, dtype=torch.bfloat16):
            out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
            cache = out.cache
            token = out.logits[:, -1:].argmax(-1)
            sync()
            start = time.perf_counter()
            for _ in range(new_tokens):
                out = model(input_ids=token, cache=cache, use_cache=True)
                cache = out.cache
                token = out.logits[:, -1:].argmax(-1)
            sync()
        rows.append(
            {
                "model": name,
                "compiled": compiled,
                "prompt": prompt_length,
                "tokens_per_s": new_tokens / (time.perf_counter() - start),
            }
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    args = parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "compiled_equals_eager": compiled_equals_eager(device, args.quick),
        "no_host_sync": no_host_sync(device),
        "training": training_throughput(device, args.quick),
        "decoding": decoding(device, args.quick),
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
