"""algos/npo.py beyond its golden values: the chosen completion takes no part in the loss or its gradient (in the
loss function and through a tiny model), the loss is DPO's with the chosen log-ratio held at 0, and gradient ascent
is its small-β limit. No training. The loss is pinned by tests/golden/npo.npo_loss.json, the whole script by
tests/test_runs.py; the plumbing shared with dpo.py is tested in tests/test_dpo.py."""

import math

import pytest
import torch
from datasets import Dataset

from algos.dpo import dpo_loss
from algos.npo import Args, collate, compute_loss, npo_loss, prepare_dataset
from tests.tiny import make_tokenizer, tiny_llama


def random_logps(seed: int, n: int = 64) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    reference = [-80 * torch.rand(n, dtype=torch.float64, generator=generator) for _ in range(2)]
    policy = [r + 20 * torch.rand(n, dtype=torch.float64, generator=generator) - 10 for r in reference]
    return [tensor.requires_grad_() for tensor in (policy[0], policy[1], reference[0], reference[1])]


def test_the_chosen_log_probs_change_neither_loss_nor_gradient():
    policy_chosen, policy_rejected, reference_chosen, reference_rejected = random_logps(0)
    losses = npo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, 2.0)[0]
    other = npo_loss(policy_chosen * 3 - 7, policy_rejected, reference_chosen + 11, reference_rejected, 2.0)[0]
    assert torch.equal(losses, other)
    grads = torch.autograd.grad(losses.sum(), [policy_chosen, reference_chosen], allow_unused=True)
    assert all(g is None or not g.any() for g in grads)


def test_dpo_with_the_chosen_log_ratio_at_zero_times_two_over_beta():
    """The paper's derivation: drop the chosen term of DPO's loss and rescale by 2/β."""
    _, policy_rejected, reference_chosen, reference_rejected = random_logps(1)
    for beta in (0.1, 2.0):
        npo = npo_loss(reference_chosen, policy_rejected, reference_chosen, reference_rejected, beta)[0]
        dpo = dpo_loss(reference_chosen, policy_rejected, reference_chosen, reference_rejected, beta)[0]
        torch.testing.assert_close(npo, 2 / beta * dpo, rtol=1e-12, atol=1e-12)


def test_gradient_ascent_is_the_small_beta_limit():
    """loss - (2/β)·ln 2 -> r = logp(yl) - ref(yl) as β -> 0, and its gradient -> 1 (gradient ascent on the NLL)."""
    policy_chosen, policy_rejected, reference_chosen, reference_rejected = random_logps(2)
    beta = 1e-6
    losses = npo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta)[0]
    r = (policy_rejected - reference_rejected).detach()
    torch.testing.assert_close(losses.detach() - 2 / beta * math.log(2), r, rtol=0, atol=1e-4)
    (grad,) = torch.autograd.grad(losses.sum(), policy_rejected)
    torch.testing.assert_close(grad, torch.ones_like(grad), rtol=0, atol=1e-5)


def test_the_chosen_completion_changes_nothing_through_the_model():
    """Two batches with the same prompts and rejected completions but other chosen ones: the same loss and the same
    gradient on every weight; only the logged chosen-side metrics differ."""
    tokenizer = make_tokenizer()
    base = [{"prompt": "Q: (1+2)*3\n", "chosen": "1 + 2 = 3\n3 * 3 = 9\nAnswer: 9", "rejected": "Answer: 8"},
            {"prompt": "Q: 2*2\n", "chosen": "2 * 2 = 4\nAnswer: 4", "rejected": "2 * 2 = 5\nAnswer: 5"}]
    other = [{**base[0], "chosen": "Answer: 9"}, {**base[1], "chosen": "2 * 2 = 4\n4 = 4\nAnswer: 4"}]
    policy, reference = tiny_llama(tokenizer, 0).train(), tiny_llama(tokenizer, 1)
    results = []
    for examples in (base, other):
        rows = prepare_dataset(Dataset.from_list(examples), tokenizer, len(tokenizer), Args())
        loss, metrics = compute_loss(policy, reference, collate(rows, tokenizer.pad_token_id), Args(beta=0.5))
        grads = torch.autograd.grad(loss, list(policy.parameters()))
        results.append((loss, metrics, grads))
    (loss_a, metrics_a, grads_a), (loss_b, metrics_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=1e-7)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert metrics_a["rewards/rejected"].item() == pytest.approx(metrics_b["rewards/rejected"].item(), abs=1e-6)
    assert metrics_a["logps/chosen"].item() != pytest.approx(metrics_b["logps/chosen"].item(), abs=1e-3)


def test_a_rejected_equal_to_its_chosen_is_not_flagged():
    """DPO's "identical" rows give no gradient; NPO still pushes such a rejected completion down."""
    row = {"prompt": "Q: 7\n", "chosen": "Answer: 7", "rejected": "Answer: 7"}
    assert prepare_dataset(Dataset.from_list([row]), make_tokenizer(), 100, Args())[0]["identical"] is False
