"""algos/simpo.py beyond its golden values: the lengths it averages by, the loss of a whole batch through the
model (the SFT term against a plain cross-entropy), the absence of a reference model and the bad inputs,
on a tiny character tokenizer and a random Llama of tests/tiny.py. The loss is pinned by
tests/golden/simpo.simpo_loss.json, the whole script by tests/test_runs.py; the plumbing shared with
dpo.py is tested in tests/test_dpo.py."""

import dataclasses
import inspect

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset

import algos.simpo
from algos.simpo import Args, check_args, collate, completion_lengths, compute_loss, prepare_dataset, simpo_loss
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
def model(tokenizer):
    return tiny_llama(tokenizer, 0)


@pytest.fixture(scope="module")
def rows(tokenizer):
    return prepare_dataset(Dataset.from_list(EXAMPLES), tokenizer, len(tokenizer), Args())


def test_completion_lengths_count_the_completion_tokens_with_eos(tokenizer, rows):
    chosen, rejected = completion_lengths(collate(rows, tokenizer.pad_token_id)["labels"]).chunk(2)
    assert chosen.tolist() == [len(r["chosen_ids"]) for r in rows]
    assert rejected.tolist() == [len(r["rejected_ids"]) for r in rows]
    assert chosen.tolist()[1] == len("Answer: 7") + 1  # one token per character, plus EOS


def test_batch_loss_is_the_equation_on_naive_average_logps(tokenizer, rows, model):
    args = Args(beta=2.0, gamma_beta_ratio=0.4, label_smoothing=0.1, sft_weight=0.0)  # the SimPO term alone
    loss, metrics = compute_loss(model, collate(rows, tokenizer.pad_token_id), args)
    expected, margins = [], []
    for r in rows:
        margin = args.beta * (naive_logp(model, r["prompt_ids"], r["chosen_ids"]) / len(r["chosen_ids"])
                              - naive_logp(model, r["prompt_ids"], r["rejected_ids"]) / len(r["rejected_ids"]))
        z = torch.tensor(margin - args.beta * args.gamma_beta_ratio, dtype=torch.float64)
        expected.append((-0.9 * F.logsigmoid(z) - 0.1 * F.logsigmoid(-z)).item())
        margins.append(margin)
    assert loss.item() == pytest.approx(sum(expected) / len(expected), rel=1e-5)
    assert metrics["rewards/margins"].item() == pytest.approx(sum(margins), abs=1e-5)


def test_sft_term_is_the_token_level_cross_entropy_of_the_chosen_completions(tokenizer, rows, model):
    batch = collate(rows, tokenizer.pad_token_id)
    without, _ = compute_loss(model, batch, Args(sft_weight=0.0))
    with_sft, _ = compute_loss(model, batch, Args(sft_weight=0.7))
    chosen = slice(0, len(rows))  # collate puts the chosen sequences first
    logits, labels = model(input_ids=batch["input_ids"][chosen]).logits, batch["labels"][chosen]
    cross_entropy = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    assert (with_sft - without).item() == pytest.approx(0.7 * cross_entropy.item(), rel=1e-5)


def test_there_is_no_reference_model():
    assert "ref_model" not in inspect.signature(compute_loss).parameters
    assert "precompute_ref_logps" not in {field.name for field in dataclasses.fields(Args)}
    assert not hasattr(algos.simpo, "precompute_ref_logps")


@pytest.mark.parametrize("flag,value,valid_range", [
    ("beta", 0.0, "> 0"), ("beta", -2.0, "> 0"), ("gamma_beta_ratio", -0.1, ">= 0"),
    ("label_smoothing", -0.1, r"in \[0, 0.5\)"), ("label_smoothing", 0.5, r"in \[0, 0.5\)"),
    ("sft_weight", -1.0, ">= 0"),
])
def test_bad_hyperparameters_are_errors_naming_the_flag(flag, value, valid_range):
    with pytest.raises(ValueError, match=rf"--{flag.replace('_', '-')} {value}: must be {valid_range}"):
        check_args(Args(**{flag: value}))
    check_args(Args())  # the defaults pass


def test_empty_completions_give_finite_loss_and_gradient():
    policy = torch.zeros(3, requires_grad=True)
    lengths = torch.zeros(3, dtype=torch.long)
    losses, _, _ = simpo_loss(policy, policy, lengths, lengths, 2.0, 0.5, label_smoothing=0.1, sft_weight=1.0)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(policy.grad).all()


def test_rewards_carry_no_gradient():
    policy = torch.tensor([-1.0, -2.0], requires_grad=True)
    lengths = torch.tensor([3, 4])
    losses, chosen, rejected = simpo_loss(policy, policy.flip(0), lengths, lengths, 2.0, 0.5, sft_weight=0.0)
    assert losses.requires_grad and not chosen.requires_grad and not rejected.requires_grad


def test_bad_datasets_are_errors_that_name_the_fix(tokenizer):
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['rejected'\].*simpo.py needs.*rename the columns"):
        prepare_dataset(Dataset.from_list([{"prompt": "Q: 1\n", "chosen": "Answer: 1"}]), tokenizer, 100, Args())
    with pytest.raises(ValueError, match="the train split has no rows"):
        empty = Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []})
        prepare_dataset(empty, tokenizer, 100, Args(), "the train split")
    with pytest.raises(ValueError, match=r"row 0: the prompt takes \d+ tokens.*no room"):
        prepare_dataset(Dataset.from_list(EXAMPLES), tokenizer, 100, Args(max_length=8, max_prompt_length=8))
