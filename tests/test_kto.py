"""algos/kto.py's data preparation, mismatched pairs, batching, log-probs, z0, its own flag checks and bad-input errors, on a tiny
character tokenizer and a random Llama of tests/tiny.py (no bundled assets needed). The loss itself is pinned by
tests/golden/kto.kto_loss.json, the whole script (and torchrun) by tests/test_runs.py."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from datasets import Dataset
from transformers import LlamaForCausalLM

from algos.kto import (
    Args,
    check_args,
    class_means,
    class_weight_warning,
    collate,
    compute_loss,
    eval_groups,
    evaluate,
    kto_loss,
    micro_batch,
    policy_forward,
    prepare_dataset,
    tokenize_row,
    unpair,
)
from tests.golden import REPO, RUN_ENV
from tests.tiny import make_tokenizer, naive_logp, tiny_llama


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def row(tokenizer, example, **overrides):
    return tokenize_row(example, tokenizer, Args(**overrides))


def dataset(*examples):
    return Dataset.from_list(list(examples))


GOOD = {"prompt": "Q: (1+2)*3\n", "completion": "1 + 2 = 3\n3 * 3 = 9\nAnswer: 9", "label": True}
BAD = {"prompt": "Q: 7-2\n", "completion": "7 - 2 = 4\nAnswer: 4", "label": False}
OTHER = {"prompt": "Q: 2*2\n", "completion": "Answer: 4", "label": True}
CONVERSATION = {"prompt": [{"role": "user", "content": "(1+2)*3"}],
                "completion": [{"role": "assistant", "content": GOOD["completion"]}], "label": True}


def test_standard_format_bos_once_eos_once_and_the_label(tokenizer):
    r = row(tokenizer, GOOD)
    assert r["prompt_ids"] == [tokenizer.bos_token_id] + ids(tokenizer, GOOD["prompt"])
    assert r["completion_ids"] == ids(tokenizer, GOOD["completion"]) + [tokenizer.eos_token_id]
    assert r["label"] is True and row(tokenizer, BAD)["label"] is False
    assert not r["truncated"]


def test_conversational_format_gives_the_same_tokens(tokenizer):
    assert row(tokenizer, CONVERSATION) == row(tokenizer, GOOD)


@pytest.mark.parametrize("mode", ["keep_end", "keep_start"])
def test_truncation_cuts_the_prompt_by_mode_then_the_completion(tokenizer, mode):
    full = row(tokenizer, GOOD)
    r = row(tokenizer, GOOD, max_prompt_length=5, max_length=12, truncation_mode=mode)
    bos = [tokenizer.bos_token_id]  # keep_end keeps the BOS that starts the prompt
    assert r["prompt_ids"] == (bos + full["prompt_ids"][-4:] if mode == "keep_end" else full["prompt_ids"][:5])
    assert r["completion_ids"] == full["completion_ids"][:7] and r["truncated"]


def test_a_paired_dataset_is_unpaired_into_chosen_desirable_and_rejected_undesirable(tokenizer):
    pairs = dataset({"prompt": GOOD["prompt"], "chosen": GOOD["completion"], "rejected": BAD["completion"]},
                    {"prompt": BAD["prompt"], "chosen": OTHER["completion"], "rejected": GOOD["completion"]})
    rows = prepare_dataset(unpair(pairs), tokenizer, 100, Args())
    expected = [{**GOOD}, {**GOOD, "completion": BAD["completion"], "label": False},
                {**BAD, "completion": OTHER["completion"], "label": True}, {**BAD, "completion": GOOD["completion"]}]
    assert rows == [row(tokenizer, example) for example in expected]


def test_a_conversational_pair_with_an_implicit_prompt_is_unpaired_too(tokenizer):
    implicit = {"chosen": CONVERSATION["prompt"] + CONVERSATION["completion"],
                "rejected": CONVERSATION["prompt"] + [{"role": "assistant", "content": BAD["completion"]}]}
    rows = prepare_dataset(unpair(dataset(implicit)), tokenizer, 100, Args())
    assert rows == [row(tokenizer, GOOD), row(tokenizer, {**GOOD, "completion": BAD["completion"], "label": False})]


def test_errors_in_a_paired_dataset_name_the_unpaired_row_2i_or_2i_plus_1(tokenizer):
    long_prompt = "Q: " + "1+" * 20 + "1\n"
    pairs = dataset({"prompt": "Q: 1\n", "chosen": "a", "rejected": "b"}, {"prompt": long_prompt, "chosen": "a", "rejected": "b"})
    with pytest.raises(ValueError, match=r"row 2: the prompt takes 16 tokens.*no room"):
        prepare_dataset(unpair(pairs), tokenizer, 100, Args(max_length=16, max_prompt_length=16))
    mixed = Dataset.from_list([{"prompt": "Q: 1\n", "chosen": "Answer: 1", "rejected": ["Answer: 2"]}])
    with pytest.raises(ValueError, match=r"row 1: column 'completion' holds \['Answer: 2'\] \(list\): expected a string"):
        prepare_dataset(unpair(mixed), tokenizer, 100, Args())


def test_text_columns_name_the_bad_value_and_refuse_mixed_formats(tokenizer):
    with pytest.raises(ValueError, match=r"row 1: column 'completion' holds 5 \(int\)"):
        prepare_dataset(examples_as_dataset([GOOD, {**BAD, "completion": 5}]), tokenizer, 100, Args())
    mixed = {**CONVERSATION, "completion": GOOD["completion"]}
    with pytest.raises(ValueError, match=r"row 0: the columns \['prompt', 'completion'\] mix strings and lists"):
        prepare_dataset(examples_as_dataset([mixed, GOOD]), tokenizer, 100, Args())


@pytest.mark.parametrize("label", [1, 0.0, "true", None])
def test_a_label_that_is_not_a_bool_is_an_error(tokenizer, label):
    examples = [GOOD, {**BAD, "label": label}]
    with pytest.raises(ValueError, match=r"row 1: the label is .* not true \(desirable\) or false.*cast_column"):
        prepare_dataset(examples_as_dataset(examples), tokenizer, 100, Args())


def examples_as_dataset(examples):
    """A dataset whose label column keeps mixed Python types (Arrow would unify them)."""
    class Rows(list):
        column_names = ["prompt", "completion", "label"]

    return Rows(examples)


def test_missing_columns_are_named(tokenizer):
    needs = r"kto.py needs \['prompt', 'completion', 'label'\]"
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['label'\].*" + needs):
        prepare_dataset(unpair(dataset({"prompt": "a", "completion": "b"})), tokenizer, 100, Args())
    # pairs without a prompt (and not conversational, so no implicit prompt) are not unpaired: their columns are named
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['prompt', 'completion', 'label'\]: it has "
                                         r"\['chosen', 'rejected'\].*" + needs):
        prepare_dataset(unpair(dataset({"chosen": "a", "rejected": "b"})), tokenizer, 100, Args())


def test_empty_datasets_are_errors(tokenizer):
    empty = Dataset.from_dict({"prompt": [], "completion": [], "label": []})
    with pytest.raises(ValueError, match="the train split has no rows"):
        prepare_dataset(empty, tokenizer, 100, Args(), "the train split")
    empty_pairs = Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []})
    with pytest.raises(ValueError, match="the train split has no rows"):
        prepare_dataset(unpair(empty_pairs), tokenizer, 100, Args(), "the train split")


def test_a_test_split_of_one_row_is_refused_before_the_models_load(tmp_path):
    """z0 pairs each row with another: one held-out row cannot be evaluated (the script says so at start-up)."""
    pair = {"prompt": "Q: 1+1\n", "chosen": "Answer: 2", "rejected": "Answer: 3"}
    (tmp_path / "kto_train.jsonl").write_text("\n".join(json.dumps(pair) for _ in range(4)) + "\n")
    (tmp_path / "kto_test.jsonl").write_text(json.dumps(GOOD) + "\n")  # the splits may differ in format
    command = [sys.executable, str(REPO / "algos/kto.py"), "--dataset-name", str(tmp_path / "kto_{split}.jsonl"),
               "--output-dir", str(tmp_path / "run")]
    done = subprocess.run(command, env={**os.environ, **RUN_ENV}, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "the test split has 1 rows: KTO needs 2" in done.stderr
    assert not (tmp_path / "run").exists()  # nothing written


def test_token_ids_outside_the_vocabulary_are_an_error(tokenizer):
    with pytest.raises(ValueError, match=r"row 0: token id \d+ is outside the model's vocabulary of 10"):
        prepare_dataset(dataset(GOOD, BAD), tokenizer, 10, Args())


@pytest.mark.parametrize("size", range(2, 9))
def test_mismatched_partners_rotate_so_that_no_row_meets_itself(size):
    rows = [{"prompt_ids": [1], "completion_ids": [100 + i], "label": True} for i in range(10 * size)]
    group = [10 * i for i in range(size)]
    batch = micro_batch(rows, group, slice(None), 1024)
    partners = [r["kl_ids"][0] - 100 for r in batch]
    assert [r["completion_ids"][0] - 100 for r in batch] == group
    assert partners == [group[(i + 1) % size] for i in range(size)]
    assert all(p != g for p, g in zip(partners, group)) and sorted(partners) == group
    # a process's share (every 2nd row from rank 1, as evaluation takes them) keeps the partners of the whole group
    assert micro_batch(rows, group, slice(1, None, 2), 1024) == batch[1::2]


def test_collate_puts_the_rows_first_then_each_prompt_with_the_next_completion(tokenizer):
    rows = [row(tokenizer, example) for example in (GOOD, BAD, OTHER)]
    batch = collate(micro_batch(rows, [0, 1, 2], slice(None), 1024), tokenizer.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[0] == 6 and batch["desirable"].tolist() == [True, False, True]
    pieces = [(r["prompt_ids"], r["completion_ids"]) for r in rows]
    pieces += [(rows[i]["prompt_ids"], rows[(i + 1) % 3]["completion_ids"]) for i in range(3)]
    for i, (prompt, completion) in enumerate(pieces):
        n = len(prompt) + len(completion)
        assert batch["input_ids"][i, :n].tolist() == prompt + completion
        assert batch["labels"][i].tolist() == [-100] * len(prompt) + completion + [-100] * (batch["labels"].shape[1] - n)
        assert batch["attention_mask"][i].sum() == n


def test_a_mismatched_completion_is_cut_to_fit_after_its_new_prompt(tokenizer):
    short, long = row(tokenizer, OTHER), row(tokenizer, {**GOOD, "prompt": "Q: " + "1+" * 10 + "1\n"})
    max_length = len(long["prompt_ids"]) + 5
    batch = collate(micro_batch([long, short], [0, 1], slice(None), max_length), tokenizer.pad_token_id)
    assert batch["attention_mask"][2].sum() == max_length  # long prompt + the first 5 tokens of the short completion
    assert batch["labels"][2, len(long["prompt_ids"]) : max_length].tolist() == short["completion_ids"][:5]


def test_eval_groups_cover_every_row_once_and_never_leave_a_group_too_small():
    assert eval_groups(10, 4, 1) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert eval_groups(9, 4, 1) == [[0, 1, 2, 3], [4, 5, 6, 7, 8]]  # a last group of 1 cannot pair
    assert eval_groups(10, 8, 4) == [list(range(10))]  # 2 rows cannot be shared by 4 processes
    assert eval_groups(3, 8, 1) == [[0, 1, 2]]
    for num_rows in range(2, 40):
        groups = eval_groups(num_rows, 6, 3)
        assert sum(groups, []) == list(range(num_rows)) and (len(groups) == 1 or min(map(len, groups)) >= 3)


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    return tiny_llama(tokenizer, 0)


def test_log_probs_of_the_rows_and_of_the_mismatched_pairs(tokenizer, tiny_model):
    rows = prepare_dataset(dataset(GOOD, BAD, OTHER), tokenizer, len(tokenizer), Args())
    batch = collate(micro_batch(rows, [0, 1, 2], slice(None), 1024), tokenizer.pad_token_id)
    logps, kl_logps, aux_loss = policy_forward(tiny_model, batch)
    assert not kl_logps.requires_grad and aux_loss == 0  # a dense model has no router loss
    for i, r in enumerate(rows):
        assert logps[i].item() == pytest.approx(naive_logp(tiny_model, r["prompt_ids"], r["completion_ids"]), rel=1e-5)
        mismatched = naive_logp(tiny_model, r["prompt_ids"], rows[(i + 1) % 3]["completion_ids"])
        assert kl_logps[i].item() == pytest.approx(mismatched, rel=1e-5)


def test_at_the_start_z0_and_every_reward_are_0_and_the_loss_is_half_the_weight(tokenizer, tiny_model):
    rows = prepare_dataset(dataset(GOOD, BAD, OTHER, BAD), tokenizer, len(tokenizer), Args())
    batch = collate(micro_batch(rows, [0, 1, 2, 3], slice(None), 1024), tokenizer.pad_token_id)
    args = Args(desirable_weight=1.5, undesirable_weight=0.5)
    loss, metrics = compute_loss(tiny_model, tiny_model, batch, args)
    assert loss.item() == pytest.approx((1.5 + 0.5 + 1.5 + 0.5) / 2 / 4, rel=1e-6)
    means = class_means(metrics, torch.tensor(4.0))
    assert means["kl"] == 0 and means["rewards/margins"] == 0 and means["rewards/accuracies"] == 0
    assert means["rewards/chosen"] == 0 and means["rewards/rejected"] == 0
    assert means["logps/chosen"] == pytest.approx((metrics["logps/chosen"] / 2).item())


def test_a_one_class_micro_batch_gives_a_finite_loss_and_leaves_the_other_class_out(tokenizer, tiny_model):
    rows = prepare_dataset(dataset(GOOD, OTHER), tokenizer, len(tokenizer), Args())
    batch = collate(micro_batch(rows, [0, 1], slice(None), 1024), tokenizer.pad_token_id)
    policy = LlamaForCausalLM(tiny_model.config)  # another random model, so that r and z0 are not 0
    loss, metrics = compute_loss(policy, tiny_model, batch, Args())
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in policy.parameters() if p.grad is not None)
    means = class_means(metrics, torch.tensor(2.0))
    assert "rewards/chosen" in means and "rewards/rejected" not in means and "logps/rejected" not in means
    assert all(math.isfinite(v) for v in means.values()) and not any(k.startswith("count/") for k in means)


def test_z0_carries_no_gradient_and_is_clamped_at_0():
    policy_kl = torch.tensor([-3.0, -1.0, 4.0], dtype=torch.float64, requires_grad=True)
    policy = torch.tensor([-2.0, -5.0], dtype=torch.float64, requires_grad=True)
    losses, rewards, z0 = kto_loss(policy, torch.zeros(2, dtype=torch.float64), torch.tensor([True, False]),
                                   policy_kl, torch.zeros(3, dtype=torch.float64), beta=0.5)
    assert z0.item() == 0 and not z0.requires_grad and not rewards.requires_grad
    kl_grad, policy_grad = torch.autograd.grad(losses.sum(), [policy_kl, policy], allow_unused=True)
    assert (kl_grad is None or not kl_grad.any()) and policy_grad.abs().min() > 0
    _, _, z0 = kto_loss(policy, torch.zeros(2, dtype=torch.float64), torch.tensor([True, False]),
                        policy_kl + 3, torch.zeros(3, dtype=torch.float64), beta=0.5)
    assert z0.item() == pytest.approx(3.0) and not z0.requires_grad


def test_a_batch_of_one_cannot_estimate_z0(monkeypatch):
    one = torch.tensor([-1.0])
    with pytest.raises(ValueError, match="micro-batch of one row"):
        kto_loss(one, one, torch.tensor([True]), one, one, beta=0.1)
    for flag in ("per_device_train_batch_size", "per_device_eval_batch_size"):
        name = flag.replace("_", "-")
        with pytest.raises(ValueError, match=f"--{name} 1: must be >= 2 rows over all processes \\(z0 pairs rows\\)"):
            check_args(Args(**{flag: 1}))
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun --nproc_per_node 2 sets it: the 2 processes' rows pair up
    check_args(Args(per_device_train_batch_size=1, per_device_eval_batch_size=1))


@pytest.mark.parametrize("overrides,message", [
    ({"beta": 0.0}, "--beta 0.0: must be > 0"),
    ({"desirable_weight": 0.0}, "--desirable-weight 0.0: must be > 0"),
    ({"undesirable_weight": -1.0}, "--undesirable-weight -1.0: must be > 0"),
])
def test_kto_s_own_flags_are_checked_before_anything_loads(overrides, message):
    with pytest.raises(ValueError, match="invalid arguments") as error:
        check_args(Args(**overrides))
    assert message in str(error.value)
    check_args(Args())  # the defaults pass


def test_class_weights_follow_the_papers_rule():
    assert class_weight_warning(100, 100, 1.0, 1.0) is None
    assert class_weight_warning(100, 100, 1.5, 1.0) is None
    assert class_weight_warning(30, 70, 3.0, 1.0) is None  # 90 / 70 = 1.29
    message = class_weight_warning(30, 70, 1.0, 1.0)
    assert "= 0.429 is outside the paper's [1, 3/2]" in message and "--desirable-weight in [2.33, 3.5]" in message
    assert "0 desirable and 5 undesirable" in class_weight_warning(0, 5, 1.0, 1.0)


def test_evaluate_pairs_within_groups_and_averages_over_every_row(tokenizer, tiny_model):
    examples = [GOOD, BAD, OTHER, BAD, GOOD]
    rows = prepare_dataset(dataset(*examples), tokenizer, len(tokenizer), Args())
    policy = LlamaForCausalLM(tiny_model.config)
    args = Args(per_device_eval_batch_size=2)  # groups [0, 1] and [2, 3, 4] (a last group of 1 joins)
    metrics = evaluate(policy, tiny_model, rows, args, tokenizer.pad_token_id, torch.device("cpu"),
                       torch.autocast("cpu", enabled=False))
    losses = []
    for group in ([0, 1], [2, 3, 4]):
        batch = collate(micro_batch(rows, group, slice(None), args.max_length), tokenizer.pad_token_id)
        losses.append(compute_loss(policy, tiny_model, batch, args)[1]["loss"])
    assert metrics["eval/loss"] == pytest.approx((sum(losses) / 5).item(), rel=1e-6)
    assert policy.training  # evaluate puts the policy back into training mode
