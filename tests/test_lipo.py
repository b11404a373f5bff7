"""algos/lipo.py's objectives at the edges the golden file cannot hold (ties in the rewards, gradients that
must not exist, the equivalence to algos/dpo.py), its data checks, batching and log-probs, on a tiny
character tokenizer and a random Llama of tests/tiny.py (no bundled assets needed). The loss values are pinned by
tests/golden/lipo.lipo_loss.json, the whole script by tests/test_runs.py."""

import math

import pytest
import torch
from datasets import Dataset
from transformers import LlamaForCausalLM

from algos.dpo import dpo_loss
from algos.lipo import (
    Args,
    check_args,
    collate,
    compute_loss,
    concatenated_forward,
    lambda_weights,
    lipo_loss,
    pad_lists,
    precompute_ref_logps,
    prepare_dataset,
    tokenize_row,
    win_rates,
)
from tests.tiny import make_tokenizer, tiny_llama

LOSS_TYPES = ["lambda", "pair_logistic", "list_mle", "softmax"]
LN2, LN3 = math.log(2), math.log(3)


def loss(policy, reference, scores, sizes, beta=1.0, loss_type="lambda", dtype=torch.float64):
    as_tensor = lambda values: torch.tensor(values, dtype=dtype)  # noqa: E731
    return lipo_loss(as_tensor(policy), as_tensor(reference), as_tensor(scores), torch.tensor(sizes), beta, loss_type)


@pytest.mark.parametrize("loss_type", ["pair_logistic", "list_mle", "softmax"])
def test_a_list_of_two_is_dpo(loss_type):
    """Lists of two (best first or second) against dpo_loss on the same pairs, with win-rate labels (1, 0)."""
    generator = torch.Generator().manual_seed(0)
    chosen, rejected, reference_chosen, reference_rejected = (
        -80 * torch.rand(16, generator=generator, dtype=torch.float64) for _ in range(4))
    expected, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, reference_chosen, reference_rejected, 0.3)
    flip = torch.arange(16) % 2 == 1  # odd lists list the rejected completion first
    first, second = torch.where(flip, rejected, chosen), torch.where(flip, chosen, rejected)
    reference_first = torch.where(flip, reference_rejected, reference_chosen)
    reference_second = torch.where(flip, reference_chosen, reference_rejected)
    scores = torch.stack([(~flip).double(), flip.double()], 1).flatten()
    assert scores.tolist()[:4] == win_rates([2.0, 0.0]) + win_rates([-1.0, 5.0])
    losses, rewards = lipo_loss(torch.stack([first, second], 1).flatten(),
                                torch.stack([reference_first, reference_second], 1).flatten(),
                                scores, torch.full((16,), 2), 0.3, loss_type)
    torch.testing.assert_close(losses, expected, rtol=1e-12, atol=1e-12)
    rewards = rewards.view(16, 2)
    torch.testing.assert_close(torch.where(flip, rewards[:, 1], rewards[:, 0]), chosen_rewards)
    torch.testing.assert_close(torch.where(flip, rewards[:, 0], rewards[:, 1]), rejected_rewards)


def test_lambda_weights_of_a_hand_worked_list():
    """s = (0.2, 0.5, -0.1) ranks the items (2, 1, 3); ψ = (2, 0, 1), so G = (3, 0, 1), 1/D = (ln2/ln3, 1, 1/2)."""
    weights = lambda_weights(torch.tensor([[0.2, 0.5, -0.1]]), torch.tensor([[2.0, 0.0, 1.0]]), torch.ones(1, 3, dtype=bool))
    expected = torch.zeros(1, 3, 3)
    expected[0, 0, 1] = 3 * (1 - LN2 / LN3)  # |3 - 0|·|ln2/ln3 - 1|
    expected[0, 0, 2] = 2 * (LN2 / LN3 - 0.5)  # |3 - 1|·|ln2/ln3 - 1/2|
    expected[0, 2, 1] = 0.5  # |1 - 0|·|1/2 - 1|
    torch.testing.assert_close(weights, expected)


