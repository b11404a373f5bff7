"""Independent float64 reference for algos/sft.py, and the cases and run that pin it.

Written from the definition of supervised fine-tuning (maximum likelihood on the chosen completions, Preferred-FT
in Rafailov et al. 2023), one row at a time, never calling the script:
    loss_i = -logp(yw_i) / max(|yw_i|, 1)          the completion's mean negative log-likelihood per token
The gradient by hand: d loss_i / d logp(yw_i) = -1 / max(|yw_i|, 1). The lengths are integers and carry no gradient.

`python -m tests.golden sft --write` turns LOSSES and RUN into tests/golden/sft.*.json.
"""

import random


def sft_loss(policy_chosen_logps, chosen_lengths):
    """Per-row losses, and the gradient of their sum with respect to the log-probs."""
    losses = [-logp / max(length, 1) for logp, length in zip(policy_chosen_logps, chosen_lengths)]
    return {"losses": losses}, {"policy_chosen_logps": [-1 / max(length, 1) for length in chosen_lengths]}


def _random_rows(seed: int, n: int) -> dict:
    """Completion log-probs of realistic size with their token counts (about -1.5 nats per token)."""
    rng = random.Random(seed)
    lengths = [rng.randint(1, 60) for _ in range(n)]
    return {"policy_chosen_logps": [round(-length * rng.uniform(0.05, 3.0), 6) for length in lengths],
            "chosen_lengths": lengths}


CASES = [
    {"name": "random_8", "inputs": _random_rows(0, 8)},
    {"name": "random_3", "inputs": _random_rows(1, 3)},
    {"name": "two_rows_by_hand", "note": "logps -6 over 3 tokens and -2 over 1: losses 2 and 2, gradients -1/3 and -1",
     "inputs": {"policy_chosen_logps": [-6.0, -2.0], "chosen_lengths": [3, 1]},
     "hand": {"losses": [2.0, 2.0], "grad_policy_chosen_logps": [-1 / 3, -1.0]}},
    {"name": "certain_completions", "note": "log-prob 0 (the model is sure): loss 0, the gradient still -1/|y|",
     "inputs": {"policy_chosen_logps": [0.0, 0.0, 0.0], "chosen_lengths": [2, 5, 4]},
     "hand": {"losses": [0.0, 0.0, 0.0], "grad_policy_chosen_logps": [-0.5, -0.2, -0.25]}},
    {"name": "empty_completion", "note": "no completion token at all (cut away): the length is clamped to 1",
     "inputs": {"policy_chosen_logps": [0.0, -4.0], "chosen_lengths": [0, 8]},
     "hand": {"losses": [0.0, 0.5], "grad_policy_chosen_logps": [-1.0, -0.125]}},
    {"name": "single_row", "note": "-(-30)/10 = 3",
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
}
