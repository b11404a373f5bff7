"""Independent float64 reference for algos/step_dpo.py, and the cases and run that pin it.

Step-DPO (Lai et al. 2024) is DPO's objective on single reasoning steps: the prompt is the question plus the
correct earlier steps, and the two completions are a correct and a wrong next step. Written from the paper's
equation, one step pair at a time with `math`, never calling the script:
    h    = (logp(sw) - ref(sw)) - (logp(sl) - ref(sl))          (log-probs summed over the step's tokens)
    loss = -(1 - ε)·log σ(β·h) - ε·log σ(-β·h)                  (ε = 0: the paper's loss; ε > 0: cDPO on steps)
The gradient is derived by hand: with p = σ(β·h), d loss / d h = -β·((1 - ε)·(1 - p) - ε·p) = β·(p - (1 - ε)),
and h moves with +policy_chosen, -policy_rejected, -reference_chosen, +reference_rejected.

`python -m tests.golden step_dpo --write` turns LOSSES and RUN into tests/golden/step_dpo.*.json.
"""

import math
import random


def softplus(x: float) -> float:
    """log(1 + e^x), exact for large |x| in either direction."""
    return x + math.log1p(math.exp(-x)) if x > 0 else math.log1p(math.exp(x))


def logistic(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def step_dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                  beta, label_smoothing=0.0):
    """Per-step-pair losses and rewards, and the gradient of the summed losses with respect to each input.
    -log σ(z) = softplus(-z) and -log σ(-z) = softplus(z)."""
    out = {"losses": [], "chosen_rewards": [], "rejected_rewards": []}
    grads = {"policy_chosen_logps": [], "policy_rejected_logps": [], "reference_chosen_logps": [],
             "reference_rejected_logps": []}
    for i in range(len(policy_chosen_logps)):
        chosen_ratio = policy_chosen_logps[i] - reference_chosen_logps[i]
        rejected_ratio = policy_rejected_logps[i] - reference_rejected_logps[i]
        z = beta * (chosen_ratio - rejected_ratio)
        out["losses"].append((1 - label_smoothing) * softplus(-z) + label_smoothing * softplus(z))
        out["chosen_rewards"].append(beta * chosen_ratio)
        out["rejected_rewards"].append(beta * rejected_ratio)
        d_h = beta * (logistic(z) - (1 - label_smoothing))
        grads["policy_chosen_logps"].append(d_h)
        grads["policy_rejected_logps"].append(-d_h)
        grads["reference_chosen_logps"].append(-d_h)
        grads["reference_rejected_logps"].append(d_h)
    return out, grads


def _pairs(policy_chosen, policy_rejected, reference_chosen, reference_rejected):
    return {"policy_chosen_logps": policy_chosen, "policy_rejected_logps": policy_rejected,
            "reference_chosen_logps": reference_chosen, "reference_rejected_logps": reference_rejected}


def _random_steps(seed: int, n: int, spread: float) -> dict:
    """Log-probs of single steps (a few to a dozen tokens: -25 .. -0.5), the policy within ±spread of the reference."""
    rng = random.Random(seed)
    reference = [[round(rng.uniform(-25, -0.5), 6) for _ in range(n)] for _ in range(2)]
    policy = [[round(r + rng.uniform(-spread, spread), 6) for r in side] for side in reference]
    return _pairs(policy[0], policy[1], reference[0], reference[1])


LN2 = math.log(2)
LN3 = math.log(3)

