"""Independent float64 reference for algos/lipo.py, and the cases and run that pin it.

Written from the paper's equations, one list and one pair at a time with `math`, never calling the script.
For a list with rewards s_i = β·(logp(y_i) - ref(y_i)) and labels ψ_i (Liu et al. 2024, LiPO):
    lambda         L = Σ_{ψi > ψj} Δij·log(1 + e^-(si - sj)),  Δij = |Gi - Gj|·|1/D(τi) - 1/D(τj)|,
                   G = 2^ψ - 1, D(τ) = log2(1 + τ), τ the 1-based rank of sorting s descending, ties by index
    pair_logistic  the same with Δij = 1 (DPO_BT)
    list_mle       L = Σ_i [log Σ_{k ∈ Si} e^{sk} - si],  Si = {i} ∪ {k: ψk < ψi}  (DPO_PL, ties never compared)
    softmax        L = Σ_i ti·(log Σ_k e^{sk} - si),  ti = ψi / Σ_k ψk
and L = 0 for a list without a strict preference ψi > ψj. Gradients derived by hand, with Δ held fixed:
    pairwise   dL/dsi = -Δij·σ(-(si - sj)),  dL/dsj = +Δij·σ(-(si - sj)), summed over the pairs
    list_mle   dL/dsk = -1 + Σ_{i: k ∈ Si} e^{sk} / Σ_{m ∈ Si} e^{sm}
    softmax    dL/dsk = softmax(s)_k - tk
then d/d policy = β·dL/ds and d/d reference = -β·dL/ds. Δ is piecewise constant in s, so the harness's
central differences agree with the fixed-Δ gradient only away from ties in s: the λ cases keep their
rewards apart (ties in s for LiPO-λ are tested in tests/test_lipo.py).

`python -m tests.golden lipo --write` turns LOSSES and RUN into tests/golden/lipo.*.json.
"""

import math
import random

LN2 = math.log(2)


def log1p_exp(x: float) -> float:
    """log(1 + e^x) without overflow."""
    return x + math.log1p(math.exp(-x)) if x > 0 else math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def log_sum_exp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(math.fsum(math.exp(v - top) for v in values))


def ranks(s: list[float]) -> list[int]:
    """1-based positions when sorting s from high to low, the lower index first among equals."""
    order = sorted(range(len(s)), key=lambda i: (-s[i], i))
    position = [0] * len(s)
    for place, i in enumerate(order, start=1):
        position[i] = place
    return position


def lambda_weight(psi: list[float], tau: list[int], i: int, j: int) -> float:
    gain_i, gain_j = 2 ** psi[i] - 1, 2 ** psi[j] - 1
    return abs(gain_i - gain_j) * abs(1 / math.log2(1 + tau[i]) - 1 / math.log2(1 + tau[j]))


def list_loss(s: list[float], psi: list[float], loss_type: str) -> tuple[float, list[float]]:
    """One list's loss and its gradient with respect to s."""
    k = len(s)
    grad = [0.0] * k
    if not any(psi[i] > psi[j] for i in range(k) for j in range(k)):
        return 0.0, grad
    if loss_type in ("lambda", "pair_logistic"):
        tau = ranks(s)
        terms = []
        for i in range(k):
            for j in range(k):
                if psi[i] > psi[j]:
                    weight = lambda_weight(psi, tau, i, j) if loss_type == "lambda" else 1.0
                    terms.append(weight * log1p_exp(-(s[i] - s[j])))
                    pull = weight * sigmoid(-(s[i] - s[j]))
                    grad[i] -= pull
                    grad[j] += pull
        return math.fsum(terms), grad
    if loss_type == "list_mle":
        terms = []
        for i in range(k):
            rivals = [m for m in range(k) if m == i or psi[m] < psi[i]]
            normaliser = log_sum_exp([s[m] for m in rivals])
            terms.append(normaliser - s[i])
            grad[i] -= 1.0
            for m in rivals:
                grad[m] += math.exp(s[m] - normaliser)
        return math.fsum(terms), grad
    if loss_type == "softmax":
        total = math.fsum(psi)
        target = [p / total for p in psi]
        normaliser = log_sum_exp(s)
        loss = math.fsum(t * (normaliser - si) for t, si in zip(target, s))
        return loss, [math.exp(si - normaliser) - t for si, t in zip(s, target)]
    raise ValueError(loss_type)


