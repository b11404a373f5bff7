"""Independent float64 reference for algos/sft.py, and the cases and run that pin it.

Written from the definition of supervised fine-tuning (maximum likelihood, Preferred-FT in Rafailov et al. 2023),
one row at a time with `math`, never calling the script: over the B rows of a micro-batch,
    loss   = -Σ_i logp(yw_i) / max(Σ_i |yw_i|, 1)            the mean negative log-likelihood per chosen token
    loss_i = -B·logp(yw_i) / max(Σ_j |yw_j|, 1)              row i's share, so that the mean of the loss_i is loss
The gradient of the summed losses by hand: d Σ_i loss_i / d logp(yw_i) = -B / max(Σ_j |yw_j|, 1) for every row.
The lengths are integers and carry no gradient.

`python -m tests.golden sft --write` turns LOSSES and RUN into tests/golden/sft.*.json.
"""

import random


def sft_loss(policy_chosen_logps, chosen_lengths):
    """Per-row losses, and the gradient of their sum with respect to the log-probs."""
    rows, tokens = len(policy_chosen_logps), max(sum(chosen_lengths), 1)
    losses = [rows * -logp / tokens for logp in policy_chosen_logps]
    return {"losses": losses}, {"policy_chosen_logps": [-rows / tokens] * rows}


def _random_rows(seed: int, n: int) -> dict:
    """Completion log-probs of realistic size with their token counts (about -1.5 nats per token)."""
    rng = random.Random(seed)
    lengths = [rng.randint(1, 60) for _ in range(n)]
    return {"policy_chosen_logps": [round(-length * rng.uniform(0.05, 3.0), 6) for length in lengths],
            "chosen_lengths": lengths}


CASES = [
    {"name": "random_8", "inputs": _random_rows(0, 8)},
    {"name": "random_3", "inputs": _random_rows(1, 3)},
    {"name": "two_rows_by_hand", "note": "logps -6 and -2 over 3 + 1 tokens: the mean NLL per token is 8/4 = 2; "
     "row shares 2·6/4 = 3 and 2·2/4 = 1; each gradient -2/4",
     "inputs": {"policy_chosen_logps": [-6.0, -2.0], "chosen_lengths": [3, 1]},
     "hand": {"losses": [3.0, 1.0], "grad_policy_chosen_logps": [-0.5, -0.5]}},
    {"name": "certain_completions", "note": "log-prob 0 (the model is sure): loss 0, the gradient still -B/tokens",
     "inputs": {"policy_chosen_logps": [0.0, 0.0, 0.0], "chosen_lengths": [2, 5, 5]},
     "hand": {"losses": [0.0, 0.0, 0.0], "grad_policy_chosen_logps": [-0.25, -0.25, -0.25]}},
    {"name": "empty_completions", "note": "no completion token at all (cut away): the token count is clamped to 1",
     "inputs": {"policy_chosen_logps": [0.0, 0.0], "chosen_lengths": [0, 0]},
     "hand": {"losses": [0.0, 0.0], "grad_policy_chosen_logps": [-2.0, -2.0]}},
    {"name": "single_row", "note": "one row: the plain mean NLL per token, -(-30)/10 = 3",
     "inputs": {"policy_chosen_logps": [-30.0], "chosen_lengths": [10]},
     "hand": {"losses": [3.0], "grad_policy_chosen_logps": [-0.1]}},
]

LOSSES = {"sft_loss": {"reference": sft_loss, "outputs": ["losses"], "cases": CASES}}

# The end-to-end golden: a few steps on the bundled task (its pairs, chosen completions only). One process with 2
# accumulated micro-batches of 2 rows, torchrun with 2 processes of 2 rows: the same global batch, the same rows.
RUN = {
    "script": "algos/sft.py",
    "args": ["--max-steps", "4", "--per-device-train-batch-size", "2", "--gradient-accumulation-steps", "2",
             "--learning-rate", "1e-4", "--warmup-ratio", "0", "--logging-steps", "1", "--eval-steps", "2"],
    "torchrun_args": ["--max-steps", "4", "--per-device-train-batch-size", "2", "--gradient-accumulation-steps", "1",
                      "--learning-rate", "1e-4", "--warmup-ratio", "0", "--logging-steps", "1", "--eval-steps", "2"],
    # As for simpo.py's SFT term: eval/loss is a token mean per evaluation batch, and evaluation cuts the held-out
    # rows into different batches on 1 and 2 processes; the training steps cut them alike.
    "torchrun_tolerance": {"rtol": 1e-4, "atol": 1e-5},
}
