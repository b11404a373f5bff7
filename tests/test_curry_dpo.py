"""algos/curry_dpo.py beyond its golden values: the pairs and their easy-to-hard order against the literal reference
(tests/references/curry_dpo.py), the schedule of stages over the steps, one stage being DPO on each list's best and
worst completions, the reference that becomes the policy at a stage's first step (saved, and restored by a run resumed
within the stage: by hand, and in short runs of the script), the precomputed reference of each stage, the flags' checks;
on a tiny character tokenizer and random Llamas of tests/tiny.py. The loss is pinned by
tests/golden/curry_dpo.curry_dpo_loss.json, the whole script (two stages, the reference moving at step 4, resume at the
stage boundary) by tests/test_runs.py."""

import random
import shutil

import pytest
import torch
from datasets import Dataset

from algos import dpo
from algos.curry_dpo import (
    Args, check_args, collate, compute_loss, curriculum_pairs, curriculum_stage, move_reference, precompute_ref_logps,
    prepare_dataset,
)
from tests.golden import REPO, assert_same_run, interrupted_copy, run_script
from tests.references.curry_dpo import curriculum, stage_of_step
from tests.tiny import make_tokenizer, tiny_llama

LISTS = [  # best completion, then its pairs from the largest score gap down; a tie in the middle; a list without one
    {"prompt": "Q: 1+2\n", "completions": ["Answer: 3", "Answer: 4", "1 + 2 = 3\nAnswer: 3", "Answer: 0"],
     "scores": [1.5, 0.5, 2.0, 0.0]},
    {"prompt": "Q: 2*3\n", "completions": ["Answer: 6", "2 * 3 = 5\nAnswer: 5", "Answer: 5", "2 * 3 = 6\nAnswer: 6"],
     "scores": [2.0, 0.5, 0.5, 2.0]},
    {"prompt": "Q: 7\n", "completions": ["Answer: 7", "7 = 7\nAnswer: 7"], "scores": [1.0, 1.0]},
]
LN2 = 0.6931471805599453


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(chat_template=None)


def rows_of(tokenizer, **flags):
    return prepare_dataset(Dataset.from_list(LISTS), tokenizer, len(tokenizer), Args(**flags))


def test_pairs_by_hand():
    # best is index 2 (score 2); gaps 2 (index 3), 1.5 (index 1), 0.5 (index 0): largest first
    assert curriculum_pairs([1.5, 0.5, 2.0, 0.0], 3) == [[2, 3], [2, 1], [2, 0]]
    # the first of the tied best is chosen; the other best is never paired; equal gaps go by index, the last repeats
    assert curriculum_pairs([2.0, 0.5, 0.5, 2.0], 3) == [[0, 1], [0, 2], [0, 2]]
    assert curriculum_pairs([1.0, 1.0], 2) == [[0, 0], [0, 0]]  # no preference: no gradient
    assert curriculum_pairs([0.3, 1.0, -2.0], 1) == [[1, 2]]  # one stage: the best against the worst


def test_pairs_match_the_reference_on_random_lists():
    rng = random.Random(0)
    for _ in range(500):
        scores = [rng.choice([0.0, 0.5, 2 / 3, 1.0, 2.0]) for _ in range(rng.randint(1, 6))]
        stages = rng.randint(1, 5)
        assert curriculum_pairs(scores, stages) == [list(pair) for pair in curriculum(scores, stages)], scores


def test_stages_cut_the_run_into_equal_shares_in_order():
    for total_steps in (1, 2, 5, 6, 7, 978):
        for stages in (1, 2, 3, 4):
            seen = []
            for step in range(1, total_steps + 1):
                seen.append(curriculum_stage(step, total_steps, stages))
                assert seen[-1] == stage_of_step(step, total_steps, stages)
            assert seen == sorted(seen) and seen[0] == 0
            if total_steps >= stages:  # every stage runs, for floor(T/S) or ceil(T/S) steps
                counts = [seen.count(k) for k in range(stages)]
                assert max(counts) - min(counts) <= 1 and sum(counts) == total_steps


def test_rows_hold_each_stage_s_pair_and_flag_a_list_without_preference(tokenizer):
    rows = rows_of(tokenizer)
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
           for text in LISTS[0]["completions"]]
    assert rows[0]["chosen_ids"] == [ids[2]] * 3 and rows[0]["rejected_ids"] == [ids[3], ids[1], ids[0]]
    assert [row["identical"] for row in rows] == [False, False, True]
    with pytest.raises(ValueError, match="row 0: expected a non-empty list of completions and a finite score"):
        prepare_dataset(Dataset.from_list([{**LISTS[0], "scores": [1.0, float("nan"), 0.0, 2.0]}]), tokenizer,
                        len(tokenizer), Args())


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_collate_takes_the_stage_s_pair(tokenizer, stage):
    rows = rows_of(tokenizer)
    batch = collate(rows, tokenizer.pad_token_id, stage)
    pairs = [{"prompt_ids": row["prompt_ids"], "chosen_ids": row["chosen_ids"][stage],
              "rejected_ids": row["rejected_ids"][stage]} for row in rows]
    assert torch.equal(batch["input_ids"], dpo.collate(pairs, tokenizer.pad_token_id)["input_ids"])