def lipo_loss(policy_logps, reference_logps, scores, list_sizes, beta, loss_type="lambda"):
    """Per-list losses and per-completion rewards, and the gradient of the summed losses."""
    out = {"losses": [], "rewards": []}
    grads = {"policy_logps": [], "reference_logps": []}
    start = 0
    for size in list_sizes:
        items = range(start, start + size)
        s = [beta * (policy_logps[n] - reference_logps[n]) for n in items]
        loss, grad_s = list_loss(s, [scores[n] for n in items], loss_type)
        out["losses"].append(loss)
        out["rewards"] += s
        grads["policy_logps"] += [beta * g for g in grad_s]
        grads["reference_logps"] += [-beta * g for g in grad_s]
        start += size
    assert start == len(policy_logps), "list_sizes must add up to the number of completions"
    return out, grads


def _lists(policy, reference, scores, sizes):
    return {"policy_logps": policy, "reference_logps": reference, "scores": scores, "list_sizes": sizes}


def _random_lists(seed: int, sizes: list[int], spread: float, beta: float, levels: list[float]) -> dict:
    """Sequence log-probs of realistic size (-80 .. -2), the policy within ±spread of the reference, labels
    drawn from `levels` (so with ties); rewards of one list at least 0.05 apart, so that float32 rounding
    cannot reorder them (the λ-weights depend on that order)."""
    rng = random.Random(seed)
    while True:
        reference = [round(rng.uniform(-80, -2), 6) for _ in range(sum(sizes))]
        policy = [round(r + rng.uniform(-spread, spread), 6) for r in reference]
        rewards = [beta * (p - r) for p, r in zip(policy, reference)]
        start, apart = 0, True
        for size in sizes:
            chunk = rewards[start : start + size]
            apart &= all(abs(a - b) > 0.05 for n, a in enumerate(chunk) for b in chunk[n + 1 :])
            start += size
        if apart:
            scores = [rng.choice(levels) for _ in reference]
            return _lists(policy, reference, scores, sizes)


ARITH_LEVELS = [0.0, 1 / 3, 0.5, 2 / 3, 1.0, 4 / 3, 1.5, 5 / 3, 2.0]  # the bundled task's scores
WIN_RATES = [0.0, 1 / 6, 1 / 3, 0.5, 2 / 3, 5 / 6, 1.0]  # win rates in lists of four
RAGGED = [4, 3, 2, 4, 1]

# Hand-worked LiPO-λ list: s = (0.2, 0.5, -0.1) ranks the items 2, 1, 3; ψ = (2, 0, 1) gives G = (3, 0, 1);
# 1/D = 1/log2(1 + τ) = (ln2/ln3, 1, 1/2). Ordered pairs and weights:
#   (0, 1): |3 - 0|·|ln2/ln3 - 1|   = 3 - 3·ln2/ln3  = 1.1072107392856276
#   (0, 2): |3 - 1|·|ln2/ln3 - 1/2| = 2·ln2/ln3 - 1  = 0.2618595071429148
#   (2, 1): |1 - 0|·|1/2 - 1|       = 1/2
# loss = Σ Δ·log(1 + e^-(si - sj)) with si - sj = -0.3, 0.3, -0.6; β = 1, reference 0, so d/d policy = dL/ds.
LN3 = math.log(3)
DELTA_01, DELTA_02, DELTA_21 = 3 - 3 * LN2 / LN3, 2 * LN2 / LN3 - 1, 0.5
SP = lambda x: math.log1p(math.exp(x))  # noqa: E731  softplus, for the hand values
SIG = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
HAND_LAMBDA_LOSS = DELTA_01 * SP(0.3) + DELTA_02 * SP(-0.3) + DELTA_21 * SP(0.6)
HAND_LAMBDA_GRAD = [-DELTA_01 * SIG(0.3) - DELTA_02 * SIG(-0.3),
                    DELTA_01 * SIG(0.3) + DELTA_21 * SIG(0.6),
                    DELTA_02 * SIG(-0.3) - DELTA_21 * SIG(0.6)]

