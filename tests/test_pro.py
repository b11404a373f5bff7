"""algos/pro.py beyond its golden values: the limits that reduce PRO to a sibling's loss (lipo.py's ListMLE without
the temperatures, simpo.py's pair loss for two completions), the per-list dynamic temperature (shift and scale of the
scores), the invariance to the order of a list (ties included), the SFT weight λ·(n - 1)², the whole batch through a
model (lengths from the labels), no reference model, the flags; on a tiny character tokenizer and a random Llama
of tests/tiny.py, no training. The loss is pinned by tests/golden/pro.pro_loss.json, the whole script by
tests/test_runs.py."""

import dataclasses

import pytest
import torch
from datasets import Dataset

from algos.lipo import lipo_loss
from algos.pro import Args, batch_logps, check_args, collate, compute_loss, prepare_dataset, pro_loss
from algos.simpo import simpo_loss
from tests.golden import REPO
from tests.tiny import make_tokenizer, tiny_llama

SIZES = [4, 3, 2, 4, 1]
LEVELS = torch.tensor([0.0, 1 / 3, 0.5, 2 / 3, 1.0, 2.0], dtype=torch.float64)


def random_lists(seed=0, sizes=SIZES):
    generator = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    logps = (-80 * torch.rand(n, generator=generator, dtype=torch.float64)).requires_grad_()
    lengths = torch.randint(5, 60, (n,), generator=generator)
    scores = LEVELS[torch.randint(len(LEVELS), (n,), generator=generator)]
    return logps, lengths, scores, torch.tensor(sizes)


def test_without_temperatures_and_sft_the_ranking_term_is_lipo_s_list_mle():
    """PRO's base loss (Plackett-Luce from the best down, ties never compared) on length-normalised log-probs is
    lipo.py's ListMLE on rewards β·logp/|y| against a reference of 0."""
    logps, lengths, scores, sizes = random_lists()
    ours, rewards = pro_loss(logps, lengths, scores, sizes, 0.7, sft_weight=0.0, dynamic_temperature=False)
    theirs, their_rewards = lipo_loss(logps / lengths, torch.zeros_like(logps), scores, sizes, 0.7, "list_mle")
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rewards, their_rewards, rtol=1e-12, atol=1e-12)


def test_two_completions_are_simpo_s_pair_loss_with_the_score_gap_as_temperature():
    """A list of (chosen, rejected) with scores ψw > ψl: -log σ((ψw - ψl)·β·(logp(yw)/|yw| - logp(yl)/|yl|)), SimPO
    with β·(ψw - ψl) and γ = 0; without the dynamic temperature, β alone."""
    generator = torch.Generator().manual_seed(1)
    chosen, rejected = (-60 * torch.rand(8, generator=generator, dtype=torch.float64) for _ in range(2))
    chosen_lengths, rejected_lengths = (torch.randint(5, 60, (8,), generator=generator) for _ in range(2))
    gaps = torch.tensor([2.0, 1.5, 1 / 3, 0.5, 2.0, 1.0, 0.25, 4.0], dtype=torch.float64)
    flat = lambda a, b: torch.stack([a, b], 1).flatten()  # noqa: E731  list by list: chosen, then rejected
    for dynamic in (True, False):
        ours, _ = pro_loss(flat(chosen, rejected), flat(chosen_lengths, rejected_lengths), flat(gaps, 0 * gaps),
                           torch.full((8,), 2), 0.3, sft_weight=0.0, dynamic_temperature=dynamic)
        beta = 0.3 * gaps if dynamic else 0.3
        theirs, _, _ = simpo_loss(chosen, rejected, chosen_lengths, rejected_lengths, beta, 0.0, 0.0)
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_the_temperatures_come_from_each_list_s_score_gaps():
    """Shifting a list's scores changes nothing; scaling them by c scales the ranking term's inverse temperatures,
    i.e. equals β·c (without the SFT term); another list's scores play no part."""
    logps, lengths, scores, sizes = random_lists(2)
    base, _ = pro_loss(logps, lengths, scores, sizes, 0.5, sft_weight=0.0)
    shift = torch.repeat_interleave(torch.tensor([3.0, -1.0, 0.5, 10.0, 7.0], dtype=torch.float64), sizes)
    torch.testing.assert_close(pro_loss(logps, lengths, scores + shift, sizes, 0.5, sft_weight=0.0)[0], base,
                               rtol=1e-12, atol=1e-12)
    scaled, _ = pro_loss(logps, lengths, 4 * scores, sizes, 0.5, sft_weight=0.0)
    torch.testing.assert_close(scaled, pro_loss(logps, lengths, scores, sizes, 2.0, sft_weight=0.0)[0],
                               rtol=1e-12, atol=1e-12)
    other = scores.clone()
    other[:4] = torch.tensor([2.0, 0.0, 1.0, 0.5])  # only the first list changes
    changed, _ = pro_loss(logps, lengths, other, sizes, 0.5, sft_weight=0.0)
    assert not torch.isclose(changed[0], base[0]) and torch.equal(changed[1:], base[1:])


