"""algos/rpo.py beyond its golden values: α = 0 is DPO, the NLL term is sft.py's loss (the chosen completion's
negative log-likelihood per token, row by row) through the model, the precomputed reference, the flag's check; on a
tiny character tokenizer and random Llamas of tests/tiny.py. The loss is pinned by tests/golden/rpo.rpo_loss.json,
the whole script by tests/test_runs.py; the plumbing shared with dpo.py is tested in tests/test_dpo.py."""

import pytest
import torch
from datasets import Dataset

from algos.dpo import dpo_loss
from algos.rpo import (
    Args, batch_logps, check_args, collate, compute_loss, precompute_ref_logps, prepare_dataset, rpo_loss,
)
from algos.sft import sft_loss
from tests.tiny import make_tokenizer, tiny_llama

EXAMPLES = [  # chosen completions of 30, 10 and 20 tokens (EOS included): the per-token mean differs from a batch mean
    {"prompt": "Q: (1+2)*3\n", "chosen": "1 + 2 = 3\n3 * 3 = 9\nAnswer: 9", "rejected": "Answer: 8"},
    {"prompt": "Q: 7\n", "chosen": "Answer: 7", "rejected": "7 = 7\nAnswer: 6"},
    {"prompt": "Q: 2*2\n", "chosen": "2 * 2 = 4\nAnswer: 4", "rejected": "2 * 2 = 5\nAnswer: 5"},
]
LN2 = 0.6931471805599453


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(chat_template=None)


@pytest.fixture(scope="module")
def rows(tokenizer):
    return prepare_dataset(Dataset.from_list(EXAMPLES), tokenizer, len(tokenizer), Args())


def test_alpha_zero_is_dpo_exactly():
    torch.manual_seed(0)
    inputs = [(torch.randn(6, dtype=torch.float64) * 20 - 40).requires_grad_() for _ in range(4)]
    lengths = torch.tensor([3, 17, 1, 40, 8, 25])
    ours = rpo_loss(*inputs, lengths, beta=0.3, label_smoothing=0.1, rpo_alpha=0.0)
    theirs = dpo_loss(*inputs, beta=0.3, label_smoothing=0.1)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(ours[0].sum(), inputs),
                                                  torch.autograd.grad(theirs[0].sum(), inputs)))


def test_the_nll_term_is_sft_s_loss_row_by_row(tokenizer, rows):
    """Policy = reference: the DPO term is ln 2, so the loss is ln 2 + α × sft.py's loss, the mean over rows of each
    chosen completion's NLL per token (not the NLL per token of the whole batch)."""
    model = tiny_llama(tokenizer, 0)
    batch = collate(rows, tokenizer.pad_token_id)
    loss, metrics = compute_loss(model, model, batch, Args(rpo_alpha=0.7))
    with torch.no_grad():
        logps = batch_logps(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                            batch["labels"])[: len(rows)]
    lengths = torch.tensor([len(row["chosen_ids"]) for row in rows])
    assert lengths.tolist() == [30, 10, 20]
    nll = sft_loss(logps, lengths)
    torch.testing.assert_close(loss, LN2 + 0.7 * nll.mean())
    torch.testing.assert_close(metrics["nll_loss"], nll.sum())
    assert not torch.allclose(nll.mean(), -logps.sum() / lengths.sum())  # a batch-level token mean differs here


def test_precomputed_reference_logps_match_the_reference_model(tokenizer, rows):
    rows = [dict(row) for row in rows]
    policy, reference = tiny_llama(tokenizer, 0), tiny_llama(tokenizer, 1)
    on_the_fly = compute_loss(policy, reference, collate(rows, tokenizer.pad_token_id), Args())
    precompute_ref_logps(reference, rows, Args(per_device_eval_batch_size=2), tokenizer.pad_token_id,
                         torch.device("cpu"), torch.autocast("cpu", enabled=False))
    precomputed = compute_loss(policy, None, collate(rows, tokenizer.pad_token_id), Args())
    torch.testing.assert_close(precomputed[0], on_the_fly[0])
    for key, value in on_the_fly[1].items():
        torch.testing.assert_close(precomputed[1][key], value, msg=key)


def test_negative_alpha_is_an_error():
    with pytest.raises(ValueError, match=r"--rpo-alpha -0.5: must be >= 0"):
        check_args(Args(rpo_alpha=-0.5))
    check_args(Args(rpo_alpha=0.0))  # plain DPO is allowed
