"""algos/cpl.py's segment scores (the discount γ over completion tokens, the per-token mean of the BC term),
its hyperparameter checks and its bad-data errors, on a tiny character tokenizer and a random Llama of
tests/tiny.py. The loss is pinned by tests/golden/cpl.cpl_loss.json, the whole script by tests/test_runs.py."""

import pytest
import torch
from datasets import Dataset

from algos.cpl import Args, check_args, collate, compute_loss, concatenated_forward, cpl_loss, prepare_dataset
from tests.references.cpl import cpl_loss as reference_cpl_loss
from tests.references.cpl import segment_score
from tests.tiny import make_tokenizer, tiny_llama


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(chat_template=None)


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    return tiny_llama(tokenizer, 0)


EXAMPLE = {"prompt": "Q: (1+2)*3\n", "chosen": "1 + 2 = 3\n3 * 3 = 9\nAnswer: 9", "rejected": "Answer: 8"}
SHORT = {"prompt": "Q: 7\n", "chosen": "Answer: 7", "rejected": "Answer: 1"}


def dataset(*examples):
    return Dataset.from_list(list(examples))


def token_logps_of(model, tokenizer, row, key):
    """log π(y_t | x, y_<t) of each completion token, from a plain log-softmax in float64."""
    sequence = torch.tensor([row["prompt_ids"] + row[key]])
    with torch.no_grad():
        logp = model(sequence).logits.double().log_softmax(-1)[0, :-1].gather(-1, sequence[0, 1:, None])[:, 0]
    return logp[len(row["prompt_ids"]) - 1 :].tolist()


@pytest.mark.parametrize("discount", [1.0, 0.9, 0.5])
def test_segment_scores_discount_from_the_first_completion_token(tokenizer, tiny_model, discount):
    """concatenated_forward against the literal Σ_t γ^t log π of the reference, with prompts and completions of
    different lengths in one padded batch (so t must restart at each completion, not at the sequence)."""
    rows = prepare_dataset(dataset(EXAMPLE, SHORT), tokenizer, len(tokenizer), Args())
    batch = collate(rows, tokenizer.pad_token_id)
    with torch.no_grad():
        chosen, rejected, mean, aux_loss = concatenated_forward(tiny_model, batch, discount=discount)
    discounted = torch.cat([chosen, rejected])
    expected_discounted, expected_mean = [], []
    for key in ("chosen_ids", "rejected_ids"):
        for r in rows:
            token_logps = token_logps_of(tiny_model, tokenizer, r, key)
            expected_discounted.append(segment_score(token_logps, 1.0, discount))
            if key == "chosen_ids":  # the BC term's mean, of the chosen completions only
                expected_mean.append(sum(token_logps) / len(token_logps))
    assert aux_loss == 0  # a dense model has no router loss
    torch.testing.assert_close(discounted.double(), torch.tensor(expected_discounted, dtype=torch.float64),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean.double(), torch.tensor(expected_mean, dtype=torch.float64), rtol=1e-5, atol=1e-6)


def test_compute_loss_is_the_reference_cpl_loss_on_model_log_probs(tokenizer, tiny_model):
    """End to end on one batch: model -> discounted sums -> loss, against the reference fed the literal sums."""
    args = Args(alpha=0.3, conservative_bias=0.5, discount=0.8, bc_coef=0.7)
    rows = prepare_dataset(dataset(EXAMPLE, SHORT), tokenizer, len(tokenizer), args)
    with torch.no_grad():
        loss, metrics = compute_loss(tiny_model, collate(rows, tokenizer.pad_token_id), args)
    chosen = [token_logps_of(tiny_model, tokenizer, r, "chosen_ids") for r in rows]
    rejected = [token_logps_of(tiny_model, tokenizer, r, "rejected_ids") for r in rows]
    expected, _ = reference_cpl_loss([segment_score(c, 1.0, 0.8) for c in chosen],
                                     [segment_score(r, 1.0, 0.8) for r in rejected],
                                     [sum(c) / len(c) for c in chosen], 0.3, 0.5, 0.7)
    assert loss.item() == pytest.approx(sum(expected["losses"]) / 2, rel=1e-5)
    assert metrics["rewards/chosen"].item() == pytest.approx(sum(expected["chosen_scores"]), rel=1e-5)
    assert metrics["nll_loss"].item() == pytest.approx(-sum(sum(c) / len(c) for c in chosen), rel=1e-5)


def test_lambda1_gamma1_no_bc_is_logistic_on_alpha_times_logp_difference():
    chosen, rejected = torch.tensor([-10.0, -3.0]), torch.tensor([-12.0, -1.0])
    losses, _, _ = cpl_loss(chosen, rejected, torch.zeros(2), alpha=0.2, bc_coef=0.0, conservative_bias=1.0)
    torch.testing.assert_close(losses, -torch.nn.functional.logsigmoid(0.2 * (chosen - rejected)))


def test_scores_carry_no_gradient_and_lambda_does_not_bias_them():
    chosen = torch.tensor([-1.0, -2.0], requires_grad=True)
    losses, chosen_scores, rejected_scores = cpl_loss(chosen, chosen.flip(0), chosen, alpha=0.5, bc_coef=0.0, conservative_bias=0.5)
    assert losses.requires_grad and not chosen_scores.requires_grad and not rejected_scores.requires_grad
    torch.testing.assert_close(rejected_scores, torch.tensor([-1.0, -0.5]))


@pytest.mark.parametrize("flag,value,allowed", [
    ("conservative_bias", 0.0, r"in \(0, 1\]"), ("conservative_bias", 1.5, r"in \(0, 1\]"),
    ("discount", 0.0, r"in \(0, 1\]"), ("discount", 1.01, r"in \(0, 1\]"), ("alpha", 0.0, "> 0"),
    ("alpha", float("nan"), "> 0"), ("bc_coef", -0.1, ">= 0"),
])
def test_hyperparameters_out_of_range_are_errors_naming_the_flag(flag, value, allowed):
    with pytest.raises(ValueError, match=rf"--{flag.replace('_', '-')} {value}: must be {allowed}"):
        check_args(Args(**{flag: value}))
    check_args(Args())  # the defaults pass


def test_missing_columns_are_named(tokenizer):
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['rejected'\].*cpl.py needs"):
        prepare_dataset(dataset({"prompt": "Q: 1\n", "chosen": "a"}), tokenizer, 100, Args())


def test_empty_dataset_is_an_error(tokenizer):
    empty = Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []})
    with pytest.raises(ValueError, match="the test split has no rows"):
        prepare_dataset(empty, tokenizer, 100, Args(), "the test split")


def test_an_example_that_cannot_fit_is_an_error(tokenizer):
    with pytest.raises(ValueError, match=r"row 0: the prompt takes 12 tokens.*no room"):
        prepare_dataset(dataset(EXAMPLE), tokenizer, 100, Args(max_length=12, max_prompt_length=12))


def test_the_implicit_prompt_format_gives_the_explicit_prompt_s_tokens():
    """TRL's implicit-prompt format: chosen and rejected are whole conversations sharing their leading messages."""
    tokenizer = make_tokenizer()  # with the plain chat template
    user = {"role": "user", "content": "7"}
    implicit = {"chosen": [user, {"role": "assistant", "content": "Answer: 7"}],
                "rejected": [user, {"role": "assistant", "content": "Answer: 1"}]}
    assert prepare_dataset(dataset(implicit), tokenizer, len(tokenizer), Args()) == prepare_dataset(
        dataset(SHORT), tokenizer, len(tokenizer), Args())
