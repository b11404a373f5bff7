"""Independent float64 reference for algos/cpl.py, and the cases and run that pin it.

Written from the paper's conservative CPL(λ) objective (Hejna et al. 2023) in its softmax form, one pair at a
time with `math`, never calling the script. A segment's score is A(σ) = Σ_t γ^t·α·log π(a_t|s_t) over its
tokens (t from 0 at the first completion token); for yw ≻ yl and λ the conservative bias:
    loss = -log [ e^{A(yw)} / (e^{A(yw)} + e^{λ·A(yl)}) ] - bc·mean_t log π(yw_t | ...)
         = logsumexp(A(yw), λ·A(yl)) - A(yw) - bc·mean_t log π(yw_t | ...)
The script's loss takes the discounted sums Σ_t γ^t log π (its batch_logps applies γ), so the pinned
function gets those, and `segment_score` below is the literal discounted sum for the tests of batch_logps.
Gradients by hand: with p = e^{A(yw)} / (e^{A(yw)} + e^{λ·A(yl)}) the softmax weight of the preferred segment,
d loss / d A(yw) = p - 1 and d loss / d (λ·A(yl)) = 1 - p; so d/d chosen = α·(p - 1), d/d rejected = α·λ·(1 - p),
d/d chosen_mean = -bc.

`python -m tests.golden cpl --write` turns LOSSES and RUN into tests/golden/cpl.*.json.
"""

import math
import random


def segment_score(token_logps: list[float], alpha: float, discount: float) -> float:
    """A(σ) = Σ_t γ^t·α·log π(a_t|s_t), t = 0, 1, ... over the segment's tokens."""
    return math.fsum(discount**t * alpha * logp for t, logp in enumerate(token_logps))


def logsumexp2(a: float, b: float) -> float:
    top = max(a, b)
    return top + math.log(math.exp(a - top) + math.exp(b - top))


def cpl_loss(policy_chosen_logps, policy_rejected_logps, policy_chosen_mean_logps, alpha, conservative_bias=1.0,
             bc_coef=0.0):
    """Per-pair losses and scores (inputs: discounted log-prob sums and the chosen per-token mean), and the
    gradient of the summed losses with respect to each input."""
    out = {"losses": [], "chosen_scores": [], "rejected_scores": []}
    grads = {"policy_chosen_logps": [], "policy_rejected_logps": [], "policy_chosen_mean_logps": []}
    for chosen, rejected, chosen_mean in zip(policy_chosen_logps, policy_rejected_logps, policy_chosen_mean_logps):
        preferred, dispreferred = alpha * chosen, conservative_bias * (alpha * rejected)
        normaliser = logsumexp2(preferred, dispreferred)
        out["losses"].append(normaliser - preferred - bc_coef * chosen_mean)
        out["chosen_scores"].append(alpha * chosen)
        out["rejected_scores"].append(alpha * rejected)
        p = math.exp(preferred - normaliser)
        q = math.exp(dispreferred - normaliser)  # 1 - p, without the cancellation when p -> 1
        grads["policy_chosen_logps"].append(-alpha * q)
        grads["policy_rejected_logps"].append(alpha * conservative_bias * q)
        grads["policy_chosen_mean_logps"].append(-bc_coef)
        assert math.isclose(p + q, 1.0, rel_tol=1e-12)
    return out, grads


def _pairs(chosen, rejected, chosen_mean):
    return {"policy_chosen_logps": chosen, "policy_rejected_logps": rejected, "policy_chosen_mean_logps": chosen_mean}


def _random_pairs(seed: int, n: int) -> dict:
    """Completion log-prob sums of realistic size (-80 .. -2) and per-token means (-3 .. -0.05)."""
    rng = random.Random(seed)
    sums = [[round(rng.uniform(-80, -2), 6) for _ in range(n)] for _ in range(2)]
    return _pairs(sums[0], sums[1], [round(rng.uniform(-3, -0.05), 6) for _ in range(n)])


LN2 = math.log(2)
LN3 = math.log(3)

