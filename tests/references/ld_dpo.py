"""Independent float64 reference for algos/ld_dpo.py, and the cases and run that pin it.

Written from the paper's equations (Liu et al. 2024), one completion and one pair at a time with `math`, never calling
the script. First the desensitized log-prob of each completion of a pair (x, yw, yl), with lp = min(|yw|, |yl|):
    ld(y) = Σ_{t=1..lp} log π(y_t | x, y_<t) + α·Σ_{t=lp+1..|y|} log π(y_t | x, y_<t)
(only the longer completion has tokens after lp; α = 1 gives the plain sum, α = 0 cuts it at lp). Its gradient with
respect to each token's log-prob is its weight, 1 or α. Then DPO's loss on these log-probs, policy and reference alike:
    h    = (ld(yw) - ldref(yw)) - (ld(yl) - ldref(yl))
    loss = -(1 - ε)·log σ(β·h) - ε·log σ(-β·h)          (the paper has ε = 0; ε > 0 is conservative DPO)
with d loss / d h = -β·((1 - ε)·σ(-β·h) - ε·σ(β·h)), h moving with +policy_chosen, -policy_rejected,
-reference_chosen, +reference_rejected.

`python -m tests.golden ld_dpo --write` turns LOSSES and RUN into tests/golden/ld_dpo.*.json.
"""

import math
import random


def log_sigmoid(x: float) -> float:
    """log σ(x) without overflow: -log(1 + e^-x) for x >= 0, x - log(1 + e^x) below."""
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def desensitized_logps(token_logps, lengths, alpha):
    """ld(y) of each of the 2B completions (B chosen, then B rejected; their tokens end to end in token_logps), and
    the gradient of their sum with respect to each token's log-prob."""
    pairs = len(lengths) // 2
    out, grads = {"logps": []}, {"token_logps": []}
    start = 0
    for i, length in enumerate(lengths):
        shared = min(lengths[i % pairs], lengths[pairs + i % pairs])  # lp of this completion's pair
        total = 0.0
        for t in range(length):  # t counts from 0: token t + 1 of the completion
            weight = 1.0 if t < shared else alpha
            total += weight * token_logps[start + t]
            grads["token_logps"].append(weight)
        out["logps"].append(total)
        start += length
    return out, grads


def ld_dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                beta, label_smoothing=0.0):
    """Per-pair losses and rewards from desensitized log-probs, and the gradient of the summed losses."""
    eps = label_smoothing
    out = {"losses": [], "chosen_rewards": [], "rejected_rewards": []}
    grads = {"policy_chosen_logps": [], "policy_rejected_logps": [], "reference_chosen_logps": [],
             "reference_rejected_logps": []}
    for pc, pr, rc, rr in zip(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                              reference_rejected_logps):
        h = (pc - rc) - (pr - rr)
        out["losses"].append(-(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h))
        out["chosen_rewards"].append(beta * (pc - rc))
        out["rejected_rewards"].append(beta * (pr - rr))
        dh = -beta * ((1 - eps) * sigmoid(-beta * h) - eps * sigmoid(beta * h))
        for name, sign in (("policy_chosen_logps", 1), ("policy_rejected_logps", -1),
                           ("reference_chosen_logps", -1), ("reference_rejected_logps", 1)):
            grads[name].append(sign * dh)
    return out, grads


def _tokens(chosen: list[list[float]], rejected: list[list[float]]) -> dict:
    """Inputs of desensitized_logps from each completion's token log-probs."""
    completions = chosen + rejected
    return {"token_logps": [logp for completion in completions for logp in completion],
            "lengths": [len(completion) for completion in completions]}


def _random_tokens(seed: int, pairs: int, max_length: int) -> dict:
    """Token log-probs of realistic size (-5 .. -0.01), 1 .. max_length tokens per completion."""
    rng = random.Random(seed)
    completions = [[round(rng.uniform(-5, -0.01), 6) for _ in range(rng.randint(1, max_length))]
                   for _ in range(2 * pairs)]
    return _tokens(completions[:pairs], completions[pairs:])


