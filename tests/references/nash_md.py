"""Independent float64 reference for algos/nash_md.py, and the cases and run that pin it.

Written from the paper's equations (Munos et al. 2023, arXiv:2312.00886), one element at a time with
`math`, never calling the script:
- the Nash-MD-PG loss of a sampled completion y ~ π against y' ~ mixture, whose gradient with respect to
  logp(y) is the paper's estimate -(P(y ≻ y') - 1/2 - τ·log π(y)/π_ref(y)):
      loss = -(P - 1/2)·logp + (τ/2)·(logp - ref)²          kl = logp - ref
  gradients by hand: d/dlogp = -(P - 1/2) + τ·(logp - ref), d/dref = -τ·(logp - ref), d/dP = -logp;
- the tabular Nash-MD step (section 5 of the paper):
      π^μ(y) ∝ π(y)^(1-ητ)·μ(y)^(ητ)        π'(y) ∝ π^μ(y)·exp(η·Σ_y' P(y ≻ y')·π^μ(y'))
  (its outputs are probability vectors and its use is the update itself, so no gradients are pinned);
- the token-level geometric mixture of two next-token distributions at temperature T:
      log π^β = log_softmax(((1 - β)·log_softmax(a) + β·log_softmax(b)) / T)      (no gradients pinned).

`python -m tests.golden nash_md --write` turns LOSSES and RUN into tests/golden/nash_md.*.json.
"""

import math
import random


def log_normalise(logits: list[float]) -> list[float]:
    """log softmax of a list, shifted by its maximum (entries of -inf stay -inf)."""
    top = max(logits)
    total = math.fsum(math.exp(v - top) for v in logits if v != -math.inf)
    return [v - top - math.log(total) if v != -math.inf else -math.inf for v in logits]


def weighted_log(weight: float, probability: float) -> float:
    """weight·log(probability) with 0·log 0 = 0 (a zero weight ignores the probability)."""
    if weight == 0:
        return 0.0
    return weight * math.log(probability) if probability > 0 else -math.inf


def nash_md_loss(policy_logps, reference_logps, probabilities, tau):
    """Per-completion losses and KL estimates, and the gradient of the summed losses with respect to each input."""
    out = {"losses": [], "kl": []}
    grads = {"policy_logps": [], "reference_logps": [], "probabilities": []}
    for logp, ref, p in zip(policy_logps, reference_logps, probabilities):
        out["losses"].append(-(p - 0.5) * logp + tau / 2 * (logp - ref) ** 2)
        out["kl"].append(logp - ref)
        grads["policy_logps"].append(-(p - 0.5) + tau * (logp - ref))
        grads["reference_logps"].append(-tau * (logp - ref))
        grads["probabilities"].append(-logp)
    return out, grads


def nash_md_tabular_step(policy, reference, preference, eta, tau):
    """The next policy and the mixture it played against."""
    weight = eta * tau
    log_mixture = log_normalise([weighted_log(1 - weight, p) + weighted_log(weight, m)
                                 for p, m in zip(policy, reference)])
    mixture = [math.exp(v) for v in log_mixture]
    wins = [math.fsum(preference[i][j] * mixture[j] for j in range(len(mixture))) for i in range(len(mixture))]
    log_next = log_normalise([v + eta * w if v != -math.inf else -math.inf for v, w in zip(log_mixture, wins)])
    return {"next_policy": [math.exp(v) for v in log_next], "mixture": mixture}, {}


def geometric_mixture(policy_logits, reference_logits, mixture_coef, temperature=1.0):
    """The mixed next-token log-probs of one position."""
    log_a, log_b = log_normalise(policy_logits), log_normalise(reference_logits)
    mixed = [((1 - mixture_coef) * x + mixture_coef * y) / temperature for x, y in zip(log_a, log_b)]
    return {"logps": log_normalise(mixed)}, {}


def _random_completions(seed: int, n: int, spread: float) -> dict:
    """Sequence log-probs of realistic size (-80 .. -2), the policy within ±spread of the reference, and
    preference probabilities anywhere in (0, 1)."""
    rng = random.Random(seed)
    reference = [round(rng.uniform(-80, -2), 6) for _ in range(n)]
    return {"policy_logps": [round(r + rng.uniform(-spread, spread), 6) for r in reference],
            "reference_logps": reference, "probabilities": [round(rng.uniform(0, 1), 6) for _ in range(n)]}


def _completions(policy, reference, probabilities):
    return {"policy_logps": policy, "reference_logps": reference, "probabilities": probabilities}