def test_tied_rewards_are_ranked_by_index():
    """At the start every reward is 0: the ranks are the dataset order, and so are the λ-weights."""
    scores = torch.tensor([[0.0, 1.0, 2.0]])  # the best item last, so that it is ranked third
    weights = lambda_weights(torch.zeros(1, 3), scores, torch.ones(1, 3, dtype=bool))
    inverse_discounts = torch.tensor([1.0, LN2 / LN3, 0.5])  # ranks (1, 2, 3)
    gains = 2 ** scores[0] - 1
    for i, j in [(1, 0), (2, 0), (2, 1)]:
        assert weights[0, i, j].item() == pytest.approx(abs(gains[i] - gains[j]) * abs(inverse_discounts[i] - inverse_discounts[j]))
    losses, _ = loss([-5.0, -6.0, -7.0], [-5.0, -6.0, -7.0], [0.0, 1.0, 2.0], [3])
    assert losses.item() == pytest.approx(weights.sum().item() * LN2)
    # the same rewards one ulp apart rank the other way: the order comes from the rewards, not the labels
    apart = lambda_weights(torch.tensor([[0.0, 0.0, 1e-6]]), scores, torch.ones(1, 3, dtype=bool))
    assert not torch.equal(apart, weights)


def test_padding_does_not_change_the_ranks():
    """A short list batched with a long one gets the same λ-weights and loss as alone."""
    short = ([-3.0, -1.0], [-2.0, -2.0], [1.0, 0.0], [2])
    alone, _ = loss(*short)
    together, _ = loss([-3.0, -1.0, -9.0, -8.0, -7.0, -6.0], [-2.0, -2.0, -9.5, -8.0, -6.0, -6.0],
                       [1.0, 0.0, 0.5, 1.0, 0.0, 2.0], [2, 4])
    torch.testing.assert_close(together[0], alone[0])


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_a_batch_of_ragged_lists_is_the_lists_one_by_one(loss_type):
    generator = torch.Generator().manual_seed(1)
    sizes = [4, 1, 3, 2, 4]
    policy = -50 * torch.rand(14, generator=generator, dtype=torch.float64)
    reference = policy + torch.randn(14, generator=generator, dtype=torch.float64)
    scores = torch.randint(0, 3, (14,), generator=generator).double() / 2  # with ties
    together, _ = lipo_loss(policy, reference, scores, torch.tensor(sizes), 0.5, loss_type)
    one_by_one = [lipo_loss(p, r, s, torch.tensor([len(p)]), 0.5, loss_type)[0]
                  for p, r, s in zip(policy.split(sizes), reference.split(sizes), scores.split(sizes))]
    torch.testing.assert_close(together, torch.cat(one_by_one))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_neither_labels_nor_lambda_weights_carry_gradient(loss_type):
    policy = torch.tensor([-1.0, -2.0, -4.0], requires_grad=True)
    scores = torch.tensor([0.0, 2.0, 1.0], requires_grad=True)
    losses, rewards = lipo_loss(policy, torch.zeros(3), scores, torch.tensor([3]), 0.1, loss_type)
    assert losses.requires_grad and not rewards.requires_grad
    policy_grad, scores_grad = torch.autograd.grad(losses.sum(), [policy, scores], allow_unused=True)
    assert scores_grad is None and torch.isfinite(policy_grad).all() and policy_grad.abs().sum() > 0
    assert not lambda_weights(policy[None], scores[None], torch.ones(1, 3, dtype=bool)).requires_grad


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_nan_at_extremes(loss_type, dtype):
    """Huge rewards, all-equal lists, lists of one, zero labels (softmax's Σψ = 0) in low precision."""
    policy = [0.0, -1e4, 1e4, -3.0, -3.0, 7.0, 0.0, 0.0, 5.0]
    scores = [1.0, 0.0, 0.5, 0.0, 0.0, 3.0, 0.0, 0.0, 1.0]
    as_tensor = lambda values: torch.tensor(values, dtype=dtype)  # noqa: E731
    policy_logps = as_tensor(policy).requires_grad_()
    losses, _ = lipo_loss(policy_logps, as_tensor([0.0] * 9), as_tensor(scores), torch.tensor([3, 2, 1, 2, 1]), 1.0,
                          loss_type)
    (grad,) = torch.autograd.grad(losses.sum(), policy_logps)
    assert torch.isfinite(losses).all() and torch.isfinite(grad).all()
    assert losses[1:].tolist() == [0.0, 0.0, 0.0, 0.0]  # no strict preference in those lists
    assert grad[3:].tolist() == [0.0] * 6


