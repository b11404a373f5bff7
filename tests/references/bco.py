"""Independent float64 reference for algos/bco.py, and the cases and run that pin it.

Written from the paper's equations (Jung et al. 2024, eqs. 7-8, with the class weights λD, λU that kto.py has), one
example at a time with `math`, never calling the script. With r = β·(logp(y) - ref(y)) the implicit reward and δ the
reward shift, a constant here (the script's REWARD_MEANS keep its moving averages: tests/test_bco.py tests them):
    loss = -λD·log σ(r - δ)   desirable,      -λU·log σ(-(r - δ))   undesirable
The gradient is derived by hand: d loss / d r = -λD·σ(-(r - δ)) for a desirable example and +λU·σ(r - δ) for an
undesirable one; r moves with +β per unit of policy, -β per unit of reference. δ is a number, not an input tensor:
no gradient can flow into it.

`python -m tests.golden bco --write` turns LOSSES and RUN into tests/golden/bco.*.json.
"""

import math
import random


def log_sigmoid(x: float) -> float:
    """log σ(x) without overflow: -log(1 + e^-x) for x >= 0, x - log(1 + e^x) below."""
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def bco_loss(policy_logps, reference_logps, desirable, reward_shift, beta, desirable_weight=1.0,
             undesirable_weight=1.0):
    """Per-example losses and rewards, and the gradient of the summed losses with respect to the log-probs."""
    out = {"losses": [], "rewards": []}
    grads = {"policy_logps": [], "reference_logps": []}
    for policy, reference, is_desirable in zip(policy_logps, reference_logps, desirable):
        r = beta * (policy - reference)
        if is_desirable:
            out["losses"].append(-desirable_weight * log_sigmoid(r - reward_shift))
            dr = -desirable_weight * sigmoid(-(r - reward_shift))
        else:
            out["losses"].append(-undesirable_weight * log_sigmoid(-(r - reward_shift)))
            dr = undesirable_weight * sigmoid(r - reward_shift)
        out["rewards"].append(r)
        grads["policy_logps"].append(beta * dr)
        grads["reference_logps"].append(-beta * dr)
    return out, grads


def _examples(policy, reference, desirable):
    return {"policy_logps": policy, "reference_logps": reference, "desirable": desirable}


def _random_examples(seed: int, n: int, spread: float, desirable=None) -> dict:
    """Sequence log-probs of realistic size (-80 .. -2), the policy within ±spread of the reference."""
    rng = random.Random(seed)
    reference = [round(rng.uniform(-80, -2), 6) for _ in range(n)]
    policy = [round(r + rng.uniform(-spread, spread), 6) for r in reference]
    labels = [rng.random() < 0.4 for _ in range(n)] if desirable is None else [desirable] * n
    return _examples(policy, reference, labels)


LN2 = 0.6931471805599453
LN3 = 1.0986122886681098