LOSS_CASES = [
    {"name": "random_tau0.1", "inputs": _random_completions(0, 8, 5.0), "hyperparameters": {"tau": 0.1}},
    {"name": "random_tau0.01", "inputs": _random_completions(1, 8, 5.0), "hyperparameters": {"tau": 0.01}},
    {"name": "random_far_from_reference", "inputs": _random_completions(2, 8, 60.0), "hyperparameters": {"tau": 0.5}},
    {"name": "tie_at_the_reference", "note": "P = 1/2 and policy = reference: loss 0, gradient 0",
     "inputs": _completions([-12.5, -3.0], [-12.5, -3.0], [0.5, 0.5]), "hyperparameters": {"tau": 0.3},
     "hand": {"losses": [0.0, 0.0], "kl": [0.0, 0.0], "grad_policy_logps": [0.0, 0.0]}},
    {"name": "sure_win_and_sure_loss",
     "note": "P = 1: loss -logp/2 + τ/2, gradient -1/2 + τ; P = 0 at the reference: logp/2, +1/2",
     "inputs": _completions([-2.0, -2.0], [-3.0, -2.0], [1.0, 0.0]), "hyperparameters": {"tau": 0.1},
     "hand": {"losses": [1.05, -1.0], "kl": [1.0, 0.0], "grad_policy_logps": [-0.4, 0.5],
              "grad_reference_logps": [-0.1, 0.0], "grad_probabilities": [2.0, 2.0]}},
    {"name": "no_regularisation", "note": "τ = 0: plain REINFORCE with baseline 1/2, gradient -(P - 1/2)",
     "inputs": _completions([-10.0, -4.0], [-30.0, -1.0], [0.75, 0.25]), "hyperparameters": {"tau": 0.0},
     "hand": {"losses": [2.5, -1.0], "grad_policy_logps": [-0.25, 0.25], "grad_reference_logps": [0.0, 0.0]}},
    {"name": "kl_dominates", "note": "log-ratio 50 with τ = 0.1: the KL term (125) outweighs any preference",
     "inputs": _completions([-10.0], [-60.0], [1.0]), "hyperparameters": {"tau": 0.1},
     "hand": {"losses": [130.0], "kl": [50.0], "grad_policy_logps": [4.5]}},
]

RPS = [[0.5, 0.0, 1.0], [1.0, 0.5, 0.0], [0.0, 1.0, 0.5]]  # rock, paper, scissors: P(row ≻ column)
THIRD = 1 / 3


def _random_preference(seed: int, k: int) -> list[list[float]]:
    """A random preference matrix: P(i ≻ j) + P(j ≻ i) = 1, P(i ≻ i) = 1/2, generally non-transitive."""
    rng = random.Random(seed)
    matrix = [[0.5] * k for _ in range(k)]
    for i in range(k):
        for j in range(i + 1, k):
            matrix[i][j] = round(rng.uniform(0, 1), 6)
            matrix[j][i] = 1 - matrix[i][j]
    return matrix


def _random_distribution(seed: int, k: int) -> list[float]:
    rng = random.Random(seed)
    weights = [rng.uniform(0.1, 1) for _ in range(k)]
    return [w / math.fsum(weights) for w in weights]


_E = [0.4 * math.exp(0.6), 0.2 * math.exp(0.5), 0.4 * math.exp(0.4)]
_F = [0.5 * math.exp(1.0), 0.25 * math.exp(1.25), 0.25 * math.exp(0.75)]
_G = [math.exp(0.25), math.exp(0.75)]

TABULAR_CASES = [
    {"name": "rps_half_mixture",
     "note": "π = (4/9, 1/9, 4/9), μ uniform, ητ = 1/2: π^μ ∝ √π ∝ (2, 1, 2) = (0.4, 0.2, 0.4); P(y ≻ π^μ) = "
             "(0.6, 0.5, 0.4); with η = 1, π' ∝ (0.4e^0.6, 0.2e^0.5, 0.4e^0.4)",
     "inputs": {"policy": [4 / 9, 1 / 9, 4 / 9], "reference": [THIRD] * 3, "preference": RPS},
     "hyperparameters": {"eta": 1.0, "tau": 0.5},
     "hand": {"mixture": [0.4, 0.2, 0.4], "next_policy": [v / math.fsum(_E) for v in _E]}},
    {"name": "full_mixture_plays_the_reference",
     "note": "ητ = 1: π^μ = μ = (1/2, 1/4, 1/4) whatever π (here a point mass); P(y ≻ μ) = (1/2, 5/8, 3/8), "
             "η = 2: π' ∝ μ·exp(2·P(y ≻ μ))",
     "inputs": {"policy": [1.0, 0.0, 0.0], "reference": [0.5, 0.25, 0.25], "preference": RPS},
     "hyperparameters": {"eta": 2.0, "tau": 0.5},
     "hand": {"mixture": [0.5, 0.25, 0.25], "next_policy": [v / math.fsum(_F) for v in _F]}},
    {"name": "uniform_is_a_fixed_point_of_rps",
     "note": "π = μ uniform: every response wins 1/2 against the uniform mixture, so π' = π",
     "inputs": {"policy": [THIRD] * 3, "reference": [THIRD] * 3, "preference": RPS},
     "hyperparameters": {"eta": 0.7, "tau": 0.3}, "hand": {"mixture": [THIRD] * 3, "next_policy": [THIRD] * 3}},
    {"name": "unregularised_step",
     "note": "τ = 0: π^μ = π = (1/2, 1/2, 0); P(y ≻ π) = (1/4, 3/4, 1/2); η = 1: π' ∝ (e^0.25, e^0.75, 0), "
             "and the zero stays zero",
     "inputs": {"policy": [0.5, 0.5, 0.0], "reference": [THIRD] * 3, "preference": RPS},
     "hyperparameters": {"eta": 1.0, "tau": 0.0},
     "hand": {"mixture": [0.5, 0.5, 0.0], "next_policy": [_G[0] / sum(_G), _G[1] / sum(_G), 0.0]}},
    {"name": "random_non_transitive",
     "inputs": {"policy": _random_distribution(3, 5), "reference": _random_distribution(4, 5),
                "preference": _random_preference(5, 5)},
     "hyperparameters": {"eta": 0.3, "tau": 0.7}},
]

