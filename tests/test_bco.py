"""algos/bco.py beyond its golden values: the reward shift δ (its moving averages by hand, updated on training
micro-batches only and before their loss, carried through --resume whether the checkpoint falls on
a logging step or not), the data path without kto.py's mismatched pairs, and the flag checks, on a tiny character
tokenizer and a random Llama built here. The loss is pinned by tests/golden/bco.bco_loss.json, the whole script (and
torchrun, and a resume after a logging step) by tests/test_runs.py; the unpaired data path it shares with kto.py is
tested in tests/test_kto.py."""

import math

import pytest
import torch
from transformers import LlamaForCausalLM

from algos.bco import (REWARD_MEANS, Args, check_args, class_means, collate, compute_loss, micro_batch,
                       prepare_dataset, update_reward_means)
from tests.golden import REPO, assert_same_run, interrupted_copy, run_script
from tests.test_kto import BAD, GOOD, OTHER, dataset, tiny_model, tokenizer  # noqa: F401 (fixtures)
from tests.tiny import naive_logp

LN2 = 0.6931471805599453


@pytest.fixture(autouse=True)
def fresh_reward_means():
    """The moving averages are the module's: each test starts, as a run does, from 0."""
    REWARD_MEANS[:] = [0.0, 0.0]
    yield
    REWARD_MEANS[:] = [0.0, 0.0]


def delta() -> float:
    return sum(REWARD_MEANS) / 2


def test_the_moving_averages_by_hand():
    update_reward_means(torch.tensor([1.0, 3.0, -2.0]), torch.tensor([True, True, False]), decay=0.5)
    assert REWARD_MEANS == [1.0, -1.0] and delta() == 0.0  # μD = 0.5·2, μU = 0.5·(-2)
    update_reward_means(torch.tensor([4.0]), torch.tensor([True]), decay=0.5)  # no undesirable row: μU stays
    assert REWARD_MEANS == [2.5, -1.0] and delta() == 0.75
    update_reward_means(torch.tensor([7.0, -5.0]), torch.tensor([True, False]), decay=0.0)  # ρ = 0: this batch's means
    assert delta() == 1.0
    update_reward_means(torch.tensor([9.0, 9.0]), torch.tensor([True, False]), decay=1.0)  # ρ = 1: never moves
    assert REWARD_MEANS == [7.0, -5.0]


def test_the_logged_reward_shift_is_delta_now_not_a_mean():
    REWARD_MEANS[:] = [1.0, 2.0]
    sums = {"loss": torch.tensor(2.0), "count/chosen": torch.tensor(0.0), "count/rejected": torch.tensor(2.0)}
    assert class_means(sums, torch.tensor(2.0)) == {"reward_shift": 1.5, "loss": 1.0}


