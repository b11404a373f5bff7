"""Independent float64 reference for algos/pro.py, and the cases and run that pin it.

Written from the paper's equations (Song et al. 2024, PRO: the ranking loss with the dynamic temperature, plus the SFT
term, with the weight of the authors' code), one list and one completion at a time with `math`, never calling the
script. For a list of n completions with summed log-probs logp_i over |y_i| tokens and scores ψ_i:
    s_i  = β·logp_i / max(|y_i|, 1)                                  (no reference model)
    W_k  = {i: ψ_i < ψ_k}          a_ki = ψ_k - ψ_i (i ∈ W_k)        a_kk = max_{i ∈ W_k} a_ki
    L    = Σ_{k: W_k ≠ ∅} -log[e^{a_kk·s_k} / (e^{a_kk·s_k} + Σ_{i ∈ W_k} e^{a_ki·s_i})] + λ·(n - 1)²·sft
    sft  = -(1/|B|)·Σ_{i ∈ B} logp_i,   B = {i: ψ_i = max ψ}
where a = 1/T are the paper's inverse temperatures (all 1 with dynamic_temperature off) and λ = sft_weight. The
paper writes the sum over a sorted ranking y^1 ≻ ... ≻ y^n, k = 1..n-1, against {y^k, ..., y^n}: for distinct scores
it is the sum above. Ties (which the paper's equation does not define) are never compared: each tied completion
gets its own term against the strictly worse ones, and the SFT term averages over the tied best.
Gradient by hand, per term k with Z_k = log(e^{a_kk·s_k} + Σ_{i ∈ W_k} e^{a_ki·s_i}):
    dL/ds_k += -a_kk + a_kk·e^{a_kk·s_k - Z_k},     dL/ds_i += a_ki·e^{a_ki·s_i - Z_k}  (i ∈ W_k)
then dL/dlogp_i = β/max(|y_i|, 1)·dL/ds_i, minus λ·(n - 1)²/|B| for i ∈ B. The scores carry no gradient.

`python -m tests.golden pro --write` turns LOSSES and RUN into tests/golden/pro.*.json.
"""

import math
import random

LN2, LN3 = math.log(2), math.log(3)


def log_sum_exp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(math.fsum(math.exp(v - top) for v in values))


def list_loss(logp, lengths, psi, beta, sft_weight, dynamic_temperature):
    """One list's loss and its gradient with respect to its log-probs."""
    n = len(logp)
    s = [beta * lp / max(length, 1) for lp, length in zip(logp, lengths)]
    grad_s = [0.0] * n
    terms = []
    for k in range(n):
        worse = [i for i in range(n) if psi[i] < psi[k]]
        if not worse:
            continue
        a = {i: (psi[k] - psi[i]) if dynamic_temperature else 1.0 for i in worse}
        a_kk = max(a.values())
        z = log_sum_exp([a_kk * s[k]] + [a[i] * s[i] for i in worse])
        terms.append(z - a_kk * s[k])
        grad_s[k] += -a_kk + a_kk * math.exp(a_kk * s[k] - z)
        for i in worse:
            grad_s[i] += a[i] * math.exp(a[i] * s[i] - z)
    best = [i for i in range(n) if psi[i] == max(psi)]
    weight = sft_weight * (n - 1) ** 2
    sft = -math.fsum(logp[i] for i in best) / len(best)
    grad = [beta / max(lengths[i], 1) * grad_s[i] - (weight / len(best) if i in best else 0.0) for i in range(n)]
    return math.fsum(terms) + weight * sft, s, grad


def pro_loss(policy_logps, lengths, scores, list_sizes, beta, sft_weight=0.05, dynamic_temperature=True):
    """Per-list losses and per-completion scores s, and the gradient of the summed losses."""
    out = {"losses": [], "rewards": []}
    grads = {"policy_logps": []}
    start = 0
    for size in list_sizes:
        items = slice(start, start + size)
        loss, s, grad = list_loss(policy_logps[items], lengths[items], scores[items], beta, sft_weight,
                                  dynamic_temperature)
        out["losses"].append(loss)
        out["rewards"] += s
        grads["policy_logps"] += grad
        start += size
    assert start == len(policy_logps), "list_sizes must add up to the number of completions"
    return out, grads


