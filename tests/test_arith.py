"""The bundled arithmetic task: the verifier, the committed data files and the committed models."""

import json
import random
from pathlib import Path

import pytest
import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from benchmarks.arith import task
from benchmarks.arith.build import comparison_starts, line_ends
from benchmarks.arith.preference import format_comparison, preference_logits

ARITH = Path(__file__).resolve().parents[1] / "benchmarks" / "arith"
DATA = ARITH / "data"
PROMPT = "Q: ((12+7)*3)-5\n"
RIGHT = "12 + 7 = 19\n19 * 3 = 57\n57 - 5 = 52\nAnswer: 52"
COLUMNS = {
    "pairs": {"prompt", "chosen", "rejected"},
    "unpaired": {"prompt", "completion", "label"},
    "lists": {"prompt", "completions", "scores"},
    "steps": {"prompt", "initial_reason_steps", "chosen", "rejected"},
    "prompts": {"prompt"},
}


def read(name: str) -> list[dict]:
    return [json.loads(line) for line in open(DATA / f"{name}.jsonl")]


# --- the task and the verifier ---

def test_problems_round_trip_and_have_no_precedence_trap():
    rng = random.Random(0)
    for _ in range(200):
        operands, ops = task.sample_problem(rng)
        q = task.question(operands, ops)
        assert task.parse_problem(task.format_prompt(q)) == (operands, ops)
        assert eval(q) == task.solve(operands, ops)[-1][3]  # Python's precedence agrees with the parentheses
        assert 2 <= len(operands) <= 4


def test_right_solution():
    assert task.format_solution(task.solve(*task.parse_problem(PROMPT))) == RIGHT
    assert task.grade(PROMPT, RIGHT) == task.Grade(3, 3, True)
    assert task.grade(PROMPT, RIGHT).correct and task.grade(PROMPT, RIGHT).score == 2.0
    assert task.parse_answer(RIGHT) == 52


def test_a_slip_costs_its_step_and_the_answer():
    slip = "12 + 7 = 18\n18 * 3 = 54\n54 - 5 = 49\nAnswer: 49"  # later steps follow from the slip
    assert task.check_steps(PROMPT, slip) == [False, True, True]
    assert task.grade(PROMPT, slip) == task.Grade(2, 3, False)


@pytest.mark.parametrize("completion, steps, answer", [
    ("12 + 7 = 19\n19 * 3 = 57\n57 - 5 = 51\nAnswer: 51", [True, True, False], False),  # last step wrong
    ("12 + 7 = 19\n19 * 4 = 76\n76 - 5 = 71\nAnswer: 71", [True, False, True], False),  # wrong operand
    ("12 + 7 = 19\n19 + 3 = 22\n22 - 5 = 17\nAnswer: 17", [True, False, True], False),  # wrong operator
    ("12 + 7 = 19\n20 * 3 = 60\n60 - 5 = 55\nAnswer: 55", [True, False, True], False),  # wrong carry
    ("12 + 7 = 19\n19*3=57\n57 - 5 = 52\nAnswer: 52", [True, False, False], True),  # unreadable step
    ("12 + 7 = 19\n19 * 3 = 57\nAnswer: 52", [True, True, False], True),  # missing step
    ("12 + 7 = 19\n19 * 3 = 57\n57 - 5 = 52\nAnswer: 53", [True, True, True], False),  # wrong answer
    ("12 + 7 = 19\n19 * 3 = 57\n57 - 5 = 52\nAnswer: 52\n", [True, True, True], False),  # answer not last
    ("12 + 7 = 19\n19 * 3 = 57\n57 - 5 = 52", [True, True, True], False),  # no answer line
    ("", [False, False, False], False),
])
def test_wrong_steps_and_answers(completion, steps, answer):
    assert task.check_steps(PROMPT, completion) == steps
    assert task.grade(PROMPT, completion) == task.Grade(sum(steps), 3, answer)


def test_line_ends_label_each_line_and_the_solution_so_far():
    """The preference model's training labels (benchmarks/arith/build.py), by hand: (offset of the line's end,
    this line wrong, any line so far wrong); the answer line is wrong when the solution is not fully correct."""
    slip = "12 + 7 = 18\n18 * 3 = 54\n54 - 5 = 49\nAnswer: 49"
    assert line_ends(PROMPT, slip) == [(11, True, True), (23, False, True), (35, False, True), (46, True, True)]
    late = "12 + 7 = 19\n19 * 3 = 57\n57 - 5 = 51\nAnswer: 51"
    assert line_ends(PROMPT, late) == [(11, False, False), (23, False, False), (35, True, True), (46, True, True)]
    assert [(o, w) for o, w, _ in line_ends(PROMPT, RIGHT)] == [(11, False), (23, False), (35, False), (46, False)]
    assert [slip[o] for o, *_ in line_ends(PROMPT, slip)[:-1]] == ["\n"] * 3


