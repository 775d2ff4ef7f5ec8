"""PEFT (the `peft` extra): LoRA adapters on the attention projections and the memory's key/value/query projection
train, save, reload, merge and generate, for every variant."""

from __future__ import annotations

import pytest
import torch
from tiny import VARIANTS, tiny_model

peft = pytest.importorskip("peft", reason="the `peft` extra is part of the dev install")

TARGETS = ["q_proj", "v_proj", "qkv_proj"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_lora_trains_saves_reloads_merges_and_generates(variant, tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM")
    model = peft.get_peft_model(tiny_model(variant, dtype=torch.float32).train(), config)
    wrapped = {name.split(".")[-2] for name, module in model.named_modules() if name.endswith("lora_A")}
    assert wrapped == (set(TARGETS) if variant != "lmm" else {"qkv_proj"})  # LMM has no attention
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)

    x = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(3)).repeat(1, 4)  # periodic: learnable
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(30):
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.93 * losses[0], losses  # the adapters alone move the loss

    model.eval()
    prompt = x[:1, :10]
    with torch.no_grad():
        expected = model(input_ids=x).logits
    generated = model.generate(input_ids=prompt, max_new_tokens=8, do_sample=False)
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()

    # A fresh base model (same initial weights) with the saved adapter gives the same logits and tokens.
    reloaded = peft.PeftModel.from_pretrained(tiny_model(variant, dtype=torch.float32), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=x).logits, expected, rtol=0, atol=1e-6)
    assert torch.equal(reloaded.generate(input_ids=prompt, max_new_tokens=8, do_sample=False), generated)

    # Merged into the weights: a plain Titans model again, same function.
    merged = reloaded.merge_and_unload()
    assert type(merged).__name__ == "TitansForCausalLM"
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, expected, rtol=0, atol=2e-5)
    assert torch.equal(merged.generate(prompt, max_new_tokens=8, do_sample=False), generated)
