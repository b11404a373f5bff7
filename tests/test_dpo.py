"""algos/dpo.py's data preparation, batching and log-probs, on a tiny character tokenizer and a random
Llama of tests/tiny.py (no bundled assets needed). The loss itself is pinned by tests/golden/dpo.dpo_loss.json,
the whole script by tests/test_runs.py."""

import json

import pytest
import torch
from datasets import Dataset
from transformers import LlamaForCausalLM

from algos.dpo import (
    Args,
    collate,
    compute_loss,
    dpo_loss,
    global_batches,
    load_splits,
    lr_scheduler,
    precompute_ref_logps,
    prepare_dataset,
    tokenize_row,
)
from tests.tiny import SPECIAL_TEMPLATE, make_tokenizer, tiny_llama


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def row(tokenizer, example, **overrides):
    return tokenize_row(example, tokenizer, Args(**overrides))


EXAMPLE = {"prompt": "Q: (1+2)*3\n", "chosen": "1 + 2 = 3\n3 * 3 = 9\nAnswer: 9", "rejected": "Answer: 8"}
CONVERSATION = {"prompt": [{"role": "user", "content": "(1+2)*3"}],
                "chosen": [{"role": "assistant", "content": EXAMPLE["chosen"]}],
                "rejected": [{"role": "assistant", "content": EXAMPLE["rejected"]}]}


def test_standard_format_bos_once_eos_once(tokenizer):
    r = row(tokenizer, EXAMPLE)
    assert r["prompt_ids"] == [tokenizer.bos_token_id] + ids(tokenizer, EXAMPLE["prompt"])
    assert r["chosen_ids"] == ids(tokenizer, EXAMPLE["chosen"]) + [tokenizer.eos_token_id]
    assert r["rejected_ids"] == ids(tokenizer, EXAMPLE["rejected"]) + [tokenizer.eos_token_id]
    assert not r["truncated"] and not r["identical"]


def test_conversational_format_gives_the_same_tokens(tokenizer):
    assert row(tokenizer, CONVERSATION) == row(tokenizer, EXAMPLE)


def test_implicit_prompt_is_the_shared_leading_messages(tokenizer):
    implicit = {"chosen": CONVERSATION["prompt"] + CONVERSATION["chosen"],
                "rejected": CONVERSATION["prompt"] + CONVERSATION["rejected"]}
    assert row(tokenizer, implicit) == row(tokenizer, EXAMPLE)
    assert row(tokenizer, {**implicit, "prompt": "a plain-text copy"}) == row(tokenizer, EXAMPLE)
    assert prepare_dataset(dataset(implicit), tokenizer, 100, Args())[0] == {**row(tokenizer, EXAMPLE), "unknown": False}


def test_template_that_writes_bos_and_eos_gets_neither_twice():
    tokenizer = make_tokenizer(SPECIAL_TEMPLATE)
    r = row(tokenizer, CONVERSATION)
    assert r == row(make_tokenizer(), EXAMPLE)
    assert r["prompt_ids"].count(tokenizer.bos_token_id) == 1
    assert r["chosen_ids"].count(tokenizer.eos_token_id) == 1


def test_text_already_ending_with_eos_gets_no_second_eos(tokenizer):
    r = row(tokenizer, {**EXAMPLE, "chosen": EXAMPLE["chosen"] + "</s>"})
    assert r["chosen_ids"] == row(tokenizer, EXAMPLE)["chosen_ids"]


@pytest.mark.parametrize("mode", ["keep_end", "keep_start"])
def test_truncation_cuts_the_prompt_by_mode_then_the_completion(tokenizer, mode):
    full = row(tokenizer, EXAMPLE)
    r = row(tokenizer, EXAMPLE, max_prompt_length=5, max_length=12, truncation_mode=mode)
    bos = [tokenizer.bos_token_id]  # keep_end keeps the BOS that starts the prompt
    assert r["prompt_ids"] == (bos + full["prompt_ids"][-4:] if mode == "keep_end" else full["prompt_ids"][:5])
    assert r["chosen_ids"] == full["chosen_ids"][:7] and r["rejected_ids"] == full["rejected_ids"][:7]
    assert r["truncated"]