CASES = [
    {"name": "random_beta0.1", "inputs": _random_steps(10, 8, 3.0), "hyperparameters": {"beta": 0.1}},
    {"name": "random_beta0.5", "note": "the official β for 7B models",
     "inputs": _random_steps(11, 8, 3.0), "hyperparameters": {"beta": 0.5}},
    {"name": "random_smoothing0.2", "inputs": _random_steps(12, 8, 3.0),
     "hyperparameters": {"beta": 0.3, "label_smoothing": 0.2}},
    {"name": "random_far_from_reference", "inputs": _random_steps(13, 8, 40.0), "hyperparameters": {"beta": 1.0}},
    {"name": "policy_equals_reference", "note": "the first training step: rewards 0, loss ln 2, d/d chosen = -β/2",
     "inputs": _pairs([-4.5, -12.0], [-3.25, -0.5], [-4.5, -12.0], [-3.25, -0.5]),
     "hyperparameters": {"beta": 0.5},
     "hand": {"losses": [LN2, LN2], "chosen_rewards": [0.0, 0.0], "rejected_rewards": [0.0, 0.0],
              "grad_policy_chosen_logps": [-0.25, -0.25], "grad_policy_rejected_logps": [0.25, 0.25]}},
    {"name": "same_step_twice", "note": "chosen = rejected (same tokens, same log-probs): h = 0 whatever the "
     "model, loss ln 2; the two gradients cancel in the model, since both sums are one tensor",
     "inputs": _pairs([-6.0], [-6.0], [-7.0], [-7.0]), "hyperparameters": {"beta": 0.2},
     "hand": {"losses": [LN2], "chosen_rewards": [0.2], "rejected_rewards": [0.2]}},
    {"name": "beta_h_ln3", "note": "β·h = ln 3: σ = 3/4, loss ln(4/3), d/d chosen = -β/4",
     "inputs": _pairs([-2.0], [-5.0 - 2 * LN3], [-3.0], [-6.0]), "hyperparameters": {"beta": 0.5},
     "hand": {"losses": [math.log(4 / 3)], "grad_policy_chosen_logps": [-0.125],
              "grad_reference_rejected_logps": [-0.125]}},
    {"name": "smoothing_stationary_point", "note": "β·h = ln 3 and ε = 1/4: σ(β·h) = 1 - ε, where cDPO's gradient "
     "vanishes; loss (3/4)·ln(4/3) + (1/4)·ln 4",
     "inputs": _pairs([-2.0], [-5.0 - 2 * LN3], [-3.0], [-6.0]),
     "hyperparameters": {"beta": 0.5, "label_smoothing": 0.25},
     "hand": {"losses": [0.75 * math.log(4 / 3) + 0.25 * math.log(4)], "grad_policy_chosen_logps": [0.0]}},
    {"name": "huge_margins", "note": "β·h = ±500: the loss is 0 or 500 exactly, never inf or NaN",
     "inputs": _pairs([0.0, -1000.0], [-1000.0, 0.0], [0.0, 0.0], [0.0, 0.0]), "hyperparameters": {"beta": 0.5},
     "hand": {"losses": [0.0, 500.0], "grad_policy_chosen_logps": [0.0, -0.5]}},
]

LOSSES = {
    "step_dpo_loss": {
        "reference": step_dpo_loss,
        "outputs": ["losses", "chosen_rewards", "rejected_rewards"],
        "cases": CASES,
    },
}

# The end-to-end golden: a few steps on the bundled step pairs. One process with 2 accumulated micro-batches
# of 4 pairs, and torchrun with 2 processes of 4 pairs each: the same global batch of 8, the same pairs.
# A learning rate larger than the default so that 4 steps move every metric well above float noise.
RUN = {
    "script": "algos/step_dpo.py",
    "args": ["--max-steps", "4", "--per-device-train-batch-size", "4", "--gradient-accumulation-steps", "2",
             "--learning-rate", "1e-4", "--warmup-ratio", "0", "--logging-steps", "1", "--eval-steps", "2",
             "--beta", "0.5", "--label-smoothing", "0.1"],
    "torchrun_args": ["--max-steps", "4", "--per-device-train-batch-size", "4", "--gradient-accumulation-steps",
                      "1", "--learning-rate", "1e-4", "--warmup-ratio", "0", "--logging-steps", "1", "--eval-steps",
                      "2", "--beta", "0.5", "--label-smoothing", "0.1"],
}