@pytest.mark.parametrize("dynamic", [True, False])
def test_the_order_within_a_list_does_not_matter_ties_included(dynamic):
    logps, lengths, scores, sizes = random_lists(3)
    scores[:4] = torch.tensor([1.0, 2.0, 1.0, 2.0])  # two ties in one list
    losses, _ = pro_loss(logps, lengths, scores, sizes, 0.5, dynamic_temperature=dynamic)
    (grad,) = torch.autograd.grad(losses.sum(), logps)
    starts = torch.cumsum(sizes, 0) - sizes
    order = torch.cat([start + torch.randperm(size, generator=torch.Generator().manual_seed(int(start)))
                       for start, size in zip(starts.tolist(), sizes.tolist())])
    permuted = logps.detach()[order].requires_grad_()
    again, _ = pro_loss(permuted, lengths[order], scores[order], sizes, 0.5, dynamic_temperature=dynamic)
    (grad_again,) = torch.autograd.grad(again.sum(), permuted)
    torch.testing.assert_close(again, losses, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_again, grad[order], rtol=1e-12, atol=1e-12)


def test_the_sft_term_weighs_the_paper_s_lambda_times_n_minus_1_squared():
    """All scores equal: nothing to rank, so the loss is λ·(n - 1)² times the mean NLL (summed over tokens) of the
    (all tied) best completions; with distinct scores, of the best one alone."""
    logps = torch.tensor([-2.0, -4.0, -6.0, -8.0, -3.0, -5.0], dtype=torch.float64)
    lengths, sizes = torch.tensor([3, 4, 5, 6, 7, 8]), torch.tensor([4, 2])
    tied, _ = pro_loss(logps, lengths, torch.ones(6, dtype=torch.float64), sizes, 1.0, sft_weight=0.05)
    torch.testing.assert_close(tied, torch.tensor([0.05 * 9 * 5.0, 0.05 * 1 * 4.0], dtype=torch.float64))
    scores = torch.tensor([0.0, 2.0, 1.0, 0.5, 1.0, 0.0], dtype=torch.float64)
    with_sft, _ = pro_loss(logps, lengths, scores, sizes, 1.0, sft_weight=0.05)
    without, _ = pro_loss(logps, lengths, scores, sizes, 1.0, sft_weight=0.0)
    torch.testing.assert_close(with_sft - without, torch.tensor([0.05 * 9 * 4.0, 0.05 * 1 * 3.0], dtype=torch.float64))


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(chat_template=None)


LISTS = [
    {"prompt": "Q: 1+2\n", "completions": ["Answer: 3", "1 + 2 = 4\nAnswer: 4", "Answer: 12"], "scores": [2.0, 0.5, 0.0]},
    {"prompt": "Q: 3*3\n", "completions": ["3 * 3 = 9\nAnswer: 9", "Answer: 6"], "scores": [2.0, 2.0]},
]


def test_a_batch_through_the_model_uses_lengths_from_the_labels(tokenizer):
    rows = prepare_dataset(Dataset.from_list(LISTS), tokenizer, len(tokenizer), Args())
    batch = collate(rows, tokenizer.pad_token_id)
    policy = tiny_llama(tokenizer, 0)
    loss, metrics = compute_loss(policy, batch, Args())
    with torch.no_grad():
        logps = batch_logps(policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                            batch["labels"])
    lengths = torch.tensor([len(text) + 1 for example in LISTS for text in example["completions"]])  # chars + EOS
    expected, rewards = pro_loss(logps, lengths, batch["scores"], batch["list_sizes"], 1.0)
    torch.testing.assert_close(loss, expected.mean())
    torch.testing.assert_close(metrics["rewards/chosen"], rewards[0] + rewards[3])  # the first best of each list


def test_flags():
    with pytest.raises(ValueError, match=r"--sft-weight -0.1: must be >= 0"):
        check_args(Args(sft_weight=-0.1))
    with pytest.raises(ValueError, match=r"--beta 0.0: must be > 0"):
        check_args(Args(beta=0.0))
    check_args(Args(sft_weight=0.0, dynamic_temperature=False))  # the ranking term alone, the paper's base loss


def test_no_reference_model_is_loaded():
    """PRO's scores are the policy's own: the script has no --precompute-ref-logps and loads one model."""
    assert "precompute_ref_logps" not in {field.name for field in dataclasses.fields(Args)}
    source = (REPO / "algos/pro.py").read_text()
    main = source[source.index('if __name__ == "__main__":'):]
    assert main.count("load_model(") == 1 and "ref_model" not in source
