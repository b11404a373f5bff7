"""Independent float64 reference for algos/npo.py, and the cases and run that pin it.

Written from the paper's equation, one pair at a time with `math`, never calling the script:
    r    = logp(yl) - ref(yl)                                 (the log-ratio of the rejected completion alone)
    loss = (2/β)·log(1 + (π(yl)/π_ref(yl))^β) = (2/β)·log(1 + e^(β·r))      (Zhang et al. 2024, the NPO loss)
The chosen completion takes no part in the loss; its reward β·(logp(yw) - ref(yw)) is only returned for logging.
The gradient is derived by hand: d loss / d r = (2/β)·β·e^(β·r)/(1 + e^(β·r)) = 2·σ(β·r), and r moves with
+policy_rejected, -reference_rejected; the chosen inputs get 0.

`python -m tests.golden npo --write` turns LOSSES and RUN into tests/golden/npo.*.json.
"""

import math
import random


def softplus(x: float) -> float:
    """log(1 + e^x) without overflow."""
    return x + math.log1p(math.exp(-x)) if x > 0 else math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def npo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta):
    """Per-pair losses and rewards, and the gradient of the summed losses with respect to each input."""
    out = {"losses": [], "chosen_rewards": [], "rejected_rewards": []}
    grads = {"policy_chosen_logps": [], "policy_rejected_logps": [], "reference_chosen_logps": [],
             "reference_rejected_logps": []}
    for pc, pr, rc, rr in zip(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                              reference_rejected_logps):
        r = pr - rr
        out["losses"].append(2 / beta * softplus(beta * r))
        out["chosen_rewards"].append(beta * (pc - rc))
        out["rejected_rewards"].append(beta * r)
        dr = 2 * sigmoid(beta * r)
        grads["policy_chosen_logps"].append(0.0)
        grads["policy_rejected_logps"].append(dr)
        grads["reference_chosen_logps"].append(0.0)
        grads["reference_rejected_logps"].append(-dr)
    return out, grads


def _pairs(policy_chosen, policy_rejected, reference_chosen, reference_rejected):
    return {"policy_chosen_logps": policy_chosen, "policy_rejected_logps": policy_rejected,
            "reference_chosen_logps": reference_chosen, "reference_rejected_logps": reference_rejected}


def _random_pairs(seed: int, n: int, spread: float) -> dict:
    """Sequence log-probs of realistic size (-80 .. -2), the policy within ±spread of the reference."""
    rng = random.Random(seed)
    reference = [[round(rng.uniform(-80, -2), 6) for _ in range(n)] for _ in range(2)]
    policy = [[round(r + rng.uniform(-spread, spread), 6) for r in side] for side in reference]
    return _pairs(policy[0], policy[1], reference[0], reference[1])


LN2 = 0.6931471805599453  # log(1 + e^0)
SOFTPLUS_MINUS2 = 0.12692801104297263  # log(1 + e^-2)
SIGMOID_MINUS2 = 0.11920292202211755  # σ(-2)

# Each case: inputs (the tensor arguments, as lists), hyperparameters (the other arguments), and for the
# hand-computed ones `hand`: values worked out on paper, which the reference must reproduce too.
CASES = [
    {"name": "random_beta0.1", "inputs": _random_pairs(0, 8, 5.0), "hyperparameters": {"beta": 0.1}},
    {"name": "random_beta2", "inputs": _random_pairs(1, 8, 5.0), "hyperparameters": {"beta": 2.0}},
    {"name": "random_far_from_reference", "inputs": _random_pairs(3, 8, 60.0), "hyperparameters": {"beta": 0.3}},
    {"name": "policy_equals_reference", "note": "r = 0: loss (2/β)·ln 2, gradient 2·σ(0) = 1, gradient ascent's",
     "inputs": _pairs([-20.5, -7.25, -33.0], [-18.0, -9.5, -2.0], [-20.5, -7.25, -33.0], [-18.0, -9.5, -2.0]),
     "hyperparameters": {"beta": 2.0},
     "hand": {"losses": [LN2] * 3, "chosen_rewards": [0.0] * 3, "rejected_rewards": [0.0] * 3,
              "grad_policy_rejected_logps": [1.0] * 3, "grad_reference_rejected_logps": [-1.0] * 3,
              "grad_policy_chosen_logps": [0.0] * 3}},
    {"name": "chosen_takes_no_part", "note": "the same rejected log-ratio r = 0 under three chosen ones, β = 0.1: "
     "loss 20·ln 2 each, whatever the chosen rewards",
     "inputs": _pairs([-1.0, -50.0, -10.0], [-12.0, -12.0, -12.0], [-40.0, -5.0, -10.0], [-12.0, -12.0, -12.0]),
     "hyperparameters": {"beta": 0.1},
     "hand": {"losses": [20 * LN2] * 3, "chosen_rewards": [3.9, -4.5, 0.0], "grad_policy_chosen_logps": [0.0] * 3,
              "grad_reference_chosen_logps": [0.0] * 3, "grad_policy_rejected_logps": [1.0] * 3}},
    {"name": "above_and_below_reference", "note": "β = 1, r = +2: 2·log(1 + e^2) = 4 + 2·log(1 + e^-2), "
     "gradient 2·σ(2); r = -2: 2·log(1 + e^-2), gradient 2·σ(-2)",
     "inputs": _pairs([-3.0, -3.0], [-6.0, -10.0], [-4.0, -4.0], [-8.0, -8.0]), "hyperparameters": {"beta": 1.0},
     "hand": {"losses": [4 + 2 * SOFTPLUS_MINUS2, 2 * SOFTPLUS_MINUS2], "rejected_rewards": [2.0, -2.0],
              "grad_policy_rejected_logps": [2 * (1 - SIGMOID_MINUS2), 2 * SIGMOID_MINUS2]}},
    {"name": "huge_log_ratios", "note": "β·r = ±1000, β = 0.1: (2/β)·1000 = 20000 with gradient 2, and "
     "(2/β)·log(1 + e^-1000) = 0 (underflow) with gradient 0",
     "inputs": _pairs([0.0, 0.0], [0.0, -10000.0], [0.0, 0.0], [-10000.0, 0.0]), "hyperparameters": {"beta": 0.1},
     "hand": {"losses": [20000.0, 0.0], "rejected_rewards": [1000.0, -1000.0],
              "grad_policy_rejected_logps": [2.0, 0.0]}},
]

LOSSES = {
    "npo_loss": {
        "reference": npo_loss,
        "outputs": ["losses", "chosen_rewards", "rejected_rewards"],
        "cases": CASES,
    },
}

# The end-to-end golden: a few steps on the bundled task. One process with 2 accumulated micro-batches
# of 4 pairs, and torchrun with 2 processes of 4 pairs each: the same global batch of 8, the same pairs.
# A learning rate larger than the default so that 6 steps move every metric well above float noise.
RUN = {
    "script": "algos/npo.py",
    "args": ["--max-steps", "6", "--per-device-train-batch-size", "4", "--gradient-accumulation-steps", "2",
             "--learning-rate", "1e-4", "--warmup-ratio", "0", "--logging-steps", "1", "--eval-steps", "3",
             "--beta", "0.5"],
    "torchrun_args": ["--max-steps", "6", "--per-device-train-batch-size", "4", "--gradient-accumulation-steps", "1",
                      "--learning-rate", "1e-4", "--warmup-ratio", "0", "--logging-steps", "1", "--eval-steps", "3",
                      "--beta", "0.5"],
}
