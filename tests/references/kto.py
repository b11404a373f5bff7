"""Independent float64 reference for algos/kto.py, and the cases and run that pin it.

Written from the paper's equations (Ethayarajh et al. 2024, the KTO loss and its KL estimate), one example at a
time with `math`, never calling the script. With r = logp(y) - ref(y) and the m mismatched pairs (x_i, y_{i+1}):
    z0   = max(0, (1/m)·Σ_i [logp(y_{i+1}|x_i) - ref(y_{i+1}|x_i)])       a constant for the gradient
    loss = λD·(1 - σ(β·(r - z0)))   desirable,      λU·(1 - σ(β·(z0 - r)))   undesirable
The gradient is derived by hand, with v = σ(β·(r - z0)) for a desirable example and v = σ(β·(z0 - r)) for an
undesirable one: d loss / d r = -λD·β·v·(1 - v), resp. +λU·β·v·(1 - v); r moves with +policy, -reference.
z0 carries no gradient (the paper does not backpropagate through it), which the central differences of the
golden harness cannot check: tests/test_kto.py does.

`python -m tests.golden kto --write` turns LOSSES and RUN into tests/golden/kto.*.json.
"""

import math
import random


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def kto_loss(policy_logps, reference_logps, desirable, policy_kl_logps, reference_kl_logps, beta,
             desirable_weight=1.0, undesirable_weight=1.0):
    """Per-example losses, rewards and z0, and the gradient of the summed losses with respect to the log-probs."""
    kl_estimate = math.fsum(p - r for p, r in zip(policy_kl_logps, reference_kl_logps)) / len(policy_kl_logps)
    z0 = max(0.0, kl_estimate)
    out = {"losses": [], "rewards": [], "reference_point": z0}
    grads = {"policy_logps": [], "reference_logps": []}
    for policy, reference, is_desirable in zip(policy_logps, reference_logps, desirable):
        r = policy - reference
        if is_desirable:
            v = sigmoid(beta * (r - z0))
            out["losses"].append(desirable_weight * (1 - v))
            dr = -desirable_weight * beta * v * (1 - v)
        else:
            v = sigmoid(beta * (z0 - r))
            out["losses"].append(undesirable_weight * (1 - v))
            dr = undesirable_weight * beta * v * (1 - v)
        out["rewards"].append(beta * r)
        grads["policy_logps"].append(dr)
        grads["reference_logps"].append(-dr)
    return out, grads


def _examples(policy, reference, desirable, policy_kl, reference_kl):
    return {"policy_logps": policy, "reference_logps": reference, "desirable": desirable,
            "policy_kl_logps": policy_kl, "reference_kl_logps": reference_kl}


def _random_examples(seed: int, n: int, spread: float, kl_shift: float, desirable=None) -> dict:
    """Sequence log-probs of realistic size (-80 .. -2), the policy within ±spread of the reference; the n
    mismatched pairs' log-ratios are centred on kl_shift (negative: z0 is clamped to 0)."""
    rng = random.Random(seed)
    reference = [round(rng.uniform(-80, -2), 6) for _ in range(n)]
    policy = [round(r + rng.uniform(-spread, spread), 6) for r in reference]
    labels = [rng.random() < 0.4 for _ in range(n)] if desirable is None else [desirable] * n
    reference_kl = [round(rng.uniform(-120, -20), 6) for _ in range(n)]
    policy_kl = [round(r + kl_shift + rng.uniform(-spread, spread), 6) for r in reference_kl]
    return _examples(policy, reference, labels, policy_kl, reference_kl)


LN3 = math.log(3)

