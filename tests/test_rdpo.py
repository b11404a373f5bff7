"""algos/rdpo.py beyond its golden values: the properties the paper's loss is built for, on random float64 inputs
(no model, no training), and the label flips of benchmarks/bench_noisy_labels.py. The loss is pinned by
tests/golden/rdpo.rdpo_loss.json, the whole script by tests/test_runs.py; the plumbing shared with dpo.py is tested in
tests/test_dpo.py."""

import json

import pytest
import torch

from algos.dpo import dpo_loss
from algos.rdpo import Args, check_args, rdpo_loss
from benchmarks.bench_noisy_labels import DATA, flip_labels


def random_logps(seed: int, n: int = 64) -> list[torch.Tensor]:
    """Policy and reference sequence log-probs of chosen and rejected completions, the policy within ±10 nats."""
    generator = torch.Generator().manual_seed(seed)
    reference = [-80 * torch.rand(n, dtype=torch.float64, generator=generator) for _ in range(2)]
    policy = [r + 20 * torch.rand(n, dtype=torch.float64, generator=generator) - 10 for r in reference]
    return [tensor.requires_grad_() for tensor in (policy[0], policy[1], reference[0], reference[1])]


def margin(policy_chosen, policy_rejected, reference_chosen, reference_rejected) -> torch.Tensor:
    return (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)


def test_flip_rate_zero_is_dpo_bit_for_bit():
    inputs = random_logps(0)
    robust, plain = rdpo_loss(*inputs, beta=2.0, flip_rate=0.0), dpo_loss(*inputs, beta=2.0)
    for a, b in zip(robust, plain):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(robust[0].sum(), inputs),
                                                   torch.autograd.grad(plain[0].sum(), inputs)))


@pytest.mark.parametrize("flip_rate", [0.05, 0.2, 0.45])
def test_unbiased_under_flips(flip_rate):
    """E over a flip with probability ε of the loss of the observed label = the DPO loss of the true label."""
    policy_chosen, policy_rejected, reference_chosen, reference_rejected = random_logps(1)
    as_labelled = rdpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, 1.5, flip_rate)[0]
    flipped = rdpo_loss(policy_rejected, policy_chosen, reference_rejected, reference_chosen, 1.5, flip_rate)[0]
    clean = dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, 1.5)[0]
    torch.testing.assert_close((1 - flip_rate) * as_labelled + flip_rate * flipped, clean, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("flip_rate", [0.1, 0.3])
def test_dpo_minus_a_linear_term_unlike_cdpo(flip_rate):
    """rDPO = DPO - ε/(1-2ε)·β·h (unbounded below); cDPO (dpo.py's --label-smoothing) = DPO + ε·β·h."""
    inputs, beta = random_logps(2), 0.5
    h = margin(*inputs)
    plain = dpo_loss(*inputs, beta)[0]
    torch.testing.assert_close(rdpo_loss(*inputs, beta, flip_rate)[0],
                               plain - flip_rate / (1 - 2 * flip_rate) * beta * h, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(dpo_loss(*inputs, beta, flip_rate)[0], plain + flip_rate * beta * h,
                               rtol=1e-12, atol=1e-10)


def test_gradient_never_vanishes():
    """d loss/d h = -β·(σ(-β·h) + ε/(1-2ε)): at a huge margin DPO's weight is 0, rDPO's stays β·ε/(1-2ε)."""
    h = torch.tensor([-50.0, 0.0, 50.0, 5000.0], dtype=torch.float64, requires_grad=True)
    zero = torch.zeros_like(h)
    loss = rdpo_loss(h, zero, zero, zero, beta=2.0, flip_rate=0.2)[0]
    (grad,) = torch.autograd.grad(loss.sum(), h)
    torch.testing.assert_close(grad, -2.0 * (torch.sigmoid(-2.0 * h.detach()) + 0.2 / 0.6))
    assert grad[-1].item() == pytest.approx(-2.0 / 3) and loss[-1].item() < -3000


def test_flip_rate_must_be_below_one_half():
    with pytest.raises(ValueError, match=r"--flip-rate 0.5: must be in \[0, 0.5\)"):
        check_args(Args(flip_rate=0.5))
    assert not hasattr(Args(), "label_smoothing")  # rDPO has no cDPO term: dpo.py's flag is not carried over
    assert rdpo_loss.__defaults__ == (Args().flip_rate,)



def test_the_noisy_labels_benchmark_flips_a_seeded_share_of_the_pairs(tmp_path):
    source = [json.loads(line) for line in (DATA / "pairs_train.jsonl").read_text().splitlines()]
    flipped = flip_labels(DATA / "pairs_train.jsonl", tmp_path / "a.jsonl", 0.2, seed=0)
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    swapped = [(r["chosen"], r["rejected"]) == (s["rejected"], s["chosen"]) for r, s in zip(rows, source)]
    kept = [r == s for r, s in zip(rows, source)]
    assert len(rows) == len(source) and all(a != b for a, b in zip(swapped, kept)) and sum(swapped) == flipped
    assert abs(flipped / len(rows) - 0.2) < 0.03  # a binomial share: 1689 pairs, standard deviation 0.01
    assert flip_labels(DATA / "pairs_train.jsonl", tmp_path / "b.jsonl", 0.2, seed=0) == flipped
    assert (tmp_path / "b.jsonl").read_text() == (tmp_path / "a.jsonl").read_text()  # seeded