def _pairs(policy_chosen, policy_rejected, reference_chosen, reference_rejected):
    return {"policy_chosen_logps": policy_chosen, "policy_rejected_logps": policy_rejected,
            "reference_chosen_logps": reference_chosen, "reference_rejected_logps": reference_rejected}


def _random_pairs(seed: int, n: int, spread: float) -> dict:
    """Sequence log-probs of realistic size (-80 .. -2), the policy within ±spread of the reference."""
    rng = random.Random(seed)
    reference = [[round(rng.uniform(-80, -2), 6) for _ in range(n)] for _ in range(2)]
    policy = [[round(r + rng.uniform(-spread, spread), 6) for r in side] for side in reference]
    return _pairs(policy[0], policy[1], reference[0], reference[1])


LN2 = 0.6931471805599453  # -log σ(0)

# Each case: inputs (the tensor arguments, as lists), hyperparameters (the other arguments), and for the
# hand-computed ones `hand`: values worked out on paper, which the reference must reproduce too.
TWO_PAIRS = _tokens([[-1.0, -2.0], [-0.5, -1.0, -1.0, -1.0, -1.0]], [[-2.0, -2.0, -4.0], [-3.0]])  # lp = 2 and 1
DESENSITIZED_CASES = [
    {"name": "random_alpha0.5", "inputs": _random_tokens(0, 4, 12), "hyperparameters": {"alpha": 0.5}},
    {"name": "random_alpha0.3_long", "inputs": _random_tokens(1, 3, 40), "hyperparameters": {"alpha": 0.3}},
    {"name": "equal_lengths_alpha_irrelevant", "note": "|yw| = |yl| = 3: no token after lp, the plain sums",
     "inputs": _tokens([[-1.0, -2.0, -3.0]], [[-0.5, -0.5, -1.0]]), "hyperparameters": {"alpha": 0.2},
     "hand": {"logps": [-6.0, -2.0], "grad_token_logps": [1.0] * 6}},
    {"name": "longer_chosen_tail_weighted", "note": "lp = 2: ld(yw) = -1 - 1 + 0.5·(-2 - 4) = -5, ld(yl) = -4",
     "inputs": _tokens([[-1.0, -1.0, -2.0, -4.0]], [[-3.0, -1.0]]), "hyperparameters": {"alpha": 0.5},
     "hand": {"logps": [-5.0, -4.0], "grad_token_logps": [1.0, 1.0, 0.5, 0.5, 1.0, 1.0]}},
    {"name": "longer_rejected_tail_weighted", "note": "lp = 1: ld(yw) = -0.25, ld(yl) = -1 + 0.25·(-2 - 6) = -3",
     "inputs": _tokens([[-0.25]], [[-1.0, -2.0, -6.0]]), "hyperparameters": {"alpha": 0.25},
     "hand": {"logps": [-0.25, -3.0], "grad_token_logps": [1.0, 1.0, 0.25, 0.25]}},
    {"name": "alpha1_is_the_plain_sum", "note": "two pairs (lp = 2, lp = 1), α = 1: -3, -4.5, -8, -3",
     "inputs": TWO_PAIRS, "hyperparameters": {"alpha": 1.0},
     "hand": {"logps": [-3.0, -4.5, -8.0, -3.0], "grad_token_logps": [1.0] * 11}},
    {"name": "alpha0_cuts_at_lp", "note": "α = 0: -1 - 2, -0.5, -2 - 2, -3 (each pair's lp: 2, then 1)",
     "inputs": TWO_PAIRS, "hyperparameters": {"alpha": 0.0},
     "hand": {"logps": [-3.0, -0.5, -4.0, -3.0],
              "grad_token_logps": [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0]}},
    {"name": "empty_chosen_completion", "note": "|yw| = 0: lp = 0, so every token of yl weighs α: 0.5·(-1 - 3) = -2",
     "inputs": _tokens([[]], [[-1.0, -3.0]]), "hyperparameters": {"alpha": 0.5},
     "hand": {"logps": [0.0, -2.0], "grad_token_logps": [0.5, 0.5]}},
]

