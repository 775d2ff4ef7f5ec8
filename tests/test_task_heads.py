"""The task heads: sequence classification (last real token, left or right padding), token classification and
question answering; Auto classes, starting them from a language model's checkpoint, and Trainer fine-tuning."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny import VARIANTS, tiny_config, tiny_model
from transformers import (
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from titans_hf import (
    TitansForCausalLM,
    TitansForQuestionAnswering,
    TitansForSequenceClassification,
    TitansForTokenClassification,
)

HEADS = {
    AutoModelForSequenceClassification: TitansForSequenceClassification,
    AutoModelForTokenClassification: TitansForTokenClassification,
    AutoModelForQuestionAnswering: TitansForQuestionAnswering,
}


def head_from(lm: TitansForCausalLM, cls, **config) -> torch.nn.Module:
    """A task head on the language model's base model (same weights), in float64, eval mode."""
    torch.manual_seed(1)
    model = cls(tiny_config(lm.config.variant, **config)).to(torch.float64).eval()
    model.model.load_state_dict(lm.model.state_dict())
    return model


def rows(lengths: list[int], seed: int = 2) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 64, (n,), generator=generator) for n in lengths]


def padded(sequences: list[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(sequences):
        span = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, span], mask[i, span] = s, 1
    return ids, mask


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_sequence_classification_reads_each_rows_last_real_token(variant, side):
    model = head_from(tiny_model(variant), TitansForSequenceClassification, num_labels=3)
    sequences = rows([13, 5, 9])
    ids, mask = padded(sequences, side)
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
        alone = torch.cat([model(s[None]).logits for s in sequences])
        hidden = [model.model(s[None]).last_hidden_state[0, -1] for s in sequences]
    assert out.logits.shape == (3, 3)
    torch.testing.assert_close(out.logits, alone, rtol=0, atol=1e-10)  # padding changes nothing
    torch.testing.assert_close(alone, model.score(torch.stack(hidden)), rtol=0, atol=1e-12)
    if side == "right":  # without a mask, the tokens that differ from pad_token_id are the real ones
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits[:, :], model(ids, attention_mask=mask).logits[:, :])


def test_sequence_classification_losses_and_errors():
    model = head_from(tiny_model("mag"), TitansForSequenceClassification, num_labels=3)
    ids, mask = padded(rows([7, 4]), "left")
    labels = torch.tensor([2, 0])
    out = model(ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))
    out.loss.backward()
    assert model.score.weight.grad.abs().sum() > 0 and model.model.embed_tokens.weight.grad.abs().sum() > 0

    regression = head_from(tiny_model("mag"), TitansForSequenceClassification, num_labels=1)
    regression.config.problem_type = "regression"
    targets = torch.tensor([0.5, -1.0], dtype=torch.float64)
    out = regression(ids, attention_mask=mask, labels=targets)
    torch.testing.assert_close(out.loss, F.mse_loss(out.logits.squeeze(-1), targets))

    no_pad = head_from(tiny_model("mag"), TitansForSequenceClassification, num_labels=3, pad_token_id=None)
    with pytest.raises(ValueError, match="last real token of 2 rows without an attention_mask"):
        no_pad(ids)
    one = ids[:1, -7:]
    torch.testing.assert_close(no_pad(one).logits, no_pad(one, attention_mask=torch.ones_like(one)).logits)


def test_token_classification_and_question_answering():
    lm = tiny_model("mac")
    ids, mask = padded(rows([11, 6]), "right")
    tokens = head_from(lm, TitansForTokenClassification, num_labels=5)
    labels = torch.randint(0, 5, ids.shape).masked_fill(mask == 0, -100)
    out = tokens(ids, attention_mask=mask, labels=labels)
    assert out.logits.shape == (2, 11, 5)
    expected = F.cross_entropy(out.logits.flatten(0, 1), labels.flatten())
    torch.testing.assert_close(out.loss, expected, check_dtype=False)  # Transformers computes it in float32
    with torch.no_grad():  # real tokens equal each row alone (eval mode: no dropout)
        alone = tokens(ids[1:, :6]).logits
    torch.testing.assert_close(out.logits[1:, :6].detach(), alone, rtol=0, atol=1e-10)

    qa = head_from(lm, TitansForQuestionAnswering)
    start, end = torch.tensor([1, 2]), torch.tensor([4, 5])
    out = qa(ids, attention_mask=mask, start_positions=start, end_positions=end)
    assert out.start_logits.shape == out.end_logits.shape == (2, 11)
    expected = (F.cross_entropy(out.start_logits, start) + F.cross_entropy(out.end_logits, end)) / 2
    torch.testing.assert_close(out.loss, expected, check_dtype=False)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_a_language_models_checkpoint_starts_every_head(tmp_path, tied):
    """Auto classes load each head from a causal LM's folder: the base model's weights are the LM's, the head is
    new, and the LM's own head is left out (also when it is a separate tensor: untied embeddings)."""
    lm = TitansForCausalLM(tiny_config("mal", tie_word_embeddings=tied))
    lm.save_pretrained(tmp_path)
    for auto, cls in HEADS.items():
        model = auto.from_pretrained(tmp_path, num_labels=4)
        assert type(model) is cls
        for name, tensor in lm.model.state_dict().items():
            assert torch.equal(tensor, model.model.state_dict()[name]), name
        model.save_pretrained(tmp_path / cls.__name__)
        again = auto.from_pretrained(tmp_path / cls.__name__)
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, again.state_dict()[name]), name
    # A base-model tensor the checkpoint lacks is still an error (only heads are optional).
    with pytest.raises(ValueError, match="no place for: model.layers.1"):
        AutoModelForSequenceClassification.from_pretrained(tmp_path, num_hidden_layers=1)


def test_trainer_fine_tunes_a_sequence_classifier(tmp_path):
    """Trainer with a padded, collated dataset: the classifier learns a rule that needs the whole sequence (does
    token 7 occur?), from a language model's base weights."""
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import DataCollatorWithPadding, PreTrainedTokenizerFast, Trainer, TrainingArguments

    vocab = {f"t{i}": i for i in range(64)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t1")))
    tokenizer.pad_token, tokenizer.padding_side = "t0", "left"

    generator = torch.Generator().manual_seed(0)
    examples = []
    for i in range(128):
        n = int(torch.randint(4, 12, (1,), generator=generator))
        seq = torch.randint(8, 64, (n,), generator=generator)
        if i % 2:
            seq[int(torch.randint(0, n, (1,), generator=generator))] = 7
        examples.append({"input_ids": seq.tolist(), "labels": i % 2})
    data = Dataset.from_list(examples)

    torch.manual_seed(0)
    model = TitansForSequenceClassification(tiny_config("mag", num_labels=2))
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=16,
        per_device_eval_batch_size=32,
        num_train_epochs=6,
        learning_rate=3e-3,
        logging_steps=8,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data,
        eval_dataset=data,
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < 0.7 * before, (before, after)
