"""Checkpoints saved by titans-hf 0.1.0 (before the memory rules became pluggable) load and give the same outputs.

``tests/data/checkpoint_0.1.0_{mac,mag}`` were written by commit 710a8c7 (``save_pretrained`` of two tiny float32
models, with ``expected.safetensors``: token ids and the logits that code computed for them).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from titans_hf import TitansForCausalLM

DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("variant", ["mac", "mag"])
def test_checkpoint_of_0_1_0_loads_with_the_same_outputs(variant):
    folder = DATA / f"checkpoint_0.1.0_{variant}"
    model = TitansForCausalLM.from_pretrained(folder).eval()
    assert model.config.variant == variant
    expected = load_file(folder / "expected.safetensors")
    with torch.no_grad():
        logits = model(expected["input_ids"]).logits
    torch.testing.assert_close(logits, expected["logits"], atol=1e-6, rtol=1e-6)
