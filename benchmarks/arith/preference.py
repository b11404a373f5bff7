"""Input layout of the learned preference model (preference_model/), for Nash-MD.

The model is a LlamaForSequenceClassification with one output: the log-odds that response `a`
is better than response `b` for `prompt`. It reads the text

    {prompt}[1]\n{a}\n[2]\n{b}\n

tokenised with the tokenizer's defaults (BOS added, no EOS), padded on either side; the score is
read at the last non-pad token. It was trained on both orders of each comparison, so
P(a > b) = sigmoid(logit(a, b)) and logit(a, b) ~ -logit(b, a).
"""

import torch


def format_comparison(prompt: str, a: str, b: str) -> str:
    return f"{prompt}[1]\n{a}\n[2]\n{b}\n"


def preference_logits(model, tokenizer, prompts: list[str], a: list[str], b: list[str]) -> torch.Tensor:
    """(batch,) log-odds that each `a` beats its `b` (gradients flow; wrap in no_grad to score)."""
    texts = [format_comparison(*x) for x in zip(prompts, a, b)]
    enc = tokenizer(texts, padding=True, return_tensors="pt").to(model.device)
    return model(**enc).logits[:, 0]
