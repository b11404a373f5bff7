"""Independent float64 reference for algos/orpo.py, and the cases and run that pin it.

Written from the paper's equations (Hong et al. 2024, eqs. 3-7), one pair at a time with `math`, never calling the
script. With a(y) = logp(y)/max(|y|, 1) the mean token log-prob (eq. 3's log P(y|x)) and P = e^a:
    r(y)   = log odds(y) = log P - log(1 - P) = a - log(1 - e^a)          (eq. 4), a capped at -1e-30
    loss_i = -a(yw) - λ·log σ(r(yw) - r(yl))                                (eq. 6: L_SFT + λ·L_OR, eq. 7)
L_SFT is the chosen completion's NLL per token (eq. 1, m the completion's length), one pair at a time. log(1 - e^a)
is computed here as log1p(-e^a) below a = -ln 2 and as log(-expm1(a)) above (Mächler 2012), the script uses the
second form throughout: both are exact where P nears 1, where log(1 - exp(a)) in float32 is -inf. The cap at a =
-1e-30 (r <= 69.08) keeps P = 1 (an empty completion, float32 log-probs that round to 0) finite; the central
differences of the golden harness cannot cross it, so tests/test_orpo.py tests it.
The gradient is derived by hand: dr/da = 1/(1 - P) (0 where the cap holds), d loss/dz = -λ·σ(-z) for
z = r(yw) - r(yl), so d loss/d a(yw) = -1 - λ·σ(-z)/(1 - P(yw)) and d loss/d a(yl) = +λ·σ(-z)/(1 - P(yl)); a moves
with 1/max(|y|, 1) per unit of the summed log-prob. The lengths are integers and carry no gradient.

`python -m tests.golden orpo --write` turns LOSSES and RUN into tests/golden/orpo.*.json.
"""

import math
import random

CAP = -1e-30  # the largest mean log-prob the log odds take


def log_sigmoid(x: float) -> float:
    """log σ(x) without overflow: -log(1 + e^-x) for x >= 0, x - log(1 + e^x) below."""
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def log1mexp(a: float) -> float:
    """log(1 - e^a) for a < 0, accurate for every a (Mächler 2012)."""
    return math.log1p(-math.exp(a)) if a < -math.log(2) else math.log(-math.expm1(a))


def orpo_loss(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths, orpo_lambda):
    """Per-pair losses and log odds, and the gradient of the summed losses with respect to each float input."""
    out = {"losses": [], "chosen_rewards": [], "rejected_rewards": []}
    grads = {"policy_chosen_logps": [], "policy_rejected_logps": []}
    for pc, pr, lc, lr in zip(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths):
        a_w, a_l = pc / max(lc, 1), pr / max(lr, 1)
        r_w, r_l = (min(a, CAP) - log1mexp(min(a, CAP)) for a in (a_w, a_l))
        z = r_w - r_l
        out["losses"].append(-a_w - orpo_lambda * log_sigmoid(z))
        out["chosen_rewards"].append(r_w)
        out["rejected_rewards"].append(r_l)
        dr_w, dr_l = (0.0 if a >= CAP else 1 / -math.expm1(a) for a in (a_w, a_l))  # 1/(1 - P)
        dz = -orpo_lambda * sigmoid(-z)
        grads["policy_chosen_logps"].append((-1 + dz * dr_w) / max(lc, 1))
        grads["policy_rejected_logps"].append(-dz * dr_l / max(lr, 1))
    return out, grads


def _pairs(policy_chosen, policy_rejected, chosen_lengths, rejected_lengths):
    return {"policy_chosen_logps": policy_chosen, "policy_rejected_logps": policy_rejected,
            "chosen_lengths": chosen_lengths, "rejected_lengths": rejected_lengths}


def _random_pairs(seed: int, n: int, low: float = -80.0, high: float = -0.5) -> dict:
    """Sequence log-probs of realistic size for 5 .. 60 tokens: mean token log-probs from about -16 to -0.01 (the
    bundled task's own samples have a ≈ -0.04 under the base model: P ≈ 0.96)."""
    rng = random.Random(seed)
    logps = [[round(rng.uniform(low, high), 6) for _ in range(n)] for _ in range(2)]
    lengths = [[rng.randint(5, 60) for _ in range(n)] for _ in range(2)]
    return _pairs(logps[0], logps[1], lengths[0], lengths[1])


LN2 = 0.6931471805599453
LN3 = 1.0986122886681098
E = math.e

