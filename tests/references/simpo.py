"""Independent float64 reference for algos/simpo.py, and the cases and run that pin it.

Written from the paper's equation, one pair at a time with `math`, never calling the script:
    r(y)   = β·logp(y)/max(|y|, 1)                   the length-normalised, reference-free reward
    z      = r(yw) - r(yl) - γ,   γ = β·(γ/β)
    loss_i = -(1 - ε)·log σ(z) - ε·log σ(-z)         (Meng et al. 2024, eq. 6, for ε = 0)
             + λ·B·(-logp(yw_i)) / max(Σ_j |yw_j|, 1)   this pair's share of λ × the NLL per chosen token
The gradient is derived by hand: d loss_i / d z = -(1 - ε)·σ(-z) + ε·σ(z); z moves with +β/n(yw) per unit of
policy_chosen and -β/n(yl) per unit of policy_rejected; the SFT term adds -λ·B/max(Σ_j |yw_j|, 1) to
every chosen log-prob's gradient of the summed losses. The lengths are integers and carry no gradient.

`python -m tests.golden simpo --write` turns LOSSES and RUN into tests/golden/simpo.*.json.
"""

import math
import random


def log_sigmoid(x: float) -> float:
    """log σ(x) without overflow: -log(1 + e^-x) for x >= 0, x - log(1 + e^x) below."""
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def simpo_loss(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths, beta,
               gamma_beta_ratio, label_smoothing=0.0, sft_weight=0.0):
    """Per-pair losses and rewards, and the gradient of the summed losses with respect to each float input."""
    eps, gamma, pairs = label_smoothing, beta * gamma_beta_ratio, len(policy_chosen_logps)
    chosen_tokens = max(sum(chosen_lengths), 1)
    out = {"losses": [], "chosen_rewards": [], "rejected_rewards": []}
    grads = {"policy_chosen_logps": [], "policy_rejected_logps": []}
    for pc, pr, lc, lr in zip(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths):
        chosen_reward = beta * pc / max(lc, 1)
        rejected_reward = beta * pr / max(lr, 1)
        z = chosen_reward - rejected_reward - gamma
        sft_share = sft_weight * pairs * -pc / chosen_tokens
        out["losses"].append(-(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z) + sft_share)
        out["chosen_rewards"].append(chosen_reward)
        out["rejected_rewards"].append(rejected_reward)
        dz = -(1 - eps) * sigmoid(-z) + eps * sigmoid(z)
        grads["policy_chosen_logps"].append(dz * beta / max(lc, 1) - sft_weight * pairs / chosen_tokens)
        grads["policy_rejected_logps"].append(-dz * beta / max(lr, 1))
    return out, grads


def _pairs(policy_chosen, policy_rejected, chosen_lengths, rejected_lengths):
    return {"policy_chosen_logps": policy_chosen, "policy_rejected_logps": policy_rejected,
            "chosen_lengths": chosen_lengths, "rejected_lengths": rejected_lengths}


def _random_pairs(seed: int, n: int) -> dict:
    """Sequence log-probs of realistic size (-80 .. -2) for 5 .. 60 tokens."""
    rng = random.Random(seed)
    logps = [[round(rng.uniform(-80, -2), 6) for _ in range(n)] for _ in range(2)]
    lengths = [[rng.randint(5, 60) for _ in range(n)] for _ in range(2)]
    return _pairs(logps[0], logps[1], lengths[0], lengths[1])


LN2 = 0.6931471805599453  # -log σ(0)
SOFTPLUS1 = 1.3132616875182228  # -log σ(-1) = log(1 + e)

