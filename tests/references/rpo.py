"""Independent float64 reference for algos/rpo.py, and the cases and run that pin it.

Written from the paper's equation (Pang et al. 2024: the DPO term plus α times the winner's NLL divided by
its length), one pair at a time with `math`, never calling the script:
    h      = (logp(yw) - ref(yw)) - (logp(yl) - ref(yl))
    loss_i = -(1 - ε)·log σ(β·h) - ε·log σ(-β·h)        the DPO term (cDPO for ε > 0; the paper has ε = 0)
             + α·(-logp(yw)) / max(|yw|, 1)             the NLL of the chosen completion per token (its tokens only)
The gradient is derived by hand: d loss / d h = -β·((1 - ε)·σ(-β·h) - ε·σ(β·h)), and h moves with
+policy_chosen, -policy_rejected, -reference_chosen, +reference_rejected; the NLL term adds -α/max(|yw|, 1) to
d loss / d policy_chosen and nothing else. The lengths are integers and carry no gradient.

`python -m tests.golden rpo --write` turns LOSSES and RUN into tests/golden/rpo.*.json.
"""

import math
import random


def log_sigmoid(x: float) -> float:
    """log σ(x) without overflow: -log(1 + e^-x) for x >= 0, x - log(1 + e^x) below."""
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def rpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
             chosen_lengths, beta, label_smoothing=0.0, rpo_alpha=16.0):
    """Per-pair losses and rewards, and the gradient of the summed losses with respect to each float input."""
    eps, alpha = label_smoothing, rpo_alpha
    out = {"losses": [], "chosen_rewards": [], "rejected_rewards": []}
    grads = {"policy_chosen_logps": [], "policy_rejected_logps": [], "reference_chosen_logps": [],
             "reference_rejected_logps": []}
    for pc, pr, rc, rr, n in zip(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                                 reference_rejected_logps, chosen_lengths):
        h = (pc - rc) - (pr - rr)
        tokens = max(n, 1)
        dpo = -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)
        out["losses"].append(dpo + alpha * (-pc) / tokens)
        out["chosen_rewards"].append(beta * (pc - rc))
        out["rejected_rewards"].append(beta * (pr - rr))
        dh = -beta * ((1 - eps) * sigmoid(-beta * h) - eps * sigmoid(beta * h))
        grads["policy_chosen_logps"].append(dh - alpha / tokens)
        grads["policy_rejected_logps"].append(-dh)
        grads["reference_chosen_logps"].append(-dh)
        grads["reference_rejected_logps"].append(dh)
    return out, grads


def _pairs(policy_chosen, policy_rejected, reference_chosen, reference_rejected, chosen_lengths):
    return {"policy_chosen_logps": policy_chosen, "policy_rejected_logps": policy_rejected,
            "reference_chosen_logps": reference_chosen, "reference_rejected_logps": reference_rejected,
            "chosen_lengths": chosen_lengths}


def _random_pairs(seed: int, n: int, spread: float) -> dict:
    """Sequence log-probs of realistic size (-80 .. -2), the policy within ±spread of the reference, 5 .. 60 tokens."""
    rng = random.Random(seed)
    reference = [[round(rng.uniform(-80, -2), 6) for _ in range(n)] for _ in range(2)]
    policy = [[round(r + rng.uniform(-spread, spread), 6) for r in side] for side in reference]
    lengths = [rng.randint(5, 60) for _ in range(n)]
    return _pairs(policy[0], policy[1], reference[0], reference[1], lengths)


LN2 = 0.6931471805599453  # -log σ(0)