def dataset(*examples):
    return Dataset.from_list(list(examples))


def test_an_example_that_cannot_fit_is_an_error(tokenizer):
    long_prompt = {**EXAMPLE, "prompt": "Q: " + "1+" * 20 + "1\n"}
    with pytest.raises(ValueError, match=r"row 1: the prompt takes 16 tokens.*no room.*--max-prompt-length"):
        prepare_dataset(dataset(EXAMPLE, long_prompt), tokenizer, 100, Args(max_length=16, max_prompt_length=16))


def test_missing_columns_are_named(tokenizer):
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['prompt'\].*rename the columns"):
        prepare_dataset(dataset({"chosen": "a", "rejected": "b"}), tokenizer, 100, Args())


def test_empty_dataset_is_an_error(tokenizer):
    empty = Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []})
    with pytest.raises(ValueError, match="the train split has no rows"):
        prepare_dataset(empty, tokenizer, 100, Args(), "the train split")


def test_token_ids_outside_the_vocabulary_are_an_error(tokenizer):
    with pytest.raises(ValueError, match=r"row 0: token id \d+ is outside the model's vocabulary of 10"):
        prepare_dataset(dataset(EXAMPLE), tokenizer, 10, Args())


def test_conversational_data_needs_a_chat_template():
    with pytest.raises(ValueError, match="no chat template"):
        prepare_dataset(dataset(CONVERSATION), make_tokenizer(chat_template=None), 100, Args())