CASES = [
    {"name": "random_official_cpl", "note": "the official CPL config: α = 0.1, λ = 0.5, no BC",
     "inputs": _random_pairs(20, 8), "hyperparameters": {"alpha": 0.1, "conservative_bias": 0.5}},
    {"name": "random_official_cpl_bc", "note": "the official CPL-BC config: α = 0.1, λ = 1, bc 1",
     "inputs": _random_pairs(21, 8), "hyperparameters": {"alpha": 0.1, "conservative_bias": 1.0, "bc_coef": 1.0}},
    {"name": "random_mixed", "inputs": _random_pairs(22, 8),
     "hyperparameters": {"alpha": 0.5, "conservative_bias": 0.75, "bc_coef": 0.3}},
    {"name": "lambda1_is_logistic_on_alpha_difference", "note": "λ = 1 (γ = 1: plain sums): -log σ(α·(logp(yw) - "
     "logp(yl))); α·Δ = 0, ln 3, -ln 3 give ln 2, ln(4/3), ln 4, and d/d chosen = -α·σ(-α·Δ)",
     "inputs": _pairs([-12.0, -7.0, -7.0 - 10 * LN3], [-12.0, -7.0 - 10 * LN3, -7.0], [-1.0, -1.0, -1.0]),
     "hyperparameters": {"alpha": 0.1, "conservative_bias": 1.0},
     "hand": {"losses": [LN2, math.log(4 / 3), math.log(4)], "chosen_scores": [-1.2, -0.7, -0.7 - LN3],
              "grad_policy_chosen_logps": [-0.05, -0.025, -0.075], "grad_policy_rejected_logps": [0.05, 0.025, 0.075],
              "grad_policy_chosen_mean_logps": [0.0, 0.0, 0.0]}},
    {"name": "conservative_bias_on_equal_segments", "note": "logp(yw) = logp(yl) = -20, α = 0.1, λ = 1/2: A = -2 on "
     "both, yet A(yw) - λ·A(yl) = -1, so loss log(1 + e), not ln 2; d/d chosen = -α·σ(1), d/d rejected = α·λ·σ(1)",
     "inputs": _pairs([-20.0], [-20.0], [-2.0]), "hyperparameters": {"alpha": 0.1, "conservative_bias": 0.5},
     "hand": {"losses": [math.log1p(math.e)], "chosen_scores": [-2.0], "rejected_scores": [-2.0],
              "grad_policy_chosen_logps": [-0.1 * math.e / (1 + math.e)],
              "grad_policy_rejected_logps": [0.05 * math.e / (1 + math.e)]}},
    {"name": "bc_term_adds_the_chosen_mean_nll", "note": "A(yw) = A(yl) = 0 (certain completions) with λ = 1/2: "
     "ln 2 + bc·0.5; d/d chosen_mean = -bc",
     "inputs": _pairs([0.0], [0.0], [-0.5]), "hyperparameters": {"alpha": 1.0, "conservative_bias": 0.5, "bc_coef": 2.0},
     "hand": {"losses": [LN2 + 1.0], "grad_policy_chosen_mean_logps": [-2.0], "grad_policy_chosen_logps": [-0.5]}},
    {"name": "huge_scores", "note": "A(yw) - λ·A(yl) = ±1000: loss 0 or 1000 exactly, never inf or NaN",
     "inputs": _pairs([0.0, -10000.0], [-20000.0, 0.0], [-0.1, -5.0]),
     "hyperparameters": {"alpha": 0.1, "conservative_bias": 0.5},
     "hand": {"losses": [0.0, 1000.0], "grad_policy_chosen_logps": [0.0, -0.1], "grad_policy_rejected_logps": [0.0, 0.05]}},
]

# cpl_loss has no default for bc_coef: a case that does not set it tests plain CPL.
for case in CASES:
    case.setdefault("hyperparameters", {}).setdefault("bc_coef", 0.0)

LOSSES = {
    "cpl_loss": {
        "reference": cpl_loss,
        "outputs": ["losses", "chosen_scores", "rejected_scores"],
        "cases": CASES,
    },
}

# The end-to-end golden: a few steps on the bundled pairs. One process with 2 accumulated micro-batches of 4
# pairs, and torchrun with 2 processes of 4 pairs each: the same global batch of 8, the same pairs. A learning
# rate larger than the default so that 4 steps move every metric well above float noise; γ < 1 and the BC term
# on, so that the run pins the discounting and the BC gradient too.
RUN = {
    "script": "algos/cpl.py",
    "args": ["--max-steps", "4", "--per-device-train-batch-size", "4", "--gradient-accumulation-steps", "2",
             "--learning-rate", "1e-4", "--warmup-ratio", "0", "--logging-steps", "1", "--eval-steps", "2",
             "--alpha", "0.1", "--conservative-bias", "0.5", "--discount", "0.98", "--bc-coef", "0.5"],
    "torchrun_args": ["--max-steps", "4", "--per-device-train-batch-size", "4", "--gradient-accumulation-steps",
                      "1", "--learning-rate", "1e-4", "--warmup-ratio", "0", "--logging-steps", "1", "--eval-steps",
                      "2", "--alpha", "0.1", "--conservative-bias", "0.5", "--discount", "0.98", "--bc-coef", "0.5"],
}