def test_unknown_loss_type_is_an_error():
    with pytest.raises(ValueError, match="unknown loss_type 'hinge'"):
        loss([-1.0, -2.0], [0.0, 0.0], [1.0, 0.0], [2], loss_type="hinge")


def test_win_rates_keep_order_and_ties():
    assert win_rates([2.0, 1.0, 1.0, 0.0]) == [1.0, 0.5, 0.5, 0.0]
    assert win_rates([0.0, 5.0, 0.0]) == [0.25, 1.0, 0.25]
    assert win_rates([3.0, 3.0]) == [0.5, 0.5] and win_rates([7.0]) == [0.0]


def test_pad_lists():
    padded, valid = pad_lists(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1, 3]))
    assert padded.tolist() == [[1.0, 0.0, 0.0], [2.0, 3.0, 4.0]]
    assert valid.tolist() == [[True, False, False], [True, True, True]]


# data: a character tokenizer like the bundled model's

@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


EXAMPLE = {"prompt": "Q: (1+2)*3\n", "completions": ["1 + 2 = 3\n3 * 3 = 9\nAnswer: 9", "Answer: 8", "3 * 3 = 9\nAnswer: 9"],
           "scores": [2.0, 0.0, 1.5]}
CONVERSATION = {"prompt": [{"role": "user", "content": "(1+2)*3"}],
                "completions": [[{"role": "assistant", "content": text}] for text in EXAMPLE["completions"]],
                "scores": EXAMPLE["scores"]}


def dataset(*examples):
    return Dataset.from_list(list(examples))


def prepare(tokenizer, *examples, **overrides):
    return prepare_dataset(dataset(*examples), tokenizer, len(tokenizer), Args(**overrides), "the train split")


def test_rows_hold_every_completion_and_the_labels(tokenizer):
    (row,) = prepare(tokenizer, EXAMPLE)
    assert row["prompt_ids"] == [tokenizer.bos_token_id] + ids(tokenizer, EXAMPLE["prompt"])
    assert row["completions_ids"] == [ids(tokenizer, text) + [tokenizer.eos_token_id] for text in EXAMPLE["completions"]]
    assert row["scores"] == [1.0, 0.0, 0.5] and not row["truncated"]  # win rates by default
    assert prepare(tokenizer, EXAMPLE, score_transform="none")[0]["scores"] == EXAMPLE["scores"]


def test_conversational_format_gives_the_same_tokens(tokenizer):
    assert prepare(tokenizer, CONVERSATION) == prepare(tokenizer, EXAMPLE)


def test_truncation_cuts_every_completion(tokenizer):
    (row,) = prepare(tokenizer, EXAMPLE, max_length=24)  # a prompt of 12 tokens leaves 12 for each completion
    assert [len(ids) for ids in row["completions_ids"]] == [12, 10, 12]
    assert row["truncated"]


@pytest.mark.parametrize("example,message", [
    ({"prompt": "Q: 1\n", "completions": ["Answer: 1"], "ranks": [1]}, r"lacks the column\(s\) \['scores'\].*rename"),
    ({**EXAMPLE, "completions": []}, r"row 0: `completions` must be a non-empty list"),
    ({**EXAMPLE, "scores": [1.0, 0.0]}, r"row 0: `scores` must be a list with one score per completion: 3"),
    ({**EXAMPLE, "scores": [1.0, float("nan"), 0.0]}, r"row 0: the scores must be finite numbers"),
    ({**EXAMPLE, "scores": [1.0, None, 0.0]}, r"row 0: the scores must be finite numbers"),
    ({**EXAMPLE, "prompt": None}, r"row 0: column 'prompt' holds None \(NoneType\): expected a string or a list of"),
    ({**CONVERSATION, "completions": [[], *CONVERSATION["completions"][1:]]}, r"row 0: column 'completions\[0\]' holds \[\]"),
])
def test_bad_lists_are_named(tokenizer, example, message):
    with pytest.raises(ValueError, match=message):
        prepare(tokenizer, example)


