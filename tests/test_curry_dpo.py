"""algos/curry_dpo.py beyond its golden values: the pairs and their easy-to-hard order against the literal reference
(tests/references/curry_dpo.py), the schedule of stages over the steps, one stage being DPO on each list's best and
worst completions, the reference that becomes the policy at a stage's first step (saved, and restored by a run resumed
within the stage), the precomputed reference of each stage, the flags' checks; on a tiny character tokenizer and random
Llamas built here, no training. The loss is pinned by tests/golden/curry_dpo.curry_dpo_loss.json, the whole script
(two stages, the reference moving at step 4, resume at the stage boundary) by tests/test_runs.py."""

import random

import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import algos.curry_dpo as curry_dpo
from algos import dpo
from algos.curry_dpo import (
    Args, check_args, collate, compute_loss, curriculum_pairs, current_stage, precompute_ref_logps, prepare_dataset,
)
from tests.references.curry_dpo import curriculum, stage_of_step

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
    chars = dict.fromkeys("0123456789+-*()=: \nQAnswer")
    vocab = {token: i for i, token in enumerate(["<pad>", "<s>", "</s>", "<unk>", *chars])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def tiny_llama(tokenizer, seed):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config)


def rows_of(tokenizer, **flags):
    return prepare_dataset(Dataset.from_list(LISTS), tokenizer, len(tokenizer), Args(**flags))


def at_step(monkeypatch, step, total_steps, output_dir=None):
    """Pretend the main block's loop is taking `step` of `total_steps` (the variables current_stage reads)."""
    monkeypatch.setattr(curry_dpo, "step", step, raising=False)
    monkeypatch.setattr(curry_dpo, "total_steps", total_steps, raising=False)
    if output_dir is not None:
        monkeypatch.setattr(curry_dpo, "output_dir", str(output_dir), raising=False)


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


def test_stages_cut_the_run_into_equal_shares_in_order(monkeypatch):
    for total_steps in (1, 2, 5, 6, 7, 978):
        for stages in (1, 2, 3, 4):
            seen = []
            for step in range(1, total_steps + 1):
                at_step(monkeypatch, step, total_steps)
                seen.append(current_stage(stages))
                assert seen[-1] == stage_of_step(step, total_steps, stages)
            assert seen == sorted(seen) and seen[0] == 0
            if total_steps >= stages:  # every stage runs, for floor(T/S) or ceil(T/S) steps
                counts = [seen.count(k) for k in range(stages)]
                assert max(counts) - min(counts) <= 1 and sum(counts) == total_steps
    monkeypatch.delattr(curry_dpo, "step")
    assert current_stage(3) == 0  # imported, no loop: stage 0


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
def test_collate_takes_the_stage_s_pair(tokenizer, monkeypatch, stage):
    rows = rows_of(tokenizer)
    at_step(monkeypatch, 1 + 2 * stage, 6)  # steps 1, 3, 5 of 6: stages 0, 1, 2
    batch = collate(rows, tokenizer.pad_token_id)
    assert torch.equal(batch["input_ids"], collate(rows, tokenizer.pad_token_id, stage)["input_ids"])
    pairs = [{"prompt_ids": row["prompt_ids"], "chosen_ids": row["chosen_ids"][stage],
              "rejected_ids": row["rejected_ids"][stage]} for row in rows]
    assert torch.equal(batch["input_ids"], dpo.collate(pairs, tokenizer.pad_token_id)["input_ids"])


