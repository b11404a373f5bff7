"""`linear_logprobs(hidden, weight, labels)`: log-probs from the last hidden states and the output
projection, in chunks of tokens, never holding the full (tokens, V) logits.

    y      = hidden @ weight.T + bias            the lm_head, in the inputs' dtype (nn.Linear)
    y      = y * scale                           Cohere: config.logit_scale
    y      = softcap * tanh(y / softcap)         Gemma 2/3: config.final_logit_softcapping
    z      = y / temperature                     sampling: generation_config.temperature
    logp   = log_softmax(z)[label]               entropy = -sum(softmax(z) * log_softmax(z))

This is the order of transformers' models (Cohere multiplies the lm_head output by `logit_scale`;
Gemma 2 caps the lm_head output; generation divides the model's logits by the temperature) and of
TRL 1.16's `ChunkedLogProbFunction`. Each step is optional.

Only the positions whose label is not `ignore_index` are computed (the others are dropped before the
first matmul, so their gradient is exactly 0 whatever their hidden states hold). Forward: for each
chunk of tokens, the logits and then the `logprobs` forward (Triton on CUDA); only the per-token
logsumexp (and entropy) is kept. Backward: each chunk's logits are recomputed (one more matmul),
turned into their gradient by the `logprobs` backward, and projected at once: dhidden_chunk = dz @ W,
dW += dz.T @ hidden_chunk. Peak extra memory: one chunk's logits and their gradient (an fp32 copy of
the chunk too when a transform or the entropy is asked for), plus the weight gradient that any
training step holds anyway (in fp32 while it accumulates over several chunks of low-precision
inputs). Time: four matmuls of the output projection where the unfused path does three.
"""

import math

import torch

from kernels.ops import _validate, _validate_floats, backward_rows, forward_rows

# Tokens per chunk are chosen so one chunk's logits hold about this many elements (128 MiB in bf16).
_CHUNK_ELEMENTS = 1 << 26


def _chunks(tokens: int, vocab: int, chunk_tokens: int | None):
    step = chunk_tokens or max(1, _CHUNK_ELEMENTS // vocab)
    return [slice(start, min(start + step, tokens)) for start in range(0, tokens, step)]


def _logits(hidden, weight, bias, transform):
    """One chunk's logits z and dz/dy, the derivative of z with respect to the lm_head output y (a
    scalar, or a tensor under soft-capping; None when z is y itself, kept in the inputs' dtype)."""
    y = hidden @ weight.T if bias is None else torch.addmm(bias, hidden, weight.T)
    scale, softcap, temperature = transform
    if scale is None and softcap is None and temperature is None:
        return y, None
    # The transform runs in fp32 on the chunk: one rounding of y, none after it.
    z = y.float()
    derivative = 1.0
    if scale is not None:
        z, derivative = z * scale, scale
    if softcap is not None:
        tanh = torch.tanh(z / softcap)
        z, derivative = softcap * tanh, derivative * (1 - tanh * tanh)
    if temperature is not None:
        z, derivative = z / temperature, derivative / temperature
    return z, derivative


def _accumulate(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """total += a @ b with an fp32 `total`, without rounding each chunk's product to a's dtype first
    (summing chunk products rounded to bf16 biases the weight gradient)."""
    if total.dtype == a.dtype:
        total.addmm_(a, b)
    elif total.is_cuda:
        torch.addmm(total, a, b, out_dtype=torch.float32, out=total)
    else:  # the fp32-output matmul of low-precision inputs exists on CUDA only
        total.addmm_(a.float(), b.float())


class _LinearLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, chunk_tokens, transform, return_entropy):
        # The entropy is often logged without a gradient: then backward gets None for it and skips its term.
        ctx.set_materialize_grads(False)
        logp = torch.empty(labels.shape, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logp)
        entropy = torch.empty_like(logp) if return_entropy else None
        for chunk in _chunks(hidden.shape[0], weight.shape[0], chunk_tokens):
            z, _ = _logits(hidden[chunk], weight, bias, transform)
            logp[chunk], lse[chunk] = (out[0] for out in forward_rows(z[None], labels[None, chunk], ignore_index))
            if return_entropy:
                # H = lse - sum(p * z): one more reduction per row.
                probs = torch.exp(z.float() - lse[chunk, None])
                entropy[chunk] = lse[chunk] - (probs * z).sum(-1)
                del probs
            # Freed before the next chunk's logits exist: two chunks alive at once would double the peak.
            del z
        ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy)
        ctx.ignore_index, ctx.chunk_tokens, ctx.transform = ignore_index, chunk_tokens, transform
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        chunks = _chunks(hidden.shape[0], weight.shape[0], ctx.chunk_tokens)
        # Over several chunks, low-precision weight and bias gradients accumulate in fp32, rounded once.
        accumulate_dtype = torch.float32 if len(chunks) > 1 else weight.dtype
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=accumulate_dtype, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_bias else None
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        for chunk in chunks:
            z, derivative = _logits(hidden[chunk], weight, bias, ctx.transform)
            grad = backward_rows(z[None], labels[None, chunk], lse[None, chunk], grad_logp[chunk], ctx.ignore_index)[0]
            if grad_entropy is not None:
                # dH/dz_j = -p_j * (log p_j + H)
                log_probs = z.float() - lse[chunk, None]
                grad = grad.float() - grad_entropy[chunk, None] * log_probs.exp() * (log_probs + entropy[chunk, None])
            if derivative is not None:
                grad = grad * derivative
            grad = grad.to(hidden.dtype)
            if need_hidden:
                grad_hidden[chunk] = grad @ weight
            if need_weight:
                _accumulate(grad_weight, grad.T, hidden[chunk])
            if need_bias:
                grad_bias += grad.sum(0, dtype=torch.float32)
            del z, derivative, grad  # as in forward: one chunk's logits and gradient alive at a time
        return (
            grad_hidden,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            None, None, None, None, None,
        )


