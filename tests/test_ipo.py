"""algos/ipo.py beyond its golden values: the completion lengths it normalises by, the loss of a whole batch
through the model, the reference paths and the bad inputs, on a tiny character tokenizer and a random
Llama of tests/tiny.py. The loss is pinned by tests/golden/ipo.ipo_loss.json, the whole script by
tests/test_runs.py; the plumbing shared with dpo.py is tested in tests/test_dpo.py."""

import pytest
import torch
from datasets import Dataset

from algos.ipo import (
    Args, check_args, collate, completion_lengths, compute_loss, ipo_loss, precompute_ref_logps, prepare_dataset,
)
from tests.tiny import make_tokenizer, naive_logp, tiny_llama

EXAMPLES = [
    {"prompt": "Q: (1+2)*3\n", "chosen": "1 + 2 = 3\n3 * 3 = 9\nAnswer: 9", "rejected": "Answer: 8"},
    {"prompt": "Q: 7\n", "chosen": "Answer: 7", "rejected": "7 = 7\nAnswer: 6"},
    {"prompt": "Q: 2*2\n", "chosen": "2 * 2 = 4\nAnswer: 4", "rejected": "2 * 2 = 5\nAnswer: 5"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(chat_template=None)


@pytest.fixture(scope="module")
def rows(tokenizer):
    return prepare_dataset(Dataset.from_list(EXAMPLES), tokenizer, len(tokenizer), Args())


def test_completion_lengths_count_the_completion_tokens_with_eos(tokenizer, rows):
    batch = collate(rows, tokenizer.pad_token_id)
    chosen, rejected = completion_lengths(batch["labels"]).chunk(2)
    assert chosen.tolist() == [len(r["chosen_ids"]) for r in rows]
    assert rejected.tolist() == [len(r["rejected_ids"]) for r in rows]
    assert chosen.tolist()[1] == len("Answer: 7") + 1  # one token per character, plus EOS


@pytest.mark.parametrize("length_normalize", [True, False], ids=["normalised", "summed"])
def test_batch_loss_is_the_equation_on_naive_logps(tokenizer, rows, length_normalize):
    policy, reference = tiny_llama(tokenizer, 0), tiny_llama(tokenizer, 1)
    args = Args(tau=0.25, length_normalize=length_normalize)
    loss, metrics = compute_loss(policy, reference, collate(rows, tokenizer.pad_token_id), args)
    expected = []
    for r in rows:
        n_chosen = len(r["chosen_ids"]) if length_normalize else 1
        n_rejected = len(r["rejected_ids"]) if length_normalize else 1
        chosen, rejected = ((naive_logp(policy, r["prompt_ids"], r[key]) - naive_logp(reference, r["prompt_ids"], r[key]))
                            for key in ("chosen_ids", "rejected_ids"))
        h = chosen / n_chosen - rejected / n_rejected
        expected.append((h - 1 / (2 * args.tau)) ** 2)
    assert loss.item() == pytest.approx(sum(expected) / len(expected), rel=1e-5)
    assert metrics["loss"].item() == pytest.approx(sum(expected), rel=1e-5)


def test_policy_equal_to_reference_gives_the_squared_target(tokenizer, rows):
    model = tiny_llama(tokenizer, 0)
    loss, metrics = compute_loss(model, model, collate(rows, tokenizer.pad_token_id), Args(tau=0.1))
    assert loss.item() == pytest.approx(25.0, rel=1e-6)  # (1/(2·0.1))²
    assert metrics["rewards/margins"].item() == 0 and metrics["rewards/accuracies"].item() == 0


def test_precomputed_reference_logps_match_the_reference_model(tokenizer):
    rows = prepare_dataset(Dataset.from_list(EXAMPLES), tokenizer, len(tokenizer), Args())
    policy, reference = tiny_llama(tokenizer, 0), tiny_llama(tokenizer, 1)
    on_the_fly = compute_loss(policy, reference, collate(rows, tokenizer.pad_token_id), Args())
    precompute_ref_logps(reference, rows, Args(per_device_eval_batch_size=2), tokenizer.pad_token_id,
                         torch.device("cpu"), torch.autocast("cpu", enabled=False))
    precomputed = compute_loss(policy, None, collate(rows, tokenizer.pad_token_id), Args())
    torch.testing.assert_close(precomputed[0], on_the_fly[0])
    for key, value in on_the_fly[1].items():
        torch.testing.assert_close(precomputed[1][key], value, msg=key)


@pytest.mark.parametrize("tau", [0.0, -0.5])
def test_non_positive_tau_is_an_error(tau):
    with pytest.raises(ValueError, match=rf"--tau {tau}: must be > 0"):
        check_args(Args(tau=tau))
    check_args(Args(tau=0.2))  # the default passes


@pytest.mark.parametrize("length_normalize", [True, False], ids=["normalised", "summed"])
def test_empty_completions_give_finite_loss_and_gradient(length_normalize):
    policy = torch.zeros(3, requires_grad=True)
    lengths = torch.zeros(3, dtype=torch.long)
    losses, _, _ = ipo_loss(policy, policy, torch.zeros(3), torch.zeros(3), lengths, lengths, 0.5, length_normalize)
    losses.sum().backward()
    assert torch.equal(losses, torch.ones(3)) and torch.isfinite(policy.grad).all()


def test_rewards_carry_no_gradient():
    policy = torch.tensor([-1.0, -2.0], requires_grad=True)
    lengths = torch.tensor([3, 4])
    losses, chosen, rejected = ipo_loss(policy, policy.flip(0), torch.zeros(2), torch.zeros(2), lengths, lengths, 0.1, False)
    assert losses.requires_grad and not chosen.requires_grad and not rejected.requires_grad


def test_bad_datasets_are_errors_that_name_the_fix(tokenizer):
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['rejected'\].*ipo.py needs.*rename the columns"):
        prepare_dataset(Dataset.from_list([{"prompt": "Q: 1\n", "chosen": "Answer: 1"}]), tokenizer, 100, Args())
    with pytest.raises(ValueError, match="the train split has no rows"):
        empty = Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []})
        prepare_dataset(empty, tokenizer, 100, Args(), "the train split")
    with pytest.raises(ValueError, match=r"row 0: the prompt takes \d+ tokens.*no room"):
        prepare_dataset(Dataset.from_list(EXAMPLES), tokenizer, 100, Args(max_length=8, max_prompt_length=8))