def test_one_stage_is_dpo_on_the_best_and_worst_completions(tokenizer):
    rows = rows_of(tokenizer, num_stages=1)
    best_worst = [{"prompt": example["prompt"], "chosen": example["completions"][example["scores"].index(max(
        example["scores"]))], "rejected": example["completions"][example["scores"].index(min(example["scores"]))]}
        for example in LISTS]
    pairs = dpo.prepare_dataset(Dataset.from_list(best_worst), tokenizer, len(tokenizer), dpo.Args())
    policy, reference = tiny_llama(tokenizer, 0), tiny_llama(tokenizer, 1).eval()
    ours = compute_loss(policy, reference, collate(rows, tokenizer.pad_token_id), Args(num_stages=1))
    theirs = dpo.compute_loss(policy, reference, dpo.collate(pairs, tokenizer.pad_token_id), dpo.Args())
    assert torch.equal(ours[0], theirs[0]) and all(torch.equal(ours[1][k], theirs[1][k]) for k in theirs[1])


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_the_reference_becomes_the_policy_at_a_stage_s_first_step_and_is_restored_on_resume(tokenizer, monkeypatch,
                                                                                             tmp_path):
    rows, args = rows_of(tokenizer), Args(num_stages=3)
    policy, reference = tiny_llama(tokenizer, 0), tiny_llama(tokenizer, 1).eval().requires_grad_(False)
    initial = weights(reference)
    for step in (1, 2):  # stage 0 (steps 1-2 of 6): the initial model
        at_step(monkeypatch, step, 6, tmp_path)
        compute_loss(policy, reference, collate(rows, tokenizer.pad_token_id), args)
        assert same(weights(reference), initial)
    with torch.no_grad():  # the policy trained during stage 0
        for parameter in policy.parameters():
            parameter.add_(0.01)
    at_step(monkeypatch, 3, 6, tmp_path)  # stage 1 begins: the reference is the policy, so every reward is 0
    loss, metrics = compute_loss(policy, reference, collate(rows, tokenizer.pad_token_id), args)
    end_of_stage_0 = weights(policy)
    assert same(weights(reference), end_of_stage_0) and (tmp_path / "reference-stage-1" / ".metadata").is_file()
    torch.testing.assert_close(loss, torch.tensor(LN2))
    torch.testing.assert_close(metrics["rewards/chosen"], torch.tensor(0.0))
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(0.01)
    at_step(monkeypatch, 4, 6, tmp_path)  # within stage 1: the reference stays
    compute_loss(policy, reference, collate(rows, tokenizer.pad_token_id), args)
    assert same(weights(reference), end_of_stage_0)

    resumed = tiny_llama(tokenizer, 1).eval().requires_grad_(False)  # a new process resumed at step 4: loads the copy
    compute_loss(policy, resumed, collate(rows, tokenizer.pad_token_id), args)
    assert same(weights(resumed), end_of_stage_0) and not same(weights(resumed), weights(policy))
    at_step(monkeypatch, 5, 6, tmp_path)  # stage 2 begins, but evaluation (eval mode) never moves the reference
    policy.eval()
    compute_loss(policy, reference, collate(rows, tokenizer.pad_token_id), args)
    assert same(weights(reference), end_of_stage_0)
    policy.train()
    compute_loss(policy, reference, collate(rows, tokenizer.pad_token_id), args)
    assert same(weights(reference), weights(policy)) and (tmp_path / "reference-stage-2").is_dir()
    at_step(monkeypatch, 4, 6, tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError, match="resuming within curriculum stage 1 needs its reference"):
        compute_loss(policy, tiny_llama(tokenizer, 1).eval(), collate(rows, tokenizer.pad_token_id), args)


def test_a_fixed_reference_never_moves(tokenizer, monkeypatch, tmp_path):
    rows, args = rows_of(tokenizer), Args(update_reference=False)
    policy, reference = tiny_llama(tokenizer, 0), tiny_llama(tokenizer, 1).eval()
    initial = weights(reference)
    for step in range(1, 7):
        at_step(monkeypatch, step, 6, tmp_path)
        compute_loss(policy, reference, collate(rows, tokenizer.pad_token_id), args)
    assert same(weights(reference), initial) and not list(tmp_path.iterdir())


def test_precomputed_reference_logps_of_every_stage_match_the_reference_model(tokenizer, monkeypatch):
    rows, args = [dict(row) for row in rows_of(tokenizer)], Args(update_reference=False, per_device_eval_batch_size=2)
    policy, reference = tiny_llama(tokenizer, 0).eval(), tiny_llama(tokenizer, 1).eval()
    precompute_ref_logps(reference, rows, args, tokenizer.pad_token_id, torch.device("cpu"),
                         torch.autocast("cpu", enabled=False))
    assert all(len(row["reference_chosen_logps"]) == 3 for row in rows)
    for step in (1, 3, 5):
        at_step(monkeypatch, step, 6)
        plain = [{k: v for k, v in row.items() if not k.startswith("reference_")} for row in rows]
        on_the_fly = compute_loss(policy, reference, collate(plain, tokenizer.pad_token_id), args)
        precomputed = compute_loss(policy, None, collate(rows, tokenizer.pad_token_id), args)
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
