"""algos/ld_dpo.py beyond its golden values, through the model: α = 1 is DPO, pairs of equal lengths make α
irrelevant, the weights fall on the tokens after the shorter completion's length of policy and reference alike, the
precomputed reference is desensitized too, the flag's check; on a tiny character tokenizer and random Llamas of
tests/tiny.py. desensitized_logps and the loss are pinned by tests/golden/ld_dpo.*.json, the whole script by
tests/test_runs.py; the plumbing shared with dpo.py is tested in tests/test_dpo.py."""

import pytest
import torch
from datasets import Dataset

import algos.dpo
from algos.ld_dpo import (
    Args, check_args, collate, compute_loss, concatenated_forward, ld_dpo_loss, precompute_ref_logps, prepare_dataset,
    shifted_logprobs,
)
from tests.tiny import make_tokenizer, tiny_llama

UNEQUAL = [  # completions of 30 and 10, 10 and 16, 20 and 20 tokens (EOS included)
    {"prompt": "Q: (1+2)*3\n", "chosen": "1 + 2 = 3\n3 * 3 = 9\nAnswer: 9", "rejected": "Answer: 8"},
    {"prompt": "Q: 7\n", "chosen": "Answer: 7", "rejected": "7 = 7\nAnswer: 6"},
    {"prompt": "Q: 2*2\n", "chosen": "2 * 2 = 4\nAnswer: 4", "rejected": "2 * 2 = 5\nAnswer: 5"},
]
EQUAL = [{"prompt": "Q: 7\n", "chosen": "Answer: 7", "rejected": "Answer: 6"}, UNEQUAL[2]]
CPU = (torch.device("cpu"), torch.autocast("cpu", enabled=False))


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(chat_template=None)


@pytest.fixture(scope="module")
def pair_of_models(tokenizer):
    return tiny_llama(tokenizer, 0), tiny_llama(tokenizer, 1)  # policy, reference


def batch_of(tokenizer, examples):
    rows = prepare_dataset(Dataset.from_list(examples), tokenizer, len(tokenizer), Args())
    return rows, collate(rows, tokenizer.pad_token_id)


def by_hand(model, rows, batch, alpha):
    """ld(y) of every completion (chosen ones, then rejected), summed token by token in Python."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        token_logps = shifted_logprobs(logits, batch["labels"])
    completions = [row["chosen_ids"] for row in rows] + [row["rejected_ids"] for row in rows]
    values = []
    for i, ids in enumerate(completions):
        pair = rows[i % len(rows)]
        shared = min(len(pair["chosen_ids"]), len(pair["rejected_ids"]))
        start = len(pair["prompt_ids"]) - 1  # the log-prob of completion token t sits at position prompt + t - 1
        values.append(sum((1.0 if t < shared else alpha) * token_logps[i, start + t].item() for t in range(len(ids))))
    return torch.tensor(values)


def test_alpha_one_is_dpo(tokenizer, pair_of_models):
    rows, batch = batch_of(tokenizer, UNEQUAL)
    ours = compute_loss(*pair_of_models, batch, Args(ld_alpha=1.0, beta=0.5))
    theirs = algos.dpo.compute_loss(*pair_of_models, batch, algos.dpo.Args(beta=0.5))
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-5)  # sums of ~100 in another order: float32 ulps
    assert ours[1].keys() == theirs[1].keys()
    for key, value in theirs[1].items():
        torch.testing.assert_close(ours[1][key], value, rtol=1e-5, atol=1e-4, msg=key)  # sums of rewards of ~50
    inputs = [torch.randn(5) for _ in range(4)]  # and the loss itself is DPO's, bit for bit
    assert all(torch.equal(a, b) for a, b in zip(ld_dpo_loss(*inputs, beta=0.5, label_smoothing=0.1),
                                                  algos.dpo.dpo_loss(*inputs, beta=0.5, label_smoothing=0.1)))


def test_equal_lengths_make_alpha_irrelevant(tokenizer, pair_of_models):
    rows, batch = batch_of(tokenizer, EQUAL)
    assert all(len(row["chosen_ids"]) == len(row["rejected_ids"]) for row in rows)
    losses = [compute_loss(*pair_of_models, batch, Args(ld_alpha=alpha)) for alpha in (0.0, 0.3, 1.0)]
    for loss, metrics in losses[1:]:
        assert torch.equal(loss, losses[0][0])
        assert all(torch.equal(metrics[key], value) for key, value in losses[0][1].items())


@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_the_weights_fall_on_the_longer_tail_of_policy_and_reference_alike(tokenizer, pair_of_models, alpha):
    policy, reference = pair_of_models
    rows, batch = batch_of(tokenizer, UNEQUAL)
    assert [(len(row["chosen_ids"]), len(row["rejected_ids"])) for row in rows] == [(30, 10), (10, 16), (20, 20)]
    chosen, rejected, _ = concatenated_forward(policy, batch, ld_alpha=alpha)
    torch.testing.assert_close(torch.cat([chosen, rejected]), by_hand(policy, rows, batch, alpha))
    _, metrics = compute_loss(policy, reference, batch, Args(ld_alpha=alpha, beta=0.5))
    rewards = 0.5 * (by_hand(policy, rows, batch, alpha) - by_hand(reference, rows, batch, alpha))
    torch.testing.assert_close(metrics["rewards/chosen"], rewards[: len(rows)].sum())
    torch.testing.assert_close(metrics["rewards/rejected"], rewards[len(rows) :].sum())
    # the same model as policy and reference: every reward 0, loss ln 2, however the lengths differ
    loss, metrics = compute_loss(policy, policy, batch, Args(ld_alpha=alpha))
    assert loss.item() == pytest.approx(0.6931471805599453, rel=1e-6)
    assert metrics["rewards/chosen"].item() == 0 and metrics["rewards/rejected"].item() == 0


def test_precomputed_reference_logps_are_desensitized_too(tokenizer, pair_of_models):
    policy, reference = pair_of_models
    rows, batch = batch_of(tokenizer, UNEQUAL)
    args = Args(ld_alpha=0.3, per_device_eval_batch_size=2)
    on_the_fly = compute_loss(policy, reference, batch, args)
    precompute_ref_logps(reference, rows, args, tokenizer.pad_token_id, *CPU)
    torch.testing.assert_close(torch.tensor([row["reference_chosen_logps"] for row in rows]),
                               by_hand(reference, rows, batch, 0.3)[: len(rows)])
    precomputed = compute_loss(policy, None, collate(rows, tokenizer.pad_token_id), args)
    torch.testing.assert_close(precomputed[0], on_the_fly[0])
    for key, value in on_the_fly[1].items():
        torch.testing.assert_close(precomputed[1][key], value, msg=key)


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_alpha_outside_0_1_is_an_error(alpha):
    with pytest.raises(ValueError, match=rf"--ld-alpha {alpha}: must be in \[0, 1\]"):
        check_args(Args(ld_alpha=alpha))