# Each case: inputs (the tensor arguments, as lists), hyperparameters (the other arguments), and for the
# hand-computed ones `hand`: values worked out on paper, which the reference must reproduce too.
CASES = [
    {"name": "random_beta2_ratio0.5", "inputs": _random_pairs(0, 8),
     "hyperparameters": {"beta": 2.0, "gamma_beta_ratio": 0.5}},
    {"name": "random_beta10_ratio0.3", "inputs": _random_pairs(1, 8),
     "hyperparameters": {"beta": 10.0, "gamma_beta_ratio": 0.3}},
    {"name": "random_smoothing_and_sft", "inputs": _random_pairs(2, 8),
     "hyperparameters": {"beta": 2.5, "gamma_beta_ratio": 0.55, "label_smoothing": 0.1, "sft_weight": 0.5}},
    {"name": "equal_averages_no_margin_is_ln2", "note": "averages -6/3 = -8/4 = -2 and γ = 0: loss ln 2, "
     "d/d chosen = -(1/2)·β/3", "inputs": _pairs([-6.0], [-8.0], [3], [4]),
     "hyperparameters": {"beta": 2.0, "gamma_beta_ratio": 0.0},
     "hand": {"losses": [LN2], "chosen_rewards": [-4.0], "rejected_rewards": [-4.0],
              "grad_policy_chosen_logps": [-1 / 3], "grad_policy_rejected_logps": [0.25]}},
    {"name": "equal_averages_margin_gamma1", "note": "equal averages, γ = 2·0.5 = 1: loss log(1 + e), "
     "d/d chosen = -σ(1)·β/3", "inputs": _pairs([-6.0], [-8.0], [3], [4]),
     "hyperparameters": {"beta": 2.0, "gamma_beta_ratio": 0.5},
     "hand": {"losses": [SOFTPLUS1], "grad_policy_chosen_logps": [-2 / 3 * 0.7310585786300049]}},
    {"name": "margin_exactly_gamma", "note": "reward gap 1.5 = γ (β = 3, γ/β = 0.5): z = 0, loss ln 2",
     "inputs": _pairs([-1.0, -2.0], [-2.0, -5.0], [2, 4], [2, 5]),
     "hyperparameters": {"beta": 3.0, "gamma_beta_ratio": 0.5},
     "hand": {"losses": [LN2, LN2], "chosen_rewards": [-1.5, -1.5], "rejected_rewards": [-3.0, -3.0]}},
    {"name": "sft_term_by_hand", "note": "z = 0 on both pairs, NLL per chosen token (2 + 4)/(2 + 4) = 1: losses "
     "ln 2 + 2·2/6 and ln 2 + 2·4/6, mean ln 2 + 1; d/d chosen = -(1/2)·1/n - λ·2/6",
     "inputs": _pairs([-2.0, -4.0], [-2.0, -4.0], [2, 4], [2, 4]),
     "hyperparameters": {"beta": 1.0, "gamma_beta_ratio": 0.0, "sft_weight": 1.0},
     "hand": {"losses": [LN2 + 2 / 3, LN2 + 4 / 3], "grad_policy_chosen_logps": [-0.25 - 1 / 3, -0.125 - 1 / 3],
              "grad_policy_rejected_logps": [0.25, 0.125]}},
    {"name": "smoothing_one_half_is_symmetric", "note": "ε = 1/2, z = ±2: loss (softplus(2) + softplus(-2))/2 "
     "= 1 + log(1 + e^-2) on both", "inputs": _pairs([-1.0, -5.0], [-5.0, -1.0], [4, 4], [4, 4]),
     "hyperparameters": {"beta": 2.0, "gamma_beta_ratio": 0.0, "label_smoothing": 0.5},
     "hand": {"losses": [1.12692801104297263] * 2}},
    {"name": "zero_length_completions", "note": "empty completions (log-prob 0, 0 tokens) average to 0, never 0/0; "
     "all chosen empty: the SFT term is 0/max(0, 1) = 0", "inputs": _pairs([0.0, 0.0], [0.0, -2.0], [0, 0], [0, 2]),
     "hyperparameters": {"beta": 2.0, "gamma_beta_ratio": 0.0, "sft_weight": 1.0},
     "hand": {"losses": [LN2, 0.12692801104297263], "chosen_rewards": [0.0, 0.0], "rejected_rewards": [0.0, -2.0],
              "grad_policy_chosen_logps": [-1 - 2.0, -2 * 0.11920292202211755 - 2.0]}},
    {"name": "huge_margins", "note": "z = ±1000: -log σ(1000) underflows to 0, -log σ(-1000) = 1000",
     "inputs": _pairs([0.0, -1000.0], [-1000.0, 0.0], [1, 1], [1, 1]),
     "hyperparameters": {"beta": 1.0, "gamma_beta_ratio": 0.0},
     "hand": {"losses": [0.0, 1000.0], "grad_policy_chosen_logps": [0.0, -1.0]}},
]

# simpo_loss has no default for sft_weight: a case that does not set it tests plain SimPO.
for case in CASES:
    case.setdefault("hyperparameters", {}).setdefault("sft_weight", 0.0)

LOSSES = {
    "simpo_loss": {
        "reference": simpo_loss,
        "outputs": ["losses", "chosen_rewards", "rejected_rewards"],
        "cases": CASES,
    },
}

# The end-to-end golden: a few steps on the bundled task. One process with 2 accumulated micro-batches
# of 2 pairs, and torchrun with 2 processes of 2 pairs each: the same global batch of 4, the same pairs.
# A learning rate larger than the default so that 4 steps move every metric well above float noise; the
# SFT term and label smoothing on, so that the run pins them too.
RUN = {
    "script": "algos/simpo.py",
    "args": ["--max-steps", "4", "--per-device-train-batch-size", "2", "--gradient-accumulation-steps", "2",
             "--learning-rate", "1e-4", "--warmup-ratio", "0", "--logging-steps", "1", "--eval-steps", "2",
             "--beta", "2.5", "--gamma-beta-ratio", "0.5", "--label-smoothing", "0.1", "--sft-weight", "0.5"],
    "torchrun_args": ["--max-steps", "4", "--per-device-train-batch-size", "2", "--gradient-accumulation-steps", "1",
                      "--learning-rate", "1e-4", "--warmup-ratio", "0", "--logging-steps", "1", "--eval-steps", "2",
                      "--beta", "2.5", "--gamma-beta-ratio", "0.5", "--label-smoothing", "0.1", "--sft-weight", "0.5"],
    # Looser than the default (rtol 1e-5, atol 1e-6) for eval/loss: the SFT term is a token mean per batch (the
    # script's deviation 6), and evaluation cuts the held-out pairs into different batches on 1 and 2 processes
    # (measured: relative difference 2e-5); the training steps cut them alike and agree to float rounding.
    "torchrun_tolerance": {"rtol": 1e-4, "atol": 1e-5},
}
