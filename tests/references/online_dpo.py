"""Independent float64 reference for algos/online_dpo.py, and the cases and run that pin it.

Written from the paper's objective (Guo et al. 2024, arXiv:2402.04792, Algorithm 1: DPO's loss on the pair of the
current policy's samples that the annotator ordered), one pair at a time with `math`, never calling the script:
    h    = (logp(yw) - ref(yw)) - (logp(yl) - ref(yl))
    loss = -log σ(β·h),  and 0 for a pair the judge calls a tie (P = 1/2: neither is preferred)
The gradient is derived by hand: d loss / d h = -β·σ(-β·h) (0 for a tie), and h moves with +policy_chosen,
-policy_rejected, -reference_chosen, +reference_rejected.

`python -m tests.golden online_dpo --write` turns LOSSES and RUN into tests/golden/online_dpo.*.json.
"""

import math
import random


def log_sigmoid(x: float) -> float:
    """log σ(x) without overflow: -log(1 + e^-x) for x >= 0, x - log(1 + e^x) below."""
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def online_dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                    ties, beta):
    """Per-pair losses and rewards, and the gradient of the summed losses with respect to each float input."""
    out = {"losses": [], "chosen_rewards": [], "rejected_rewards": []}
    grads = {"policy_chosen_logps": [], "policy_rejected_logps": [], "reference_chosen_logps": [],
             "reference_rejected_logps": []}
    for pc, pr, rc, rr, tie in zip(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                                   reference_rejected_logps, ties):
        h = (pc - rc) - (pr - rr)
        out["losses"].append(0.0 if tie else -log_sigmoid(beta * h))
        out["chosen_rewards"].append(beta * (pc - rc))
        out["rejected_rewards"].append(beta * (pr - rr))
        dh = 0.0 if tie else -beta * sigmoid(-beta * h)
        for name, sign in (("policy_chosen_logps", 1), ("policy_rejected_logps", -1),
                           ("reference_chosen_logps", -1), ("reference_rejected_logps", 1)):
            grads[name].append(sign * dh)
    return out, grads


def _pairs(policy_chosen, policy_rejected, reference_chosen, reference_rejected, ties):
    return {"policy_chosen_logps": policy_chosen, "policy_rejected_logps": policy_rejected,
            "reference_chosen_logps": reference_chosen, "reference_rejected_logps": reference_rejected, "ties": ties}


def _random_pairs(seed: int, n: int, spread: float, tie_rate: float) -> dict:
    """Sequence log-probs of realistic size (-80 .. -2), the policy within ±spread of the reference; a share of
    ties (the verifier's equal scores)."""
    rng = random.Random(seed)
    reference = [[round(rng.uniform(-80, -2), 6) for _ in range(n)] for _ in range(2)]
    policy = [[round(r + rng.uniform(-spread, spread), 6) for r in side] for side in reference]
    ties = [rng.random() < tie_rate for _ in range(n)]
    return _pairs(policy[0], policy[1], reference[0], reference[1], ties)


LN2 = 0.6931471805599453  # -log σ(0)
LOG1P_E = math.log1p(math.e)  # -log σ(-1)

# Each case: inputs (the tensor arguments, as lists), hyperparameters (the other arguments), and for the
# hand-computed ones `hand`: values worked out on paper, which the reference must reproduce too.
CASES = [
    {"name": "random_beta0.1", "inputs": _random_pairs(0, 8, 5.0, 0.0), "hyperparameters": {"beta": 0.1}},
    {"name": "random_beta2_with_ties", "inputs": _random_pairs(1, 8, 5.0, 0.4), "hyperparameters": {"beta": 2.0}},
    {"name": "random_far_from_reference", "inputs": _random_pairs(2, 8, 60.0, 0.25),
     "hyperparameters": {"beta": 0.3}},
    {"name": "policy_equals_reference", "note": "the first step of training: every reward 0, loss ln 2, gradient ∓β/2",
     "inputs": _pairs([-20.5, -7.25], [-18.0, -9.5], [-20.5, -7.25], [-18.0, -9.5], [False, False]),
     "hyperparameters": {"beta": 0.5},
     "hand": {"losses": [LN2, LN2], "chosen_rewards": [0.0, 0.0], "rejected_rewards": [0.0, 0.0],
              "grad_policy_chosen_logps": [-0.25, -0.25], "grad_policy_rejected_logps": [0.25, 0.25]}},
    {"name": "ties_give_nothing", "note": "a tie: loss 0 and no gradient whatever the log-probs; the rewards are still "
     "logged (y1 as chosen)",
     "inputs": _pairs([-3.0, -40.0], [-9.0, -1.0], [-5.0, -30.0], [-8.0, -2.0], [True, True]),
     "hyperparameters": {"beta": 1.0},
     "hand": {"losses": [0.0, 0.0], "chosen_rewards": [2.0, -10.0], "rejected_rewards": [-1.0, 1.0],
              "grad_policy_chosen_logps": [0.0, 0.0], "grad_reference_rejected_logps": [0.0, 0.0]}},
    {"name": "the_judged_winner_behind", "note": "β·h = -1 (the policy prefers the loser): loss log(1 + e), "
     "gradient -β·σ(1) on the chosen log-prob",
     "inputs": _pairs([-11.0], [-9.0], [-10.0], [-10.0], [False]), "hyperparameters": {"beta": 0.5},
     "hand": {"losses": [LOG1P_E], "chosen_rewards": [-0.5], "rejected_rewards": [0.5],
              "grad_policy_chosen_logps": [-0.5 * sigmoid(1.0)], "grad_policy_rejected_logps": [0.5 * sigmoid(1.0)]}},
    {"name": "huge_margins", "note": "β·h = ±1000: -log σ(1000) underflows to 0, -log σ(-1000) = 1000",
     "inputs": _pairs([0.0, -10000.0], [-10000.0, 0.0], [0.0, 0.0], [0.0, 0.0], [False, False]),
     "hyperparameters": {"beta": 0.1},
     "hand": {"losses": [0.0, 1000.0], "grad_policy_chosen_logps": [0.0, -0.1]}},
]

LOSSES = {
    "online_dpo_loss": {"reference": online_dpo_loss, "outputs": ["losses", "chosen_rewards", "rejected_rewards"],
                        "cases": CASES},
}

# The end-to-end golden: a few steps on the bundled task, judged by the verifier (exact, no judge model to load).
# One process with 2 accumulated micro-batches of 2 prompts, and torchrun with 2 processes of 2 prompts each: the
# same global batch of 4, the same samples (each completion's noise comes from its own generator). Short
# completions (24 tokens) keep the sampling, and the evaluation on the 300 test prompts, to a few seconds; a
# learning rate larger than the default's effect per step so that 3 steps move every metric well above float noise.
RUN = {
    "script": "algos/online_dpo.py",
    "args": ["--max-steps", "3", "--per-device-train-batch-size", "2", "--gradient-accumulation-steps", "2",
             "--max-new-tokens", "24", "--learning-rate", "1e-3", "--warmup-ratio", "0", "--logging-steps", "1",
             "--eval-steps", "3", "--beta", "0.5", "--judge", "verifier"],
    "torchrun_args": ["--max-steps", "3", "--per-device-train-batch-size", "2", "--gradient-accumulation-steps", "1",
                      "--max-new-tokens", "24", "--learning-rate", "1e-3", "--warmup-ratio", "0", "--logging-steps",
                      "1", "--eval-steps", "3", "--beta", "0.5", "--judge", "verifier"],
}