# Each case: inputs (the tensor arguments, as lists), hyperparameters (the other arguments), and for the
# hand-computed ones `hand`: values worked out on paper, which the reference must reproduce too.
CASES = [
    {"name": "random_both_classes_beta0.1", "note": "the paper's β, δ a typical small shift",
     "inputs": _random_examples(0, 8, 5.0), "hyperparameters": {"reward_shift": -0.05, "beta": 0.1}},
    {"name": "random_weighted_beta2", "note": "λD = 1.5 (kto.py's class weights, kept)",
     "inputs": _random_examples(1, 8, 2.0), "hyperparameters": {"reward_shift": 0.7, "beta": 2.0,
                                                                "desirable_weight": 1.5}},
    {"name": "random_far_from_reference", "inputs": _random_examples(2, 8, 60.0),
     "hyperparameters": {"reward_shift": -3.0, "beta": 0.3, "desirable_weight": 0.8, "undesirable_weight": 1.5}},
    {"name": "only_desirable", "note": "a one-class micro-batch: finite, every example pulls up",
     "inputs": _random_examples(4, 5, 5.0, desirable=True), "hyperparameters": {"reward_shift": 0.2, "beta": 0.5}},
    {"name": "only_undesirable", "note": "a one-class micro-batch: finite, every example pushes down",
     "inputs": _random_examples(5, 5, 5.0, desirable=False), "hyperparameters": {"reward_shift": 0.2, "beta": 0.5}},
    {"name": "policy_equals_reference", "note": "the first step of training: r = δ = 0, loss λ·ln 2, gradient ∓λβ/2",
     "inputs": _examples([-20.5, -7.25, -33.0], [-20.5, -7.25, -33.0], [True, False, True]),
     "hyperparameters": {"reward_shift": 0.0, "beta": 0.4, "desirable_weight": 2.0, "undesirable_weight": 1.5},
     "hand": {"losses": [2 * LN2, 1.5 * LN2, 2 * LN2], "rewards": [0.0, 0.0, 0.0],
              "grad_policy_logps": [-0.4, 0.3, -0.4], "grad_reference_logps": [0.4, -0.3, 0.4]}},
    {"name": "shift_by_hand", "note": "δ = 1, r - δ = ±ln 3 at β = 1: σ(ln 3) = 3/4, so a desirable loss is "
     "λD·ln(4/3) above δ and λD·ln 4 below it, an undesirable one the other way round; d/d r = -λD·σ(δ - r), "
     "+λU·σ(r - δ)",
     "inputs": _examples([-10.0 + 1 + LN3, -10.0 + 1 - LN3, -10.0 + 1 - LN3, -10.0 + 1 + LN3],
                         [-10.0, -10.0, -10.0, -10.0], [True, False, True, False]),
     "hyperparameters": {"reward_shift": 1.0, "beta": 1.0, "desirable_weight": 1.0, "undesirable_weight": 2.0},
     "hand": {"losses": [math.log(4 / 3), 2 * math.log(4 / 3), math.log(4), 2 * math.log(4)],
              "rewards": [1 + LN3, 1 - LN3, 1 - LN3, 1 + LN3],
              "grad_policy_logps": [-0.25, 0.5, -0.75, 1.5]}},
    {"name": "the_shift_is_what_counts", "note": "r = 3, δ = 3: every loss is λ·ln 2 whatever the reward's size "
     "(δ = 0 would give ln(1 + e^-3) and ln(1 + e^3))",
     "inputs": _examples([-7.0, -7.0], [-10.0, -10.0], [True, False]),
     "hyperparameters": {"reward_shift": 3.0, "beta": 1.0},
     "hand": {"losses": [LN2, LN2], "rewards": [3.0, 3.0], "grad_policy_logps": [-0.5, 0.5]}},
    {"name": "huge_margins", "note": "r - δ = ±1000: -λ·log σ(1000) underflows to 0, -λ·log σ(-1000) = 1000·λ, its "
     "gradient ∓λβ",
     "inputs": _examples([0.0, -10000.0, -10000.0, 0.0], [-10000.0, 0.0, 0.0, -10000.0], [True, True, False, False]),
     "hyperparameters": {"reward_shift": 0.0, "beta": 0.1, "desirable_weight": 1.5, "undesirable_weight": 0.5},
     "hand": {"losses": [0.0, 1500.0, 0.0, 500.0], "grad_policy_logps": [0.0, -0.15, 0.0, 0.05]}},
]

LOSSES = {
    "bco_loss": {
        "reference": bco_loss,
        "outputs": ["losses", "rewards"],
        "cases": CASES,
    },
}

# The end-to-end golden: a few steps on the bundled task. Its pairs (unpaired by the script: the pair data
# path end to end, and a test split of 292 examples instead of the 1200 unpaired ones, which keeps the
# evaluation short). One process with micro-batches of 8 examples, and torchrun with 2 processes of 4: the same
# micro-batch of 8 whose class means move δ, and evaluation groups of 32 either way (32 x 1 process, 16 x 2). A
# learning rate larger than the default so that 4 steps move every metric well above float noise; ρ = 0.5 so that δ
# moves visibly in 4 steps (the run pins the moving averages: each logged train/reward_shift is the δ of that step).
RUN = {
    "script": "algos/bco.py",
    "args": ["--dataset-name", "benchmarks/arith/data/pairs_{split}.jsonl", "--max-steps", "4",
             "--per-device-train-batch-size", "8", "--per-device-eval-batch-size", "32", "--learning-rate", "1e-4",
             "--warmup-ratio", "0", "--logging-steps", "1", "--eval-steps", "2", "--beta", "2",
             "--reward-shift-decay", "0.5"],
    "torchrun_args": ["--dataset-name", "benchmarks/arith/data/pairs_{split}.jsonl", "--max-steps", "4",
                      "--per-device-train-batch-size", "4", "--per-device-eval-batch-size", "16",
                      "--learning-rate", "1e-4", "--warmup-ratio", "0", "--logging-steps", "1", "--eval-steps", "2",
                      "--beta", "2", "--reward-shift-decay", "0.5"],
    # Looser than the default (rtol 1e-5, atol 1e-6), as kto.py's: 1 x 8 and 2 x 4 examples pad to different widths,
    # so float32 log-probs round differently, β = 2 carries that into the rewards and δ averages them (measured: |Δ| up
    # to 2.6e-6 on train/reward_shift ~ 0.06, 9e-6 on train/rewards/rejected ~ 0.26, after 4 steps).
    "torchrun_tolerance": {"rtol": 1e-4, "atol": 1e-5},
}
