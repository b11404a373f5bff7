"""Independent float64 reference for algos/ipo.py, and the cases and run that pin it.

Written from the paper's equation, one pair at a time with `math`, never calling the script:
    n(y) = max(|y|, 1) when length-normalised, else 1
    h    = (logp(yw) - ref(yw))/n(yw) - (logp(yl) - ref(yl))/n(yl)
    loss = (h - 1/(2τ))²                      (Azar et al. 2023, eq. 17, the sampled IPO loss; n = 1 there)
The gradient is derived by hand: d loss / d h = 2·(h - 1/(2τ)), and h moves with +1/n(yw) per unit of
policy_chosen, -1/n(yw) of reference_chosen, -1/n(yl) of policy_rejected, +1/n(yl) of reference_rejected.
The completion lengths are integers and carry no gradient.

`python -m tests.golden ipo --write` turns LOSSES and RUN into tests/golden/ipo.*.json.
"""

import random


def ipo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
             chosen_lengths, rejected_lengths, tau, length_normalize=True):
    """Per-pair losses and rewards, and the gradient of the summed losses with respect to each float input."""
    target = 1 / (2 * tau)
    out = {"losses": [], "chosen_rewards": [], "rejected_rewards": []}
    grads = {"policy_chosen_logps": [], "policy_rejected_logps": [], "reference_chosen_logps": [],
             "reference_rejected_logps": []}
    for pc, pr, rc, rr, lc, lr in zip(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                                      reference_rejected_logps, chosen_lengths, rejected_lengths):
        n_chosen = max(lc, 1) if length_normalize else 1
        n_rejected = max(lr, 1) if length_normalize else 1
        chosen_ratio = (pc - rc) / n_chosen
        rejected_ratio = (pr - rr) / n_rejected
        h = chosen_ratio - rejected_ratio
        out["losses"].append((h - target) ** 2)
        out["chosen_rewards"].append(tau * chosen_ratio)
        out["rejected_rewards"].append(tau * rejected_ratio)
        dh = 2 * (h - target)
        grads["policy_chosen_logps"].append(dh / n_chosen)
        grads["reference_chosen_logps"].append(-dh / n_chosen)
        grads["policy_rejected_logps"].append(-dh / n_rejected)
        grads["reference_rejected_logps"].append(dh / n_rejected)
    return out, grads


def _pairs(policy_chosen, policy_rejected, reference_chosen, reference_rejected, chosen_lengths, rejected_lengths):
    return {"policy_chosen_logps": policy_chosen, "policy_rejected_logps": policy_rejected,
            "reference_chosen_logps": reference_chosen, "reference_rejected_logps": reference_rejected,
            "chosen_lengths": chosen_lengths, "rejected_lengths": rejected_lengths}


def _random_pairs(seed: int, n: int, spread: float) -> dict:
    """Sequence log-probs of realistic size (-80 .. -2) for 5 .. 60 tokens, the policy within ±spread of the reference."""
    rng = random.Random(seed)
    reference = [[round(rng.uniform(-80, -2), 6) for _ in range(n)] for _ in range(2)]
    policy = [[round(r + rng.uniform(-spread, spread), 6) for r in side] for side in reference]
    lengths = [[rng.randint(5, 60) for _ in range(n)] for _ in range(2)]
    return _pairs(policy[0], policy[1], reference[0], reference[1], lengths[0], lengths[1])


