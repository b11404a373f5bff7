"""algos/nash_md.py beyond its golden values: the tabular algorithm's convergence (and its cycling without
regularisation), the sampler (mixture frequencies, KV cache and left padding against plain greedy decoding,
EOS and budgets, batch independence), the symmetrised judge, the expected gradient of the loss, and the bad
inputs, on a tiny character tokenizer and random Llamas of tests/tiny.py. The loss, the tabular step and the
mixture are pinned by tests/golden/nash_md.*.json, the whole script by tests/test_runs.py; the plumbing
shared with dpo.py is tested in tests/test_dpo.py."""

from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models
from transformers import LlamaForSequenceClassification, PreTrainedTokenizerFast

from algos.nash_md import (
    Args,
    check_args,
    check_tokenizer,
    compute_loss,
    geometric_mixture,
    load_judge,
    nash_md_loss,
    nash_md_tabular,
    nash_md_tabular_step,
    prepare_dataset,
    preference_probabilities,
    row_generators,
    sample_completions,
)
from tests import tiny

RPS = torch.tensor([[0.5, 0.0, 1.0], [1.0, 0.5, 0.0], [0.0, 1.0, 0.5]], dtype=torch.float64)
UNIFORM = torch.full((3,), 1 / 3, dtype=torch.float64)
# A weighted rock-paper-scissors, P = 1/2 + A/2 with A antisymmetric: its Nash equilibrium is ∝ (3, 2, 1)
# (each response then wins exactly 1/2 against it), not uniform.
WEIGHTED = 0.5 + torch.tensor([[0.0, 1.0, -2.0], [-1.0, 0.0, 3.0], [2.0, -3.0, 0.0]], dtype=torch.float64) / 6
WEIGHTED_NASH = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64) / 6


def kl(p: torch.Tensor, q: torch.Tensor) -> float:
    return (p * (p / q).log()).sum().item()


def regularised_equilibrium(preference, reference, tau, damping=0.05, steps=20000):
    """π = μ·exp(P·π/τ)/Z by a damped fixed-point iteration in float64, independent of Nash-MD."""
    policy = reference.clone()
    for _ in range(steps):
        target = reference * torch.exp(preference @ policy / tau)
        policy = (1 - damping) * policy + damping * target / target.sum()
    target = reference * torch.exp(preference @ policy / tau)
    assert (policy - target / target.sum()).abs().max() < 1e-12, "the fixed-point iteration did not converge"
    return policy


def test_weighted_rps_equilibrium_is_what_the_tests_assume():
    assert torch.allclose(WEIGHTED + WEIGHTED.T, torch.ones(3, 3, dtype=torch.float64))
    assert torch.allclose(WEIGHTED @ WEIGHTED_NASH, torch.full((3,), 0.5, dtype=torch.float64))


def test_rps_with_uniform_reference_converges_to_the_uniform_equilibrium():
    """By symmetry the regularised equilibrium of rock-paper-scissors with a uniform μ is uniform. From a
    lopsided start with a constant step, the last iterate (not the average) gets there."""
    assert torch.allclose(regularised_equilibrium(RPS, UNIFORM, tau=0.1), UNIFORM, atol=1e-12)
    policy = torch.tensor([0.8, 0.15, 0.05], dtype=torch.float64)
    for _ in range(300):
        policy, mixture = nash_md_tabular_step(policy, UNIFORM, RPS, eta=1.0, tau=0.1)
    torch.testing.assert_close(policy, UNIFORM, rtol=0, atol=1e-6)
    torch.testing.assert_close(nash_md_tabular(RPS, UNIFORM, tau=0.1, num_steps=50), UNIFORM, rtol=0, atol=1e-12)


@pytest.mark.parametrize("reference", [UNIFORM, torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)],
                         ids=["uniform", "non_uniform"])
