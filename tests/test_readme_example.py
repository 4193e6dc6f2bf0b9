"""The Hugging Face Trainer example (``example:trainer``: the README's quick start and the fused-losses guide,
``docs/guides/fused-losses.md``, hold the same copy), executed verbatim on a tiny random Llama.

Checks what a user of the example cares about: its loss is the BS-T forget loss computed from the model's own
full logits, and a few Trainer steps on it push the forget answers' likelihood down.
"""

from __future__ import annotations

import pytest
import torch

import bs_kernels as bk
from tools.doc_blocks import example

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

def readme_example() -> str:
    code = example("trainer")  # every copy of it identical, or an error naming them
    assert len(code.strip().splitlines()) < 10, "the example must stay under ten lines"
    return code


def tiny_llama(vocab=96):
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


class ForgetSet(torch.utils.data.Dataset):
    def __init__(self, n=8, t=12, vocab=96):
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, vocab, (n, t), generator=g)
        self.labels = self.ids.clone()
        self.labels[:, :5] = -100  # the question part carries no label

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def reference_bst(model, batch, lam=0.2, topk=20):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    per_seq = []
    for b in range(logits.shape[0]):
        y = batch["labels"][b, 1:]
        z = logits[b, :-1]
        s = bk.naive_token_scores(z, torch.eye(z.shape[-1]), y, topk=topk, lam=lam)  # h = logits, W = I
        per_seq.append(s.sum() / (y != -100).sum())
    return torch.stack(per_seq).mean()


def test_trainer_example(tmp_path):
    namespace: dict = {}
    exec(readme_example(), namespace)
    BSTTrainer = namespace["BSTTrainer"]
    model = tiny_llama()
    data = ForgetSet()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=6,
                                          learning_rate=5e-3, report_to="none", use_cpu=True, save_strategy="no",
                                          logging_strategy="no", remove_unused_columns=False)
    trainer = BSTTrainer(model=model, args=args, train_dataset=data)
    batch = {k: torch.stack([data[i][k] for i in range(4)]) for k in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        ours = trainer.compute_loss(model, batch)
        want = reference_bst(model, batch)
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)

    def forget_loglik():
        with torch.no_grad():
            return float(bk.naive_token_scores(
                model(input_ids=data.ids).logits[:, :-1].reshape(-1, 96), torch.eye(96),
                data.labels[:, 1:].reshape(-1)).sum())

    before = forget_loglik()
    trainer.train()
    after = forget_loglik()
    assert after < before - 1.0, (before, after)