# Each case: inputs (the tensor arguments, as lists), hyperparameters (the other arguments), and for the
# hand-computed ones `hand`: values worked out on paper, which the reference must reproduce too.
CASES = [
    {"name": "random_tau0.1", "inputs": _random_pairs(0, 8, 5.0), "hyperparameters": {"tau": 0.1}},
    {"name": "random_tau0.5", "inputs": _random_pairs(1, 8, 5.0), "hyperparameters": {"tau": 0.5}},
    {"name": "random_tau0.1_summed", "inputs": _random_pairs(2, 8, 5.0),
     "hyperparameters": {"tau": 0.1, "length_normalize": False}},
    {"name": "random_far_from_reference", "inputs": _random_pairs(3, 8, 60.0), "hyperparameters": {"tau": 1.0}},
    {"name": "h0_is_target_squared", "note": "h = 0 with policy != reference: loss (1/(2τ))² = 25 at τ = 0.1, "
     "gradient ∓2·5/n", "inputs": _pairs([-10.0, -3.0], [-12.0, -7.0], [-11.0, -4.0], [-13.0, -8.0], [2, 5], [2, 5]),
     "hyperparameters": {"tau": 0.1},
     "hand": {"losses": [25.0, 25.0], "chosen_rewards": [0.05, 0.02], "rejected_rewards": [0.05, 0.02],
              "grad_policy_chosen_logps": [-5.0, -2.0], "grad_policy_rejected_logps": [5.0, 2.0]}},
    {"name": "policy_equals_reference", "note": "the first step of training: every reward 0, loss 1/(4τ²) = 1 "
     "at τ = 0.5, gradient -2/n(yw) on the chosen", "inputs": _pairs([-20.5, -7.25, -33.0], [-18.0, -9.5, -2.0],
                                                                   [-20.5, -7.25, -33.0], [-18.0, -9.5, -2.0],
                                                                   [8, 4, 1], [10, 2, 1]),
     "hyperparameters": {"tau": 0.5},
     "hand": {"losses": [1.0] * 3, "chosen_rewards": [0.0] * 3, "rejected_rewards": [0.0] * 3,
              "grad_policy_chosen_logps": [-0.25, -0.5, -2.0], "grad_policy_rejected_logps": [0.2, 1.0, 2.0]}},
    {"name": "length_normalised_by_hand", "note": "log-ratios +6 over 3 tokens and -4 over 4 tokens: h = 2 - (-1) "
     "= 3, target 1 at τ = 0.5, loss (3 - 1)² = 4, d/d policy_chosen = 2·2/3",
     "inputs": _pairs([-4.0], [-14.0], [-10.0], [-10.0], [3], [4]), "hyperparameters": {"tau": 0.5},
     "hand": {"losses": [4.0], "chosen_rewards": [1.0], "rejected_rewards": [-0.5],
              "grad_policy_chosen_logps": [4 / 3], "grad_policy_rejected_logps": [-1.0]}},
    {"name": "summed_by_hand", "note": "the same pair in the paper's form: h = 6 - (-4) = 10, loss (10 - 1)² = 81",
     "inputs": _pairs([-4.0], [-14.0], [-10.0], [-10.0], [3], [4]),
     "hyperparameters": {"tau": 0.5, "length_normalize": False},
     "hand": {"losses": [81.0], "chosen_rewards": [3.0], "rejected_rewards": [-2.0],
              "grad_policy_chosen_logps": [18.0], "grad_policy_rejected_logps": [-18.0]}},
    {"name": "at_the_target", "note": "h = 1/(2τ) = 2.5 exactly (τ = 0.2): loss 0, gradient 0",
     "inputs": _pairs([-2.5], [-5.0], [-5.0], [-5.0], [1], [7]), "hyperparameters": {"tau": 0.2},
     "hand": {"losses": [0.0], "grad_policy_chosen_logps": [0.0], "grad_policy_rejected_logps": [0.0]}},
    {"name": "zero_length_completions", "note": "empty completions (log-probs 0, 0 tokens) count as log-ratio 0, "
     "never 0/0: loss (h - 1)² with h from the non-empty side only",
     "inputs": _pairs([0.0, -3.0, 0.0], [-6.0, 0.0, 0.0], [0.0, -6.0, 0.0], [-2.0, 0.0, 0.0], [0, 3, 0], [2, 0, 0]),
     "hyperparameters": {"tau": 0.5},
     "hand": {"losses": [1.0, 0.0, 1.0], "chosen_rewards": [0.0, 0.5, 0.0], "rejected_rewards": [-1.0, 0.0, 0.0],
              "grad_policy_chosen_logps": [2.0, 0.0, -2.0], "grad_policy_rejected_logps": [-1.0, 0.0, 2.0]}},
    {"name": "huge_margins", "note": "h = ±1000 per token: a square, so finite and symmetric about the target",
     "inputs": _pairs([0.0, -10000.0], [-10000.0, 0.0], [0.0, 0.0], [0.0, 0.0], [10, 10], [10, 10]),
     "hyperparameters": {"tau": 0.5},
     "hand": {"losses": [999.0 ** 2, 1001.0 ** 2], "grad_policy_chosen_logps": [199.8, -200.2]}},
]

# ipo_loss has no default for length_normalize: a case that does not set it tests the length-normalised form.
for case in CASES:
    case.setdefault("hyperparameters", {}).setdefault("length_normalize", True)

LOSSES = {
    "ipo_loss": {
        "reference": ipo_loss,
        "outputs": ["losses", "chosen_rewards", "rejected_rewards"],
        "cases": CASES,
    },
}

# The end-to-end golden: a few steps on the bundled task. One process with 2 accumulated micro-batches
# of 2 pairs, and torchrun with 2 processes of 2 pairs each: the same global batch of 4, the same pairs.
# A learning rate larger than the default so that 4 steps move every metric well above float noise.
RUN = {
    "script": "algos/ipo.py",
    "args": ["--max-steps", "4", "--per-device-train-batch-size", "2", "--gradient-accumulation-steps", "2",
             "--learning-rate", "1e-4", "--warmup-ratio", "0", "--logging-steps", "1", "--eval-steps", "2",
             "--tau", "0.5", "--length-normalize"],
    "torchrun_args": ["--max-steps", "4", "--per-device-train-batch-size", "2", "--gradient-accumulation-steps", "1",
                      "--learning-rate", "1e-4", "--warmup-ratio", "0", "--logging-steps", "1", "--eval-steps", "2",
                      "--tau", "0.5", "--length-normalize"],
}