# A list of two with h = 2, β = 1 (dpo's single_pair_beta1): DPO's loss log(1 + e^-2), gradient ∓σ(-2).
DPO_PAIR = _lists([-3.0, -6.0], [-4.0, -5.0], [1.0, 0.0], [2])
DPO_HAND = {"losses": [0.12692801104297263], "grad_policy_logps": [-0.11920292202211755, 0.11920292202211755]}

CASES = [
    {"name": "lambda_random_beta0.1", "inputs": _random_lists(0, RAGGED, 10.0, 0.1, ARITH_LEVELS),
     "hyperparameters": {"beta": 0.1, "loss_type": "lambda"}},
    {"name": "lambda_random_win_rates_beta0.5", "inputs": _random_lists(1, [4, 4, 4, 3], 5.0, 0.5, WIN_RATES),
     "hyperparameters": {"beta": 0.5, "loss_type": "lambda"}},
    {"name": "lambda_far_from_reference", "inputs": _random_lists(2, [4, 2, 3], 60.0, 0.3, ARITH_LEVELS),
     "hyperparameters": {"beta": 0.3, "loss_type": "lambda"}},
    {"name": "pair_logistic_random", "inputs": _random_lists(3, RAGGED, 10.0, 0.1, ARITH_LEVELS),
     "hyperparameters": {"beta": 0.1, "loss_type": "pair_logistic"}},
    {"name": "list_mle_random", "inputs": _random_lists(4, RAGGED, 10.0, 0.1, ARITH_LEVELS),
     "hyperparameters": {"beta": 0.1, "loss_type": "list_mle"}},
    {"name": "softmax_random", "inputs": _random_lists(5, RAGGED, 10.0, 0.1, ARITH_LEVELS),
     "hyperparameters": {"beta": 0.1, "loss_type": "softmax"}},
    {"name": "lambda_hand_worked_three_items",
     "note": f"s = (0.2, 0.5, -0.1), ψ = (2, 0, 1): ranks (2, 1, 3), Δ01 = 3 - 3·ln2/ln3 = {DELTA_01!r}, "
             f"Δ02 = 2·ln2/ln3 - 1 = {DELTA_02!r}, Δ21 = 1/2 (see tests/references/lipo.py)",
     "inputs": _lists([0.2, 0.5, -0.1], [0.0, 0.0, 0.0], [2.0, 0.0, 1.0], [3]),
     "hyperparameters": {"beta": 1.0, "loss_type": "lambda"},
     "hand": {"losses": [HAND_LAMBDA_LOSS], "rewards": [0.2, 0.5, -0.1], "grad_policy_logps": HAND_LAMBDA_GRAD}},
    {"name": "lambda_list_of_two", "note": "K = 2, ψ = (1, 0): Δ = (2 - 1)·(1 - ln2/ln3), times DPO's loss",
     "inputs": DPO_PAIR, "hyperparameters": {"beta": 1.0, "loss_type": "lambda"},
     "hand": {"losses": [(1 - LN2 / LN3) * 0.12692801104297263],
              "grad_policy_logps": [-(1 - LN2 / LN3) * 0.11920292202211755, (1 - LN2 / LN3) * 0.11920292202211755]}},
    *({"name": f"{loss_type}_list_of_two_is_dpo", "note": "K = 2 with distinct labels: DPO's loss, h = 2, β = 1",
       "inputs": DPO_PAIR, "hyperparameters": {"beta": 1.0, "loss_type": loss_type}, "hand": DPO_HAND}
      for loss_type in ("pair_logistic", "list_mle", "softmax")),
    {"name": "list_mle_ties_policy_equals_reference",
     "note": "ψ = (1, 1, 0), s = 0: the tied pair is never compared; 2·ln2, gradient β·(-1/2, -1/2, 1)",
     "inputs": _lists([-7.0, -9.5, -3.25], [-7.0, -9.5, -3.25], [1.0, 1.0, 0.0], [3]),
     "hyperparameters": {"beta": 0.5, "loss_type": "list_mle"},
     "hand": {"losses": [2 * LN2], "rewards": [0.0] * 3, "grad_policy_logps": [-0.25, -0.25, 0.5]}},
    {"name": "pair_logistic_ties_policy_equals_reference",
     "note": "ψ = (1, 1, 0): two ordered pairs, 2·ln2; gradient β·(-1/2, -1/2, 1)",
     "inputs": _lists([-7.0, -9.5, -3.25], [-7.0, -9.5, -3.25], [1.0, 1.0, 0.0], [3]),
     "hyperparameters": {"beta": 0.5, "loss_type": "pair_logistic"},
     "hand": {"losses": [2 * LN2], "grad_policy_logps": [-0.25, -0.25, 0.5]}},
    {"name": "softmax_policy_equals_reference",
     "note": "s = 0: loss log K = ln 3 whatever the target t = ψ/Σψ = (1/2, 1/3, 1/6); gradient β·(1/3 - t)",
     "inputs": _lists([-1.0, -2.0, -3.0], [-1.0, -2.0, -3.0], [1.5, 1.0, 0.5], [3]),
     "hyperparameters": {"beta": 0.3, "loss_type": "softmax"},
     "hand": {"losses": [math.log(3)], "grad_policy_logps": [0.3 * (1 / 3 - 1 / 2), 0.0, 0.3 * (1 / 3 - 1 / 6)]}},
    *({"name": f"{loss_type}_no_preference_contributes_zero",
       "note": "all-equal scores, and a list of one: nothing to rank, loss 0 and no gradient",
       "inputs": _lists([-4.0, -6.0, -5.0, -1.0, -2.0, -3.0], [-5.0, -5.0, -5.0, -1.5, -1.0, -2.0],
                        [1.0, 1.0, 1.0, 0.5, 0.5, 2.0], [3, 2, 1]),
       "hyperparameters": {"beta": 0.1, "loss_type": loss_type},
       "hand": {"losses": [0.0, 0.0, 0.0], "grad_policy_logps": [0.0] * 6}}
      for loss_type in ("lambda", "pair_logistic", "list_mle", "softmax")),
    {"name": "lambda_huge_margins", "note": "s = ±1000 around ties in ψ: -log σ(1000) underflows to 0, -log σ(-1000) = 1000",
     "inputs": _lists([0.0, -10000.0, -10000.0, -10000.0, 0.0], [0.0] * 5, [1.0, 0.0, 0.0, 1.0, 0.0], [3, 2]),
     "hyperparameters": {"beta": 0.1, "loss_type": "lambda"},
     # list 1: s = (0, -1000, -1000), ranks (1, 2, 3), G = (1, 0, 0): Δ01 = 1 - ln2/ln3, Δ02 = 1/2, both margins +1000
     # list 2: s = (-1000, 0), ranks (2, 1), G = (1, 0): Δ = 1 - ln2/ln3 on the margin -1000
     "hand": {"losses": [0.0, 1000 * (1 - LN2 / LN3)], "grad_policy_logps": [0.0, 0.0, 0.0, -0.1 * (1 - LN2 / LN3),
                                                                             0.1 * (1 - LN2 / LN3)]}},
]

