"""algos/sft.py beyond its golden values: the tokens it learns from (chosen only, prompt and padding masked), the
loss of a whole batch through the model against per-row cross-entropies, and its data errors, on the tiny
character tokenizer and random Llama of tests/tiny.py. The loss is pinned by tests/golden/sft.sft_loss.json, the whole
script by tests/test_runs.py; the plumbing shared with dpo.py by tests/test_dpo.py and tests/test_template.py."""

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset

from algos.sft import Args, collate, compute_loss, prepare_dataset, sft_loss
from tests.tiny import make_tokenizer, tiny_llama

EXAMPLES = [
    {"prompt": "Q: (1+2)*3\n", "chosen": "1 + 2 = 3\n3 * 3 = 9\nAnswer: 9", "rejected": "Answer: 8"},
    {"prompt": "Q: 7\n", "chosen": "Answer: 7", "rejected": "7 = 7\nAnswer: 6"},
    {"prompt": "Q: 2*2\n", "chosen": "2 * 2 = 4\nAnswer: 4", "rejected": "2 * 2 = 5\nAnswer: 5"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    return tiny_llama(tokenizer, 0)


def test_rows_hold_the_prompt_and_the_chosen_completion_only(tokenizer):
    rows = prepare_dataset(Dataset.from_list(EXAMPLES), tokenizer, len(tokenizer), Args())
    ids = tokenizer(EXAMPLES[1]["chosen"], add_special_tokens=False)["input_ids"]
    assert rows[1]["chosen_ids"] == ids + [tokenizer.eos_token_id] and "rejected_ids" not in rows[1]
    without_rejected = [{k: v for k, v in e.items() if k != "rejected"} for e in EXAMPLES]  # SFT data works too
    assert prepare_dataset(Dataset.from_list(without_rejected), tokenizer, len(tokenizer), Args()) == rows
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['chosen'\]"):
        prepare_dataset(Dataset.from_list([{"prompt": "Q: 1\n", "completion": "1"}]), tokenizer, 100, Args())


def test_loss_is_each_completion_s_cross_entropy_averaged_over_rows(tokenizer, tiny_model):
    rows = prepare_dataset(Dataset.from_list(EXAMPLES), tokenizer, len(tokenizer), Args())
    batch = collate(rows, tokenizer.pad_token_id)
    loss, metrics = compute_loss(tiny_model, batch, Args())
    logits = tiny_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    per_row = [F.cross_entropy(logits[i, :-1], batch["labels"][i, 1:], ignore_index=-100) for i in range(len(rows))]
    expected = sum(per_row) / len(rows)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["loss"].item() == pytest.approx(len(rows) * expected.item(), rel=1e-5)  # sums over rows
    lengths = [len(r["chosen_ids"]) for r in rows]
    assert metrics["lengths/chosen"].item() == sum(lengths)
    assert (batch["labels"] != -100).sum().item() == sum(lengths)  # prompt and padding masked


def test_the_loss_function_needs_no_hyperparameter():
    logps = torch.tensor([-6.0, -2.0], requires_grad=True)
    losses = sft_loss(logps, torch.tensor([3, 1]))
    assert losses.tolist() == [2.0, 2.0]  # 6 nats over 3 tokens, 2 nats over 1