def test_non_uniform_equilibrium_is_reached_by_the_last_iterate(reference):
    """The paper's step sizes η_t = 2/(τ(t+2)): after 2000 steps the last iterate is within 5e-4 of the
    regularised equilibrium computed by the fixed-point iteration (measured: 1.2e-4 and 3.8e-5)."""
    target = regularised_equilibrium(WEIGHTED, reference, tau=0.1)
    assert (target - reference).abs().max() > 0.03, "the equilibrium should not be the reference"
    last = nash_md_tabular(WEIGHTED, reference, tau=0.1, num_steps=2000)
    torch.testing.assert_close(last, target, rtol=0, atol=5e-4)


def test_small_tau_approaches_the_unregularised_equilibrium():
    """τ = 0.02: the regularised equilibrium is within 0.03 of the Nash equilibrium (3, 2, 1)/6 (measured
    0.022), and 5000 steps reach it within 5e-4 (measured 2.7e-4)."""
    last = nash_md_tabular(WEIGHTED, UNIFORM, tau=0.02, num_steps=5000)
    torch.testing.assert_close(last, regularised_equilibrium(WEIGHTED, UNIFORM, tau=0.02, damping=0.01),
                               rtol=0, atol=5e-4)
    torch.testing.assert_close(last, WEIGHTED_NASH, rtol=0, atol=0.03)


def test_without_regularisation_the_last_iterate_cycles_away():
    """τ = 0 is mirror descent against itself: on rock-paper-scissors it circles the equilibrium and spirals
    out, so KL(uniform ‖ π_t) grows instead of vanishing."""
    policy = torch.tensor([0.8, 0.15, 0.05], dtype=torch.float64)
    distances = []
    for _ in range(3):
        for _ in range(300):
            next_policy, mixture = nash_md_tabular_step(policy, UNIFORM, RPS, eta=0.5, tau=0.0)
            torch.testing.assert_close(mixture, policy)  # nothing to mix with
            policy = next_policy
        distances.append(kl(UNIFORM, policy))
    start = kl(UNIFORM, torch.tensor([0.8, 0.15, 0.05], dtype=torch.float64))
    assert start < distances[0] < distances[1] < distances[2]


def test_tabular_bad_step_sizes_are_errors():
    with pytest.raises(ValueError, match=r"mixture weight η·τ must lie in \[0, 1\]"):
        nash_md_tabular_step(UNIFORM, UNIFORM, RPS, eta=2.0, tau=1.0)
    with pytest.raises(ValueError, match="need τ > 0"):
        nash_md_tabular(RPS, UNIFORM, tau=0.0, num_steps=3)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.make_tokenizer(chars=tiny.CHARS + "[]")  # "[]" for the preference template's "[1]" and "[2]"


def llama_config(tokenizer, **overrides):
    return tiny.llama_config(tokenizer, max_position_embeddings=256, **overrides)


def tiny_llama(tokenizer, seed):
    return tiny.tiny_llama(tokenizer, seed, max_position_embeddings=256)


def tiny_judge(tokenizer, seed=5):
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(llama_config(tokenizer, num_labels=1)).eval(), tokenizer