def test_collate_masks_everything_but_the_completions(tokenizer):
    rows = [row(tokenizer, EXAMPLE), row(tokenizer, {**EXAMPLE, "prompt": "Q: 1\n", "chosen": "Answer: 1"})]
    batch = collate(rows, tokenizer.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[0] == 4  # chosen 0, chosen 1, rejected 0, rejected 1
    for i, (r, key) in enumerate([(rows[0], "chosen_ids"), (rows[1], "chosen_ids"), (rows[0], "rejected_ids"),
                                  (rows[1], "rejected_ids")]):
        n_prompt, n = len(r["prompt_ids"]), len(r["prompt_ids"]) + len(r[key])
        assert batch["input_ids"][i, :n].tolist() == r["prompt_ids"] + r[key]
        assert batch["labels"][i].tolist() == [-100] * n_prompt + r[key] + [-100] * (batch["labels"].shape[1] - n)
        assert batch["attention_mask"][i].sum() == n


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    return tiny_llama(tokenizer, 0)


def test_logps_are_the_completion_log_likelihood(tokenizer, tiny_model):
    """concatenated_forward (via compute_loss) against a naive per-sequence log-softmax sum."""
    rows = prepare_dataset(dataset(EXAMPLE, {**EXAMPLE, "prompt": "Q: 7\n", "chosen": "Answer: 7"}), tokenizer,
                           len(tokenizer), Args())
    batch = collate(rows, tokenizer.pad_token_id)
    _, metrics = compute_loss(tiny_model, tiny_model, batch, Args())
    naive = []
    for r in rows:
        for key in ("chosen_ids", "rejected_ids"):
            sequence = torch.tensor([r["prompt_ids"] + r[key]])
            logp = tiny_model(sequence).logits.double().log_softmax(-1)[0, :-1].gather(-1, sequence[0, 1:, None])
            naive.append(logp[len(r["prompt_ids"]) - 1 :].sum().item())
    chosen, rejected = sum(naive[0::2]), sum(naive[1::2])
    assert metrics["logps/chosen"].item() == pytest.approx(chosen, rel=1e-5)
    assert metrics["logps/rejected"].item() == pytest.approx(rejected, rel=1e-5)
    assert metrics["loss"].item() == pytest.approx(2 * 0.6931471805599453, rel=1e-6)  # policy = reference


def test_precomputed_reference_logps_match_the_reference_model(tokenizer, tiny_model):
    examples = [EXAMPLE, {**EXAMPLE, "prompt": "Q: 7\n"}, {**EXAMPLE, "chosen": "Answer: 1"}]
    rows = prepare_dataset(dataset(*examples), tokenizer, len(tokenizer), Args())
    policy = LlamaForCausalLM(tiny_model.config)  # another random model, so that the rewards are not 0
    on_the_fly = compute_loss(policy, tiny_model, collate(rows, tokenizer.pad_token_id), Args())
    precompute_ref_logps(tiny_model, rows, Args(per_device_eval_batch_size=2), tokenizer.pad_token_id,
                         torch.device("cpu"), torch.autocast("cpu", enabled=False))
    precomputed = compute_loss(policy, None, collate(rows, tokenizer.pad_token_id), Args())
    torch.testing.assert_close(precomputed[0], on_the_fly[0])
    for key, value in on_the_fly[1].items():
        torch.testing.assert_close(precomputed[1][key], value, msg=key)


def test_rewards_carry_no_gradient():
    policy = torch.tensor([-1.0, -2.0], requires_grad=True)
    losses, chosen, rejected = dpo_loss(policy, policy.flip(0), torch.zeros(2), torch.zeros(2), beta=0.1)
    assert losses.requires_grad and not chosen.requires_grad and not rejected.requires_grad


def test_global_batches_are_seeded_permutations_without_the_last_partial_batch():
    first = global_batches(10, 4, seed=3)
    epoch0, epoch1 = [next(first) for _ in range(2)], [next(first) for _ in range(2)]
    assert [len(b) for b in epoch0 + epoch1] == [4] * 4
    assert len(set(epoch0[0] + epoch0[1])) == 8 and epoch0 != epoch1
    again = global_batches(10, 4, seed=3)
    assert [next(again) for _ in range(4)] == epoch0 + epoch1


def test_load_splits_from_local_files(tmp_path):
    for split in ("train", "test"):
        (tmp_path / f"pairs_{split}.jsonl").write_text(json.dumps({**EXAMPLE, "prompt": split}) + "\n")
    train, test = load_splits(str(tmp_path / "pairs_{split}.jsonl"), None, "train", "test")
    assert (train[0]["prompt"], test[0]["prompt"]) == ("train", "test")
    train, test = load_splits(str(tmp_path / "pairs_train.jsonl"), None, "train", "test")
    assert train[0]["prompt"] == "train" and test is None  # one file: training data only
    train.to_parquet(str(tmp_path / "pairs.parquet"))
    assert load_splits(str(tmp_path / "pairs.parquet"), None, "train", None)[0][0] == train[0]
    with pytest.raises(FileNotFoundError, match="pairs_validation.jsonl"):
        load_splits(str(tmp_path / "pairs_{split}.jsonl"), None, "train", "validation")


@pytest.mark.parametrize("name", ["linear", "cosine", "constant_with_warmup"])
def test_lr_scheduler_is_transformers_get_scheduler(name):
    """The plumbing's schedule, written out so that the scripts need not import transformers' trainer (seconds at
    every start), gives transformers' learning rates exactly, warm-up and edge cases included."""
    from transformers import get_scheduler

    for warmup_steps, total_steps in [(0, 10), (3, 10), (10, 10), (1, 1), (42, 422)]:
        optimizers = [torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=3e-4) for _ in range(2)]
        theirs = get_scheduler(name, optimizers[0], warmup_steps, total_steps)
        ours = lr_scheduler(name, optimizers[1], warmup_steps, total_steps)
        for _ in range(total_steps + 2):
            assert ours.get_last_lr() == theirs.get_last_lr()
            for optimizer, scheduler in zip(optimizers, (theirs, ours)):
                optimizer.step()
                scheduler.step()