def test_a_list_mixing_strings_and_messages_is_named(tokenizer):
    class Rows(list):  # keeps the Python values as they are (Arrow refuses a column mixing lists and strings)
        column_names = ["prompt", "completions", "scores"]

    mixed = {**CONVERSATION, "completions": [*CONVERSATION["completions"][:2], "Answer: 9"]}
    with pytest.raises(ValueError, match=r"row 1: the columns \['prompt', 'completions\[0\]', 'completions\[1\]', "
                                         r"'completions\[2\]'\] mix strings and lists of messages"):
        prepare_dataset(Rows([CONVERSATION, mixed]), tokenizer, len(tokenizer), Args())


def test_raw_scores_that_break_an_objective_are_errors(tokenizer):
    negative = {**EXAMPLE, "scores": [-1.0, 0.0, 2.0]}
    with pytest.raises(ValueError, match=r"softmax objective's target ψ/Σψ needs scores >= 0.*--score-transform win_rate"):
        prepare(tokenizer, negative, loss_type="softmax", score_transform="none")
    assert prepare(tokenizer, negative, loss_type="softmax")[0]["scores"] == [0.0, 0.5, 1.0]
    with pytest.raises(ValueError, match=r"gains 2\^ψ - 1 overflow float32.*rescale"):
        prepare(tokenizer, {**EXAMPLE, "scores": [200.0, 0.0, 1.0]}, score_transform="none")


def test_a_row_that_cannot_fit_is_an_error(tokenizer):
    long_prompt = {**EXAMPLE, "prompt": "Q: " + "1+" * 20 + "1\n"}
    with pytest.raises(ValueError, match=r"row 1: the prompt takes 16 tokens.*no room.*--max-prompt-length"):
        prepare(tokenizer, EXAMPLE, long_prompt, max_length=16, max_prompt_length=16)


def test_empty_dataset_is_an_error(tokenizer):
    empty = Dataset.from_dict({"prompt": [], "completions": [], "scores": []})
    with pytest.raises(ValueError, match="the train split has no rows"):
        prepare_dataset(empty, tokenizer, 100, Args(), "the train split")


def test_token_ids_outside_the_vocabulary_are_an_error(tokenizer):
    with pytest.raises(ValueError, match=r"row 0: token id \d+ is outside the model's vocabulary of 10"):
        prepare_dataset(dataset(EXAMPLE), tokenizer, 10, Args())


def test_collate_flattens_ragged_lists_list_by_list(tokenizer):
    short = {"prompt": "Q: 1\n", "completions": ["Answer: 1", "Answer: 2"], "scores": [1.0, 0.0]}
    rows = prepare(tokenizer, EXAMPLE, short)
    batch = collate(rows, tokenizer.pad_token_id)
    assert batch["list_sizes"].tolist() == [3, 2]
    assert batch["scores"].tolist() == rows[0]["scores"] + rows[1]["scores"]
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    completions = [(row, completion) for row in rows for completion in row["completions_ids"]]
    assert batch["input_ids"].shape[0] == len(completions) == 5
    for i, (row, completion) in enumerate(completions):
        n_prompt, n = len(row["prompt_ids"]), len(row["prompt_ids"]) + len(completion)
        assert batch["input_ids"][i, :n].tolist() == row["prompt_ids"] + completion
        assert batch["labels"][i].tolist() == [-100] * n_prompt + completion + [-100] * (batch["labels"].shape[1] - n)
        assert batch["attention_mask"][i].sum() == n


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    return tiny_llama(tokenizer, 0)


EXAMPLES = [EXAMPLE, {"prompt": "Q: 7\n", "completions": ["Answer: 7", "Answer: 1"], "scores": [0.0, 1.0]},
            {"prompt": "Q: 2\n", "completions": ["Answer: 2", "Answer: 3"], "scores": [1.0, 1.0]}]


