"""kernels.logprobs against a float64 log_softmax + gather, on both paths.

The Triton kernels run on CPU under the interpreter (TRITON_INTERPRET=1, set before the kernel module
is imported); on a CUDA machine the same tests also run the compiled kernels.

Tolerances, and why:
- fp32 logits: the op accumulates in fp32 (online softmax over V terms), so the error against float64
  is a few fp32 ulps of the logsumexp: atol 1e-5 on log-probs and 1e-6 on gradients (entries <= |g|).
- bf16/fp16 logits: log-probs are computed in fp32 from the exact low-precision inputs, so they keep
  the fp32 tolerance. The gradient is rounded once to the logits' dtype: at most half an ulp, plus one
  ulp in the interpreter whose bf16 store truncates instead of rounding. The bound used is that of
  PyTorch's own low-precision path (its fp32 result rounded to bf16) plus one ulp.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # also in conftest.py, for runs of this file alone

import pytest
import torch

from kernels import linear_logprobs, logprobs, logprobs_reference
from kernels import ops, triton_logprobs

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# TRITON_INTERPRET=0 (the GPU check) runs the compiled kernels, which take CUDA tensors only.
COMPILED = os.environ.get("TRITON_INTERPRET") != "1"


def through_cuda(kernel):
    """A Triton launcher that takes and returns CPU tensors, running the compiled kernel on the GPU: the
    CPU-built test cases then test the compiled kernels too."""
    def launch(*args):
        out = kernel(*(a.cuda() if isinstance(a, torch.Tensor) else a for a in args))
        return tuple(o.cpu() for o in out) if isinstance(out, tuple) else out.cpu()
    return launch


@pytest.fixture(params=["torch", "triton"])
def impl(request, monkeypatch):
    """The PyTorch path, and the Triton kernels (under the interpreter on CPU, compiled on the GPU when
    TRITON_INTERPRET=0) behind the same op."""
    if request.param == "triton" and COMPILED:
        if not torch.cuda.is_available():
            pytest.skip("compiled Triton kernels need CUDA; TRITON_INTERPRET=1 runs them on the CPU")
        monkeypatch.setattr(triton_logprobs, "forward", through_cuda(triton_logprobs.forward))
        monkeypatch.setattr(triton_logprobs, "backward", through_cuda(triton_logprobs.backward))
    monkeypatch.setattr(ops, "TRITON_ON_CPU", request.param == "triton")
    return request.param


def reference(logits, labels, upstream, ignore_index=-100):
    """float64 log_softmax + gather and its gradient for the upstream gradient `upstream`."""
    x = logits.detach().double().requires_grad_(True)
    valid = labels != ignore_index
    logp = torch.log_softmax(x, dim=-1).gather(-1, torch.where(valid, labels, 0)[..., None]).squeeze(-1)
    logp = torch.where(valid, logp, 0.0)
    (grad,) = torch.autograd.grad((logp * upstream.double()).sum(), x)
    return logp.detach(), grad


def run(logits, labels, upstream, ignore_index=-100):
    x = logits.detach().clone().requires_grad_(True)
    logp = logprobs(x, labels, ignore_index)
    (grad,) = torch.autograd.grad((logp * upstream).sum(), x)
    return logp, grad


def check(logits, labels, ignore_index=-100, seed=0):
    upstream = torch.randn(labels.shape, generator=torch.Generator().manual_seed(seed)).to(logits.device)
    logp, grad = run(logits, labels, upstream, ignore_index)
    ref_logp, ref_grad = reference(logits, labels, upstream, ignore_index)
    assert logp.dtype == torch.float32 and logp.shape == labels.shape
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    torch.testing.assert_close(logp.double(), ref_logp, atol=1e-5, rtol=1e-5)
    if logits.dtype == torch.float32:
        torch.testing.assert_close(grad.double(), ref_grad, atol=1e-6, rtol=1e-5)
    else:
        # PyTorch's own low-precision result: the exact gradient rounded to the dtype; allow one more ulp.
        torch_rounded = ref_grad.to(logits.dtype).double()
        ulp = torch.finfo(logits.dtype).eps * ref_grad.abs().clamp_min(torch.finfo(logits.dtype).tiny)
        assert ((grad.double() - ref_grad).abs() <= (torch_rounded - ref_grad).abs() + ulp).all()
    return logp, grad


def make(rows, vocab, dtype=torch.float32, scale=3.0, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=gen) * scale).to(dtype).to(device)
    labels = torch.randint(0, vocab, (rows,), generator=gen).to(device)
    return logits, labels


@pytest.mark.parametrize("vocab", [1, 123, 1000, 32000])
def test_vocab_sizes_not_multiple_of_block(impl, vocab):
    rows = 4 if vocab == 32000 else 9
    logits, labels = make(rows, vocab)
    check(logits, labels)


def test_labels_at_both_ends_of_vocab(impl):
    logits, labels = make(6, 257)
    labels[:3] = 0
    labels[3:] = 256
    check(logits, labels)


def test_ignored_positions_and_fully_ignored_rows(impl):
    logits = torch.randn(3, 5, 50, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 50, (3, 5), generator=torch.Generator().manual_seed(2))
    labels[0, 1] = -100
    labels[2] = -100  # a whole sequence ignored
    logp, grad = check(logits, labels)
    assert (logp[2] == 0).all() and (grad[2] == 0).all() and (grad[0, 1] == 0).all()


def test_custom_ignore_index(impl):
    logits, labels = make(5, 40)
    labels[2] = 7
    logp, grad = check(logits, labels, ignore_index=7)
    assert logp[2] == 0 and (grad[2] == 0).all()


def test_sliced_non_contiguous_input(impl):
    # The shift-by-one view every script uses: logits[:, :-1] against input_ids[:, 1:].
    full = torch.randn(3, 8, 70, generator=torch.Generator().manual_seed(3))
    ids = torch.randint(0, 70, (3, 8), generator=torch.Generator().manual_seed(4))
    logits, labels = full[:, :-1], ids[:, 1:]
    assert not logits.is_contiguous() and not labels.is_contiguous()
    check(logits, labels)
    # leading dimensions permuted: rows reached through two unrelated strides
    check(full.transpose(0, 1), ids.transpose(0, 1))


def test_huge_logits(impl):
    logits, labels = make(6, 300, scale=30.0)
    logp, _ = check(logits, labels)
    assert torch.isfinite(logp).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_confident_rows_do_not_cancel(impl, dtype):
    # p(label) >= 0.999: in low precision 1 - p would round to 0 or to a multiple of the ulp of 1.
    logits, labels = make(8, 500, scale=1.0)
    logits[torch.arange(8), labels] = 15.0
    logits = logits.to(dtype)
    p = torch.softmax(logits.double(), -1)[torch.arange(8), labels]
    assert (p >= 0.999).all()
    upstream = torch.ones(8)
    _, grad = run(logits, labels, upstream)
    _, ref_grad = reference(logits, labels, upstream)
    label_grad, ref_label_grad = grad[torch.arange(8), labels].double(), ref_grad[torch.arange(8), labels]
    # 1 - p ~ 3e-4 is right to the dtype's relative precision plus the fp32 error of p = exp(x - lse),
    # about an fp32 ulp of lse (~16 here); computed in the dtype it would be off by up to an ulp of 1
    # in that dtype (bf16: 4e-3, ten times the value itself).
    bound = torch.finfo(dtype).eps * ref_label_grad.abs() + 2 * torch.finfo(torch.float32).eps * 16
    assert ((label_grad - ref_label_grad).abs() <= bound).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_fp32_outputs(impl, dtype):
    logits, labels = make(10, 1000, dtype=dtype)
    check(logits, labels)


def test_leading_shapes(impl):
    logits = torch.randn(2, 3, 4, 33, generator=torch.Generator().manual_seed(5))
    labels = torch.randint(0, 33, (2, 3, 4), generator=torch.Generator().manual_seed(6))
    check(logits, labels)


def test_triton_out_of_vocab_label_gives_nan_not_a_read_out_of_bounds():
    logits, labels = make(4, 30)
    labels[1] = 30
    forward = through_cuda(triton_logprobs.forward) if COMPILED else triton_logprobs.forward
    if COMPILED and not torch.cuda.is_available():
        pytest.skip("compiled Triton kernels need CUDA; TRITON_INTERPRET=1 runs them on the CPU")
    logp, _ = forward(logits.view(1, 4, 30), labels.view(1, 4), -100)
    assert torch.isnan(logp[0, 1]) and torch.isfinite(logp[0, [0, 2, 3]]).all()


def test_labels_outside_vocabulary_raise():
    logits, labels = make(4, 30)
    for bad in (30, -1):
        labels[2] = bad
        with pytest.raises(ValueError, match="outside the vocabulary"):
            logprobs(logits, labels)


def test_shape_and_dtype_errors():
    logits, labels = make(4, 30)
    with pytest.raises(ValueError, match="leading shape"):
        logprobs(logits, labels[:3])
    for dtype in (torch.float32, torch.uint8, torch.int16, torch.bool):
        # uint8 cannot hold -100 or ids >= 256; these used to pass the check and fail inside gather
        with pytest.raises(ValueError, match="int64 or int32 token ids.*labels.long"):
            logprobs(logits, labels.to(dtype))
    for dtype in (torch.int64, torch.int32, torch.bool):
        with pytest.raises(ValueError, match="logits must be float32.*cast with logits.float"):
            logprobs(logits.to(dtype), labels)


def test_int32_labels_match_int64(impl):
    logits, labels = make(6, 40)
    labels[1] = -100
    torch.testing.assert_close(logprobs(logits, labels.int()), logprobs(logits, labels), rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's NaN - NaN
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_logits_at_ignored_positions_give_zero_gradient(impl, bad):
    # The README promises log-prob 0 and gradient 0 at ignored positions, whatever their logits hold
    # (a masked position's logits are often garbage); 0 * NaN would be NaN.
    logits, labels = make(5, 60)
    logits[1, 7] = bad
    logits[3] = bad
    labels[[1, 3]] = -100
    upstream = torch.randn(5, generator=torch.Generator().manual_seed(2))
    logp, grad = run(logits, labels, upstream)
    assert (logp[[1, 3]] == 0).all() and (grad[[1, 3]] == 0).all()
    # the other rows as before (float64 autograd itself gives NaN in the ignored rows, so compare these)
    ref_logp, ref_grad = reference(logits, labels, upstream)
    kept = [0, 2, 4]
    torch.testing.assert_close(logp[kept].double(), ref_logp[kept], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad[kept].double(), ref_grad[kept], atol=1e-6, rtol=1e-5)


def test_torch_path_chunks_rows(monkeypatch):
    # Force many chunks so the chunk boundaries are exercised on small shapes.
    monkeypatch.setattr(ops, "_CHUNK_ELEMENTS", 64)
    logits, labels = make(37, 50)
    check(logits, labels)


def test_reference_matches_op():
    logits, labels = make(7, 90)
    labels[3] = -100
    torch.testing.assert_close(logprobs(logits, labels), logprobs_reference(logits, labels))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_dispatch_compiled(dtype):
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter is on; run with TRITON_INTERPRET=0 to test the compiled kernels")
    logits, labels = make(64, 32000, dtype=dtype, device="cuda")
    labels[5] = -100
    upstream = torch.randn(64, device="cuda")
    x = logits.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad((logprobs(x, labels) * upstream).sum(), x)
    ref_logp, ref_grad = reference(logits, labels, upstream)
    torch.testing.assert_close(logprobs(logits, labels).double(), ref_logp, atol=1e-5, rtol=1e-5)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.double(), ref_grad, atol=2e-2 if dtype == torch.bfloat16 else 1e-6, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_tokens", [None, 4])
def test_linear_logprobs_matches_unfused(impl, dtype, chunk_tokens):
    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(2, 9, 16, generator=gen).to(dtype)
    weight = (torch.randn(77, 16, generator=gen) / 4).to(dtype)
    labels = torch.randint(0, 77, (2, 9), generator=gen)
    labels[1, :3] = -100
    upstream = torch.randn(2, 9, generator=gen)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    logp = linear_logprobs(h, w, labels, chunk_tokens=chunk_tokens)
    logp.backward(upstream)
    # float64 reference: the unfused definition on the same (rounded) inputs
    h64, w64 = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    valid = labels != -100
    logp64 = torch.log_softmax(h64 @ w64.T, -1).gather(-1, labels.clamp_min(0)[..., None])[..., 0]
    ref = torch.where(valid, logp64, 0.0)
    ref.backward(upstream.double())
    # bf16: the chunk's logits (O(1) here) and their gradients are rounded to bf16 before and between
    # the matmuls, as in the unfused bf16 path: a few bf16 ulps (2^-8) of O(1) values.
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(logp.double(), ref.detach(), **tol)
    torch.testing.assert_close(h.grad.double(), h64.grad, **tol)
    torch.testing.assert_close(w.grad.double(), w64.grad, **tol)


def linear_reference(hidden, weight, labels, bias=None, scale=None, softcap=None, temperature=None, ignore_index=-100):
    """float64: logits = softcap * tanh((hidden @ weight.T + bias) * scale / softcap) / temperature, then the
    log-prob of each label and the entropy; ignored positions 0. Returns leaf tensors to differentiate."""
    leaves = [x.detach().double().requires_grad_(True) for x in (hidden, weight) + (() if bias is None else (bias,))]
    logits = leaves[0] @ leaves[1].T + (0 if bias is None else leaves[2])
    logits = logits * (1 if scale is None else scale)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logits = logits / (1 if temperature is None else temperature)
    log_probs = torch.log_softmax(logits, -1)
    valid = labels != ignore_index
    logp = torch.where(valid, log_probs.gather(-1, torch.where(valid, labels, 0)[..., None])[..., 0], 0.0)
    entropy = torch.where(valid, -(log_probs.exp() * log_probs).sum(-1), 0.0)
    return logp, entropy, leaves


TRANSFORMS = {
    "plain": {},
    "bias": dict(bias=True),
    "scale": dict(scale=0.25),
    "softcap": dict(softcap=2.0),
    "temperature": dict(temperature=0.7),
    "all": dict(bias=True, scale=3.0, softcap=1.5, temperature=1.3),
}


@pytest.mark.parametrize("entropy", [False, True], ids=["logp", "entropy"])
@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_linear_logprobs_transforms_against_float64(impl, transform, entropy):
    # fp32 inputs, several chunks, ignored positions: values and gradients for hidden, weight and bias
    # against float64 autograd of the definition. Logits here are O(3), so fp32 error is ~1e-6.
    options = dict(TRANSFORMS[transform])
    gen = torch.Generator().manual_seed(11)
    hidden = torch.randn(3, 7, 16, generator=gen)
    weight = torch.randn(45, 16, generator=gen) / 2
    bias = torch.randn(45, generator=gen) if options.pop("bias", False) else None
    labels = torch.randint(0, 45, (3, 7), generator=gen)
    labels[0, :2] = -100
    labels[2, 5] = -100
    up_logp, up_entropy = torch.randn(2, 3, 7, generator=gen)
    leaves = [x.clone().requires_grad_(True) for x in (hidden, weight) + (() if bias is None else (bias,))]
    out = linear_logprobs(*leaves[:2], labels, chunk_tokens=4, bias=leaves[2] if bias is not None else None,
                          return_entropy=entropy, **options)
    logp, ent = out if entropy else (out, None)
    loss = (logp * up_logp).sum() + (0 if ent is None else (ent * up_entropy).sum())
    grads = torch.autograd.grad(loss, leaves)
    ref_logp, ref_ent, ref_leaves = linear_reference(hidden, weight, labels, bias, **options)
    ref_loss = (ref_logp * up_logp.double()).sum() + (0 if ent is None else (ref_ent * up_entropy.double()).sum())
    ref_grads = torch.autograd.grad(ref_loss, ref_leaves)
    assert logp.dtype == torch.float32 and logp.shape == labels.shape
    torch.testing.assert_close(logp.double(), ref_logp.detach(), atol=2e-5, rtol=1e-5)
    if entropy:
        assert ent.shape == labels.shape and (ent[labels == -100] == 0).all()
        torch.testing.assert_close(ent.double(), ref_ent.detach(), atol=2e-5, rtol=1e-5)
    for name, grad, ref in zip(["hidden", "weight", "bias"], grads, ref_grads):
        assert grad.dtype == torch.float32, name
        torch.testing.assert_close(grad.double(), ref, atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    assert (grads[0][labels == -100] == 0).all()


def test_linear_logprobs_entropy_without_its_gradient():
    # The entropy logged, not trained on: the same gradients as logp alone.
    hidden, weight = torch.randn(6, 8, requires_grad=True), torch.randn(20, 8, requires_grad=True)
    labels = torch.randint(0, 20, (6,))
    logp, _ = linear_logprobs(hidden, weight, labels, return_entropy=True, softcap=2.0)
    with_entropy = torch.autograd.grad(logp.sum(), (hidden, weight))
    alone = torch.autograd.grad(linear_logprobs(hidden, weight, labels, softcap=2.0).sum(), (hidden, weight))
    for a, b in zip(with_entropy, alone):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["gemma2", "cohere"])
def test_linear_logprobs_matches_model_families(family):
    # The arguments map onto transformers' own definitions: the model's logits (Gemma 2 caps the lm_head
    # output with config.final_logit_softcapping; Cohere multiplies it by config.logit_scale), divided by
    # a sampling temperature as generation does, against linear_logprobs on the last hidden states.
    import transformers

    common = dict(vocab_size=97, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    if family == "gemma2":
        config = transformers.Gemma2Config(**common, final_logit_softcapping=1.5)
        options = dict(softcap=config.final_logit_softcapping)
        model = transformers.Gemma2ForCausalLM(config)
    else:
        config = transformers.CohereConfig(**common, logit_scale=0.3)
        options = dict(scale=config.logit_scale)
        model = transformers.CohereForCausalLM(config)
    torch.manual_seed(0)
    for p in model.parameters():  # random weights large enough that the cap and the scale matter
        torch.nn.init.normal_(p, std=0.5)
    ids = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state
        logits = model(input_ids=ids).logits
    temperature = 0.8
    expected = torch.log_softmax(logits.double() / temperature, -1).gather(-1, ids[..., None])[..., 0]
    got = linear_logprobs(hidden, model.lm_head.weight.detach(), ids, temperature=temperature, **options)
    if family == "gemma2":
        assert logits.abs().max() < config.final_logit_softcapping  # the cap was applied
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_linear_logprobs_non_finite_hidden_at_ignored_positions(impl, bad):
    # Hidden states (so logits) that are NaN or inf at ignored positions reach neither output nor gradient.
    gen = torch.Generator().manual_seed(12)
    hidden, weight = torch.randn(2, 5, 8, generator=gen), torch.randn(30, 8, generator=gen)
    labels = torch.randint(0, 30, (2, 5), generator=gen)
    labels[1, 2] = -100
    clean_h, clean_w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    linear_logprobs(clean_h, clean_w, labels, chunk_tokens=3).sum().backward()
    hidden[1, 2] = bad
    h, w = hidden.requires_grad_(True), weight.clone().requires_grad_(True)
    logp = linear_logprobs(h, w, labels, chunk_tokens=3)
    logp.sum().backward()
    assert logp[1, 2] == 0 and (h.grad[1, 2] == 0).all()
    torch.testing.assert_close(h.grad, clean_h.grad, rtol=0, atol=0)
    torch.testing.assert_close(w.grad, clean_w.grad, rtol=0, atol=0)


def test_linear_logprobs_frozen_weight_positional_call_and_int32_labels():
    hidden = torch.randn(5, 8, requires_grad=True)
    weight = torch.randn(11, 8)
    labels = torch.randint(0, 11, (5,))
    labels[0] = 3
    logp = linear_logprobs(hidden, weight, labels, 3, 2)  # ignore_index, chunk_tokens, positionally
    logp.sum().backward()
    assert hidden.grad is not None and weight.grad is None
    assert logp[0] == 0 and (hidden.grad[0] == 0).all()
    torch.testing.assert_close(linear_logprobs(hidden, weight, labels.int()), linear_logprobs(hidden, weight, labels))


def test_linear_logprobs_errors():
    hidden, weight, labels = torch.randn(5, 8), torch.randn(11, 8), torch.randint(0, 11, (5,))
    cases = [
        (dict(labels=torch.full((5,), 11)), "outside the vocabulary"),
        (dict(weight=weight.double()), "cast them to one dtype"),
        (dict(bias=torch.randn(11).half()), "cast them to one dtype"),
        # a 1-D weight used to be read as a vocabulary of 8 and blamed on the labels
        (dict(weight=torch.randn(8)), "weight must be the \\(vocab, hidden\\) output projection"),
        (dict(weight=torch.randn(11, 9)), "hidden size of weight"),
        (dict(bias=torch.randn(10)), "bias must be \\(11,\\)"),
        (dict(labels=labels.to(torch.uint8)), "int64 or int32"),
        (dict(hidden=hidden.long(), weight=weight.long()), "hidden must be float32"),
        (dict(labels=labels[:4]), "leading shape"),
        (dict(softcap=0.0), "softcap must be > 0"),
        (dict(temperature=-1.0), "temperature must be > 0"),
        (dict(scale=float("nan")), "scale must be a finite number"),
    ] + [(dict(chunk_tokens=bad), "chunk_tokens must be a positive int") for bad in (-1, 0, 2.5, True)]
    for change, message in cases:
        args = dict(hidden=hidden, weight=weight, labels=labels) | change
        with pytest.raises(ValueError, match=message):
            linear_logprobs(**args)