def test_one_stage_is_dpo_on_the_best_and_worst_completions(tokenizer):
    rows = rows_of(tokenizer, num_stages=1)
    best_worst = [{"prompt": example["prompt"], "chosen": example["completions"][example["scores"].index(max(
        example["scores"]))], "rejected": example["completions"][example["scores"].index(min(example["scores"]))]}
        for example in LISTS]
    pairs = dpo.prepare_dataset(Dataset.from_list(best_worst), tokenizer, len(tokenizer), dpo.Args())
    policy, reference = tiny_llama(tokenizer, 0).train(), tiny_llama(tokenizer, 1)
    ours = compute_loss(policy, reference, collate(rows, tokenizer.pad_token_id, 0), Args(num_stages=1))
    theirs = dpo.compute_loss(policy, reference, dpo.collate(pairs, tokenizer.pad_token_id), dpo.Args(beta=Args().beta))
    assert torch.equal(ours[0], theirs[0]) and all(torch.equal(ours[1][k], theirs[1][k]) for k in theirs[1])


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_the_reference_becomes_the_policy_at_a_stage_s_first_step_and_is_reloaded_within_it(tokenizer, tmp_path):
    rows = rows_of(tokenizer)
    policy, reference = tiny_llama(tokenizer, 0).train(), tiny_llama(tokenizer, 1).requires_grad_(False)
    move_reference(policy, reference, 1, True, str(tmp_path))  # stage 1's first step
    end_of_stage_0 = weights(policy)
    assert same(weights(reference), end_of_stage_0) and (tmp_path / "reference-stage-1" / ".metadata").is_file()
    loss, metrics = compute_loss(policy, reference, collate(rows, tokenizer.pad_token_id, 1), Args(num_stages=3))
    torch.testing.assert_close(loss, torch.tensor(LN2))  # the reference is the policy: every reward is 0
    torch.testing.assert_close(metrics["rewards/chosen"], torch.tensor(0.0))
    with torch.no_grad():  # the policy trains on within the stage
        for parameter in policy.parameters():
            parameter.add_(0.01)
    resumed = tiny_llama(tokenizer, 1).requires_grad_(False)  # a new process, resumed within stage 1
    move_reference(policy, resumed, 1, False, str(tmp_path))
    assert same(weights(resumed), end_of_stage_0) and not same(weights(resumed), weights(policy))
    with pytest.raises(FileNotFoundError, match="resuming within curriculum stage 1 needs its reference"):
        move_reference(policy, resumed, 1, False, str(tmp_path / "elsewhere"))


def test_a_run_resumed_within_a_stage_reloads_its_reference_bit_for_bit(tmp_path):
    """4 steps, 2 stages (steps 1-2, 3-4), checkpoints after steps 2 and 3: resumed after step 3, within stage 1, the
    run reloads the reference saved at step 3 and is the whole run bit for bit; without that copy it stops, named."""
    args = ["--max-steps", "4", "--num-stages", "2", "--per-device-train-batch-size", "4", "--learning-rate", "1e-3",
            "--warmup-ratio", "0", "--logging-steps", "1", "--eval-steps", "0", "--dataset-test-split", "None",
            "--save-steps", "1", "--save-total-limit", "10"]
    script = str(REPO / "algos/curry_dpo.py")
    run_script(script, args, tmp_path / "whole")
    interrupted_copy(tmp_path / "whole", tmp_path / "resumed", 3)  # and the reference that step 3 saved:
    shutil.copytree(tmp_path / "whole" / "reference-stage-1", tmp_path / "resumed" / "reference-stage-1")
    run_script(script, args + ["--resume"], tmp_path / "resumed")
    assert_same_run(tmp_path / "resumed", tmp_path / "whole")
    interrupted_copy(tmp_path / "whole", tmp_path / "lost", 3)
    with pytest.raises(RuntimeError, match="resuming within curriculum stage 1 needs its reference"):
        run_script(script, args + ["--resume"], tmp_path / "lost")


def test_a_fixed_reference_never_moves(tmp_path):
    args = ["--max-steps", "2", "--num-stages", "2", "--per-device-train-batch-size", "4", "--logging-steps", "1",
            "--eval-steps", "0", "--dataset-test-split", "None", "--no-update-reference"]
    run_script(str(REPO / "algos/curry_dpo.py"), args, tmp_path)
    assert not list(tmp_path.glob("reference-stage-*"))


def test_precomputed_reference_logps_of_every_stage_match_the_reference_model(tokenizer):
    rows, args = [dict(row) for row in rows_of(tokenizer)], Args(update_reference=False, per_device_eval_batch_size=2)
    policy, reference = tiny_llama(tokenizer, 0), tiny_llama(tokenizer, 1)
    precompute_ref_logps(reference, rows, args, tokenizer.pad_token_id, torch.device("cpu"),
                         torch.autocast("cpu", enabled=False))
    assert all(len(row["reference_chosen_logps"]) == 3 for row in rows)
    for stage in (0, 1, 2):
        plain = [{k: v for k, v in row.items() if not k.startswith("reference_")} for row in rows]
        on_the_fly = compute_loss(policy, reference, collate(plain, tokenizer.pad_token_id, stage), args)
        precomputed = compute_loss(policy, None, collate(rows, tokenizer.pad_token_id, stage), args)
        torch.testing.assert_close(precomputed[0], on_the_fly[0])
        for key, value in on_the_fly[1].items():
            torch.testing.assert_close(precomputed[1][key], value, msg=key)


@pytest.mark.parametrize("flags", [{"lora": True}, {"precompute_ref_logps": True}])
def test_a_moving_reference_refuses_lora_and_precomputed_log_probs(flags, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError, match=r"--update-reference True: must be off with --lora .* --no-update-reference"):
        check_args(Args(**flags))
    check_args(Args(**flags, update_reference=False))
    check_args(Args(**flags, num_stages=1))  # one stage: the reference never moves
    check_args(Args(**flags, max_steps=1))  # one step: one stage
    with pytest.raises(ValueError, match=r"--num-stages 0: must be >= 1"):
        check_args(Args(num_stages=0))
