"""Independent float64 reference for algos/curry_dpo.py, and the cases and run that pin it.

Written from the paper (Pattnaik et al. 2024, Curry-DPO), one pair at a time with `math`, never calling the script.
Each list of completions y_1..y_K with scores s_1..s_K gives the pairs (y_b, y_j) of its best completion b (the first
with the highest score) and each j with s_j < s_b, ordered easy to hard: the largest gap s_b - s_j first (ties in the
gap by index). Stage k (0-based) of S trains on every list's k-th pair (its last one when it has fewer, (b, b) when it
has none), with DPO's loss against ref_k, the policy at the end of stage k - 1 (the initial model for k = 0):
    h    = (logp(yw) - ref_k(yw)) - (logp(yl) - ref_k(yl))
    loss = -(1 - ε)·log σ(β·h) - ε·log σ(-β·h)          (the paper's DPO loss, ε = 0; cDPO for ε > 0)
The gradient is derived by hand: d loss / d h = -β·((1 - ε)·σ(-β·h) - ε·σ(β·h)), and h moves with
+policy_chosen, -policy_rejected, -reference_chosen, +reference_rejected. A run of T steps gives step t (1-based) to
stage floor((t - 1)·S / T). `curriculum` and `stage_of_step` below are the literal versions of those two rules, for
tests/test_curry_dpo.py; the loss golden pins the per-pair loss (the same for every stage, given its reference).

`python -m tests.golden curry_dpo --write` turns LOSSES and RUN into tests/golden/curry_dpo.*.json.
"""

import math
import random


def log_sigmoid(x: float) -> float:
    """log σ(x) without overflow: -log(1 + e^-x) for x >= 0, x - log(1 + e^x) below."""
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def curry_dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                   beta, label_smoothing=0.0):
    """Per-pair losses and rewards, and the gradient of the summed losses with respect to each input."""
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


def curriculum(scores: list[float], num_stages: int) -> list[tuple[int, int]]:
    """Each stage's (chosen, rejected) indices: every pair (best, worse) with its gap, sorted by descending gap."""
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))  # the first of the highest
    pairs = []
    for j, score in enumerate(scores):
        if score < scores[best]:
            pairs.append((scores[best] - score, j))
    pairs.sort(key=lambda gap_and_index: (-gap_and_index[0], gap_and_index[1]))
    ordered = [(best, j) for _, j in pairs] if pairs else [(best, best)]
    return [ordered[k] if k < len(ordered) else ordered[-1] for k in range(num_stages)]


