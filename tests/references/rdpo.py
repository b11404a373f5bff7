"""Independent float64 reference for algos/rdpo.py, and the cases and run that pin it.

Written from the paper's equation, one pair at a time with `math`, never calling the script:
    h    = (logp(yw) - ref(yw)) - (logp(yl) - ref(yl)),    ℓ(z) = -log σ(z)
    loss = [(1 - ε)·ℓ(β·h) - ε·ℓ(-β·h)] / (1 - 2ε)       (Chowdhury et al. 2024, the unbiased loss; ε = 0 is DPO)
The gradient is derived by hand: ℓ'(z) = -σ(-z), so
    d loss / d h = -β·((1 - ε)·σ(-β·h) + ε·σ(β·h)) / (1 - 2ε) = -β·(σ(-β·h) + ε/(1 - 2ε)),
and h moves with +policy_chosen, -policy_rejected, -reference_chosen, +reference_rejected.

`python -m tests.golden rdpo --write` turns LOSSES and RUN into tests/golden/rdpo.*.json.
"""

import math
import random


def softplus(x: float) -> float:
    """log(1 + e^x) without overflow; ℓ(z) = -log σ(z) = softplus(-z)."""
    return x + math.log1p(math.exp(-x)) if x > 0 else math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def rdpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
              beta, flip_rate=0.0):
    """Per-pair losses and rewards, and the gradient of the summed losses with respect to each input."""
    eps = flip_rate
    out = {"losses": [], "chosen_rewards": [], "rejected_rewards": []}
    grads = {"policy_chosen_logps": [], "policy_rejected_logps": [], "reference_chosen_logps": [],
             "reference_rejected_logps": []}
    for pc, pr, rc, rr in zip(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                              reference_rejected_logps):
        h = (pc - rc) - (pr - rr)
        as_labelled = softplus(-beta * h)  # ℓ(β·h): the loss if the label is right
        as_flipped = softplus(beta * h)  # ℓ(-β·h): the loss if it was flipped
        out["losses"].append(((1 - eps) * as_labelled - eps * as_flipped) / (1 - 2 * eps))
        out["chosen_rewards"].append(beta * (pc - rc))
        out["rejected_rewards"].append(beta * (pr - rr))
        dh = -beta * ((1 - eps) * sigmoid(-beta * h) + eps * sigmoid(beta * h)) / (1 - 2 * eps)
        for name, sign in (("policy_chosen_logps", 1), ("policy_rejected_logps", -1),
                           ("reference_chosen_logps", -1), ("reference_rejected_logps", 1)):
            grads[name].append(sign * dh)
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


LN2 = 0.6931471805599453  # -log σ(0)
SOFTPLUS_MINUS2 = 0.12692801104297263  # log(1 + e^-2) = ℓ(2)
SIGMOID_MINUS2 = 0.11920292202211755  # σ(-2)

