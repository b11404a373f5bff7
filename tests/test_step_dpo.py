"""algos/step_dpo.py's data: how a step pair becomes a prompt (question + earlier steps, masked) and two steps
(no EOS), and the errors on bad step data; on a tiny character tokenizer and a random Llama of tests/tiny.py. The loss
is pinned by tests/golden/step_dpo.step_dpo_loss.json, the whole script by tests/test_runs.py."""

import pytest
import torch
from datasets import Dataset

import algos.dpo
from algos.step_dpo import (
    Args, check_args, collate, compute_loss, dpo_loss, prepare_dataset, step_dpo_loss, tokenize_row,
)
from tests.tiny import SPECIAL_TEMPLATE, make_tokenizer, tiny_llama


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def row(tokenizer, example, **overrides):
    return tokenize_row(example, tokenizer, Args(**overrides))


# ((1+2)*3)-4: the first step is right, the second is where the rejected sample went wrong
EXAMPLE = {"prompt": "Q: ((1+2)*3)-4\n", "initial_reason_steps": "1 + 2 = 3\n", "chosen": "3 * 3 = 9\n",
           "rejected": "3 * 3 = 6\n"}
CONVERSATION = {**EXAMPLE, "prompt": [{"role": "user", "content": "((1+2)*3)-4"}]}


def dataset(*examples):
    return Dataset.from_list(list(examples))


def test_prompt_is_question_then_earlier_steps_and_steps_get_no_eos(tokenizer):
    r = row(tokenizer, EXAMPLE)
    assert r["prompt_ids"] == [tokenizer.bos_token_id] + ids(tokenizer, "Q: ((1+2)*3)-4\n1 + 2 = 3\n")
    assert r["chosen_ids"] == ids(tokenizer, "3 * 3 = 9\n") and r["rejected_ids"] == ids(tokenizer, "3 * 3 = 6\n")
    assert tokenizer.eos_token_id not in r["chosen_ids"] + r["rejected_ids"]
    assert not r["truncated"]


def test_no_earlier_steps_leaves_the_question_alone(tokenizer):
    r = row(tokenizer, {**EXAMPLE, "initial_reason_steps": "", "chosen": "1 + 2 = 3\n", "rejected": "1 + 2 = 4\n"})
    assert r["prompt_ids"] == [tokenizer.bos_token_id] + ids(tokenizer, EXAMPLE["prompt"])


def test_conversational_prompt_is_rendered_then_continued_by_the_steps(tokenizer):
    assert row(tokenizer, CONVERSATION) == row(tokenizer, EXAMPLE)


def test_template_that_writes_bos_and_eos_gets_bos_once_and_no_eos():
    tokenizer = make_tokenizer(SPECIAL_TEMPLATE)
    r = row(tokenizer, CONVERSATION)
    assert r == row(make_tokenizer(), EXAMPLE)
    assert r["prompt_ids"].count(tokenizer.bos_token_id) == 1
    assert tokenizer.eos_token_id not in r["prompt_ids"] + r["chosen_ids"] + r["rejected_ids"]


def test_keep_end_truncation_keeps_bos_and_the_latest_steps_and_cuts_the_question(tokenizer):
    full = row(tokenizer, EXAMPLE)
    r = row(tokenizer, EXAMPLE, max_prompt_length=12, max_length=16)
    assert r["prompt_ids"][1:] == full["prompt_ids"][-11:] == ids(tokenizer, ")-4\n1 + 2 = 3\n")[-11:]
    assert r["prompt_ids"][0] == tokenizer.bos_token_id and len(r["prompt_ids"]) == 12
    assert r["chosen_ids"] == full["chosen_ids"][:4] and r["truncated"]


def test_an_example_that_cannot_fit_is_an_error(tokenizer):
    many_steps = {**EXAMPLE, "initial_reason_steps": "1 + 2 = 3\n" * 3}
    with pytest.raises(ValueError, match=r"row 1: the prompt takes 46 tokens.*no room"):
        prepare_dataset(dataset(EXAMPLE, many_steps), tokenizer, 100, Args(max_length=46, max_prompt_length=64))


def test_missing_initial_reason_steps_is_named(tokenizer):
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['initial_reason_steps'\].*step_dpo.py needs \['prompt', 'initial_reason_steps', 'chosen', 'rejected'\]"):
        prepare_dataset(dataset({"prompt": "Q: 1\n", "chosen": "a", "rejected": "b"}), tokenizer, 100, Args())