# Each case: inputs (the tensor arguments, as lists), hyperparameters (the other arguments), and for the
# hand-computed ones `hand`: values worked out on paper, which the reference must reproduce too.
CASES = [
    {"name": "random_both_classes_beta0.1", "inputs": _random_examples(0, 8, 5.0, 2.0),
     "hyperparameters": {"beta": 0.1}},
    {"name": "random_weighted_beta0.5", "note": "λD = 1.33, λU = 1 (the paper's imbalance correction)",
     "inputs": _random_examples(1, 8, 5.0, 3.0), "hyperparameters": {"beta": 0.5, "desirable_weight": 1.33}},
    {"name": "random_far_from_reference", "inputs": _random_examples(2, 8, 60.0, 20.0),
     "hyperparameters": {"beta": 0.3, "desirable_weight": 0.8, "undesirable_weight": 1.5}},
    {"name": "negative_kl_is_clamped_to_0", "note": "the mismatched log-ratios average -2: z0 = 0, not -2",
     "inputs": _random_examples(3, 6, 5.0, -2.0), "hyperparameters": {"beta": 0.2}},
    {"name": "only_desirable", "note": "a one-class micro-batch: finite, every example pulls up",
     "inputs": _random_examples(4, 5, 5.0, 1.0, desirable=True), "hyperparameters": {"beta": 0.1}},
    {"name": "only_undesirable", "note": "a one-class micro-batch: finite, every example pushes down",
     "inputs": _random_examples(5, 5, 5.0, 1.0, desirable=False), "hyperparameters": {"beta": 0.1}},
    {"name": "policy_equals_reference", "note": "the first step of training: r = z0 = 0, loss λ/2, gradient ∓λβ/4",
     "inputs": _examples([-20.5, -7.25, -33.0], [-20.5, -7.25, -33.0], [True, False, True],
                         [-40.0, -12.5, -9.0], [-40.0, -12.5, -9.0]),
     "hyperparameters": {"beta": 0.4, "desirable_weight": 2.0, "undesirable_weight": 1.5},
     "hand": {"losses": [1.0, 0.75, 1.0], "rewards": [0.0, 0.0, 0.0],
              "grad_policy_logps": [-0.2, 0.15, -0.2], "grad_reference_logps": [0.2, -0.15, 0.2]}},
    {"name": "z0_by_hand", "note": "mismatched log-ratios 1 and 3: z0 = 2; r - z0 = ±ln 3 at β = 1 gives σ = 3/4, "
     "so each loss is λ/4 and its gradient ∓λ·3/16",
     "inputs": _examples([-10.0 + 2 + LN3, -10.0 + 2 - LN3, -10.0 + 2 - LN3, -10.0 + 2 + LN3],
                         [-10.0, -10.0, -10.0, -10.0], [True, False, True, False], [-4.0, -5.0], [-5.0, -8.0]),
     "hyperparameters": {"beta": 1.0, "desirable_weight": 1.0, "undesirable_weight": 2.0},
     "hand": {"losses": [0.25, 0.5, 0.75, 1.5], "grad_policy_logps": [-0.1875, 0.375, -0.1875, 0.375]}},
    {"name": "one_example_per_process", "note": "B = 1 example here, M = 2 pairs: the other process's pair counts",
     "inputs": _examples([-12.0], [-13.0], [True], [-30.0, -20.0], [-30.5, -20.5]),
     "hyperparameters": {"beta": 1.0},
     "hand": {"losses": [0.3775406687981454], "rewards": [1.0]}},  # 1 - σ(1 - 0.5)
    {"name": "huge_margins", "note": "β·(r - z0) = ±1000: the bounded loss is 0 or λ exactly, its gradient 0",
     "inputs": _examples([0.0, -10000.0, -10000.0, 0.0], [-10000.0, 0.0, 0.0, -10000.0], [True, True, False, False],
                         [0.0, 0.0], [0.0, 0.0]),
     "hyperparameters": {"beta": 0.1, "desirable_weight": 1.5, "undesirable_weight": 0.5},
     "hand": {"losses": [0.0, 1.5, 0.0, 0.5], "grad_policy_logps": [0.0, 0.0, 0.0, 0.0]}},
]

LOSSES = {
    "kto_loss": {
        "reference": kto_loss,
        "outputs": ["losses", "rewards", "reference_point"],
        "cases": CASES,
    },
}

# The end-to-end golden: a few steps on the bundled task. Its pairs (unpaired by the script: the pair data
# path end to end, and a test split of 292 examples instead of the 1200 unpaired ones, which keeps the
# evaluation short). One process with micro-batches of 8 examples, and torchrun with 2 processes of 4: the same
# micro-batch of 8 sharing one z0, the same mismatched pairs, and evaluation groups of 32 either way (32 x 1
# process, 16 x 2). A learning rate larger than the default so that 4 steps move every metric well above float
# noise; λD·nD / (λU·nU) = 1.5 keeps the class-balance rule quiet.
RUN = {
    "script": "algos/kto.py",
    "args": ["--dataset-name", "benchmarks/arith/data/pairs_{split}.jsonl", "--max-steps", "4",
             "--per-device-train-batch-size", "8", "--per-device-eval-batch-size", "32", "--learning-rate", "1e-4",
             "--warmup-ratio", "0", "--logging-steps", "1", "--eval-steps", "2", "--beta", "2",
             "--desirable-weight", "1.5"],
    "torchrun_args": ["--dataset-name", "benchmarks/arith/data/pairs_{split}.jsonl", "--max-steps", "4",
                      "--per-device-train-batch-size", "4", "--per-device-eval-batch-size", "16",
                      "--learning-rate", "1e-4", "--warmup-ratio", "0", "--logging-steps", "1", "--eval-steps", "2",
                      "--beta", "2", "--desirable-weight", "1.5"],
    # Looser than the default (rtol 1e-5, atol 1e-6): 1 x 8 and 2 x 4 examples pad to different widths, so float32
    # sums round differently, and β = 2 carries that into the small KL estimate z0 (measured: |Δ| up to 3e-6 on
    # train/kl ~ 0.007, 4e-6 on the rewards, after 4 steps).
    "torchrun_tolerance": {"rtol": 1e-4, "atol": 1e-5},
}