def _check_positive(name: str, value, allow_negative: bool = False) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"linear_logprobs: {name} must be a finite number or None, got {value!r}")
    if not allow_negative and value <= 0:
        raise ValueError(f"linear_logprobs: {name} must be > 0, got {value}; pass None to leave it out")


def _check_arguments(hidden, weight, bias, labels, chunk_tokens, scale, softcap, temperature) -> None:
    if weight.dim() != 2:
        raise ValueError(
            f"linear_logprobs: weight must be the (vocab, hidden) output projection, got shape "
            f"{tuple(weight.shape)}; pass model.lm_head.weight (or model.get_output_embeddings().weight)"
        )
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"linear_logprobs: hidden {tuple(hidden.shape)} must be (..., {weight.shape[1]}), the hidden size "
            f"of weight {tuple(weight.shape)}; pass the last hidden states (after the final norm)"
        )
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(
            f"linear_logprobs: bias must be ({weight.shape[0]},), one per vocabulary entry, got "
            f"{tuple(bias.shape)}; pass model.lm_head.bias"
        )
    _validate_floats("linear_logprobs", hidden=hidden, weight=weight, **({} if bias is None else {"bias": bias}))
    for what, tensor in (("weight", weight), ("labels", labels), ("bias", bias)):
        if tensor is not None and tensor.device != hidden.device:
            raise ValueError(f"linear_logprobs: hidden is on {hidden.device} but {what} on {tensor.device}; move one")
    if chunk_tokens is not None and (isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1):
        raise ValueError(f"linear_logprobs: chunk_tokens must be a positive int or None (automatic), got {chunk_tokens!r}")
    _check_positive("scale", scale, allow_negative=True)
    _check_positive("softcap", softcap)
    _check_positive("temperature", temperature)


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    chunk_tokens: int | None = None,
    check_labels: bool | None = None,
    *,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    temperature: float | None = None,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`logprobs(logits, labels)` of the logits below, without materialising them:

        logits = softcap * tanh((hidden @ weight.T + bias) * scale / softcap) / temperature

    each part optional (None leaves it out). From a transformers model:
    `bias=model.lm_head.bias`, `scale=config.logit_scale` (Cohere), `softcap=config.final_logit_softcapping`
    (Gemma 2/3), `temperature` the sampling temperature (applied last, as generation does).

    Args:
        hidden: (..., H) last hidden states (after the final norm), float32/bfloat16/float16.
        weight: (V, H) output projection, `model.lm_head.weight`, same dtype as hidden.
        labels: (...) int64 or int32 token ids; `ignore_index` marks skipped positions (log-prob 0,
            entropy 0, gradient exactly 0: they are not computed).
        ignore_index: the label value that marks ignored positions.
        chunk_tokens: tokens per chunk, a positive int; None keeps one chunk's logits near 64M elements.
        check_labels: as in `logprobs` (checked on CPU, on CUDA only when asked).
        bias: (V,) lm_head bias, or None.
        scale: multiplies the lm_head output (any finite number), or None.
        softcap: > 0, caps the scaled logits to (-softcap, softcap) with tanh, or None.
        temperature: > 0, divides the capped logits, or None.
        return_entropy: also return the entropy of softmax(logits) per token (differentiable).

    Returns:
        float32 tensor of `labels.shape`; with `return_entropy`, a pair (logp, entropy). Under autocast
        the inputs are cast to the autocast dtype first, as the unfused `lm_head` would be. The transform
        and the entropy are computed in fp32 from the lm_head output rounded to the inputs' dtype.
        Selecting the valid positions costs one device sync on CUDA.
    """
    _check_arguments(hidden, weight, bias, labels, chunk_tokens, scale, softcap, temperature)
    _validate((*hidden.shape[:-1], weight.shape[0]), labels, hidden.is_cuda, ignore_index, check_labels, "linear_logprobs")
    if torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    elif hidden.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        dtypes = f"hidden is {hidden.dtype}, weight {weight.dtype}" + ("" if bias is None else f", bias {bias.dtype}")
        raise ValueError(f"linear_logprobs: {dtypes}; cast them to one dtype")
    flat_hidden, flat_labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1).long()
    rows = (flat_labels != ignore_index).nonzero().squeeze(1)
    # Ignored positions (prompt, padding) are dropped before the first matmul: no work, no gradient.
    compact = rows.numel() < flat_labels.numel()
    with torch.autocast(hidden.device.type, enabled=False):
        outputs = _LinearLogProbs.apply(
            flat_hidden.index_select(0, rows) if compact else flat_hidden, weight, bias,
            flat_labels[rows] if compact else flat_labels, ignore_index, chunk_tokens,
            (scale, softcap, temperature), return_entropy,
        )
    # Scattered back into zeros: ignored positions get 0, and autograd routes no gradient to them.
    outputs = [out.new_zeros(flat_labels.shape).index_copy(0, rows, out) if compact else out for out in outputs if out is not None]
    outputs = [out.view(labels.shape) for out in outputs]
    return tuple(outputs) if return_entropy else outputs[0]