LOSS_CASES = [
    {"name": "random_beta0.1", "inputs": _random_pairs(0, 8, 5.0), "hyperparameters": {"beta": 0.1}},
    {"name": "random_beta2_smoothing0.1", "inputs": _random_pairs(1, 8, 5.0),
     "hyperparameters": {"beta": 2.0, "label_smoothing": 0.1}},
    {"name": "random_far_from_reference", "inputs": _random_pairs(3, 8, 60.0),
     "hyperparameters": {"beta": 0.3, "label_smoothing": 0.05}},
    {"name": "desensitized_by_hand",
     "note": "tokens of the case longer_chosen_tail_weighted at α = 0.5 (policy ld -5, -4) against a reference with "
             "tokens [-1]*4, [-2, -2] (ld -1 - 1 + 0.5·(-2) = -3, -4): h = (-5 + 3) - 0 = -2, β = 1: log(1 + e^2), "
             "gradient -σ(2) (plain sums would give h = -4)",
     "inputs": _pairs([-5.0], [-4.0], [-3.0], [-4.0]), "hyperparameters": {"beta": 1.0},
     "hand": {"losses": [2.1269280110429727], "chosen_rewards": [-2.0], "rejected_rewards": [0.0],
              "grad_policy_chosen_logps": [-0.8807970779778823]}},
    {"name": "policy_equals_reference", "note": "the first step of training: every reward 0, loss ln 2, whatever α",
     "inputs": _pairs([-20.5, -7.25], [-18.0, -9.5], [-20.5, -7.25], [-18.0, -9.5]),
     "hyperparameters": {"beta": 0.5},
     "hand": {"losses": [LN2] * 2, "chosen_rewards": [0.0] * 2, "grad_policy_chosen_logps": [-0.25] * 2}},
    {"name": "huge_margins", "note": "β·h = ±1000: -log σ(1000) underflows to 0, -log σ(-1000) = 1000",
     "inputs": _pairs([0.0, -10000.0], [-10000.0, 0.0], [0.0, 0.0], [0.0, 0.0]),
     "hyperparameters": {"beta": 0.1},
     "hand": {"losses": [0.0, 1000.0], "grad_policy_chosen_logps": [0.0, -0.1]}},
]

LOSSES = {
    "desensitized_logps": {
        "reference": desensitized_logps,
        "outputs": ["logps"],
        "cases": DESENSITIZED_CASES,
    },
    "ld_dpo_loss": {
        "reference": ld_dpo_loss,
        "outputs": ["losses", "chosen_rewards", "rejected_rewards"],
        "cases": LOSS_CASES,
    },
}

# The end-to-end golden: a few steps on the bundled task. One process with 2 accumulated micro-batches
# of 4 pairs, and torchrun with 2 processes of 4 pairs each: the same global batch of 8, the same pairs.
# A learning rate larger than the default so that 6 steps move every metric well above float noise; α = 0.25 so that
# the pairs of unequal lengths (a quarter of the bundled pairs) differ clearly from DPO.
RUN = {
    "script": "algos/ld_dpo.py",
    "args": ["--max-steps", "6", "--per-device-train-batch-size", "4", "--gradient-accumulation-steps", "2",
             "--learning-rate", "1e-4", "--warmup-ratio", "0", "--logging-steps", "1", "--eval-steps", "3",
             "--beta", "0.3", "--label-smoothing", "0.1", "--ld-alpha", "0.25"],
    "torchrun_args": ["--max-steps", "6", "--per-device-train-batch-size", "4", "--gradient-accumulation-steps", "1",
                      "--learning-rate", "1e-4", "--warmup-ratio", "0", "--logging-steps", "1", "--eval-steps", "3",
                      "--beta", "0.3", "--label-smoothing", "0.1", "--ld-alpha", "0.25"],
}