def test_rows_are_batched_without_mismatched_pairs(tokenizer):
    rows = prepare_dataset(dataset(GOOD, BAD, OTHER), tokenizer, len(tokenizer), Args())
    chunk = micro_batch(rows, [0, 1, 2], slice(1, None), 1024)
    assert chunk == rows[1:] and all("kl_ids" not in row for row in chunk)
    batch = collate(chunk, tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 2 and batch["desirable"].tolist() == [False, True]


def test_at_the_start_every_reward_and_delta_are_0_and_the_loss_is_the_weight_times_ln2(tokenizer, tiny_model):
    rows = prepare_dataset(dataset(GOOD, BAD, OTHER, BAD), tokenizer, len(tokenizer), Args())
    batch = collate(rows, tokenizer.pad_token_id)
    loss, metrics = compute_loss(tiny_model, tiny_model, batch, Args(desirable_weight=1.5, undesirable_weight=0.5))
    assert loss.item() == pytest.approx((1.5 + 0.5 + 1.5 + 0.5) * LN2 / 4, rel=1e-6)
    means = class_means(metrics, torch.tensor(4.0))
    assert means["reward_shift"] == 0 and means["rewards/margins"] == 0 and means["rewards/accuracies"] == 0
    assert means["rewards/chosen"] == 0 and means["rewards/rejected"] == 0
    assert means["logps/chosen"] == pytest.approx((metrics["logps/chosen"] / 2).item())


def test_delta_moves_on_training_micro_batches_only_before_their_loss(tokenizer, tiny_model):
    rows = prepare_dataset(dataset(GOOD, BAD, OTHER, BAD), tokenizer, len(tokenizer), Args())
    batch = collate(rows, tokenizer.pad_token_id)
    policy = LlamaForCausalLM(tiny_model.config).eval()  # another random model: the rewards are not 0
    args = Args(beta=0.5, reward_shift_decay=0.25)
    compute_loss(policy, tiny_model, batch, args)
    assert REWARD_MEANS == [0.0, 0.0]  # evaluation (the policy in eval mode) leaves δ alone
    rewards = [0.5 * (naive_logp(policy, r["prompt_ids"], r["completion_ids"])
                      - naive_logp(tiny_model, r["prompt_ids"], r["completion_ids"])) for r in rows]
    desirable, undesirable = (rewards[0] + rewards[2]) / 2, (rewards[1] + rewards[3]) / 2
    policy.train()
    loss, _ = compute_loss(policy, tiny_model, batch, args)
    expected_delta = 0.75 * (desirable + undesirable) / 2
    assert delta() == pytest.approx(expected_delta, rel=1e-4)
    expected = [math.log1p(math.exp(-(r - expected_delta) if label else (r - expected_delta))) for r, label in
                zip(rewards, [True, False, True, False])]
    assert loss.item() == pytest.approx(sum(expected) / 4, rel=1e-4)  # this batch's δ, already moved


@pytest.mark.parametrize("overrides,message", [
    ({"reward_shift_decay": -0.1}, "--reward-shift-decay -0.1: must be in [0, 1]"),
    ({"reward_shift_decay": 1.5}, "--reward-shift-decay 1.5: must be in [0, 1]"),
    ({"beta": 0.0}, "--beta 0.0: must be > 0"),
])
def test_bco_s_own_flags_are_checked_before_anything_loads(overrides, message):
    with pytest.raises(ValueError, match="invalid arguments") as error:
        check_args(Args(**overrides))
    assert message in str(error.value)
    check_args(Args(reward_shift_decay=0.0))
    check_args(Args(reward_shift_decay=1.0))
    check_args(Args(per_device_train_batch_size=1, per_device_eval_batch_size=1))  # no mismatched pairs to make


def test_resume_between_logging_steps_restores_delta_and_a_lost_delta_would_show(tmp_path):
    """Saved after step 2, before the first logging step (3): the metrics logged so far are none, the sums hold δ.
    The resumed run is the uninterrupted one bit for bit; the same checkpoint with δ's moving averages zeroed (as a
    script that did not save them would resume) leaves the trajectory."""
    args = ["--max-steps", "4", "--per-device-train-batch-size", "8", "--logging-steps", "3", "--eval-steps", "0",
            "--dataset-test-split", "None", "--learning-rate", "1e-4", "--reward-shift-decay", "0.5",
            "--save-steps", "2", "--save-total-limit", "10"]
    whole = run_script(str(REPO / "algos/bco.py"), args, tmp_path / "whole")
    assert whole[0]["step"] == 3 and whole[0]["train/reward_shift"] != 0
    interrupted_copy(tmp_path / "whole", tmp_path / "resumed", 2)
    run_script(str(REPO / "algos/bco.py"), args + ["--resume"], tmp_path / "resumed")
    assert_same_run(tmp_path / "resumed", tmp_path / "whole")

    interrupted_copy(tmp_path / "whole", tmp_path / "lost", 2)
    state_file = tmp_path / "lost" / "checkpoint-2" / "rank0.pt"
    state = torch.load(state_file, weights_only=False)
    assert state["train_metrics"] == {} and state["reward_means"] != [0.0, 0.0]  # what the checkpoint restores
    state["reward_means"] = [0.0, 0.0]
    torch.save(state, state_file)
    lost = run_script(str(REPO / "algos/bco.py"), args + ["--resume"], tmp_path / "lost")
    assert lost[0]["train/reward_shift"] != whole[0]["train/reward_shift"] and lost[-1] != whole[-1]