def test_comparison_starts_point_at_the_solutions():
    tokenizer = AutoTokenizer.from_pretrained(ARITH / "preference_model")
    a, b = "12 + 7 = 18\nAnswer: 18", "12 + 7 = 19\nAnswer: 19"
    ids = tokenizer(format_comparison(PROMPT, a, b)).input_ids
    a_start, b_start = comparison_starts(tokenizer, PROMPT, a)
    assert tokenizer.decode(ids[a_start:a_start + len(a)]) == a
    assert tokenizer.decode(ids[b_start:b_start + len(b)]) == b and b_start + len(b) == len(ids) - 1


def test_parse_answer():
    assert task.parse_answer("1 + 2 = 3\nAnswer: 3") == 3
    assert task.parse_answer("Answer: -4") == -4
    assert task.parse_answer("Answer: 3\nmore") is None
    assert task.parse_answer("Answer:3") is None


def test_splits_are_fixed_by_the_question():
    prompts = task.sample_distinct_prompts(random.Random(1), 20, "eval")
    assert len(set(prompts)) == 20 and all(task.split_of(p[3:-1]) == "eval" for p in prompts)


# --- the data files ---

@pytest.mark.parametrize("name", [f"{kind}_{split}" for kind in COLUMNS for split in ("train", "test")])
def test_data_files_load_with_their_columns(name, tmp_path):
    rows = load_dataset("json", data_files=str(DATA / f"{name}.jsonl"), split="train", cache_dir=str(tmp_path))
    assert len(rows) > 0 and set(rows.column_names) == COLUMNS[name.rsplit("_", 1)[0]]


@pytest.mark.parametrize("split", ["train", "test"])
def test_chosen_is_verified_better_than_rejected(split):
    for row in read(f"pairs_{split}"):
        chosen, rejected = task.grade(row["prompt"], row["chosen"]), task.grade(row["prompt"], row["rejected"])
        assert chosen.correct and not rejected.answer_correct


@pytest.mark.parametrize("split", ["train", "test"])
def test_step_pairs(split):
    for row in read(f"steps_{split}"):
        prefix = row["initial_reason_steps"]
        k = prefix.count("\n")
        assert row["chosen"].endswith("\n") and row["rejected"].endswith("\n") and (prefix == "" or prefix.endswith("\n"))
        assert task.check_steps(row["prompt"], prefix + row["chosen"])[:k + 1] == [True] * (k + 1)
        assert task.check_steps(row["prompt"], prefix + row["rejected"])[:k + 1] == [True] * k + [False]


@pytest.mark.parametrize("split", ["train", "test"])
def test_lists_and_unpaired_are_graded_by_the_verifier(split):
    for row in read(f"lists_{split}"):
        assert len(row["completions"]) >= 4
        assert row["scores"] == [task.grade(row["prompt"], c).score for c in row["completions"]]
        assert len(set(row["scores"])) > 1
    labels = [row["label"] == task.grade(row["prompt"], row["completion"]).correct for row in read(f"unpaired_{split}")]
    assert all(labels)


def test_completions_are_plain_text():
    """Sampling masked the special tokens, so a completion tokenises back to what was sampled."""
    specials = ("<s>", "</s>", "<pad>", "<unk>")
    for split in ("train", "test"):
        assert not any(t in row["completion"] for row in read(f"unpaired_{split}") for t in specials)


def test_eval_prompts_are_held_out():
    evals = read("eval")
    assert all(row["answer"] == task.solve(*task.parse_problem(row["prompt"]))[-1][3] for row in evals)
    train = {row["prompt"] for row in read("prompts_train")}
    for kind in ("pairs", "unpaired", "lists", "steps"):
        assert {row["prompt"] for row in read(f"{kind}_train")} <= train
    test = {row["prompt"] for row in read("prompts_test")}
    eval_prompts = {row["prompt"] for row in evals}
    assert len(eval_prompts) == len(evals) and not eval_prompts & train and not eval_prompts & test and not test & train