LOSSES = {
    "lipo_loss": {
        "reference": lipo_loss,
        "outputs": ["losses", "rewards"],
        "cases": CASES,
    },
}

# The end-to-end golden: a few steps on the bundled task. One process with 2 accumulated micro-batches
# of 2 lists, and torchrun with 2 processes of 2 lists each: the same global batch of 4 lists (16
# completions), the same lists. A learning rate larger than the default so that 4 steps move every metric
# well above float noise; --max-length 64 holds every completion of the bundled task (at most 59 characters
# after a prompt of at most 19), so it only bounds the padding.
RUN = {
    "script": "algos/lipo.py",
    "args": ["--max-steps", "4", "--per-device-train-batch-size", "2", "--gradient-accumulation-steps", "2",
             "--learning-rate", "1e-4", "--warmup-ratio", "0", "--logging-steps", "1", "--eval-steps", "2",
             "--beta", "0.3", "--loss-type", "lambda", "--score-transform", "none"],
    "torchrun_args": ["--max-steps", "4", "--per-device-train-batch-size", "2", "--gradient-accumulation-steps", "1",
                      "--learning-rate", "1e-4", "--warmup-ratio", "0", "--logging-steps", "1", "--eval-steps", "2",
                      "--beta", "0.3", "--loss-type", "lambda", "--score-transform", "none"],
}