class FixedLogits(torch.nn.Module):
    """A stand-in language model with the same next-token logits at every position."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.as_tensor(logits, dtype=torch.float32))

    config = SimpleNamespace()  # what forward_logits reads: no router, so no auxiliary loss

    def get_output_embeddings(self):
        return None

    def forward(self, input_ids, cache=None, logits_to_keep=0, **kwargs):
        length = logits_to_keep or input_ids.shape[1]
        return SimpleNamespace(logits=self.logits.expand(input_ids.shape[0], length, -1), cache=cache)


def test_sampled_frequencies_match_the_geometric_mixture():
    policy_logits, reference_logits = torch.tensor([2.0, 0.0, -1.0, 1.0]), torch.tensor([-1.0, 1.0, 0.5, 2.0])
    n = 4000
    completions = sample_completions(FixedLogits(policy_logits), FixedLogits(reference_logits), [[1]] * n, [1] * n,
                                     [0.3] * n, 0.8, row_generators(0, 1, list(range(n)), 0), 0, 99)
    frequencies = torch.bincount(torch.tensor([c[0] for c in completions]), minlength=4).double() / n
    expected = geometric_mixture(policy_logits.double(), reference_logits.double(), 0.3, 0.8).exp()
    tolerance = 4.5 * (expected * (1 - expected) / n).sqrt()
    assert ((frequencies - expected).abs() <= tolerance).all(), (frequencies, expected)


@pytest.mark.parametrize("mixture_coef", [0.0, 0.5, 1.0])
def test_cold_sampling_is_greedy_decoding_of_the_mixture(tokenizer, mixture_coef):
    """At a tiny temperature the sampler decodes greedily; with left padding and the two KV caches it must
    pick the same tokens as a plain loop over each prompt alone, recomputing everything without a cache."""
    policy, reference = tiny_llama(tokenizer, 1), tiny_llama(tokenizer, 2)
    policy.train()
    prompts = [[1, 20, 21], [1, 5, 6, 7, 8, 9, 10], [1, 11, 12, 13, 14]]
    completions = sample_completions(policy, reference, prompts, [6, 6, 6], [mixture_coef] * 3, 1e-6,
                                     row_generators(0, 1, [0, 1, 2], 0), tokenizer.pad_token_id, tokenizer.eos_token_id)
    assert policy.training, "the sampler must give the policy back in train mode"
    policy.eval()
    with torch.no_grad():
        for prompt, completion in zip(prompts, completions):
            sequence = list(prompt)
            for _ in range(6):
                ids = torch.tensor([sequence])
                mixed = ((1 - mixture_coef) * policy(ids).logits[0, -1].log_softmax(-1)
                         + mixture_coef * reference(ids).logits[0, -1].log_softmax(-1))
                sequence.append(mixed.argmax().item())
                if sequence[-1] == tokenizer.eos_token_id:
                    break
            assert completion == sequence[len(prompt):]


def test_completions_end_with_eos_or_at_their_budget():
    always_eos = FixedLogits([0.0, 0.0, 50.0])  # token 2 is EOS
    never_eos = FixedLogits([0.0, 0.0, -float("inf")])
    generators = row_generators(0, 1, [0, 1], 0)
    assert sample_completions(always_eos, None, [[1], [1, 1]], [4, 1], [0.0, 0.0], 1.0, generators, 0, 2) == [[2], [2]]
    completions = sample_completions(never_eos, None, [[1], [1, 1]], [4, 1], [0.0, 0.0], 1.0, generators, 0, 2)
    assert [len(c) for c in completions] == [4, 1]


def test_a_sample_does_not_depend_on_the_rest_of_its_batch(tokenizer):
    """What makes one process and torchrun train on the same samples."""
    policy, reference = tiny_llama(tokenizer, 1), tiny_llama(tokenizer, 2)
    prompts = [[1, 20, 21], [1, 5, 6, 7, 8, 9, 10], [1, 11, 12, 13, 14]]
    def sample(rows, step):
        return sample_completions(policy, reference, [prompts[i] for i in rows], [8] * len(rows), [0.25] * len(rows),
                                  1.0, row_generators(3, step, [4 + i for i in rows], 1), tokenizer.pad_token_id,
                                  tokenizer.eos_token_id)

    together = sample([0, 1, 2], step=7)
    assert sample([1], step=7) == together[1:2]
    assert sample([0, 1, 2], step=8) != together


def test_preference_model_is_symmetrised(tokenizer):
    judge = tiny_judge(tokenizer)
    args = Args()
    prompts, a, b = ["Q: 1+2\n", "Q: 7\n", "Q: 3\n"], ["1 + 2 = 3\nAnswer: 3", "Answer: 7", "Answer: 3"], \
        ["Answer: 4", "7 = 7", "Answer: 3"]
    forward, scores, swapped = preference_probabilities(judge, prompts, a, b, args)
    backward, _, _ = preference_probabilities(judge, prompts, b, a, args)
    torch.testing.assert_close(forward + backward, torch.ones(3))
    assert forward[2] == 0.5, "identical completions tie exactly"
    with torch.no_grad():
        texts = [args.preference_template.format(prompt=prompts[0], a=y, b=z) for y, z in [(a[0], b[0]), (b[0], a[0])]]
        logits = [judge[0](**tokenizer([text], return_tensors="pt")).logits[0, 0] for text in texts]
    torch.testing.assert_close(forward[0], torch.sigmoid((logits[0] - logits[1]) / 2))
    torch.testing.assert_close((scores[0], swapped[0]), (logits[0], logits[1]))


def test_reward_model_judges_through_bradley_terry(tokenizer):
    judge = tiny_judge(tokenizer, seed=6)
    args = Args(reward_model_path="a reward model")
    probabilities, rewards, opponent_rewards = preference_probabilities(judge, ["Q: 7\n"], ["Answer: 7"], ["Answer: 1"],
                                                                        args)
    with torch.no_grad():
        r = [judge[0](**tokenizer([text], return_tensors="pt")).logits[0, 0]
             for text in ("Q: 7\nAnswer: 7", "Q: 7\nAnswer: 1")]
    torch.testing.assert_close((rewards[0], opponent_rewards[0]), (r[0], r[1]))
    torch.testing.assert_close(probabilities[0], torch.sigmoid(r[0] - r[1]))


def test_verifier_judges_exactly_by_the_task_score():
    """--judge verifier: P = 1, 0 or 1/2 as grade(x, y).score beats, loses to or ties grade(x, y').score."""
    args = Args(judge="verifier")
    judge = load_judge(args, torch.float32, "cpu", ["Q: (2+3)*4\n", "Q: 7-2\n"])
    prompts = ["Q: (2+3)*4\n"] * 4 + ["Q: 7-2\n"]
    right, wrong_answer, wrong_step = "2 + 3 = 5\n5 * 4 = 20\nAnswer: 20", "2 + 3 = 5\n5 * 4 = 21\nAnswer: 21", \
        "2 + 3 = 6\n6 * 4 = 25\nAnswer: 25"
    a = [right, wrong_answer, wrong_answer, right, "7 - 2 = 5\nAnswer: 5"]
    b = [wrong_answer, right, wrong_step, "2 + 3 = 5\n5 * 4 = 20\nAnswer: 20", "garbage"]
    probabilities, scores, opponent_scores = preference_probabilities(judge, prompts, a, b, args)
    assert probabilities.tolist() == [1.0, 0.0, 1.0, 0.5, 1.0]  # 2 > 1/2; 1/2 < 2; 1/2 (a right step) > 0; a tie
    assert scores.tolist() == [2.0, 0.5, 0.5, 2.0, 2.0] and opponent_scores.tolist() == [0.5, 2.0, 0.0, 2.0, 0.0]


def test_verifier_refuses_prompts_that_are_not_task_problems():
    with pytest.raises(ValueError, match="grades the bundled arithmetic task's problems.*'Write a poem'.*--judge model"):
        load_judge(Args(judge="verifier"), torch.float32, "cpu", ["Q: 1+2\n", "Write a poem"])
    check_args(Args(judge="verifier", preference_model_path=None))  # the verifier needs no model


def test_expected_gradient_is_the_gradient_of_the_regularised_preference():
    """A softmax policy over 4 responses, y ~ π weighted exactly: E_y[∇ loss] = -∇(P(π ≻ π') - τ·KL(π‖μ)) for
    the opponent π' held fixed: the loss is an unbiased Nash-MD-PG estimate, its KL part included."""
    torch.manual_seed(0)
    theta = torch.randn(4, dtype=torch.float64, requires_grad=True)
    reference = torch.softmax(torch.randn(4, dtype=torch.float64), -1)
    preference = torch.rand(4, 4, dtype=torch.float64).triu(1)
    preference = preference + (1 - preference.T).tril(-1) + 0.5 * torch.eye(4, dtype=torch.float64)
    tau = 0.3
    policy = torch.softmax(theta, -1)
    opponent = torch.softmax(0.6 * policy.detach().log() + 0.4 * reference.log(), -1)  # a mixture, fixed
    wins = preference @ opponent  # P(y ≻ π') for each response y
    losses, _ = nash_md_loss(policy.log(), reference.log(), wins, tau)
    expected_gradient, = torch.autograd.grad((policy.detach() * losses).sum(), theta, retain_graph=True)
    objective = (policy * wins).sum() - tau * (policy * (policy / reference).log()).sum()
    objective_gradient, = torch.autograd.grad(objective, theta)
    torch.testing.assert_close(expected_gradient, -objective_gradient)


PROMPTS = [{"prompt": "Q: 1+2\n"}, {"prompt": "Q: (3*4)-5\n"}, {"prompt": "Q: 7\n"}]


def indexed_rows(examples, tokenizer, args):
    """prepare_dataset's rows with the index the main block gives each (it seeds the row's samples)."""
    rows = prepare_dataset(Dataset.from_list(examples), tokenizer, len(tokenizer), args)
    return [{**row, "index": i} for i, row in enumerate(rows)]


def test_compute_loss_plays_one_round(tokenizer):
    policy, reference = tiny_llama(tokenizer, 1), tiny_llama(tokenizer, 2)
    policy.train()
    args = Args(max_new_tokens=10, num_logged_completions=2)
    rows = indexed_rows(PROMPTS, tokenizer, args)
    loss, metrics, samples = compute_loss(policy, reference, tiny_judge(tokenizer), tokenizer, rows, 1, args,
                                          tokenizer.pad_token_id, args.mixture_coef)
    assert torch.isfinite(loss) and loss.requires_grad
    loss.backward()
    assert all(p.grad is not None for p in policy.parameters())
    assert set(metrics) == {"loss", "loss/kl", "objective/entropy", "rewards/probabilities", "rewards/win_rate",
                            "completions/length", "completions/opponent_length", "completions/clipped_ratio",
                            "completions/opponent_clipped_ratio"}
    assert 0 <= metrics["rewards/probabilities"] <= 3 and 0 <= metrics["completions/length"] <= 30
    assert [s["prompt"] for s in samples] == ["Q: 1+2\n", "Q: (3*4)-5\n"]
    assert all(0 < s["probability"] < 1 for s in samples)


def test_max_length_limits_the_completions(tokenizer):
    never_eos = FixedLogits([0.0] * 2 + [-float("inf")] + [0.0] * (len(tokenizer) - 3))
    args = Args(max_new_tokens=10, max_length=9)  # the prompts take 8, 12 and 6 tokens before truncation
    rows = indexed_rows(PROMPTS[:1] + PROMPTS[2:], tokenizer, args)
    _, metrics, _ = compute_loss(never_eos, never_eos, tiny_judge(tokenizer), tokenizer, rows, 1, args,
                                 tokenizer.pad_token_id, 0.5)
    assert metrics["completions/length"] == 1 + 3 and metrics["completions/clipped_ratio"] == 2


def test_conversational_prompts_use_the_chat_template(tokenizer):
    rows = prepare_dataset(Dataset.from_list([{"prompt": [{"role": "user", "content": "1+2"}]}]), tokenizer,
                           len(tokenizer), Args())
    plain = prepare_dataset(Dataset.from_list(PROMPTS[:1]), tokenizer, len(tokenizer), Args())
    assert rows == plain and rows[0]["prompt_text"] == "Q: 1+2\n"
    assert rows[0]["prompt_ids"][0] == tokenizer.bos_token_id and rows[0]["truncated"] is False


def test_a_missing_prompt_value_names_its_row(tokenizer):
    with pytest.raises(ValueError, match=r"the train split, row 1: column 'prompt' holds None \(NoneType\)"):
        prepare_dataset(Dataset.from_list([{"prompt": "Q: 1\n"}, {"prompt": None}]), tokenizer, len(tokenizer), Args(),
                        "the train split")


def test_missing_prompt_column_is_named(tokenizer):
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['prompt'\]: it has \['question'\].*nash_md.py "
                                         r"needs \['prompt'\].*rename the columns"):
        prepare_dataset(Dataset.from_list([{"question": "Q: 1\n"}]), tokenizer, len(tokenizer), Args())