def test_conversational_pairs_template_to_the_standard_ones():
    tokenizer = AutoTokenizer.from_pretrained(ARITH / "model")
    standard = {(r["prompt"], r["chosen"], r["rejected"]) for r in read("pairs_test")}
    for row in read("pairs_conversational_test"):
        prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(row["prompt"] + row["chosen"], tokenize=False)
        assert full.startswith(prompt) and not prompt.startswith(tokenizer.bos_token)
        assert (prompt, full[len(prompt):], row["rejected"][0]["content"]) in standard


# --- the models ---

def test_tokenizer_is_character_level_with_one_bos_and_no_eos():
    tokenizer = AutoTokenizer.from_pretrained(ARITH / "model")
    text = PROMPT + RIGHT + " ~!"
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.eos_token_id not in ids and len(ids) == len(text) + 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer(text, add_special_tokens=False).input_ids == ids[1:]
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3


def test_base_model_loads_and_prefers_the_right_solution():
    tokenizer = AutoTokenizer.from_pretrained(ARITH / "model")
    model = AutoModelForCausalLM.from_pretrained(ARITH / "model")
    assert 0.5e6 < model.num_parameters() < 2.5e6

    prompt = "Q: ((2+7)*3)-5\n"  # within the task's ranges (the verifier's examples above need not be)

    def logp(completion):
        ids = tokenizer(prompt + completion).input_ids + [tokenizer.eos_token_id]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, :-1]
        n = len(ids) - len(tokenizer(prompt).input_ids)
        return logits.log_softmax(-1)[-n:].gather(-1, torch.tensor(ids[-n:])[:, None]).sum()

    assert logp("2 + 7 = 9\n9 * 3 = 27\n27 - 5 = 22\nAnswer: 22") > logp("2 + 7 = 8\n8 * 3 = 24\n24 - 5 = 19\nAnswer: 19")


def test_preference_model_loads_and_mostly_agrees_with_the_verifier():
    tokenizer = AutoTokenizer.from_pretrained(ARITH / "preference_model")
    model = AutoModelForSequenceClassification.from_pretrained(ARITH / "preference_model").eval()
    pairs = read("pairs_test")[:64]
    prompts, chosen, rejected = ([p[k] for p in pairs] for k in ("prompt", "chosen", "rejected"))
    with torch.no_grad():
        forward = preference_logits(model, tokenizer, prompts, chosen, rejected)
        backward = preference_logits(model, tokenizer, prompts, rejected, chosen)
    assert forward.shape == (len(pairs),)
    assert ((forward > 0).float().mean() + (backward < 0).float().mean()) / 2 > 0.8  # 0.875 on these 64 (0.898 on all 167)


def test_mean_and_stderr_by_hand():
    from benchmarks.arith.evaluate import mean_and_stderr

    assert mean_and_stderr([1.0, 0.0, 1.0, 0.0]) == (0.5, pytest.approx((1 / 3 / 4) ** 0.5))  # var 1/3, n 4
    assert mean_and_stderr([0.25]) == (0.25, 0.0)


def test_ranking_accuracy_against_one_sequence_at_a_time(tmp_path):
    """Batched, padded log-probs in evaluate.py against a plain per-sequence sum (no padding), on the base model."""
    from benchmarks.arith.evaluate import ranking_accuracy

    pairs = read("pairs_test")[:6] + [{"prompt": PROMPT, "chosen": RIGHT, "rejected": RIGHT}]  # a tie counts as wrong
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    tokenizer = AutoTokenizer.from_pretrained(ARITH / "model")
    model = AutoModelForCausalLM.from_pretrained(ARITH / "model").eval()

    def logps(prompt, completion):
        prompt_ids = [tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False).input_ids
        ids = prompt_ids + tokenizer(completion, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        with torch.no_grad():
            logp = model(torch.tensor([ids])).logits[0, :-1].double().log_softmax(-1)
        token_logps = [logp[t - 1, ids[t]].item() for t in range(len(prompt_ids), len(ids))]
        return sum(token_logps), sum(token_logps) / len(token_logps)

    scores = [(logps(p["prompt"], p["chosen"]), logps(p["prompt"], p["rejected"])) for p in pairs]
    summed = sum(c[0] > r[0] for c, r in scores) / len(pairs)
    averaged = sum(c[1] > r[1] for c, r in scores) / len(pairs)
    result = ranking_accuracy(model, tokenizer, str(path), batch_size=4)
    assert result["ranking_accuracy"] == pytest.approx(summed) and result["n_pairs"] == 7
    assert result["ranking_accuracy_length_normalised"] == pytest.approx(averaged)
    assert 0 < result["ranking_accuracy_stderr"] < 0.5
