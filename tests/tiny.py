"""Tiny Titans configurations shared by the model tests."""

from __future__ import annotations

import torch

from titans_hf import TitansConfig, TitansForCausalLM

VARIANTS = ("mac", "mag", "mal", "lmm")

# Prepended to a subprocess script: `import titans_hf` fails there, as where the package is not installed.
BLOCK_TITANS_HF = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "titans_hf" or name.startswith("titans_hf."):
            raise ImportError("titans_hf is not installed in this process")
sys.meta_path.insert(0, _Block())
"""


def random_ids(batch: int = 2, length: int = 21, seed: int = 1, vocab: int = 64) -> torch.Tensor:
    """Token ids in [1, vocab) (0 is the tiny configs' pad id), reproducible from ``seed``."""
    return torch.randint(1, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def tiny_config(variant: str = "mag", **overrides) -> TitansConfig:
    """Two layers of width 32: window 6 and segment 8 (two memory chunks of 4), so that short sequences cross
    window, chunk and segment boundaries."""
    config = dict(
        variant=variant,
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=6,
        segment_size=8,
        memory_chunk_size=4,
        memory_num_heads=2,
        pad_token_id=0,
        eos_token_id=None,
        bos_token_id=None,
    )
    config.update(overrides)
    return TitansConfig(**config)


def tiny_model(
    variant: str = "mag", dtype: torch.dtype = torch.float64, seed: int = 0, **overrides
) -> TitansForCausalLM:
    """A tiny model with its memory gates spread away from their initial values (so that every term matters) and
    a non-zero pad embedding (so that a pad leaking anywhere would show)."""
    torch.manual_seed(seed)
    model = TitansForCausalLM(tiny_config(variant, **overrides)).to(dtype).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            if layer.memory is not None:
                for proj in (layer.memory.lr_proj, layer.memory.momentum_proj, layer.memory.retention_proj):
                    if proj is not None:
                        proj.bias.add_(torch.randn_like(proj.bias))
                        proj.weight.normal_(0.0, 0.2)
                layer.memory.qkv_proj.weight.normal_(0.0, 0.3)
        model.model.embed_tokens.weight[0].normal_()
    return model