def test_empty_dataset_is_an_error(tokenizer):
    with pytest.raises(ValueError, match="the train split has no rows"):
        prepare_dataset(Dataset.from_dict({"prompt": []}), tokenizer, len(tokenizer), Args(), "the train split")


def test_a_prompt_that_leaves_no_room_is_an_error(tokenizer):
    with pytest.raises(ValueError, match=r"row 1: the prompt takes 12 tokens.*no room.*--max-prompt-length"):
        prepare_dataset(Dataset.from_list(PROMPTS), tokenizer, len(tokenizer),
                        Args(max_length=12, max_prompt_length=12))


def test_a_long_prompt_keeps_its_end_and_its_bos(tokenizer):
    rows = prepare_dataset(Dataset.from_list(PROMPTS[1:2]), tokenizer, len(tokenizer), Args(max_prompt_length=5))
    full = prepare_dataset(Dataset.from_list(PROMPTS[1:2]), tokenizer, len(tokenizer), Args())
    assert rows[0]["truncated"] and rows[0]["prompt_ids"] == full[0]["prompt_ids"][:1] + full[0]["prompt_ids"][-4:]
    assert rows[0]["prompt_text"] == PROMPTS[1]["prompt"], "the judge reads the whole prompt"


@pytest.mark.parametrize("overrides,message", [
    ({"mixture_coef": 1.5}, r"--mixture-coef 1.5: must be in \[0, 1\]"),
    ({"mixture_coef": -0.1}, r"--mixture-coef -0.1: must be in \[0, 1\]"),
    ({"temperature": 0.0}, r"--temperature 0.0: must be > 0"),
    ({"tau": -1.0}, r"--tau -1.0: must be >= 0"),
    ({"max_new_tokens": 0}, r"--max-new-tokens 0: must be >= 1"),
    ({"num_logged_completions": -1}, r"--num-logged-completions -1: must be >= 0"),
    ({"preference_model_path": None}, r"--preference-model-path None: must be .*--reward-model-path.*no judge"),
    ({"preference_template": "{prompt}{a}"}, r"--preference-template \{prompt\}\{a\}: must be a text with"),
])
def test_bad_arguments_are_errors(overrides, message):
    """Nash-MD's own flags go through the shared check_args (algorithm_checks), before anything loads."""
    with pytest.raises(ValueError, match=message):
        check_args(Args(**overrides))