def stage_of_step(step: int, total_steps: int, num_stages: int) -> int:
    """The stage of optimiser step `step` (1-based): the run cut into num_stages equal shares of steps, in order."""
    return min(num_stages - 1, math.floor((step - 1) * num_stages / total_steps))


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
CASES = [
    {"name": "random_beta0.1", "inputs": _random_pairs(0, 8, 5.0), "hyperparameters": {"beta": 0.1}},
    {"name": "random_beta0.5", "inputs": _random_pairs(1, 8, 5.0), "hyperparameters": {"beta": 0.5}},
    {"name": "random_beta0.1_smoothing0.1", "inputs": _random_pairs(2, 8, 5.0),
     "hyperparameters": {"beta": 0.1, "label_smoothing": 0.1}},
    {"name": "random_far_from_reference", "inputs": _random_pairs(3, 8, 60.0),
     "hyperparameters": {"beta": 0.3, "label_smoothing": 0.05}},
    {"name": "h0_is_ln2", "note": "h = 0 with policy != reference (e.g. equal drifts since the stage began): loss "
                                  "ln 2, gradient ∓β/2",
     "inputs": _pairs([-10.0, -3.0], [-12.0, -7.0], [-11.0, -4.0], [-13.0, -8.0]),
     "hyperparameters": {"beta": 0.1},
     "hand": {"losses": [LN2, LN2], "chosen_rewards": [0.1, 0.1], "rejected_rewards": [0.1, 0.1],
              "grad_policy_chosen_logps": [-0.05, -0.05], "grad_policy_rejected_logps": [0.05, 0.05]}},
    {"name": "policy_equals_reference", "note": "the first step of every stage (the reference is the policy as "
                                                "the stage begins): every reward 0, loss ln 2",
     "inputs": _pairs([-20.5, -7.25, -33.0], [-18.0, -9.5, -2.0], [-20.5, -7.25, -33.0], [-18.0, -9.5, -2.0]),
     "hyperparameters": {"beta": 0.5, "label_smoothing": 0.2},
     "hand": {"losses": [LN2] * 3, "chosen_rewards": [0.0] * 3, "rejected_rewards": [0.0] * 3,
              "grad_policy_chosen_logps": [-0.15] * 3}},  # -β(1 - 2ε)/2
    {"name": "huge_margins", "note": "β·h = ±1000: -log σ(1000) underflows to 0, -log σ(-1000) = 1000",
     "inputs": _pairs([0.0, -10000.0], [-10000.0, 0.0], [0.0, 0.0], [0.0, 0.0]),
     "hyperparameters": {"beta": 0.1},
     "hand": {"losses": [0.0, 1000.0], "chosen_rewards": [0.0, -1000.0], "rejected_rewards": [-1000.0, 0.0],
              "grad_policy_chosen_logps": [0.0, -0.1]}},
    {"name": "huge_margins_smoothed", "note": "cDPO at β·h = ±1000: ε·1000 and (1 - ε)·1000",
     "inputs": _pairs([0.0, -10000.0], [-10000.0, 0.0], [0.0, 0.0], [0.0, 0.0]),
     "hyperparameters": {"beta": 0.1, "label_smoothing": 0.25},
     "hand": {"losses": [250.0, 750.0], "grad_policy_chosen_logps": [0.025, -0.075]}},
    {"name": "smoothing_one_half_is_symmetric", "note": "ε = 1/2: loss(h) = loss(-h) = (softplus(2) + softplus(-2))/2 = 1 + log(1 + e^-2)",
     "inputs": _pairs([-5.0, -25.0], [-25.0, -5.0], [-15.0, -15.0], [-15.0, -15.0]),
     "hyperparameters": {"beta": 0.1, "label_smoothing": 0.5},
     "hand": {"losses": [1.12692801104297263] * 2,
              "grad_policy_chosen_logps": [0.038079707797788245, -0.038079707797788245]}},  # ±β/2·tanh(1)
    {"name": "single_pair_beta1", "note": "h = 2, β = 1: loss log(1 + e^-2)",
     "inputs": _pairs([-3.0], [-6.0], [-4.0], [-5.0]), "hyperparameters": {"beta": 1.0},
     "hand": {"losses": [0.12692801104297263], "grad_policy_chosen_logps": [-0.11920292202211755]}},
]

LOSSES = {
    "curry_dpo_loss": {
        "reference": curry_dpo_loss,
        "outputs": ["losses", "chosen_rewards", "rejected_rewards"],
        "cases": CASES,
    },
}

# The end-to-end golden: a few steps on the bundled task (its lists). One process with 2 accumulated micro-batches
# of 4 lists, and torchrun with 2 processes of 4 lists each: the same global batch of 8, the same pairs.
# A learning rate larger than the default so that 6 steps move every metric well above float noise. Two stages of
# 3 steps: the reference becomes the policy at step 4 (train/loss is ln 2 there), and the shared run's checkpoint
# (tests/test_runs.py: halfway, after step 3) ends stage 0, so the resumed run moves the reference itself (resuming
# within a stage needs <output dir>/reference-stage-<k>, which tests/test_curry_dpo.py covers).
RUN = {
    "script": "algos/curry_dpo.py",
    "args": ["--max-steps", "6", "--per-device-train-batch-size", "4", "--gradient-accumulation-steps", "2",
             "--learning-rate", "1e-4", "--warmup-ratio", "0", "--logging-steps", "1", "--eval-steps", "3",
             "--beta", "0.3", "--label-smoothing", "0.1", "--num-stages", "2"],
    "torchrun_args": ["--max-steps", "6", "--per-device-train-batch-size", "4", "--gradient-accumulation-steps", "1",
                      "--learning-rate", "1e-4", "--warmup-ratio", "0", "--logging-steps", "1", "--eval-steps", "3",
                      "--beta", "0.3", "--label-smoothing", "0.1", "--num-stages", "2"],
}
