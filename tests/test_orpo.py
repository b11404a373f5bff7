"""algos/orpo.py beyond its golden values: λ = 0 is sft.py's loss, the loss of a whole batch through the model (the NLL
per chosen token row by row, the log odds of the mean token log-probs), the log odds where P = e^a nears or reaches 1
(float32 included), the absence of a reference model and the flag's check, on a tiny character tokenizer and a random
Llama of tests/tiny.py. The loss is pinned by tests/golden/orpo.orpo_loss.json, the whole script by
tests/test_runs.py; the plumbing shared with dpo.py is tested in tests/test_dpo.py."""

import dataclasses
import inspect
import math

import pytest
import torch
from datasets import Dataset

import algos.orpo
from algos.orpo import Args, check_args, collate, compute_loss, orpo_loss, prepare_dataset
from algos.sft import sft_loss
from tests.tiny import make_tokenizer, naive_logp, tiny_llama

EXAMPLES = [  # chosen completions of 30, 10 and 20 tokens (EOS included): a per-row mean differs from a token mean
    {"prompt": "Q: (1+2)*3\n", "chosen": "1 + 2 = 3\n3 * 3 = 9\nAnswer: 9", "rejected": "Answer: 8"},
    {"prompt": "Q: 7\n", "chosen": "Answer: 7", "rejected": "7 = 7\nAnswer: 6"},
    {"prompt": "Q: 2*2\n", "chosen": "2 * 2 = 4\nAnswer: 4", "rejected": "2 * 2 = 5\nAnswer: 5"},
]
R_CAP = 69.07755278982137  # the log odds at the cap a = -1e-30: -1e-30 - log(1e-30)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(chat_template=None)


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_llama(tokenizer, 0)


@pytest.fixture(scope="module")
def rows(tokenizer):
    return prepare_dataset(Dataset.from_list(EXAMPLES), tokenizer, len(tokenizer), Args())


def test_lambda_zero_is_sft_s_loss_exactly():
    torch.manual_seed(0)
    chosen, rejected = (-torch.rand(6, dtype=torch.float64) * 40).requires_grad_(), -torch.rand(6, dtype=torch.float64)
    lengths = torch.tensor([3, 17, 1, 40, 0, 25])
    losses, _, _ = orpo_loss(chosen, rejected, lengths, lengths.flip(0), orpo_lambda=0.0)
    expected = sft_loss(chosen, lengths)
    assert torch.equal(losses, expected)
    assert torch.equal(*(torch.autograd.grad(x.sum(), chosen)[0] for x in (losses, expected)))


def test_batch_loss_is_the_equation_on_mean_token_log_probs(tokenizer, rows, model):
    """The batch loss is the mean over pairs of -a(yw) - λ·log σ(r(yw) - r(yl)), a the completion's mean token log-prob
    and r its log odds, with nll_loss the pairs' NLL per chosen token (not a token mean over the batch)."""
    loss, metrics = compute_loss(model, collate(rows, tokenizer.pad_token_id), Args(orpo_lambda=0.7))
    expected, nll = [], []
    for row in rows:
        a_w, a_l = (naive_logp(model, row["prompt_ids"], row[key]) / len(row[key])
                    for key in ("chosen_ids", "rejected_ids"))
        r_w, r_l = (a - math.log(-math.expm1(a)) for a in (a_w, a_l))
        expected.append(-a_w + 0.7 * math.log1p(math.exp(-(r_w - r_l))))
        nll.append(-a_w)
    assert [len(row["chosen_ids"]) for row in rows] == [30, 10, 20]
    assert loss.item() == pytest.approx(sum(expected) / 3, rel=1e-5)
    assert metrics["nll_loss"].item() == pytest.approx(sum(nll), rel=1e-5)
    summed = -sum(naive_logp(model, row["prompt_ids"], row["chosen_ids"]) for row in rows)
    token_mean = summed / sum(len(r["chosen_ids"]) for r in rows)
    assert abs(sum(nll) / 3 - token_mean) > 1e-3  # a batch-level token mean differs here


def test_log_odds_are_exact_where_p_nears_1_in_float32():
    """a = -2e-8: exp(a) rounds to 1 in float32, so log1p(-exp(a)) is -inf; log(-expm1(a)) keeps |a|."""
    logps = torch.tensor([-2e-3, -1e-3], requires_grad=True)
    lengths = torch.tensor([100000, 1000])
    a = logps.detach() / lengths
    assert torch.isinf(torch.log1p(-torch.exp(a[0])))
    losses, chosen, rejected = orpo_loss(logps, logps.detach().flip(0), lengths, lengths.flip(0), orpo_lambda=0.5)
    exact = [x - math.log(-math.expm1(x)) for x in (-2e-8, -1e-6)]
    torch.testing.assert_close(chosen, torch.tensor(exact), rtol=1e-6, atol=0)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(logps.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_certain_or_empty_completions_stop_at_the_cap(dtype):
    """a = 0 (an empty completion, or log-probs that round to 0): log odds 69.08, not inf, and no gradient through
    them (the NLL of an empty chosen completion keeps its gradient -1); the loss and gradients are finite."""
    chosen = torch.tensor([0.0, -1.0], dtype=dtype, requires_grad=True)
    rejected = torch.tensor([-2.0, 0.0], dtype=dtype, requires_grad=True)
    losses, chosen_odds, rejected_odds = orpo_loss(chosen, rejected, torch.tensor([0, 4]), torch.tensor([2, 3]), 0.5)
    assert chosen_odds[0].item() == pytest.approx(R_CAP) and rejected_odds[1].item() == pytest.approx(R_CAP)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()
    assert chosen.grad[0].item() == -1.0 and rejected.grad[1].item() == 0.0
    z = R_CAP - (-0.25 - math.log(-math.expm1(-0.25)))  # the second pair: its rejected completion is certain
    assert losses[1].item() == pytest.approx(0.25 + 0.5 * (z + math.log1p(math.exp(-z))), rel=1e-6)


def test_there_is_no_reference_model():
    assert "ref_model" not in inspect.signature(compute_loss).parameters
    assert "precompute_ref_logps" not in {field.name for field in dataclasses.fields(Args)}
    assert not hasattr(algos.orpo, "precompute_ref_logps")


def test_a_negative_lambda_is_an_error():
    with pytest.raises(ValueError, match=r"--orpo-lambda -0.1: must be >= 0"):
        check_args(Args(orpo_lambda=-0.1))
    check_args(Args(orpo_lambda=0.0))  # sft.py's loss is allowed
    check_args(Args())