def _lists(policy, lengths, scores, sizes):
    return {"policy_logps": policy, "lengths": lengths, "scores": scores, "list_sizes": sizes}


def _random_lists(seed: int, sizes: list[int], levels: list[float]) -> dict:
    """Summed log-probs of realistic size (-80 .. -0.5) over 5 .. 60 tokens, scores drawn from `levels` (so ties)."""
    rng = random.Random(seed)
    total = sum(sizes)
    return _lists([round(rng.uniform(-80, -0.5), 6) for _ in range(total)], [rng.randint(5, 60) for _ in range(total)],
                  [rng.choice(levels) for _ in range(total)], sizes)


ARITH_LEVELS = [0.0, 1 / 3, 0.5, 2 / 3, 1.0, 4 / 3, 1.5, 5 / 3, 2.0]  # the bundled task's scores
RAGGED = [4, 3, 2, 4, 1]
SP = lambda x: math.log1p(math.exp(x))  # noqa: E731  softplus, for the hand values
SIG = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731

CASES = [
    {"name": "random_beta1", "inputs": _random_lists(0, RAGGED, ARITH_LEVELS), "hyperparameters": {"beta": 1.0}},
    {"name": "random_beta3_sft0.2", "inputs": _random_lists(1, [4, 4, 4, 3], ARITH_LEVELS),
     "hyperparameters": {"beta": 3.0, "sft_weight": 0.2}},
    {"name": "random_reward_model_scale", "note": "scores like a reward model's logits, gaps up to ~8",
     "inputs": _random_lists(2, [5, 2, 3], [-4.0, -1.5, 0.0, 0.5, 2.0, 4.0]), "hyperparameters": {"beta": 1.0}},
    {"name": "random_no_temperature", "inputs": _random_lists(3, RAGGED, ARITH_LEVELS),
     "hyperparameters": {"beta": 2.0, "dynamic_temperature": False}},
    {"name": "two_completions_is_a_length_normalised_pair",
     "note": "ψ = (1, 0), s = (-3/3, -6/2) = (-1, -3), no SFT: -log σ(s1 - s2) = log(1 + e^-2); "
             "d/dlogp = ∓σ(-2)/|y|",
     "inputs": _lists([-3.0, -6.0], [3, 2], [1.0, 0.0], [2]),
     "hyperparameters": {"beta": 1.0, "sft_weight": 0.0},
     "hand": {"losses": [SP(-2)], "rewards": [-1.0, -3.0], "grad_policy_logps": [-SIG(-2) / 3, SIG(-2) / 2]}},
    {"name": "the_score_gap_is_the_inverse_temperature",
     "note": "ψ = (2, 0): a = 2, so log(1 + e^{2·(-3 - (-1))}) = log(1 + e^-4); d/ds = ∓2σ(-4)",
     "inputs": _lists([-3.0, -6.0], [3, 2], [2.0, 0.0], [2]),
     "hyperparameters": {"beta": 1.0, "sft_weight": 0.0},
     "hand": {"losses": [SP(-4)], "grad_policy_logps": [-2 * SIG(-4) / 3, 2 * SIG(-4) / 2]}},
    {"name": "equal_scores_s_three_items",
     "note": "s = 0, ψ = (3, 2, 1): log 3 + log 2 whatever the temperatures; a = (2, 1 | 1), so ds = (-2 + 2/3, "
             "1/3 - 1 + 1/2, 2/3 + 1/2) = (-4/3, -1/6, 7/6), over |y| = (4, 2, 1); SFT 0.05·4 = 0.2 on the first",
     "inputs": _lists([0.0, 0.0, 0.0], [4, 2, 1], [3.0, 2.0, 1.0], [3]),
     "hyperparameters": {"beta": 1.0},
     "hand": {"losses": [LN3 + LN2], "rewards": [0.0, 0.0, 0.0],
              "grad_policy_logps": [-4 / 3 / 4 - 0.2, -1 / 6 / 2, 7 / 6]}},
    {"name": "ties_are_never_compared",
     "note": "ψ = (1, 1, 0), s = (-2/2, -4/4, -1/1) all -1: two terms log 2 (each best against the worst only), ds = "
             "(-1/2, -1/2, 1); SFT 0.05·4 = 0.2 times the two best's mean NLL (2 + 4)/2 = 3, so -0.1 on each best",
     "inputs": _lists([-2.0, -4.0, -1.0], [2, 4, 1], [1.0, 1.0, 0.0], [3]),
     "hyperparameters": {"beta": 1.0},
     "hand": {"losses": [2 * LN2 + 0.6], "rewards": [-1.0, -1.0, -1.0],
              "grad_policy_logps": [-0.5 / 2 - 0.1, -0.5 / 4 - 0.1, 1.0]}},
    {"name": "no_preference_leaves_the_sft_term",
     "note": "ψ = (1, 1): nothing to rank; SFT 0.05·1·(2 + 4)/2 = 0.15, gradient -0.025 each; a list of one: n - 1 = 0",
     "inputs": _lists([-2.0, -4.0, -7.0], [3, 5, 2], [1.0, 1.0, 2.0], [2, 1]),
     "hyperparameters": {"beta": 1.0},
     "hand": {"losses": [0.15, 0.0], "grad_policy_logps": [-0.025, -0.025, 0.0]}},
    {"name": "empty_completion_length_clamped",
     "note": "|y| = 0 (logp 0) is divided by 1: s = (0, -2), log(1 + e^-2), no SFT",
     "inputs": _lists([0.0, -2.0], [0, 1], [1.0, 0.0], [2]), "hyperparameters": {"beta": 1.0, "sft_weight": 0.0},
     "hand": {"losses": [SP(-2)], "grad_policy_logps": [-SIG(-2), SIG(-2)]}},
    {"name": "huge_margins",
     "note": "s = (0, -1000) ranks right: loss 0; s = (-1000, 0) wrong: 1000 (a = 1); no SFT",
     "inputs": _lists([0.0, -10000.0, -10000.0, 0.0], [10, 10, 10, 10], [1.0, 0.0, 1.0, 0.0], [2, 2]),
     "hyperparameters": {"beta": 1.0, "sft_weight": 0.0},
     "hand": {"losses": [0.0, 1000.0], "grad_policy_logps": [0.0, 0.0, -0.1, 0.1]}},
]

LOSSES = {
    "pro_loss": {
        "reference": pro_loss,
        "outputs": ["losses", "rewards"],
        "cases": CASES,
    },
}

# The end-to-end golden: a few steps on the bundled task. One process with 2 accumulated micro-batches
# of 2 lists, and torchrun with 2 processes of 2 lists each: the same global batch of 4 lists (16
# completions), the same lists. A learning rate larger than the default so that 4 steps move every metric
# well above float noise; β and the SFT weight raised so that both terms move the model visibly.
RUN = {
    "script": "algos/pro.py",
    "args": ["--max-steps", "4", "--per-device-train-batch-size", "2", "--gradient-accumulation-steps", "2",
             "--learning-rate", "1e-4", "--warmup-ratio", "0", "--logging-steps", "1", "--eval-steps", "2",
             "--beta", "2", "--sft-weight", "0.1"],
    "torchrun_args": ["--max-steps", "4", "--per-device-train-batch-size", "2", "--gradient-accumulation-steps", "1",
                      "--learning-rate", "1e-4", "--warmup-ratio", "0", "--logging-steps", "1", "--eval-steps", "2",
                      "--beta", "2", "--sft-weight", "0.1"],
}