_LN = math.log
MIXTURE_CASES = [  # one position's (V,) logits: the function takes any leading shape
    {"name": "geometric_mean_of_two_distributions",
     "note": "(1/2, 1/2) and (1/5, 4/5) at β = 1/2: ∝ (√(1/10), √(4/10)) ∝ (1/3, 2/3)",
     "inputs": {"policy_logits": [3.0, 3.0], "reference_logits": [_LN(2), _LN(8)]},
     "hyperparameters": {"mixture_coef": 0.5, "temperature": 1.0}, "hand": {"logps": [_LN(1 / 3), _LN(2 / 3)]}},
    {"name": "geometric_mean_at_half_temperature", "note": "the same at T = 1/2: (1/3, 2/3) squared ∝ (1/5, 4/5)",
     "inputs": {"policy_logits": [0.0, 0.0], "reference_logits": [_LN(0.2), _LN(0.8)]},
     "hyperparameters": {"mixture_coef": 0.5, "temperature": 0.5}, "hand": {"logps": [_LN(0.2), _LN(0.8)]}},
    {"name": "beta0_is_the_policy", "note": "β = 0, T = 1: log_softmax(1, 2, 3)",
     "inputs": {"policy_logits": [1.0, 2.0, 3.0], "reference_logits": [-5.0, 0.0, 9.0]},
     "hyperparameters": {"mixture_coef": 0.0, "temperature": 1.0},
     "hand": {"logps": [v - _LN(math.exp(1) + math.exp(2) + math.exp(3)) for v in (1.0, 2.0, 3.0)]}},
    {"name": "beta1_is_the_reference_at_temperature", "note": "β = 1, T = 2: log_softmax((-5, 0, 9) / 2)",
     "inputs": {"policy_logits": [1.0, 2.0, 3.0], "reference_logits": [-5.0, 0.0, 9.0]},
     "hyperparameters": {"mixture_coef": 1.0, "temperature": 2.0},
     "hand": {"logps": [v - _LN(math.exp(-2.5) + 1 + math.exp(4.5)) for v in (-2.5, 0.0, 4.5)]}},
    {"name": "random_beta0.125_temperature0.7",
     "inputs": {"policy_logits": [round(random.Random(6).gauss(0, 3), 6) for _ in range(8)],
                "reference_logits": [round(random.Random(7).gauss(0, 3), 6) for _ in range(8)]},
     "hyperparameters": {"mixture_coef": 0.125, "temperature": 0.7}},
    {"name": "huge_logits",
     "note": "logits ±1000 at β = 1/4: mixed log-probs (-500, -750, -1750) -> (0, -250, -1250), no overflow",
     "inputs": {"policy_logits": [1000.0, 0.0, -1000.0], "reference_logits": [-1000.0, 1000.0, 0.0]},
     "hyperparameters": {"mixture_coef": 0.25, "temperature": 1.0}, "hand": {"logps": [0.0, -250.0, -1250.0]}},
]

LOSSES = {
    "nash_md_loss": {"reference": nash_md_loss, "outputs": ["losses", "kl"], "cases": LOSS_CASES},
    "nash_md_tabular_step": {"reference": nash_md_tabular_step, "outputs": ["next_policy", "mixture"],
                             "cases": TABULAR_CASES},
    "geometric_mixture": {"reference": geometric_mixture, "outputs": ["logps"], "cases": MIXTURE_CASES},
}

# The end-to-end golden: a few steps on the bundled task. One process with 2 accumulated micro-batches of 2
# prompts, and torchrun with 2 processes of 2 prompts each: the same global batch of 4, the same samples (each
# completion's noise comes from its own generator). Short completions (16 tokens) keep the sampling, and the
# evaluation on the 300 test prompts, to a few seconds; a learning rate larger than the default so that 3 steps
# move every metric well above float noise.
RUN = {
    "script": "algos/nash_md.py",
    "args": ["--max-steps", "3", "--per-device-train-batch-size", "2", "--gradient-accumulation-steps", "2",
             "--max-new-tokens", "16", "--learning-rate", "1e-4", "--warmup-ratio", "0", "--logging-steps", "1",
             "--eval-steps", "3", "--tau", "0.1", "--mixture-coef", "0.25"],
    "torchrun_args": ["--max-steps", "3", "--per-device-train-batch-size", "2", "--gradient-accumulation-steps", "1",
                      "--max-new-tokens", "16", "--learning-rate", "1e-4", "--warmup-ratio", "0", "--logging-steps",
                      "1", "--eval-steps", "3", "--tau", "0.1", "--mixture-coef", "0.25"],
}