def test_good_arguments_pass():
    check_args(Args(tau=0.0, mixture_coef=1.0, num_logged_completions=0))  # no KL term, the reference as opponent
    check_args(Args(preference_model_path=None, reward_model_path="org/reward", preference_template="unused"))


def test_a_tokenizer_without_eos_is_an_error(tokenizer):
    check_tokenizer(tokenizer)
    with pytest.raises(ValueError, match="no EOS token"):
        check_tokenizer(SimpleNamespace(eos_token_id=None))


def test_judges_that_cannot_score_are_errors(tokenizer, tmp_path):
    two_outputs = tmp_path / "two_outputs"
    LlamaForSequenceClassification(llama_config(tokenizer, num_labels=2)).save_pretrained(two_outputs)
    tokenizer.save_pretrained(two_outputs)
    with pytest.raises(ValueError, match="has 2 outputs; it needs one"):
        load_judge(Args(preference_model_path=str(two_outputs)), torch.float32, "cpu", [])
    no_pad = tmp_path / "no_pad"
    LlamaForSequenceClassification(llama_config(tokenizer, num_labels=1)).save_pretrained(no_pad)
    backend = Tokenizer(models.BPE(vocab={"<unk>": 0, "a": 1}, merges=[], unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>").save_pretrained(no_pad)
    with pytest.raises(ValueError, match="has no pad token.*set its tokenizer's pad_token"):
        load_judge(Args(reward_model_path=str(no_pad)), torch.float32, "cpu", [])
    good = tmp_path / "good"
    config = llama_config(tokenizer, num_labels=1)
    config.pad_token_id = None  # the tokenizer's pad token is enough
    LlamaForSequenceClassification(config).save_pretrained(good)
    tokenizer.save_pretrained(good)
    args = Args(preference_model_path=str(two_outputs), reward_model_path=str(good))
    model, _ = load_judge(args, torch.float32, "cpu", [])
    assert model.config.num_labels == 1 and not model.training, "a reward model, when given, is the judge"
    assert model.config.pad_token_id == tokenizer.pad_token_id
