"""`linear_logprobs(hidden, weight, labels)`: log-probs from the last hidden states and the output
projection, in chunks of tokens, never holding the full (tokens, V) logits.

    logp[i] = log_softmax(hidden[i] @ weight.T)[labels[i]]

Forward: for each chunk of tokens, logits = hidden_chunk @ weight.T, then the `logprobs` forward
(Triton on CUDA); only the per-token logsumexp is kept. Backward: each chunk's logits are recomputed
(one more matmul), turned into their gradient by the `logprobs` backward, and projected at once:
dhidden_chunk = dlogits @ weight, dweight += dlogits.T @ hidden_chunk. Peak extra memory: one chunk's
logits and their gradient, plus the weight gradient that any training step holds anyway. Time: four
matmuls of the output projection where the unfused path does three.
"""

import torch

from kernels.ops import _validate, backward_rows, forward_rows

# Tokens per chunk are chosen so one chunk's logits hold about this many elements (128 MiB in bf16).
_CHUNK_ELEMENTS = 1 << 26


def _chunks(tokens: int, vocab: int, chunk_tokens: int | None):
    step = chunk_tokens or max(1, _CHUNK_ELEMENTS // vocab)
    return [slice(start, min(start + step, tokens)) for start in range(0, tokens, step)]


class _LinearLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, chunk_tokens):
        logp = torch.empty(labels.shape, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logp)
        for chunk in _chunks(hidden.shape[0], weight.shape[0], chunk_tokens):
            logits = (hidden[chunk] @ weight.T)[None]
            logp[chunk], lse[chunk] = (out[0] for out in forward_rows(logits, labels[None, chunk], ignore_index))
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.ignore_index, ctx.chunk_tokens = ignore_index, chunk_tokens
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        hidden, weight, labels, lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight) if need_weight else None
        for chunk in _chunks(hidden.shape[0], weight.shape[0], ctx.chunk_tokens):
            logits = (hidden[chunk] @ weight.T)[None]
            grad_logits = backward_rows(
                logits, labels[None, chunk], lse[None, chunk], grad_logp[None, chunk], ctx.ignore_index
            )[0]
            if need_hidden:
                grad_hidden[chunk] = grad_logits @ weight
            if need_weight:
                grad_weight.addmm_(grad_logits.T, hidden[chunk])
        return grad_hidden, grad_weight, None, None, None


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    chunk_tokens: int | None = None,
    check_labels: bool | None = None,
) -> torch.Tensor:
    """`logprobs(hidden @ weight.T, labels)` without materialising the logits.

    Args:
        hidden: (..., H) last hidden states (after the final norm), fp32/bf16/fp16.
        weight: (V, H) output projection (`model.lm_head.weight`; no bias, no logit soft-capping).
        labels: (...) integer token ids; `ignore_index` marks skipped positions (log-prob 0, no gradient).
        ignore_index: the label value that marks ignored positions.
        chunk_tokens: tokens per chunk; default keeps one chunk's logits near 64M elements.
        check_labels: as in `logprobs` (checked on CPU, on CUDA only when asked).

    Returns:
        float32 tensor of `labels.shape`. Under autocast both inputs are cast to the autocast dtype first,
        as the unfused `lm_head` would be. The weight gradient is accumulated over chunks in the
        weight's dtype.
    """
    _validate((*hidden.shape[:-1], weight.shape[0]), labels, hidden.is_cuda, ignore_index, check_labels)
    if torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    elif hidden.dtype != weight.dtype:
        raise ValueError(f"linear_logprobs: hidden is {hidden.dtype} but weight is {weight.dtype}; cast one")
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1).contiguous()
    with torch.autocast(hidden.device.type, enabled=False):
        logp = _LinearLogProbs.apply(flat_hidden, weight, flat_labels, ignore_index, chunk_tokens)
    return logp.view(labels.shape)