# Each case: inputs (the tensor arguments, as lists), hyperparameters (the other arguments), and for the
# hand-computed ones `hand`: values worked out on paper, which the reference must reproduce too.
CASES = [
    {"name": "random_beta0.1_alpha1", "inputs": _random_pairs(0, 8, 5.0),
     "hyperparameters": {"beta": 0.1, "rpo_alpha": 1.0}},
    {"name": "random_beta2_alpha0.5", "inputs": _random_pairs(1, 8, 5.0),
     "hyperparameters": {"beta": 2.0, "rpo_alpha": 0.5}},
    {"name": "random_beta0.1_smoothing0.1_alpha2", "inputs": _random_pairs(2, 8, 5.0),
     "hyperparameters": {"beta": 0.1, "label_smoothing": 0.1, "rpo_alpha": 2.0}},
    {"name": "random_far_from_reference", "inputs": _random_pairs(3, 8, 60.0),
     "hyperparameters": {"beta": 0.3, "label_smoothing": 0.05, "rpo_alpha": 1.0}},
    {"name": "policy_equals_reference",
     "note": "h = 0: DPO's ln 2 plus the NLL per token, 12/4 = 3 and 20/10 = 2; d/d policy_chosen = -β/2 - α/|yw|",
     "inputs": _pairs([-12.0, -20.0], [-9.0, -30.0], [-12.0, -20.0], [-9.0, -30.0], [4, 10]),
     "hyperparameters": {"beta": 0.1, "rpo_alpha": 1.0},
     "hand": {"losses": [LN2 + 3.0, LN2 + 2.0], "chosen_rewards": [0.0, 0.0], "rejected_rewards": [0.0, 0.0],
              "grad_policy_chosen_logps": [-0.3, -0.15], "grad_policy_rejected_logps": [0.05, 0.05],
              "grad_reference_chosen_logps": [0.05, 0.05]}},
    {"name": "alpha0_is_dpo", "note": "α = 0: DPO's loss, here h = 2, β = 1: log(1 + e^-2), gradient -σ(-2)",
     "inputs": _pairs([-3.0], [-6.0], [-4.0], [-5.0], [7]), "hyperparameters": {"beta": 1.0, "rpo_alpha": 0.0},
     "hand": {"losses": [0.12692801104297263], "grad_policy_chosen_logps": [-0.11920292202211755]}},
    {"name": "nll_is_per_token_of_the_chosen_completion",
     "note": "the same log-prob -20 over 10 or 40 tokens: NLL 2 or 0.5, gradient -α/10 or -α/40 on top of -β/2",
     "inputs": _pairs([-20.0, -20.0], [-20.0, -20.0], [-20.0, -20.0], [-20.0, -20.0], [10, 40]),
     "hyperparameters": {"beta": 0.5, "rpo_alpha": 1.0},
     "hand": {"losses": [LN2 + 2.0, LN2 + 0.5], "grad_policy_chosen_logps": [-0.35, -0.275]}},
    {"name": "empty_chosen_completion",
     "note": "|yw| = 0 (and logp(yw) = 0): the length is clamped to 1, so the NLL is 0 and its gradient -α",
     "inputs": _pairs([0.0], [-5.0], [0.0], [-5.0], [0]), "hyperparameters": {"beta": 0.5, "rpo_alpha": 2.0},
     "hand": {"losses": [LN2], "grad_policy_chosen_logps": [-2.25], "grad_policy_rejected_logps": [0.25]}},
    {"name": "huge_margins",
     "note": "β·h = ±1000: DPO gives 0 and 1000; α·NLL = 0.5·0/10 = 0 and 0.5·10000/10 = 500",
     "inputs": _pairs([0.0, -10000.0], [-10000.0, 0.0], [0.0, 0.0], [0.0, 0.0], [10, 10]),
     "hyperparameters": {"beta": 0.1, "rpo_alpha": 0.5},
     "hand": {"losses": [0.0, 1500.0], "chosen_rewards": [0.0, -1000.0], "rejected_rewards": [-1000.0, 0.0],
              "grad_policy_chosen_logps": [-0.05, -0.15], "grad_policy_rejected_logps": [0.0, 0.1]}},
    {"name": "smoothing_one_half_with_nll",
     "note": "ε = 1/2: the DPO term is 1 + log(1 + e^-2) for h = ±20, β = 0.1; NLL 5/5 = 1 and 25/5 = 5",
     "inputs": _pairs([-5.0, -25.0], [-25.0, -5.0], [-15.0, -15.0], [-15.0, -15.0], [5, 5]),
     "hyperparameters": {"beta": 0.1, "label_smoothing": 0.5, "rpo_alpha": 1.0},
     "hand": {"losses": [2.12692801104297263, 6.12692801104297263],
              # ±β/2·tanh(1) - α/5
              "grad_policy_chosen_logps": [0.038079707797788245 - 0.2, -0.038079707797788245 - 0.2]}},
]

LOSSES = {
    "rpo_loss": {
        "reference": rpo_loss,
        "outputs": ["losses", "chosen_rewards", "rejected_rewards"],
        "cases": CASES,
    },
}

# The end-to-end golden: a few steps on the bundled task. One process with 2 accumulated micro-batches
# of 4 pairs, and torchrun with 2 processes of 4 pairs each: the same global batch of 8, the same pairs.
# A learning rate larger than the default so that 6 steps move every metric well above float noise; α = 0.5 and
# ε = 0.1 so that both optional terms are exercised.
RUN = {
    "script": "algos/rpo.py",
    "args": ["--max-steps", "6", "--per-device-train-batch-size", "4", "--gradient-accumulation-steps", "2",
             "--learning-rate", "1e-4", "--warmup-ratio", "0", "--logging-steps", "1", "--eval-steps", "3",
             "--beta", "0.3", "--label-smoothing", "0.1", "--rpo-alpha", "0.5"],
    "torchrun_args": ["--max-steps", "6", "--per-device-train-batch-size", "4", "--gradient-accumulation-steps", "1",
                      "--learning-rate", "1e-4", "--warmup-ratio", "0", "--logging-steps", "1", "--eval-steps", "3",
                      "--beta", "0.3", "--label-smoothing", "0.1", "--rpo-alpha", "0.5"],
}