def test_empty_dataset_is_an_error(tokenizer):
    empty = Dataset.from_dict({"prompt": [], "initial_reason_steps": [], "chosen": [], "rejected": []})
    with pytest.raises(ValueError, match="the train split has no rows"):
        prepare_dataset(empty, tokenizer, 100, Args(), "the train split")


@pytest.mark.parametrize("column", ["chosen", "rejected"])
def test_an_empty_step_is_an_error(tokenizer, column):
    with pytest.raises(ValueError, match=rf"row 0: the {column} step is empty"):
        prepare_dataset(dataset({**EXAMPLE, column: ""}), tokenizer, 100, Args())


def test_steps_as_messages_or_null_are_an_error(tokenizer):
    as_message = {**CONVERSATION, "chosen": [{"role": "assistant", "content": "3 * 3 = 9\n"}]}
    with pytest.raises(ValueError, match=r"the columns \['initial_reason_steps', 'chosen', 'rejected'\] mix strings"):
        row(tokenizer, as_message)
    all_messages = {**CONVERSATION, **{column: [{"role": "assistant", "content": EXAMPLE[column]}]
                                       for column in ("initial_reason_steps", "chosen", "rejected")}}
    with pytest.raises(ValueError, match="column 'initial_reason_steps' holds a list of messages: the steps are plain"):
        row(tokenizer, all_messages)
    with pytest.raises(ValueError, match=r"row 0: column 'initial_reason_steps' holds None \(NoneType\): expected a"):
        prepare_dataset(dataset({**EXAMPLE, "initial_reason_steps": None}), tokenizer, 100, Args())


def test_identical_steps_are_flagged(tokenizer):
    assert row(tokenizer, {**EXAMPLE, "rejected": EXAMPLE["chosen"]})["identical"]
    assert not row(tokenizer, EXAMPLE)["identical"]


def test_collate_masks_the_question_and_the_earlier_steps(tokenizer):
    rows = [row(tokenizer, EXAMPLE), row(tokenizer, {**EXAMPLE, "initial_reason_steps": ""})]
    batch = collate(rows, tokenizer.pad_token_id)
    for i, (r, key) in enumerate([(rows[0], "chosen_ids"), (rows[1], "chosen_ids"), (rows[0], "rejected_ids"),
                                  (rows[1], "rejected_ids")]):
        n_prompt, n = len(r["prompt_ids"]), len(r["prompt_ids"]) + len(r[key])
        assert batch["labels"][i].tolist() == [-100] * n_prompt + r[key] + [-100] * (batch["labels"].shape[1] - n)


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    return tiny_llama(tokenizer, 0)


def test_logps_are_the_log_likelihood_of_the_step_alone(tokenizer, tiny_model):
    """The summed log-probs cover the step's tokens given question + earlier steps, nothing else."""
    rows = prepare_dataset(dataset(EXAMPLE), tokenizer, len(tokenizer), Args())
    _, metrics = compute_loss(tiny_model, tiny_model, collate(rows, tokenizer.pad_token_id), Args())
    for key, step in (("logps/chosen", EXAMPLE["chosen"]), ("logps/rejected", EXAMPLE["rejected"])):
        context = [tokenizer.bos_token_id] + ids(tokenizer, EXAMPLE["prompt"] + EXAMPLE["initial_reason_steps"])
        naive = 0.0
        for token in ids(tokenizer, step):
            logits = tiny_model(torch.tensor([context])).logits[0, -1].double()
            naive += logits.log_softmax(-1)[token].item()
            context.append(token)
        assert metrics[key].item() == pytest.approx(naive, rel=1e-5)
    assert metrics["loss"].item() == pytest.approx(0.6931471805599453, rel=1e-6)  # policy = reference


def test_rewards_carry_no_gradient():
    policy = torch.tensor([-1.0, -2.0], requires_grad=True)
    losses, chosen, rejected = step_dpo_loss(policy, policy.flip(0), torch.zeros(2), torch.zeros(2), beta=0.5)
    assert losses.requires_grad and not chosen.requires_grad and not rejected.requires_grad


def test_the_loss_is_dpo_s_byte_for_byte():
    import inspect

    assert step_dpo_loss is dpo_loss and inspect.getsource(dpo_loss) == inspect.getsource(algos.dpo.dpo_loss)


@pytest.mark.parametrize("flag,value", [("beta", 0.0), ("beta", -1.0), ("label_smoothing", -0.1),
                                        ("label_smoothing", 0.5)])
def test_bad_beta_or_label_smoothing_is_an_error_naming_the_flag(flag, value):
    with pytest.raises(ValueError, match=rf"--{flag.replace('_', '-')} {value}: must be"):
        check_args(Args(**{flag: value}))
    check_args(Args())  # the defaults pass