# Each case: inputs (the tensor arguments, as lists), hyperparameters (the other arguments), and for the
# hand-computed ones `hand`: values worked out on paper, which the reference must reproduce too.
# The closed form used by hand: ℓ(-z) = ℓ(z) + z, so loss = ℓ(β·h) - ε/(1 - 2ε)·β·h.
CASES = [
    {"name": "random_beta0.1_default_flip_rate", "inputs": _random_pairs(0, 8, 5.0), "hyperparameters": {"beta": 0.1}},
    {"name": "random_beta0.5_flip0.2", "inputs": _random_pairs(1, 8, 5.0),
     "hyperparameters": {"beta": 0.5, "flip_rate": 0.2}},
    {"name": "random_beta2_flip0.05", "inputs": _random_pairs(2, 8, 5.0),
     "hyperparameters": {"beta": 2.0, "flip_rate": 0.05}},
    {"name": "random_far_from_reference", "inputs": _random_pairs(3, 8, 60.0),
     "hyperparameters": {"beta": 0.3, "flip_rate": 0.3}},
    {"name": "h0_is_ln2", "note": "h = 0 with policy != reference: loss ln 2 for any ε, gradient ∓β/(2(1 - 2ε))",
     "inputs": _pairs([-10.0, -3.0], [-12.0, -7.0], [-11.0, -4.0], [-13.0, -8.0]),
     "hyperparameters": {"beta": 0.1, "flip_rate": 0.1},
     "hand": {"losses": [LN2, LN2], "chosen_rewards": [0.1, 0.1], "rejected_rewards": [0.1, 0.1],
              "grad_policy_chosen_logps": [-0.0625, -0.0625], "grad_policy_rejected_logps": [0.0625, 0.0625]}},
    {"name": "policy_equals_reference", "note": "the first step of training: every reward 0, loss ln 2",
     "inputs": _pairs([-20.5, -7.25, -33.0], [-18.0, -9.5, -2.0], [-20.5, -7.25, -33.0], [-18.0, -9.5, -2.0]),
     "hyperparameters": {"beta": 0.5, "flip_rate": 0.2},
     "hand": {"losses": [LN2] * 3, "chosen_rewards": [0.0] * 3, "rejected_rewards": [0.0] * 3,
              "grad_policy_chosen_logps": [-5 / 12] * 3}},  # -β/(2(1 - 2ε)) = -0.5/1.2
    {"name": "flip0_is_dpo", "note": "ε = 0: the DPO loss, h = 2, β = 1: log(1 + e^-2), gradient -σ(-2)",
     "inputs": _pairs([-3.0], [-6.0], [-4.0], [-5.0]), "hyperparameters": {"beta": 1.0, "flip_rate": 0.0},
     "hand": {"losses": [SOFTPLUS_MINUS2], "grad_policy_chosen_logps": [-SIGMOID_MINUS2]}},
    {"name": "negative_loss", "note": "h = 2, β = 1, ε = 1/4: ℓ(2) - (1/2)·2 < 0, gradient -(σ(-2) + 1/2)",
     "inputs": _pairs([-3.0], [-6.0], [-4.0], [-5.0]), "hyperparameters": {"beta": 1.0, "flip_rate": 0.25},
     "hand": {"losses": [SOFTPLUS_MINUS2 - 1.0], "grad_policy_chosen_logps": [-(SIGMOID_MINUS2 + 0.5)]}},
    {"name": "flip_rate_near_one_half", "note": "ε = 0.45: ε/(1 - 2ε) = 4.5; h = 0 and h = 2 at β = 1",
     "inputs": _pairs([-5.0, -3.0], [-5.0, -6.0], [-5.0, -4.0], [-5.0, -5.0]),
     "hyperparameters": {"beta": 1.0, "flip_rate": 0.45},
     "hand": {"losses": [LN2, SOFTPLUS_MINUS2 - 9.0], "grad_policy_chosen_logps": [-5.0, -(SIGMOID_MINUS2 + 4.5)]}},
    {"name": "huge_margins", "note": "β·h = ±1000, ε = 1/4: (0 - 1000/4)/(1/2) = -500 and (3/4·1000 - 0)/(1/2) = 1500",
     "inputs": _pairs([0.0, -10000.0], [-10000.0, 0.0], [0.0, 0.0], [0.0, 0.0]),
     "hyperparameters": {"beta": 0.1, "flip_rate": 0.25},
     "hand": {"losses": [-500.0, 1500.0], "chosen_rewards": [0.0, -1000.0], "rejected_rewards": [-1000.0, 0.0],
              "grad_policy_chosen_logps": [-0.05, -0.15]}},  # -β(ε or 1 - ε)/(1 - 2ε)
]

LOSSES = {
    "rdpo_loss": {
        "reference": rdpo_loss,
        "outputs": ["losses", "chosen_rewards", "rejected_rewards"],
        "cases": CASES,
    },
}

# The end-to-end golden: a few steps on the bundled task. One process with 2 accumulated micro-batches
# of 4 pairs, and torchrun with 2 processes of 4 pairs each: the same global batch of 8, the same pairs.
# A learning rate larger than the default so that 6 steps move every metric well above float noise.
RUN = {
    "script": "algos/rdpo.py",
    "args": ["--max-steps", "6", "--per-device-train-batch-size", "4", "--gradient-accumulation-steps", "2",
             "--learning-rate", "1e-4", "--warmup-ratio", "0", "--logging-steps", "1", "--eval-steps", "3",
             "--beta", "0.3", "--flip-rate", "0.2"],
    "torchrun_args": ["--max-steps", "6", "--per-device-train-batch-size", "4", "--gradient-accumulation-steps", "1",
                      "--learning-rate", "1e-4", "--warmup-ratio", "0", "--logging-steps", "1", "--eval-steps", "3",
                      "--beta", "0.3", "--flip-rate", "0.2"],
}