def test_logps_and_metrics_at_the_start(tokenizer, tiny_model):
    """Log-probs against a naive per-sequence sum; at the start (policy = reference) every reward is 0."""
    rows = prepare(tokenizer, *EXAMPLES, loss_type="pair_logistic")
    _, metrics = compute_loss(tiny_model, tiny_model, collate(rows, tokenizer.pad_token_id), Args(loss_type="pair_logistic"))
    naive = []
    for row in rows:
        logps = []
        for completion in row["completions_ids"]:
            sequence = torch.tensor([row["prompt_ids"] + completion])
            logp = tiny_model(sequence).logits.double().log_softmax(-1)[0, :-1].gather(-1, sequence[0, 1:, None])
            logps.append(logp[len(row["prompt_ids"]) - 1 :].sum().item())
        naive.append(logps)
    # chosen: the first best of each list (items 0, 1, 0), rejected: the first worst (items 1, 0, 0)
    assert metrics["logps/chosen"].item() == pytest.approx(naive[0][0] + naive[1][1] + naive[2][0], rel=1e-5)
    assert metrics["logps/rejected"].item() == pytest.approx(naive[0][1] + naive[1][0] + naive[2][0], rel=1e-5)
    assert metrics["loss"].item() == pytest.approx((3 + 1 + 0) * LN2, rel=1e-6)  # ordered pairs x ln 2
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert metrics[key].item() == 0.0


def test_accuracies_count_the_ordered_pairs_of_each_list(tokenizer, tiny_model):
    rows = prepare(tokenizer, *EXAMPLES)
    for row, logps in zip(rows, [[-1.0, -3.0, -2.0], [-1.0, -2.0], [-4.0, -4.0]]):
        row["reference_logps"] = logps
    batch = collate(rows, tokenizer.pad_token_id)
    _, metrics = compute_loss(tiny_model, None, batch, Args())
    logps, aux_loss = concatenated_forward(tiny_model, batch)
    assert aux_loss == 0  # a dense model has no router loss
    rewards = Args().beta * (logps - batch["reference_logps"])
    ordered_right = lambda s, pairs: sum(s[i] > s[j] for i, j in pairs) / len(pairs)  # noqa: E731
    expected = ordered_right(rewards[:3], [(0, 1), (0, 2), (2, 1)]) + ordered_right(rewards[3:5], [(1, 0)]) + 0
    assert metrics["rewards/accuracies"].item() == pytest.approx(expected)


def test_precomputed_reference_logps_match_the_reference_model(tokenizer, tiny_model):
    rows = prepare(tokenizer, *EXAMPLES)
    policy = LlamaForCausalLM(tiny_model.config)  # another random model, so that the rewards are not 0
    on_the_fly = compute_loss(policy, tiny_model, collate(rows, tokenizer.pad_token_id), Args())
    precompute_ref_logps(tiny_model, rows, Args(per_device_eval_batch_size=2), tokenizer.pad_token_id,
                         torch.device("cpu"), torch.autocast("cpu", enabled=False))
    assert [len(row["reference_logps"]) for row in rows] == [3, 2, 2]
    precomputed = compute_loss(policy, None, collate(rows, tokenizer.pad_token_id), Args())
    torch.testing.assert_close(precomputed[0], on_the_fly[0])
    for key, value in on_the_fly[1].items():
        torch.testing.assert_close(precomputed[1][key], value, msg=key)


def test_a_row_is_tokenized_by_tokenize_row_with_its_labels(tokenizer):
    row = tokenize_row(EXAMPLE, tokenizer, Args(score_transform="none"))
    assert row == {**prepare(tokenizer, EXAMPLE, score_transform="none")[0], "unknown": False}
    bos = [tokenizer.bos_token_id]  # keep_end keeps the BOS that starts the prompt
    cut = tokenize_row(EXAMPLE, tokenizer, Args(max_prompt_length=5, max_length=12))
    assert cut["prompt_ids"] == bos + row["prompt_ids"][-4:] and cut["truncated"]
    assert cut["completions_ids"] == [ids[:7] for ids in row["completions_ids"]]


@pytest.mark.parametrize("beta", [0.0, -0.5])
def test_beta_is_checked_before_anything_loads(beta):
    with pytest.raises(ValueError, match=rf"invalid arguments:\n  --beta {beta}: must be > 0"):
        check_args(Args(beta=beta))
    check_args(Args())  # the defaults pass
