"""Fused log-softmax + gather: per-token log-probabilities of label tokens.

The one piece of code that every script in `algos/` shares.

    from kernels import logprobs
    logp = logprobs(logits[:, :-1], input_ids[:, 1:])   # (B, T-1) float32

`logprobs` never materialises a full-size fp32 log-softmax: the forward keeps one logsumexp per row,
the backward recomputes the softmax from the logits and writes the gradient once, in the logits'
dtype. CUDA tensors run the Triton kernels in `kernels/triton_logprobs.py`; everything else runs
the chunked PyTorch path in `kernels/ops.py`, which has the same semantics and is the reference
for the Triton kernels.

`linear_logprobs(hidden, weight, labels)` goes one step further: it takes the last hidden states and
the output projection and never holds the full logits (chunked over tokens, recomputed in backward),
with an optional lm_head `bias`, logit `scale` (Cohere), `softcap` (Gemma 2), sampling `temperature`
and per-token entropy (`return_entropy=True`).
"""

from kernels.linear import linear_logprobs
from kernels.ops import logprobs, logprobs_reference

__all__ = ["linear_logprobs", "logprobs", "logprobs_reference"]