# Each case: inputs (the tensor arguments, as lists), hyperparameters (the other arguments), and for the
# hand-computed ones `hand`: values worked out on paper, which the reference must reproduce too.
CASES = [
    {"name": "random_lambda0.25", "note": "the paper's λ for Phi-2", "inputs": _random_pairs(0, 8),
     "hyperparameters": {"orpo_lambda": 0.25}},
    {"name": "random_lambda1", "inputs": _random_pairs(1, 8), "hyperparameters": {"orpo_lambda": 1.0}},
    {"name": "random_likely_completions_lambda0.1", "note": "P from 0.85 to 0.999, as on the bundled task: the "
     "1/(1 - P) in the gradient is 7 to 1000", "inputs": _random_pairs(2, 8, low=-8.0, high=-0.03),
     "hyperparameters": {"orpo_lambda": 0.1}},
    {"name": "lambda_zero_is_the_nll_per_token", "note": "λ = 0: -logp(yw)/|yw| (sft.py's loss), pair by pair",
     "inputs": _pairs([-6.0, -1.5], [-2.0, -9.0], [3, 5], [4, 2]), "hyperparameters": {"orpo_lambda": 0.0},
     "hand": {"losses": [2.0, 0.3], "grad_policy_chosen_logps": [-1 / 3, -0.2],
              "grad_policy_rejected_logps": [0.0, 0.0]}},
    {"name": "equal_means_is_ln2", "note": "a = -1 on both sides: z = 0, loss 1 + λ·ln 2; 1/(1 - P) = e/(e - 1), "
     "d/d chosen = (-1 - λ/2·e/(e - 1))/2, d/d rejected = (λ/2·e/(e - 1))/3",
     "inputs": _pairs([-2.0], [-3.0], [2], [3]), "hyperparameters": {"orpo_lambda": 0.5},
     "hand": {"losses": [1 + 0.5 * LN2], "grad_policy_chosen_logps": [(-1 - 0.25 * E / (E - 1)) / 2],
              "grad_policy_rejected_logps": [0.25 * E / (E - 1) / 3]}},
    {"name": "odds_by_hand", "note": "P(yw) = 1/2 (odds 1, r = 0), P(yl) = 1/3 (odds 1/2, r = -ln 2): z = ln 2, "
     "σ(-z) = 1/3, loss ln 2 + λ·ln(3/2); d/d a(yw) = -1 - λ·(1/3)/(1/2), d/d a(yl) = λ·(1/3)/(2/3)",
     "inputs": _pairs([-4 * LN2], [-3 * LN3], [4], [3]), "hyperparameters": {"orpo_lambda": 1.0},
     "hand": {"losses": [LN2 + math.log(1.5)], "chosen_rewards": [0.0], "rejected_rewards": [-LN2],
              "grad_policy_chosen_logps": [-5 / 12], "grad_policy_rejected_logps": [1 / 6]}},
    {"name": "near_certain_completions", "note": "a = -2e-8, -1e-6, -3e-6, -1e-8 (P within 3e-6 of 1, long "
     "completions): r = a - log(-a) to first order, 17.7, 13.8, 12.7, 18.4; in float32 log(1 - exp(a)) is -inf for "
     "the first and last (exp rounds to 1), log(-expm1(a)) is exact",
     "inputs": _pairs([-2e-3, -1e-3], [-3e-3, -1e-3], [100000, 1000], [1000, 100000]),
     "hyperparameters": {"orpo_lambda": 0.2}},
    {"name": "huge_margins", "note": "z ≈ ±57: the odds-ratio term is about 0, or λ·57 with gradient λ/(1 - P)",
     "inputs": _pairs([-1e-3, -100.0], [-100.0, -1e-3], [1, 2], [2, 1]), "hyperparameters": {"orpo_lambda": 0.5}},
]

LOSSES = {
    "orpo_loss": {
        "reference": orpo_loss,
        "outputs": ["losses", "chosen_rewards", "rejected_rewards"],
        "cases": CASES,
    },
}

# The end-to-end golden: a few steps on the bundled task. One process with 2 accumulated micro-batches
# of 2 pairs, and torchrun with 2 processes of 2 pairs each: the same global batch of 4, the same pairs.
# A learning rate larger than the default so that 4 steps move every metric well above float noise.
RUN = {
    "script": "algos/orpo.py",
    "args": ["--max-steps", "4", "--per-device-train-batch-size", "2", "--gradient-accumulation-steps", "2",
             "--learning-rate", "1e-4", "--warmup-ratio", "0", "--logging-steps", "1", "--eval-steps", "2",
             "--orpo-lambda", "0.5"],
    "torchrun_args": ["--max-steps", "4", "--per-device-train-batch-size", "2", "--gradient-accumulation-steps", "1",
                      "--learning-rate", "1e-4", "--warmup-ratio", "0", "--logging-steps", "1", "--eval-steps", "2",
                      "--orpo-lambda", "0.5"],
}
