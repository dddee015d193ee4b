"""tilesmith.ops.scaled_dot_product_attention / attention / varlen_attention against
PyTorch's scaled_dot_product_attention in float64 (GUIDE §3), outputs and every gradient."""

import contextlib
import functools
import importlib
import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import (DEVICE, HAS_GPU, backend_dtype_params, check_compiled_dynamic,
                      compile_backends, cuda_kernel_names, kernel_backends, requires_gpu,
                      requires_hopper_kernels)

import tilesmith
from tilesmith import testing

# The module (tilesmith.ops.attention is also the name of the function it exports).
attention_ops = importlib.import_module("tilesmith.ops.attention")

LOW_PRECISION = (torch.float16, torch.bfloat16)
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
SAMPLE_NAMES = [s.name for s in testing.attention_sample_inputs("cpu", torch.float32,
                                                                 large=HAS_GPU)]
VARLEN_NAMES = [s.name for s in testing.varlen_sample_inputs("cpu", torch.float32)]


def _sample(name, dtype):
    return {s.name: s for s in testing.attention_sample_inputs(DEVICE, dtype, large=HAS_GPU)}[name]


def _params(dtypes):
    return backend_dtype_params("attention", dtypes)


def _skip_if_backend_cannot(backend, args, kwargs=None):
    """Skip (with the reason) a call the backend's kernels do not take, e.g. a mask on cuda
    (the torch backend takes all)."""
    kwargs = kwargs or {}
    packed = args[0].dim() == 3 and len(args) > 3  # varlen args: cu_seqlens_q is 4th
    batch = args[3].numel() - 1 if packed else None
    why = attention_ops.kernel_limits(args[0], args[2], kwargs.get("dropout_p", 0.0),
                                      kwargs.get("attn_mask"), batch=batch).get(backend)
    if why:
        pytest.skip(why)


def _float64(kwargs):
    mask = kwargs.get("attn_mask")
    if mask is not None and mask.is_floating_point():
        return dict(kwargs, attn_mask=mask.detach().double().requires_grad_(mask.requires_grad))
    return kwargs


def _check(got, ref, base, name):
    if got.dtype in LOW_PRECISION:
        testing.assert_close_to_reference(got, ref, base, name=name)
    else:
        testing.assert_fp32_close(got, ref, name=name)


@pytest.mark.parametrize("backend,dtype", _params(DTYPES))
@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_forward_and_gradients_match_float64(backend, dtype, name):
    _check_sample(backend, dtype, name)


def _check_sample(backend, dtype, name):
    """Output and every gradient of attention sample `name` against float64 (GUIDE §3)."""
    sample = _sample(name, dtype)
    _skip_if_backend_cannot(backend, sample.args, sample.kwargs)
    kwargs = dict(sample.kwargs)
    mask = kwargs.get("attn_mask")
    q, k, v = testing.grad_views(sample.args)
    inputs = [q, k, v]
    if mask is not None and mask.is_floating_point():
        # The sample's own tensor, strides and all (a clone would make some views dense).
        kwargs["attn_mask"] = mask = mask.detach().requires_grad_(True)
        inputs.append(mask)

    with testing.poison_outputs():
        out = tilesmith.ops.scaled_dot_product_attention(q, k, v, backend=backend, **kwargs)
        grad_out = torch.randn(out.shape, device=DEVICE).to(dtype)
        grads = (torch.autograd.grad(out, inputs, grad_out) if out.numel()
                 else [None] * len(inputs))

    # PyTorch's SDPA (pytorch_sdpa: the samples with no heads would crash torch 2.11's).
    ref_inputs = [t.detach().double().requires_grad_(True) for t in inputs]
    ref_kwargs = dict(kwargs, attn_mask=ref_inputs[3]) if len(inputs) == 4 else kwargs
    ref = attention_ops.pytorch_sdpa(*ref_inputs[:3], **ref_kwargs)
    base_inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    base_kwargs = dict(kwargs, attn_mask=base_inputs[3]) if len(inputs) == 4 else kwargs
    base = attention_ops.pytorch_sdpa(*base_inputs[:3], **base_kwargs)

    assert out.shape == ref.shape and out.dtype == dtype
    _check(out, ref, base, "out")
    if out.numel() == 0:
        return
    ref_grads = torch.autograd.grad(ref, ref_inputs, grad_out.double())
    base_grads = torch.autograd.grad(base, base_inputs, grad_out)
    for got, want, baseline, what in zip(grads, ref_grads, base_grads, ["dq", "dk", "dv", "dmask"]):
        assert torch.isfinite(got).all(), f"{what} has NaN/inf"
        _check(got, want, baseline, what)


# ---- the wgmma kernels (csrc/attention/attention_{fwd,bwd}_sm90a.cuh) on an H100 -------------

# (batch, heads, kv heads, seq_q, seq_k, head dim, causal): 128-row query blocks and 128-key
# steps in the forward, 128-key blocks and 64-query steps in dK/dV, the causal diagonal
# inside and across them, GQA, head dims zero-filled to the kernel's 64 or 128.
HOPPER_SHAPES = {
    "d128_causal_1000": (2, 4, 4, 1000, 1000, 128, True),
    "d128_gqa_300x777": (1, 8, 2, 300, 777, 128, False),
    "d128_causal_sq777_gt_sk300": (1, 2, 2, 777, 300, 128, True),
    "d128_causal_sq300_lt_sk777": (1, 2, 2, 300, 777, 128, True),
    "d96_causal": (1, 2, 2, 257, 257, 96, True),
    "d72": (3, 1, 1, 129, 65, 72, False),
    "d64_causal_gqa": (2, 8, 2, 513, 513, 64, True),
    "d40": (1, 2, 2, 100, 200, 40, False),
}


# (batch, heads, kv heads, seq_q, seq_k, head dim, causal, mask shape, bool?): masks of the
# shapes models use (key padding, a learnable bias per head, one bias for every head), read
# for each score; a float mask's gradient is summed by the dQ kernel. (SDPA takes a mask or
# is_causal, not both; the kernels' causal masking with a mask is tested on the emulator.)
HOPPER_MASKED_SHAPES = {
    "bool_key_padding_d128": (2, 4, 4, 300, 777, 128, False, (2, 1, 1, 777), True),
    "float_bias_per_head_d64_gqa": (1, 8, 2, 513, 513, 64, False, (1, 8, 513, 513), False),
    "float_bias_d96_sq_gt_sk": (2, 2, 2, 257, 130, 96, False, (257, 130), False),
}


def _check_hopper_kernels(b, h, hk, sq, sk, d, causal, dtype, mask_shape=None, boolean=False,
                          tma=True):
    """Output, lse and every gradient of one call on the wgmma kernels against float64: the
    forward on its TMA-fed kernel where there is no mask (and `tma`), else on the cp.async
    one."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(b, heads, s, d, generator=g).to(DEVICE, dtype).requires_grad_(True)
               for heads, s in ((h, sq), (hk, sk), (hk, sk)))
    grad_out = torch.randn(b, h, sq, d, generator=g).to(DEVICE, dtype)
    kwargs = {"is_causal": causal, "enable_gqa": h != hk}
    leaves = [q, k, v]
    if mask_shape is not None:
        if boolean:
            # Key padding: each batch entry keeps a prefix of the keys.
            lengths = torch.tensor([sk - 177 * i for i in range(mask_shape[0])])
            mask = (torch.arange(sk) < lengths.view(-1, 1)).view(mask_shape).to(DEVICE)
        else:
            mask = torch.randn(mask_shape, generator=g).to(DEVICE, dtype).requires_grad_(True)
            leaves.append(mask)
        kwargs["attn_mask"] = mask

    def forward_backward():
        with tilesmith.backend.hopper_kernels(tma=tma and tilesmith.backend._TMA_DEFAULT):
            out = tilesmith.ops.scaled_dot_product_attention(q, k, v, backend="cuda", **kwargs)
            return out, torch.autograd.grad(out, leaves, grad_out)

    names = cuda_kernel_names(forward_backward)
    tma_forward = "attention_tma_sm90a::attention_fwd_tma_kernel"
    if tma and tilesmith.backend._TMA_DEFAULT and mask_shape is None:
        assert tma_forward in names and "attention_sm90a::attention_fwd_kernel" not in names
    else:
        assert "attention_sm90a::attention_fwd_kernel" in names and tma_forward not in names
    assert "attention_sm90a::attention_bwd_dkdv_kernel" in names
    assert "attention_sm90a::attention_bwd_dq_kernel" in names
    assert "attention_sm80" not in names
    out, grads = forward_backward()

    def with_leaves(inputs):
        if len(inputs) == 4:
            return dict(kwargs, attn_mask=inputs[3])
        return kwargs

    ref_inputs = [t.detach().double().requires_grad_(True) for t in leaves]
    ref = F.scaled_dot_product_attention(*ref_inputs[:3], **with_leaves(ref_inputs))
    ref_grads = torch.autograd.grad(ref, ref_inputs, grad_out.double())
    base_inputs = [t.detach().clone().requires_grad_(True) for t in leaves]
    base = F.scaled_dot_product_attention(*base_inputs[:3], **with_leaves(base_inputs))
    base_grads = torch.autograd.grad(base, base_inputs, grad_out)
    _check(out, ref, base, "out")
    for got, want, baseline, what in zip(grads, ref_grads, base_grads,
                                         ["dq", "dk", "dv", "dmask"]):
        _check(got, want, baseline, what)
    if mask_shape is None:
        _, lse = tilesmith.ops.attention(q.detach(), k.detach(), v.detach(), causal=causal,
                                         backend="cuda")
        _, ref_lse = tilesmith.ops.attention(*[t.detach() for t in ref_inputs], causal=causal,
                                             backend="torch")
        testing.assert_fp32_close(lse, ref_lse, name="lse")


@requires_hopper_kernels
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("name", list(HOPPER_SHAPES))
def test_hopper_kernels_match_float64(name, dtype):
    _check_hopper_kernels(*HOPPER_SHAPES[name], dtype)


@requires_hopper_kernels
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("name", ["d128_causal_1000", "d128_gqa_300x777", "d72", "d40"])
def test_hopper_cp_async_forward_matches_float64(name, dtype):
    """Unmasked calls take the TMA-fed forward: its cp.async twin on the same shapes."""
    _check_hopper_kernels(*HOPPER_SHAPES[name], dtype, tma=False)


@requires_hopper_kernels
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("name", list(HOPPER_MASKED_SHAPES))
def test_hopper_kernels_with_masks_match_float64(name, dtype):
    _check_hopper_kernels(*HOPPER_MASKED_SHAPES[name][:7], dtype,
                          *HOPPER_MASKED_SHAPES[name][7:])


@requires_hopper_kernels
def test_hopper_kernels_leave_the_rest_to_the_sm80_kernels():
    q, k, v = (torch.randn(1, 2, 200, 128, device=DEVICE, dtype=torch.bfloat16,
                           requires_grad=True) for _ in range(3))

    def names(q, k, v, **kwargs):
        def forward_backward():
            out = tilesmith.ops.scaled_dot_product_attention(q, k, v, backend="cuda", **kwargs)
            torch.autograd.grad(out.float().sum(), (q, k, v))
        return cuda_kernel_names(forward_backward)

    assert "attention_sm90a" in names(q, k, v)
    # (batch, seq, heads, dim) projections viewed as (b, h, s, d), read in place: the TMA-fed
    # forward's rank-4 tile maps take any such strides.
    seq_major = [torch.randn(2, 200, 2, 128, device=DEVICE, dtype=torch.bfloat16
                             ).transpose(1, 2).requires_grad_(True) for _ in range(3)]
    if tilesmith.backend._TMA_DEFAULT:
        got = names(*seq_major)
        assert "attention_fwd_tma_kernel" in got and "attention_sm90a::attention_fwd_" not in got
        # Packed batches too: one tile map over all the tokens, each sequence from its offset.
        cu = torch.tensor([0, 37, 37, 237], device=DEVICE, dtype=torch.int32)
        packed = [torch.randn(237, 2, 128, device=DEVICE, dtype=torch.bfloat16)
                  for _ in range(3)]
        got = cuda_kernel_names(lambda: tilesmith.ops.varlen_attention(
            *packed, cu, cu, 200, 200, causal=True, backend="cuda"))
        assert "attention_fwd_tma_kernel" in got and "attention_sm90a::attention_fwd_" not in got
    mask = torch.ones(200, 200, device=DEVICE, dtype=torch.bool)
    for kwargs in ({"attn_mask": mask}, {"dropout_p": 0.1}):
        got = names(q, k, v, **kwargs)
        assert "attention_sm90a" in got and "attention_sm80" not in got, kwargs
    got = names(q, k, v, attn_mask=mask, dropout_p=0.1)  # both: the sm_80 kernels
    assert "attention_sm80" in got and "attention_sm90a" not in got
    wide = [torch.randn(1, 2, 200, 192, device=DEVICE, dtype=torch.bfloat16,
                        requires_grad=True) for _ in range(3)]
    got = names(*wide)  # head dims above 128: the 256-wide sm_80 kernels
    assert "attention_sm80" in got and "attention_sm90a" not in got
    with tilesmith.backend.hopper_kernels(False):
        got = names(q, k, v)
    assert "attention_sm80" in got and "attention_sm90a" not in got


@requires_hopper_kernels
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("name", ["d80", "d128", "large_causal_2k", "large_gqa_1k"])
def test_sm80_kernels_on_hopper(dtype, name):
    """On an H100 the cuda backend's attention takes wgmma where it can: the sm_80 kernels
    on the same samples, forward and gradients."""
    with tilesmith.backend.hopper_kernels(False):
        test_forward_and_gradients_match_float64("cuda", dtype, name)


@pytest.mark.parametrize("backend", kernel_backends("attention", torch.bfloat16))
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_fully_masked_row_gives_zeros_and_finite_grads(backend, kind):
    sample = _sample(f"fully_masked_row_{kind}", torch.bfloat16)
    _skip_if_backend_cannot(backend, sample.args, sample.kwargs)
    q, k, v = testing.grad_views(sample.args)
    out = tilesmith.ops.scaled_dot_product_attention(q, k, v, backend=backend, **sample.kwargs)
    row = 4 if kind == "bool" else 7
    assert torch.equal(out[:, :, row], torch.zeros_like(out[:, :, row]))
    for grad in torch.autograd.grad(out.float().square().sum(), (q, k, v)):
        assert torch.isfinite(grad).all()
    _, lse = tilesmith.ops.attention(*[t.detach() for t in (q, k, v)], backend=backend,
                                     attn_mask=sample.kwargs["attn_mask"])
    assert torch.isneginf(lse[:, :, row]).all() and torch.isfinite(lse[:, :, row + 1]).all()


@pytest.mark.parametrize("backend", kernel_backends("attention", torch.bfloat16))
def test_forward_is_deterministic(backend):
    q, k, v = _sample("gqa_kv2_causal", torch.bfloat16).args
    first = tilesmith.ops.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True,
                                                       backend=backend)
    for _ in range(3):
        again = tilesmith.ops.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                           enable_gqa=True, backend=backend)
        assert torch.equal(first, again)


@contextlib.contextmanager
def _deterministic_algorithms():
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


# A learnable bias broadcast over batch (and heads, rows): the kernels sum its gradient with
# atomic adds unless deterministic algorithms are asked for.
BROADCAST_BIAS_SHAPES = {"per_head": (1, 2, 19, 23), "shared": (19, 23),
                         "per_key": (3, 1, 1, 23), "full": (3, 2, 19, 23)}


@pytest.mark.parametrize("backend,dtype", _params([torch.bfloat16, torch.float32]))
@pytest.mark.parametrize("bias", list(BROADCAST_BIAS_SHAPES))
def test_deterministic_algorithms_sum_a_broadcast_mask_gradient_in_torch(backend, dtype, bias,
                                                                         monkeypatch):
    q, k, v = (torch.randn(shape, device=DEVICE).to(dtype).requires_grad_()
               for shape in ((3, 2, 19, 16), (3, 2, 23, 16), (3, 2, 23, 16)))
    mask = torch.randn(BROADCAST_BIAS_SHAPES[bias], device=DEVICE).to(dtype).requires_grad_()
    grad_out = torch.randn(3, 2, 19, 16, device=DEVICE).to(dtype)
    expanded_to, shape_for = [], attention_ops._deterministic_mask_grad_shape

    def recording(*args):
        expanded_to.append(shape_for(*args))
        return expanded_to[-1]

    monkeypatch.setattr(attention_ops, "_deterministic_mask_grad_shape", recording)
    with _deterministic_algorithms():
        runs = []
        for _ in range(2):
            out = tilesmith.ops.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                             backend=backend)
            runs.append(torch.autograd.grad(out, (q, k, v, mask), grad_out))
    assert expanded_to == [None if bias == "full" else (3, 2, 19, 23)] * 2
    for first, again in zip(*runs):
        assert torch.equal(first, again)

    # Against float64 (outside deterministic mode: cuBLAS matmuls refuse it without a
    # workspace setting).
    def reference(compute_dtype):
        xs = [t.detach().to(compute_dtype).requires_grad_() for t in (q, k, v, mask)]
        out = F.scaled_dot_product_attention(*xs[:3], attn_mask=xs[3])
        return torch.autograd.grad(out, xs, grad_out.to(compute_dtype))

    for got, want, baseline, what in zip(runs[0], reference(torch.float64), reference(dtype),
                                         ["dq", "dk", "dv", "dmask"]):
        assert got.shape == want.shape
        _check(got, want, baseline, what)


@pytest.mark.parametrize("backend,dtype", _params([torch.bfloat16, torch.float32]))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_attention_returns_logsumexp(backend, dtype, causal):
    q, k, v = _sample("cross_sq17_sk50", dtype).args
    out, lse = tilesmith.ops.attention(q, k, v, causal=causal, backend=backend)
    ref_out, ref_lse = tilesmith.ops.attention(q.double(), k.double(), v.double(), causal=causal,
                                               backend="torch")
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    testing.assert_fp32_close(lse, ref_lse, name="lse")
    _check(out, ref_out, F.scaled_dot_product_attention(q, k, v, is_causal=causal), "out")


# sample, attention's keyword arguments: cross, causal, a learnable bias, packed GQA calls
# (the cuda backend's query-rows views: a decode, a bias per head and row), a fully masked
# row (its lse -inf).
LSE_GRAD_CASES = {
    "cross": ("cross_sq17_sk50", {}),
    "causal": ("cross_sq17_sk50", {"causal": True}),
    "float_bias": ("float_mask_1_h_sq_sk", {}),
    "gqa_decode": ("gqa_decode", {"enable_gqa": True}),
    "gqa_float_bias": ("gqa_float_mask_per_head", {"enable_gqa": True}),
    "fully_masked_row": ("fully_masked_row_bool", {}),
}


@pytest.mark.parametrize("backend,dtype", _params([torch.bfloat16, torch.float32]))
@pytest.mark.parametrize("uses_out", [True, False], ids=["out_and_lse", "lse_only"])
@pytest.mark.parametrize("case", list(LSE_GRAD_CASES))
def test_logsumexp_gradient_matches_float64(backend, dtype, case, uses_out):
    """attention's lse is differentiable: a loss of out and lse (or of lse alone) gives the
    gradients of q, k, v and a float mask that the explicit float64 scores do."""
    name, kwargs = LSE_GRAD_CASES[case]
    sample = _sample(name, dtype)
    _skip_if_backend_cannot(backend, sample.args, sample.kwargs)
    kwargs = dict(kwargs)
    mask = sample.kwargs.get("attn_mask")
    q, k, v = testing.grad_views(sample.args)
    inputs = [q, k, v]
    if mask is not None:
        kwargs["attn_mask"] = mask
        if mask.is_floating_point():
            kwargs["attn_mask"] = mask = mask.detach().clone().requires_grad_(True)
            inputs.append(mask)

    def loss(backend_, tensors):
        args = dict(kwargs, attn_mask=tensors[3]) if len(tensors) == 4 else kwargs
        out, lse = tilesmith.ops.attention(*tensors[:3], backend=backend_, **args)
        assert lse.requires_grad
        weights = torch.linspace(-1, 1, lse.numel(), device=lse.device).view(lse.shape)
        total = (lse.masked_fill(torch.isneginf(lse), 0) * weights).sum()
        return total + (out.float() * out.float()).sum() if uses_out else total

    def grads_of(backend_, tensors):  # v's is zero when the loss is lse's alone
        return torch.autograd.grad(loss(backend_, tensors), tensors, allow_unused=True,
                                   materialize_grads=True)

    grads = grads_of(backend, inputs)
    ref_inputs = [t.detach().double().requires_grad_(True) for t in inputs]
    ref_grads = grads_of("torch", ref_inputs)
    base_inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    base_grads = grads_of("torch", base_inputs)
    for got, want, baseline, what in zip(grads, ref_grads, base_grads, ["dq", "dk", "dv", "dmask"]):
        assert torch.isfinite(got).all(), f"{what} has NaN/inf"
        _check(got, want, baseline, what)


@pytest.mark.parametrize("backend", [p for p in kernel_backends("attention", torch.float64)])
@pytest.mark.parametrize("case", ["plain", "causal_gqa", "float_mask"])
def test_gradcheck_float64(backend, case):
    g = torch.Generator().manual_seed(1)

    def r(*shape):
        return torch.randn(shape, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()

    q, k, v = r(1, 2, 5, 4), r(1, 1 if case == "causal_gqa" else 2, 7, 4), None
    v = r(1, k.shape[1], 7, 3)
    inputs = [q, k, v]
    kwargs = {"is_causal": case == "causal_gqa", "enable_gqa": case == "causal_gqa"}
    if case == "float_mask":
        inputs.append(r(2, 5, 7))

    def f(*xs):
        mask = xs[3] if len(xs) == 4 else None
        return tilesmith.ops.scaled_dot_product_attention(*xs[:3], attn_mask=mask,
                                                          backend=backend, **kwargs)

    assert torch.autograd.gradcheck(f, tuple(inputs))


# Double backward: (q, k, v shapes, kwargs); a float mask that takes a gradient, with one
# fully masked row, where named.
DOUBLE_BACKWARD_CASES = {
    "plain": (((2, 2, 5, 16), (2, 2, 7, 16), (2, 2, 7, 16)), {}),
    "causal_q_longer": (((1, 2, 9, 16), (1, 2, 6, 16), (1, 2, 6, 16)), dict(is_causal=True)),
    "causal_gqa": (((1, 4, 5, 16), (1, 2, 8, 16), (1, 2, 8, 16)),
                   dict(is_causal=True, enable_gqa=True)),
    "float_mask": (((2, 2, 5, 16), (2, 2, 6, 16), (2, 2, 6, 16)), dict(attn_mask=(2, 1, 5, 6))),
}


def _double_backward_inputs(case, dtype):
    shapes, kwargs = DOUBLE_BACKWARD_CASES[case]
    g = torch.Generator().manual_seed(13)

    def r(*shape):
        return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)

    inputs = [r(*shape) for shape in shapes]
    kwargs = dict(kwargs)
    if "attn_mask" in kwargs:
        mask = r(*kwargs.pop("attn_mask"))
        mask[1, 0, 3] = float("-inf")  # a fully masked row: zeros, no NaN in any gradient
        inputs.append(mask)
    return inputs, kwargs


def _sdpa_call(function, kwargs):
    def call(q, k, v, mask=None):
        return function(q, k, v, attn_mask=mask, **kwargs)
    return call


@pytest.mark.parametrize("backend", kernel_backends("attention", torch.float64))
@pytest.mark.parametrize("case", list(DOUBLE_BACKWARD_CASES))
def test_double_backward_gradgradcheck_float64(backend, case):
    """A double backward (create_graph=True) computes the first backward in PyTorch ops, on
    the graph. fast_mode: PyTorch's check of one random projection of the Jacobians."""
    inputs, kwargs = _double_backward_inputs(case, torch.float64)
    inputs = [t.requires_grad_() for t in inputs]
    function = functools.partial(tilesmith.ops.scaled_dot_product_attention, backend=backend)
    assert torch.autograd.gradgradcheck(_sdpa_call(function, kwargs), inputs, fast_mode=True)


def _penalty(call, inputs, grad_out):
    """The first-order gradients along grad_out (create_graph=True; a tuple where call
    returns several outputs), and a gradient penalty's gradients: their squared norm
    differentiated with respect to the inputs."""
    firsts = torch.autograd.grad(call(*inputs), inputs, grad_out, create_graph=True)
    penalty = sum(grad.double().square().sum() for grad in firsts)
    return firsts, torch.autograd.grad(penalty, inputs)


def _check_penalty(got, ref, base, dtype, names=("q", "k", "v", "mask")):
    """_penalty's two orders of gradients against float64 (ref) by the 2x rule (base:
    PyTorch's own in dtype), finite and in dtype."""
    for order, ours, refs, bases in zip(["grad", "penalty grad"], got, ref, base):
        for out, want, baseline, what in zip(ours, refs, bases, names):
            assert out.dtype == dtype and torch.isfinite(out).all(), what
            testing.assert_close_to_reference(out, want, baseline, name=f"{order} {what}")


@pytest.mark.parametrize("backend,dtype", _params(LOW_PRECISION))
@pytest.mark.parametrize("case", list(DOUBLE_BACKWARD_CASES))
def test_double_backward_matches_float64(backend, dtype, case):
    """The first-order gradients under create_graph and a gradient penalty's gradients, by
    the 2x rule against PyTorch's math backend in the same dtype (its flash and efficient
    backends have no double backward)."""
    inputs, kwargs = _double_backward_inputs(case, dtype)
    grad_out = torch.randn(inputs[0].shape[:-1] + inputs[2].shape[-1:],
                           generator=torch.Generator().manual_seed(14)).to(dtype).to(DEVICE)

    def run(compute, function):
        leaves = [t.detach().to(compute).requires_grad_() for t in inputs]
        return _penalty(_sdpa_call(function, kwargs), leaves, grad_out.to(compute))

    with testing.poison_outputs():
        got = run(dtype, functools.partial(tilesmith.ops.scaled_dot_product_attention,
                                           backend=backend))
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.MATH):
        ref = run(torch.float64, F.scaled_dot_product_attention)
        base = run(dtype, F.scaled_dot_product_attention)
    _check_penalty(got, ref, base, dtype)


# varlen_attention's double backward: samples of testing.varlen_sample_inputs (GQA, causal,
# sequences with no queries and with no keys).
VARLEN_DOUBLE_BACKWARD_CASES = ["causal_gqa", "with_empty_sequence"]


def _varlen_call(sample, backend):
    """varlen_attention on the sample's packing, (out, lse) of (q, k, v)."""
    _, _, _, cu_q, cu_k, max_q, max_k = sample.args

    def call(q, k, v):
        return tilesmith.ops.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k,
                                              return_lse=True, backend=backend, **sample.kwargs)
    return call


@pytest.mark.parametrize("backend", kernel_backends("attention", torch.float64))
@pytest.mark.parametrize("case", VARLEN_DOUBLE_BACKWARD_CASES)
def test_varlen_double_backward_gradgradcheck_float64(backend, case):
    """As the dense double backward: the first backward in PyTorch ops, a sequence at a
    time, on the graph; through out and the log-sum-exp."""
    sample = {s.name: s for s in testing.varlen_sample_inputs(DEVICE, torch.float64)}[case]
    inputs = [t.detach().requires_grad_() for t in sample.args[:3]]
    assert torch.autograd.gradgradcheck(_varlen_call(sample, backend), inputs, fast_mode=True)


@pytest.mark.parametrize("backend,dtype", _params(LOW_PRECISION))
@pytest.mark.parametrize("case", VARLEN_DOUBLE_BACKWARD_CASES)
def test_varlen_double_backward_matches_float64(backend, dtype, case):
    """A gradient penalty through varlen_attention's out and lse, by the 2x rule against
    the torch backend (SDPA's math backend per sequence)."""
    sample = {s.name: s for s in testing.varlen_sample_inputs(DEVICE, dtype)}[case]
    g = torch.Generator().manual_seed(14)
    q, v = sample.args[0], sample.args[2]
    grad_out = torch.randn(q.shape[:-1] + v.shape[-1:], generator=g).to(dtype).to(DEVICE)
    grad_lse = torch.randn(q.shape[1], q.shape[0], generator=g).to(DEVICE)

    def run(compute, backend_):
        leaves = [t.detach().to(compute).requires_grad_() for t in sample.args[:3]]
        return _penalty(_varlen_call(sample, backend_), leaves,
                        (grad_out.to(compute), grad_lse.to(attention_ops._lse_dtype(compute))))

    with testing.poison_outputs():
        got = run(dtype, backend)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.MATH):
        ref = run(torch.float64, "torch")
        base = run(dtype, "torch")
    _check_penalty(got, ref, base, dtype)


@pytest.mark.parametrize("backend", [*kernel_backends("attention", torch.float64), "torch"])
def test_varlen_batch_of_no_sequences_stays_on_the_graph(backend):
    """cu_seqlens of one entry: no tokens; out (0, heads, dv) and lse (heads, 0), with
    empty gradients of every input, first and second order, in every backend."""
    q = torch.randn(0, 4, 16, dtype=torch.float64, device=DEVICE, requires_grad=True)
    k = torch.randn(0, 2, 16, dtype=torch.float64, device=DEVICE, requires_grad=True)
    v = torch.randn(0, 2, 24, dtype=torch.float64, device=DEVICE, requires_grad=True)
    cu = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    out, lse = tilesmith.ops.varlen_attention(q, k, v, cu, cu, 0, 0, return_lse=True,
                                              backend=backend)
    assert out.shape == (0, 4, 24) and lse.shape == (4, 0)
    grads = torch.autograd.grad(out.sum() + lse.sum(), (q, k, v), create_graph=True)
    assert [g.shape for g in grads] == [t.shape for t in (q, k, v)]


@pytest.mark.parametrize("backend", kernel_backends("attention", torch.float64))
@pytest.mark.parametrize("mask_shape", [(2, 3, 5, 40), (1, 40)], ids=["full", "keys_only"])
def test_float64_gradients_are_float64_accurate(backend, mask_shape):
    """float64 inputs get float64 arithmetic throughout, the mask gradient's accumulation
    included (gradcheck's tolerance would pass fp32 accumulation)."""
    q = torch.randn(2, 3, 5, 64, dtype=torch.float64, device=DEVICE, requires_grad=True)
    k, v = (torch.randn(2, 1, 40, 64, dtype=torch.float64, device=DEVICE) for _ in range(2))
    mask = torch.randn(mask_shape, dtype=torch.float64, device=DEVICE, requires_grad=True)
    out = tilesmith.ops.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True,
                                                     backend=backend)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    grad = torch.randn_like(ref)
    for got, want, name in zip(torch.autograd.grad(out, (q, mask), grad),
                               torch.autograd.grad(ref, (q, mask), grad), ("dq", "dmask")):
        assert testing.rel_error(got, want) < 1e-12, name


@pytest.mark.parametrize("backend,dtype", [("torch", torch.float32),
                                           *_params([torch.bfloat16, torch.float32])])
@pytest.mark.parametrize("boolean", [False, True], ids=["float", "bool"])
def test_one_dimensional_mask_broadcasts_over_batch_heads_and_rows(backend, dtype, boolean):
    """A (seq_k,) mask broadcasts as PyTorch documents (PyTorch's own SDPA fails on it, so
    the reference takes it as (1, seq_k)); every backend, the torch one included, takes it."""
    q = torch.randn(2, 2, 3, 16, device=DEVICE).to(dtype).requires_grad_()
    k, v = (torch.randn(2, 2, 17, 16, device=DEVICE).to(dtype) for _ in range(2))
    if boolean:
        mask = torch.arange(17, device=DEVICE) % 3 != 1
    else:
        mask = torch.randn(17, device=DEVICE).to(dtype).requires_grad_()
    out = tilesmith.ops.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend=backend)
    inputs = (q,) if boolean else (q, mask)
    grad = torch.randn_like(out)

    def reference(compute_dtype):
        xs = [t.detach().to(compute_dtype).requires_grad_() for t in inputs]
        m = mask if boolean else xs[1]
        ref = F.scaled_dot_product_attention(xs[0], k.to(compute_dtype), v.to(compute_dtype),
                                             attn_mask=m.view(1, 17))
        return ref, torch.autograd.grad(ref, xs, grad.to(compute_dtype))

    (ref, ref_grads), (base, base_grads) = reference(torch.float64), reference(dtype)
    _check(out, ref, base, "out")
    for got, want, baseline, name in zip(torch.autograd.grad(out, inputs, grad), ref_grads,
                                         base_grads, ("dq", "dmask")):
        assert got.shape == want.shape
        _check(got, want, baseline, name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("backend", ["torch", *kernel_backends("attention", torch.bfloat16)])
def test_float32_mask_with_low_precision_queries(backend, dtype):
    """PyTorch's SDPA takes a float32 additive mask with fp16/bf16 queries and adds it in
    float32; so does every backend here, the mask's gradient coming back in float32. Its
    values sit around -300, whose fractions fp16 (steps of 0.25) and bf16 (steps of 2) would
    lose. (test_cuda_emulated's twin adds a row near -7e4, which fp16 would make -inf.)"""
    q, k, v = (torch.randn(2, 2, n, 32, device=DEVICE).to(dtype).requires_grad_()
               for n in (9, 20, 20))
    mask = (torch.randn(2, 1, 9, 20, device=DEVICE) * 2 - 300).requires_grad_()
    out = tilesmith.ops.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend=backend)
    grad = torch.randn(out.shape, device=DEVICE).to(dtype)
    grads = torch.autograd.grad(out, (q, k, v, mask), grad)
    assert grads[3].dtype == torch.float32

    def expression(compute):
        leaves = [t.detach().to(compute).requires_grad_() for t in (q, k, v)]
        mask_leaf = mask.detach().to(torch.float64 if compute == torch.float64 else
                                     torch.float32).requires_grad_()
        y = F.scaled_dot_product_attention(*leaves, attn_mask=mask_leaf)
        return y, torch.autograd.grad(y, [*leaves, mask_leaf], grad.to(compute))

    (ref, ref_grads), (base, base_grads) = expression(torch.float64), expression(dtype)
    testing.assert_close_to_reference(out, ref, base)
    # The mask's gradient at the queries' precision, PyTorch's too: a flash-style backward's
    # dmask carries the rounding of the output (through rowsum(dO * O)) whatever the mask's
    # dtype, while PyTorch's CPU math runs a float32 mask's gradient in float32.
    for got, want, baseline, name in zip(grads, ref_grads, base_grads,
                                         ("dq", "dk", "dv", "dmask")):
        testing.assert_close_to_reference(got.to(dtype), want, baseline.to(dtype), name=name)


@pytest.mark.parametrize("backend", ["torch", *kernel_backends("attention", torch.bfloat16)])
def test_varlen_takes_strided_cu_seqlens(backend):
    """cu_seqlens that are strided views give what their contiguous copies give."""
    q, k, v = (torch.randn(n, 2, 16, device=DEVICE, dtype=torch.bfloat16) for n in (5, 7, 7))
    every_other = torch.tensor([0, 9, 2, 9, 5, 9], dtype=torch.int32, device=DEVICE)[::2]
    keys = torch.tensor([0, 9, 3, 9, 7, 9], dtype=torch.int32, device=DEVICE)[::2]
    out = tilesmith.ops.varlen_attention(q, k, v, every_other, keys, 3, 4, backend=backend)
    want = tilesmith.ops.varlen_attention(q, k, v, every_other.contiguous(), keys.contiguous(),
                                          3, 4, backend=backend)
    assert torch.equal(out, want)


def _attention_per_sequence(q, k, v, cu_q, cu_k, **kwargs):
    """varlen_attention's reference: PyTorch's SDPA on each packed sequence on its own
    (cu_seqlens read on the host), a sequence with no keys giving zeros."""
    starts_q, starts_k = cu_q.tolist(), cu_k.tolist()
    outs = [q.new_zeros(0, q.shape[1], v.shape[2])]
    for i in range(len(starts_q) - 1):
        qi, ki, vi = (t[starts[i]:starts[i + 1]].transpose(0, 1)[None]
                      for t, starts in ((q, starts_q), (k, starts_k), (v, starts_k)))
        out = attention_ops.pytorch_sdpa(qi, ki, vi, enable_gqa=True, **kwargs)
        outs.append(out[0].transpose(0, 1))
    return torch.cat(outs, 0)


@pytest.mark.parametrize("backend,dtype", [
    *_params(DTYPES), *(pytest.param("torch", dt, id=f"torch-{str(dt)[6:]}") for dt in DTYPES)])
@pytest.mark.parametrize("name", VARLEN_NAMES)
def test_varlen_forward_and_gradients(backend, dtype, name):
    _check_varlen_sample(backend, dtype, name)


def _check_varlen_sample(backend, dtype, name):
    sample = {s.name: s for s in testing.varlen_sample_inputs(DEVICE, dtype)}[name]
    _skip_if_backend_cannot(backend, sample.args)
    q, k, v, cu_q, cu_k, max_q, max_k = sample.args
    q, k, v = testing.grad_views((q, k, v))
    with testing.poison_outputs():
        out = tilesmith.ops.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, backend=backend,
                                             **sample.kwargs)
        grad_out = torch.randn(out.shape, device=DEVICE).to(dtype)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)

    def reference(compute_dtype):
        xs = [t.detach().to(compute_dtype).requires_grad_(True) for t in (q, k, v)]
        o = _attention_per_sequence(*xs, cu_q, cu_k,
                                    is_causal=sample.kwargs.get("causal", False))
        return o, torch.autograd.grad(o, xs, grad_out.to(compute_dtype), allow_unused=True,
                                      materialize_grads=True)

    ref, ref_grads = reference(torch.float64)
    base, base_grads = reference(dtype)
    _check(out, ref, base, "out")
    for got, want, baseline, what in zip(grads, ref_grads, base_grads, ["dq", "dk", "dv"]):
        _check(got, want, baseline, what)


@pytest.mark.parametrize("backend,dtype", _params([torch.bfloat16, torch.float32]))
@pytest.mark.parametrize("uses_out", [True, False], ids=["out_and_lse", "lse_only"])
@pytest.mark.parametrize("name", ["causal_gqa", "with_empty_sequence"])
def test_varlen_logsumexp_and_its_gradient_match_float64(backend, dtype, name, uses_out):
    _check_varlen_lse(backend, dtype, name, uses_out)


def _check_varlen_lse(backend, dtype, name, uses_out):
    """varlen_attention(return_lse=True): lse is (heads, total_q), each sequence's that of
    the dense attention over it alone (-inf for the queries of a sequence with no keys),
    and differentiable: a loss of out and lse (or of lse alone) gives the gradients that
    float64 does."""
    sample = {s.name: s for s in testing.varlen_sample_inputs(DEVICE, dtype)}[name]
    _skip_if_backend_cannot(backend, sample.args)
    q, k, v, cu_q, cu_k, max_q, max_k = sample.args
    causal = sample.kwargs.get("causal", False)

    def run(backend_, tensors):
        return tilesmith.ops.varlen_attention(*tensors, cu_q, cu_k, max_q, max_k,
                                              return_lse=True, backend=backend_, causal=causal)

    def grads_of(backend_, tensors):
        out, lse = run(backend_, tensors)
        weights = torch.linspace(-1, 1, lse.numel(), device=lse.device).view(lse.shape)
        total = (lse.masked_fill(torch.isneginf(lse), 0) * weights).sum()
        if uses_out:
            total = total + (out.float() * out.float()).sum()
        return (out, lse), torch.autograd.grad(total, tensors, allow_unused=True,
                                               materialize_grads=True)

    inputs = testing.grad_views((q, k, v))
    with testing.poison_outputs():
        (out, lse), grads = grads_of(backend, inputs)
    ref_inputs = [t.detach().double().requires_grad_(True) for t in inputs]
    (ref_out, ref_lse), ref_grads = grads_of("torch", ref_inputs)
    base_inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    _, base_grads = grads_of("torch", base_inputs)

    assert lse.dtype == torch.float32 and lse.shape == (q.shape[1], q.shape[0])
    starts_q, starts_k = cu_q.tolist(), cu_k.tolist()
    for i in range(len(starts_q) - 1):  # the float64 reference against dense attention
        rows = slice(starts_q[i], starts_q[i + 1])
        dense = [t[span].transpose(0, 1)[None] for t, span in (
            (ref_inputs[0], rows), (ref_inputs[1], slice(starts_k[i], starts_k[i + 1])),
            (ref_inputs[2], slice(starts_k[i], starts_k[i + 1])))]
        _, dense_lse = tilesmith.ops.attention(*dense, causal=causal, enable_gqa=True,
                                               backend="torch")
        # (float64 on both sides; the padded batch's reductions may round differently)
        torch.testing.assert_close(ref_lse[:, rows], dense_lse[0], rtol=1e-13, atol=1e-13)
    assert torch.isneginf(ref_lse).any() == (name == "with_empty_sequence")
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    finite = torch.isfinite(ref_lse)
    testing.assert_fp32_close(lse[finite], ref_lse[finite], name="lse")
    for got, want, baseline, what in zip(grads, ref_grads, base_grads, ["dq", "dk", "dv"]):
        assert torch.isfinite(got).all(), f"{what} has NaN/inf"
        _check(got, want, baseline, what)


# ---- the forward split over the keys (flash-decoding) -----------------------------------------

def _split_size(longest):
    """Keys per split for the tests: a multiple of the forward's key block (on a GPU, of
    every tuned Triton tile's and of the CUDA kernel's 64; under the interpreter, of the
    Triton kernel's 16- or 64-key tiles)."""
    if HAS_GPU:
        return 128
    return 16 if longest <= 128 else 64


def _splits_keys(sample_args):
    q, k = sample_args[0], sample_args[1]
    return k.shape[2] > _split_size(max(q.shape[2], k.shape[2]))


SPLIT_NAMES = [s.name for s in testing.attention_sample_inputs("cpu", torch.float32,
                                                                large=HAS_GPU)
               if _splits_keys(s.args)]
SPLIT_PARAMS = _params([torch.bfloat16, torch.float32])


def _forced_splits(monkeypatch, keys):
    """Forces `keys` per split and returns the list of what each forward call used."""
    chosen = []
    decide = attention_ops._keys_per_split

    def recording(*args):
        chosen.append(decide(*args))
        return chosen[-1]

    monkeypatch.setattr(attention_ops, "_keys_per_split", recording)
    monkeypatch.setattr(attention_ops, "_FORCED_SPLIT_KEYS", [keys])
    return chosen


@pytest.mark.parametrize("backend,dtype", SPLIT_PARAMS)
@pytest.mark.parametrize("name", SPLIT_NAMES)
def test_forward_split_over_keys_matches_float64(backend, dtype, name, monkeypatch):
    """The samples whose keys span more than one split, each split's partial output and
    lse combined by attention_split_combine_kernel; the backward reads the combined ones."""
    q, k = _sample(name, dtype).args[:2]
    keys = _split_size(max(q.shape[2], k.shape[2]))
    chosen = _forced_splits(monkeypatch, keys)
    _check_sample(backend, dtype, name)
    assert chosen == [keys]


@pytest.mark.parametrize("backend,dtype", SPLIT_PARAMS)
@pytest.mark.parametrize("name", [n for n in VARLEN_NAMES if n != "no_heads"])  # (no work)
def test_varlen_forward_split_over_keys_matches_float64(backend, dtype, name, monkeypatch):
    # (On a GPU these sequences are shorter than one split of 128 keys.)
    chosen = _forced_splits(monkeypatch, _split_size(0))
    _check_varlen_sample(backend, dtype, name)
    assert chosen == [_split_size(0)]


@pytest.mark.parametrize("backend,dtype", SPLIT_PARAMS)
def test_forward_split_keeps_the_dropout_mask(backend, dtype):
    """Dropout over split keys: the same Philox mask (it is a function of row and key), so
    the same output as one pass over the keys, up to the combine's rounding."""
    q = torch.randn(2, 3, 9, 32, device=DEVICE).to(dtype)
    k, v = (torch.randn(2, 3, 300, 32, device=DEVICE).to(dtype) for _ in range(2))
    _skip_if_backend_cannot(backend, (q, k, v), dict(dropout_p=0.3))
    seed = attention_ops.draw_dropout_seed(q.device)

    def forward(keys_per_split):
        args = (q, k, v, None, False, 0.2, 0.3, seed)
        if backend == "cuda":
            return torch.ops.tilesmith.attention_fwd_cuda(*args, keys_per_split)
        with attention_ops.split_keys(keys_per_split):
            return attention_ops._attention_fwd_triton(*args)

    whole, whole_lse = forward(0)
    split, split_lse = forward(_split_size(300))
    # bf16: the two round their fp32 results to bf16 apart by at most an ulp (2^-8 relative).
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(split, whole, **tol)
    torch.testing.assert_close(split_lse, whole_lse, rtol=1e-5, atol=1e-5)


# ---- grouped-query heads packed per kv head ------------------------------------------------

GQA_NAMES = [s.name for s in testing.attention_sample_inputs("cpu", torch.float32,
                                                              large=HAS_GPU)
             if s.args[1].shape[1] < s.args[0].shape[1]]


@pytest.mark.parametrize("backend,dtype",
                         [p for p in SPLIT_PARAMS if p.values[0] == "triton"])
@pytest.mark.parametrize("name", GQA_NAMES)
def test_triton_forward_unpacked_gqa_matches_float64(backend, dtype, name, monkeypatch):
    """The grouped-query samples, which the forward packs by default where seq_q < 128,
    with one program per query head instead (as longer queries run)."""
    asked = []

    def never(group_size, seqlen_q):
        asked.append((group_size, seqlen_q))
        return False

    monkeypatch.setattr(attention_ops, "_packs_gqa", never)
    _check_sample(backend, dtype, name)
    assert asked


@pytest.mark.parametrize("backend", kernel_backends("attention", torch.bfloat16))
def test_output_is_laid_out_as_sequence_major_queries(backend):
    """q, k and v as models that project them together have them, (batch, seq, heads, dim)
    memory seen as (batch, heads, seq, dim): the output comes back laid out the same way,
    as PyTorch's SDPA returns it, so out.transpose(1, 2) needs no copy before the output
    projection. Contiguous (batch, heads, seq, dim) queries give a contiguous output."""
    qkv = torch.randn(2, 9, 3, 4, 64, device=DEVICE, dtype=torch.bfloat16)

    def attention(qkv, sdpa):
        qkv = qkv.detach().requires_grad_(True)
        out = sdpa(*(t.transpose(1, 2) for t in qkv.unbind(2)), is_causal=True)
        return qkv, out

    ours = functools.partial(tilesmith.ops.scaled_dot_product_attention, backend=backend)
    (qkv_in, out), (ref_in, ref), (base_in, base) = (
        attention(qkv, ours), attention(qkv.double(), F.scaled_dot_product_attention),
        attention(qkv, F.scaled_dot_product_attention))
    assert out.transpose(1, 2).is_contiguous()
    testing.assert_close_to_reference(out, ref, base)
    grad_out = torch.randn_like(out)
    grads = [torch.autograd.grad(o, t, grad_out.to(o.dtype))[0]
             for o, t in ((out, qkv_in), (ref, ref_in), (base, base_in))]
    testing.assert_close_to_reference(*grads, name="grad")
    contiguous = [t.transpose(1, 2).contiguous() for t in qkv.unbind(2)]
    assert tilesmith.ops.scaled_dot_product_attention(*contiguous, backend=backend
                                                      ).is_contiguous()


def _float64_cuda_forward(monkeypatch):
    """Stands PyTorch's attention in float64 in for the CUDA forward (the kernels are the
    GPU tests'); returns the list of (q, k, mask) shapes it is called with."""
    calls = []

    def forward(q, k, v, mask, causal, scale, dropout_p, seed):
        calls.append((tuple(q.shape), tuple(k.shape)) if mask is None
                     else (tuple(q.shape), tuple(k.shape), tuple(mask.shape)))
        s = (q @ k.transpose(-1, -2).repeat_interleave(q.shape[1] // k.shape[1], 1)) * scale
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
        return torch.softmax(s, -1) @ v.repeat_interleave(q.shape[1] // k.shape[1], 1), \
            torch.logsumexp(s, -1)

    monkeypatch.setattr(attention_ops, "_cuda_forward", forward)
    return calls


@pytest.mark.parametrize("seqlen_q,layout,kwargs,swapped", [
    (1, "bhsd", {}, True), (5, "bhsd", {}, True), (5, "bshd", {}, True),
    (1, "bhsd", {"causal": True}, False), (1, "bhsd", {"dropout_p": 0.2}, False),
    (128, "bhsd", {}, False)])
def test_cuda_short_gqa_calls_run_each_kv_heads_group_as_query_rows(seqlen_q, layout, kwargs,
                                                                    swapped, monkeypatch):
    """A GQA call with short queries reaches the CUDA forward as (batch, kv_heads, group *
    seq_q, dim) query rows of a plain (non-GQA) call, its out and lse viewed back (q
    (batch, seq, heads, dim)-major: copied); the forward here is PyTorch's in float64 (the
    kernels are the GPU tests'), so this checks the views."""
    calls = _float64_cuda_forward(monkeypatch)
    q = torch.randn(3, 8, seqlen_q, 16, dtype=torch.float64)
    if layout == "bshd":
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
    q.requires_grad_(True)
    k, v = (torch.randn(3, 2, 40, 16, dtype=torch.float64) for _ in range(2))
    causal, dropout_p = kwargs.get("causal", False), kwargs.get("dropout_p", 0.0)
    out, lse = attention_ops._kernel_attention("cuda", q, k, v, None, causal, 0.25, dropout_p)
    assert calls == [((3, 2, 4 * seqlen_q, 16), (3, 2, 40, 16)) if swapped
                     else ((3, 8, seqlen_q, 16), k.shape)]
    if swapped:
        ref = F.scaled_dot_product_attention(q, k, v, scale=0.25, enable_gqa=True)
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(lse, torch.logsumexp(
            q @ k.repeat_interleave(4, 1).transpose(-1, -2) * 0.25, -1))
        (grad,) = torch.autograd.grad(out.sum(), q)
        (ref_grad,) = torch.autograd.grad(ref.sum(), q)
        torch.testing.assert_close(grad, ref_grad)


# (seq_q, mask shape, expanded to (3, 8, seq_q, 40), the mask's shape in the packed call or
# None where the call stays unpacked).
SHORT_GQA_MASKS = {
    "shared_decode": (1, (3, 1, 1, 40), False, (3, 1, 1, 40)),
    "shared_prompt": (5, (3, 1, 1, 40), False, (3, 1, 1, 40)),
    "per_head_decode": (1, (3, 8, 1, 40), False, (3, 2, 4, 40)),
    "per_head_and_row": (5, (3, 8, 5, 40), False, (3, 2, 20, 40)),
    "expanded_shared": (5, (3, 1, 1, 40), True, (3, 1, 1, 40)),
    "per_row_only": (5, (1, 1, 5, 40), False, None),
    "per_head_only": (5, (3, 8, 1, 40), False, None),
}


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("case", list(SHORT_GQA_MASKS))
def test_cuda_short_gqa_calls_take_masks_as_query_rows(case, kind, monkeypatch):
    """A short GQA call with a mask is packed into query rows where the mask follows them
    as a view (or a copy no larger than itself), its gradient taken back through it."""
    seqlen_q, shape, expanded, packed_shape = SHORT_GQA_MASKS[case]
    calls = _float64_cuda_forward(monkeypatch)
    q = torch.randn(3, 8, seqlen_q, 16, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(3, 2, 40, 16, dtype=torch.float64) for _ in range(2))
    if kind == "bool":
        given = torch.rand(shape) < 0.6
        given[..., 0] = True  # no fully masked row: the stand-in softmax would give NaN
    else:
        given = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    mask = given.expand(3, 8, seqlen_q, 40) if expanded else given
    out, _ = attention_ops._kernel_attention("cuda", q, k, v, mask, False, 0.25)
    if packed_shape is None:
        assert calls == [((3, 8, seqlen_q, 16), (3, 2, 40, 16), tuple(mask.shape))]
    else:
        assert calls == [((3, 2, 4 * seqlen_q, 16), (3, 2, 40, 16), packed_shape)]
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25, enable_gqa=True)
    torch.testing.assert_close(out, ref)
    inputs = (q,) if kind == "bool" else (q, given)
    grad_out = torch.randn_like(ref)
    for got, want in zip(torch.autograd.grad(out, inputs, grad_out),
                         torch.autograd.grad(ref, inputs, grad_out)):
        torch.testing.assert_close(got, want)


def test_packs_gqa_only_for_groups_with_short_queries():
    assert attention_ops._packs_gqa(4, 1) and attention_ops._packs_gqa(8, 127)
    assert not attention_ops._packs_gqa(4, 128) and not attention_ops._packs_gqa(1, 1)


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cuda_forward_split_launches_the_combine(dtype):
    """A decoding call (and a packed one) on the cuda backend: split (the sm80 forward and
    attention_split_combine_kernel, also on Hopper) and unsplit outputs agree, and the
    default splits a 1-query call over a long cache."""
    why = tilesmith.backend.unavailable_reason("cuda", "attention", DEVICE, dtype)
    if why:
        pytest.skip(why)
    q = torch.randn(1, 4, 1, 128, device=DEVICE, dtype=dtype)
    k, v = (torch.randn(1, 4, 4096, 128, device=DEVICE, dtype=dtype) for _ in range(2))
    with attention_ops.split_keys(0):
        whole, whole_lse = attention_ops._kernel_attention("cuda", q, k, v, None, False, 0.1)
    names = cuda_kernel_names(
        lambda: attention_ops._kernel_attention("cuda", q, k, v, None, False, 0.1))
    assert "attention_split_combine_kernel" in names, names
    split, split_lse = attention_ops._kernel_attention("cuda", q, k, v, None, False, 0.1)
    torch.testing.assert_close(split, whole, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(split_lse, whole_lse, rtol=1e-5, atol=1e-5)

    lengths = [300, 1, 700]
    cu = torch.tensor([0, 300, 301, 1001], device=DEVICE, dtype=torch.int32)
    packed = [torch.randn(sum(lengths), 4, 64, device=DEVICE, dtype=dtype) for _ in range(3)]
    outs = []
    for keys in (0, 128):
        with attention_ops.split_keys(keys):
            outs.append(tilesmith.ops.varlen_attention(*packed, cu, cu, 700, 700, causal=True,
                                                       backend="cuda"))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-2, atol=1e-2)


def test_keys_per_split_only_where_the_query_blocks_leave_sms_idle(monkeypatch):
    monkeypatch.setattr(attention_ops, "_sm_count", lambda index: 132)
    gpu = type("Query", (), {"device": torch.device("cuda", 0)})()
    decide = attention_ops._keys_per_split
    # Decoding, batch 1 x 32 heads: 4 splits of a 8192-key cache, 2048 keys each.
    assert decide(gpu, 1, 32, 1, 8192) == 2048
    assert decide(gpu, 1, 8, 1, 8192) == 512  # 16 splits, each at least 512 keys
    # At most 64 splits: ceil(100000 / 64) = 1563 keys, rounded up to 7 x 256.
    assert decide(gpu, 1, 1, 1, 100_000) == 1792
    assert decide(gpu, 8, 32, 1, 8192) == 0  # 256 blocks: the GPU is full
    assert decide(gpu, 1, 32, 1, 600) == 0  # too few keys to split
    assert decide(gpu, 1, 8, 4096, 4096) == 0  # 256 query blocks
    cpu = type("Query", (), {"device": torch.device("cpu")})()
    assert decide(cpu, 1, 1, 1, 8192) == 0
    with attention_ops.split_keys(64):
        assert decide(cpu, 1, 1, 1, 8192) == 64


# ---- GPU-only: opcheck, compile, memory -------------------------------------------------------

@requires_gpu
@pytest.mark.parametrize("backend", kernel_backends("attention", torch.bfloat16))
@pytest.mark.parametrize("name", ["basic_b2h3s17", "causal_sq50_gt_sk17", "float_mask_1_h_sq_sk",
                                  "gqa_kv2_causal"])
def test_opcheck(backend, name):
    sample = _sample(name, torch.bfloat16)
    _skip_if_backend_cannot(backend, sample.args, sample.kwargs)
    q, k, v = (t.detach().clone().requires_grad_(True) for t in sample.args)
    mask = sample.kwargs.get("attn_mask")
    if mask is not None:
        mask = attention_ops._prepare_mask(mask, q, k, "test")
    causal = sample.kwargs.get("is_causal", False)
    op = getattr(torch.ops.tilesmith, f"attention_fwd_{backend}")
    torch.library.opcheck(op, (q, k, v, mask, causal, 0.125, 0.0, None))
    seed = attention_ops.draw_dropout_seed(q.device)
    torch.library.opcheck(op, (q, k, v, mask, causal, 0.125, 0.25, seed))


def _backward_and_varlen_opchecks(backend, device, test_utils=None):
    """opcheck of the backward ops (with a float mask and its gradient, and with a gradient
    of the log-sum-exp) and of both packed ops (three sequences, one of them empty)."""
    kwargs = {} if test_utils is None else {"test_utils": test_utils}
    sample = _sample("float_mask_1_h_sq_sk", torch.bfloat16)
    q, k, v = (t.detach() for t in sample.args)
    mask = attention_ops._prepare_mask(sample.kwargs["attn_mask"], q, k, "test")
    out, lse = getattr(torch.ops.tilesmith, f"attention_fwd_{backend}")(
        q, k, v, mask, False, 0.125, 0.0, None)
    grad_out = torch.randn_like(out)
    backward = getattr(torch.ops.tilesmith, f"attention_bwd_{backend}")
    torch.library.opcheck(backward, (grad_out, q, k, v, mask, out, lse, False, 0.125, True,
                                     0.0, None), **kwargs)
    torch.library.opcheck(backward, (grad_out, q, k, v, None, out, lse, False, 0.125, False,
                                     0.0, None, torch.randn_like(lse)), **kwargs)
    q, k, v = (torch.randn(14, 2, 64, device=device, dtype=torch.bfloat16) for _ in range(3))
    cu_seqlens = torch.tensor([0, 5, 5, 14], device=device, dtype=torch.int32)
    packed = (q, k, v, cu_seqlens, cu_seqlens, 9, 9, True, 0.125, 0.0, None)
    forward = getattr(torch.ops.tilesmith, f"varlen_attention_fwd_{backend}")
    torch.library.opcheck(forward, packed, **kwargs)
    out, lse = forward(*packed)
    torch.library.opcheck(getattr(torch.ops.tilesmith, f"varlen_attention_bwd_{backend}"),
                          (torch.randn_like(out), q, k, v, out, lse, *packed[3:]), **kwargs)


@requires_gpu
@pytest.mark.parametrize("backend", kernel_backends("attention", torch.bfloat16))
def test_backward_and_varlen_opcheck(backend):
    _backward_and_varlen_opchecks(backend, DEVICE)


def test_backward_and_varlen_opcheck_schemas():
    """The same calls on the Triton backend, checked against the schemas only (inputs left
    unmutated, outputs unaliased): the fake-tensor checks cannot run under the interpreter."""
    _backward_and_varlen_opchecks("triton", DEVICE, test_utils=("test_schema",))


@requires_gpu
@pytest.mark.parametrize("backend", kernel_backends("attention", torch.bfloat16))
def test_torch_compile_fullgraph(backend):
    q, k, v = (t.requires_grad_(True) for t in _sample("gqa_kv2_causal", torch.bfloat16).args)

    def f(q, k, v):
        return tilesmith.ops.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=True, backend=backend).float().square().sum()

    loss = torch.compile(f, fullgraph=True)(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    eager = torch.autograd.grad(f(q, k, v), (q, k, v))
    for got, want in zip(grads, eager):
        torch.testing.assert_close(got, want)
    if attention_ops.kernel_limits(q, v, 0.1)[backend] is None:
        # With dropout the compiled graph draws its seed with its own generator, so only
        # "it compiles whole and trains" can be compared.
        dropped = torch.compile(lambda q, k, v: tilesmith.ops.scaled_dot_product_attention(
            q, k, v, dropout_p=0.1, is_causal=True, enable_gqa=True, backend=backend),
            fullgraph=True)(q, k, v)
        for grad in torch.autograd.grad(dropped.float().square().sum(), (q, k, v)):
            assert torch.isfinite(grad).all()


@pytest.mark.parametrize("backend", compile_backends("attention", torch.bfloat16))
def test_torch_compile_dynamic_shapes(backend):
    """torch.compile(dynamic=True): the shapes are symbolic, and so is what tilesmith derives
    from them (enable_gqa for one kv head). The torch backend handed PyTorch's SDPA such a
    SymBool, which it refuses. Three sequence lengths through one compiled graph, outputs,
    lse and gradients against eager."""
    dtype = torch.float32 if backend == "torch" else torch.bfloat16

    def f(q, k, v):
        out, lse = tilesmith.ops.attention(q, k, v, causal=True, enable_gqa=True,
                                           backend=backend)
        full = tilesmith.ops.scaled_dot_product_attention(q, k, v, enable_gqa=True,
                                                          backend=backend)
        return torch.cat([out.flatten(), full.flatten(), lse.to(dtype).flatten()])

    def r(*shape):
        return torch.randn(shape, device=DEVICE).to(dtype).requires_grad_()

    check_compiled_dynamic(f, [(r(2, 4, seq, 64), r(2, 1, seq + 3, 64), r(2, 1, seq + 3, 64))
                               for seq in (17, 33, 64)])


@pytest.mark.parametrize("backend", compile_backends("attention", torch.bfloat16))
def test_varlen_torch_compile_fullgraph_dynamic(backend):
    """varlen_attention in one graph (fullgraph=True, dynamic=True): no backend reads
    cu_seqlens on the host there (the torch one pads the batch on the device). Packings of
    different token counts, batch sizes and longest sequences through the compiled function,
    output, lse and gradients against eager."""
    dtype = torch.float32 if backend == "torch" else torch.bfloat16

    def f(q, k, v, cu_q, cu_k, max_q, max_k):
        out, lse = tilesmith.ops.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k,
                                                  causal=True, return_lse=True,
                                                  backend=backend)
        return torch.cat([out.flatten(), lse.to(dtype).flatten()])

    calls = []
    for lengths_q, lengths_k in (([3, 9, 1], [5, 9, 4]), ([17, 2], [20, 6]),
                                 ([4, 6, 2, 7], [4, 6, 2, 7])):
        cu_q, cu_k = (torch.tensor([0, *itertools.accumulate(n)], dtype=torch.int32,
                                   device=DEVICE) for n in (lengths_q, lengths_k))
        q = torch.randn(sum(lengths_q), 4, 32, device=DEVICE).to(dtype).requires_grad_()
        k, v = (torch.randn(sum(lengths_k), 2, 32, device=DEVICE).to(dtype).requires_grad_()
                for _ in range(2))
        calls.append((q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k)))
    check_compiled_dynamic(f, calls)


@requires_gpu
@pytest.mark.parametrize("backend", kernel_backends("attention", torch.bfloat16))
def test_memory_is_linear_in_sequence_length(backend):
    """16k tokens, one head: the score matrix alone would be 1 GiB in fp32."""
    seq = 16384
    q, k, v = (torch.randn(1, 1, seq, 64, device="cuda", dtype=torch.bfloat16,
                           requires_grad=True) for _ in range(3))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    tilesmith.ops.scaled_dot_product_attention(q, k, v, backend=backend).sum().backward()
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before < 64 * 2**20


# ---- dropout, backends, bad input ---------------------------------------------------------------

def test_dropout_runs_on_torch_and_is_applied():
    q, k, v = _sample("basic_b2h3s17", torch.float32).args
    with tilesmith.use_backend("torch"):
        plain = tilesmith.ops.scaled_dot_product_attention(q, k, v)
    torch.manual_seed(0)
    dropped = tilesmith.ops.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    assert not torch.allclose(plain, dropped)


def _dropout_reference(q, k, v, mask, causal, scale, keep, dropout_p):
    """SDPA with dropout, as PyTorch's math backend computes it, in q's dtype, with the
    given keep mask instead of a random one."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = (q @ k.transpose(-1, -2)) * scale
    if causal:
        visible = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~visible, float("-inf"))
    if mask is not None:
        scores = (scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool
                  else scores + mask)
    p = torch.softmax(scores, dim=-1)
    return (p * keep / (1 - dropout_p)).to(q.dtype) @ v


DROPOUT_CASES = {
    "plain_sq37_sk45": dict(q=(2, 3, 37, 32), k=(2, 3, 45, 32), v=(2, 3, 45, 24)),
    "causal_gqa": dict(q=(1, 4, 33, 64), k=(1, 2, 33, 64), v=(1, 2, 33, 64), causal=True),
    "float_mask_grad": dict(q=(2, 2, 20, 16), k=(2, 2, 29, 16), v=(2, 2, 29, 16),
                            float_mask=(1, 2, 20, 29)),
    "bool_mask": dict(q=(1, 2, 17, 16), k=(1, 2, 50, 16), v=(1, 2, 50, 16), bool_mask=(17, 50)),
}


def _check_against_float64(backend, dtype, spec, dropout_p):
    """Output and every gradient (q, k, v and a float mask's) of one call against float64
    attention that drops exactly the probabilities the kernels drop (attention_dropout_mask
    regenerates them from the call's seed), by the 2x rule."""
    q, k, v = (torch.randn(spec[n], device=DEVICE).to(dtype) for n in "qkv")
    _skip_if_backend_cannot(backend, (q, k, v), {"dropout_p": dropout_p})
    inputs = [q.requires_grad_(), k.requires_grad_(), v.requires_grad_()]
    mask = None
    if "float_mask" in spec:
        mask = torch.randn(spec["float_mask"], device=DEVICE).to(dtype).requires_grad_()
        inputs.append(mask)
    elif "bool_mask" in spec:
        mask = torch.rand(spec["bool_mask"], device=DEVICE) > 0.3
        mask[..., 0] = True  # no fully masked row: the reference's softmax would be NaN there
    causal, scale = spec.get("causal", False), q.shape[-1] ** -0.5

    torch.manual_seed(7)
    with testing.poison_outputs():
        out = tilesmith.ops.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal, enable_gqa=True,
            backend=backend)
        grad_out = torch.randn(out.shape, device=DEVICE).to(dtype)
        grads = torch.autograd.grad(out, inputs, grad_out)
    torch.manual_seed(7)
    seed = attention_ops.draw_dropout_seed(q.device)
    keep = tilesmith.ops.attention_dropout_mask(seed, *q.shape[:3], k.shape[2], dropout_p)

    def reference(compute_dtype):
        xs = [t.detach().to(compute_dtype).requires_grad_() for t in inputs]
        m = xs[3] if len(xs) == 4 else mask
        o = _dropout_reference(*xs[:3], m, causal, scale, keep, dropout_p)
        return o, torch.autograd.grad(o, xs, grad_out.to(compute_dtype))

    ref, ref_grads = reference(torch.float64)
    base, base_grads = reference(dtype)
    _check(out, ref, base, "out")
    for got, want, baseline, what in zip(grads, ref_grads, base_grads, ["dq", "dk", "dv", "dmask"]):
        assert torch.isfinite(got).all(), f"{what} has NaN/inf"
        _check(got, want, baseline, what)


@pytest.mark.parametrize("backend,dtype", _params([torch.bfloat16, torch.float32]))
@pytest.mark.parametrize("case", list(DROPOUT_CASES))
def test_dropout_matches_float64_with_the_kernels_mask(backend, dtype, case):
    _check_against_float64(backend, dtype, DROPOUT_CASES[case], dropout_p=0.3)


# On an H100: dropout on the wgmma kernels (several 128-row query blocks and key steps, both
# widths) and, for the same calls, on the sm_80 ones.
HOPPER_DROPOUT_CASES = {
    "d128_causal_gqa_300x777": dict(q=(1, 4, 300, 128), k=(1, 2, 777, 128),
                                    v=(1, 2, 777, 128), causal=True),
    "d64_200x130": dict(q=(2, 2, 200, 64), k=(2, 2, 130, 64), v=(2, 2, 130, 64)),
}


@requires_hopper_kernels
@pytest.mark.parametrize("hopper", [True, False], ids=["sm90a", "sm80"])
@pytest.mark.parametrize("case", list(HOPPER_DROPOUT_CASES))
def test_hopper_dropout_matches_float64_with_the_kernels_mask(case, hopper):
    with tilesmith.backend.hopper_kernels(hopper):
        _check_against_float64("cuda", torch.bfloat16, HOPPER_DROPOUT_CASES[case],
                               dropout_p=0.3)


@pytest.mark.parametrize("backend,dtype", _params([torch.bfloat16, torch.float32]))
@pytest.mark.parametrize("name", ["causal_gqa", "with_empty_sequence"])
def test_varlen_dropout_matches_float64_with_the_kernels_mask(backend, dtype, name):
    """Packed sequences with dropout: sequence i drops what batch entry i of
    attention_dropout_mask keeps out, over its own positions. The log-sum-exp is that of the
    scores before dropout, and its gradient joins out's."""
    sample = {s.name: s for s in testing.varlen_sample_inputs(DEVICE, dtype)}[name]
    q, k, v, cu_q, cu_k, max_q, max_k = sample.args
    dropout_p, causal = 0.25, sample.kwargs.get("causal", False)
    scale = q.shape[-1] ** -0.5
    _skip_if_backend_cannot(backend, (q, k, v), {"dropout_p": dropout_p})
    q, k, v = testing.grad_views((q, k, v))

    def loss(out, lse, grad_out):
        weights = torch.linspace(-1, 1, lse.numel(), device=lse.device).view(lse.shape)
        return ((out * grad_out).sum()
                + (lse.masked_fill(torch.isneginf(lse), 0) * weights.to(lse.dtype)).sum())

    torch.manual_seed(11)
    with testing.poison_outputs():
        out, lse = tilesmith.ops.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k,
                                                  dropout_p=dropout_p, causal=causal,
                                                  return_lse=True, backend=backend)
        grad_out = torch.randn(out.shape, device=DEVICE).to(dtype)
        grads = torch.autograd.grad(loss(out, lse, grad_out), (q, k, v))
    torch.manual_seed(11)
    seed = attention_ops.draw_dropout_seed(q.device)
    keep = tilesmith.ops.attention_dropout_mask(seed, cu_q.numel() - 1, q.shape[1], max_q, max_k,
                                                dropout_p)
    starts_q, starts_k = cu_q.tolist(), cu_k.tolist()

    def reference(compute_dtype):
        xs = [t.detach().to(compute_dtype).requires_grad_() for t in (q, k, v)]
        outs, lses = [], []
        for i in range(len(starts_q) - 1):
            qi, ki, vi = (x[lo:hi].transpose(0, 1)[None] for x, lo, hi in (
                (xs[0], starts_q[i], starts_q[i + 1]), (xs[1], starts_k[i], starts_k[i + 1]),
                (xs[2], starts_k[i], starts_k[i + 1])))
            lses.append(attention_ops._torch_logsumexp(qi, ki, None, causal, scale)[0])
            if ki.shape[2] == 0:  # no keys: zeros, as the kernels give (softmax would be NaN)
                outs.append(qi.new_zeros(qi.shape[2], qi.shape[1], vi.shape[3]))
                continue
            keep_i = keep[i:i + 1, :, :qi.shape[2], :ki.shape[2]]
            oi = _dropout_reference(qi, ki, vi, None, causal, scale, keep_i, dropout_p)
            outs.append(oi[0].transpose(0, 1))
        o, lse_ = torch.cat(outs, 0), torch.cat(lses, 1)
        return o, lse_, torch.autograd.grad(loss(o, lse_, grad_out.to(compute_dtype)), xs,
                                            allow_unused=True, materialize_grads=True)

    ref, ref_lse, ref_grads = reference(torch.float64)
    base, _, base_grads = reference(dtype)
    _check(out, ref, base, "out")
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    finite = torch.isfinite(ref_lse)
    testing.assert_fp32_close(lse[finite], ref_lse[finite], name="lse")
    for got, want, baseline, what in zip(grads, ref_grads, base_grads, ["dq", "dk", "dv"]):
        _check(got, want, baseline, what)


def _tile_config_params():
    return [pytest.param(kind, widest, i, id=f"{kind}-d{widest}-{i}")
            for kind in ("fwd", "dkdv", "dq")
            for widest, configs in attention_ops._kernel_space(kind)[1].items()
            for i in range(len(configs))]


@pytest.mark.parametrize("kind,widest,index", _tile_config_params())
def test_every_tile_config_is_correct(kind, widest, index):
    """Each entry of the Triton attention kernels' autotune spaces, forced on its own (not
    only those autotuning picks), on sequences longer than its tiles and not multiples of
    them: causal GQA with dropout, then a float mask with its gradient and a head dim of v
    that differs. Under the interpreter this is also where BLOCK_M != BLOCK_N is tested."""
    config = attention_ops._kernel_space(kind)[1][widest][index]
    d = widest
    causal_gqa = dict(q=(1, 2, 137, d), k=(1, 1, 137, d), v=(1, 1, 137, d), causal=True)
    masked = dict(q=(1, 1, 139, d), k=(1, 1, 131, d), v=(1, 1, 131, d // 2),
                  float_mask=(1, 1, 139, 131))
    with attention_ops.tile_config(**{kind: config}):
        _check_against_float64("triton", torch.bfloat16, causal_gqa, dropout_p=0.2)
        _check_against_float64("triton", torch.bfloat16, masked, dropout_p=0.0)


@pytest.mark.parametrize("backend", kernel_backends("attention", torch.float64))
def test_dropout_gradcheck_float64(backend):
    """gradcheck through the registered op with a fixed seed (the public function draws a
    new seed per call, so repeated evaluations would see different masks)."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(shape, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
               for shape in ((1, 2, 6, 4), (1, 2, 9, 4), (1, 2, 9, 3)))
    seed = torch.tensor([12345], dtype=torch.int64, device=DEVICE)

    def f(q, k, v):
        return torch.ops.tilesmith.attention_fwd_triton(q, k, v, None, True, 0.5, 0.4, seed)[0]

    assert torch.autograd.gradcheck(f, (q, k, v))


@pytest.mark.parametrize("backend", kernel_backends("attention", torch.float64))
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "varlen"])
def test_dropout_double_backward_float64(backend, packed):
    """With dropout, the double backward's math path drops what the kernels drop: its
    first-order gradients (create_graph=True) equal the kernels' (create_graph=False) to
    float64 rounding, and gradgradcheck passes, through the registered op with a fixed seed
    (the public functions draw a new seed per call)."""
    seed = torch.tensor([12345], dtype=torch.int64, device=DEVICE)
    prefix = "varlen_" if packed else ""
    forward = getattr(torch.ops.tilesmith, f"{prefix}attention_fwd_{backend}")
    g = torch.Generator().manual_seed(3)
    if packed:  # causal GQA over sequences of 3 and 5 queries, 4 and 6 keys
        cu_q, cu_k = (torch.tensor(cu, dtype=torch.int32, device=DEVICE)
                      for cu in ([0, 3, 8], [0, 4, 10]))
        inputs = [torch.randn(shape, generator=g, dtype=torch.float64).to(DEVICE)
                  for shape in ((8, 4, 8), (10, 2, 8), (10, 2, 5))]

        def call(q, k, v):
            return forward(q, k, v, cu_q, cu_k, 5, 6, True, 0.4, 0.3, seed)
    else:  # causal GQA with a float mask that takes a gradient
        inputs = [torch.randn(shape, generator=g, dtype=torch.float64).to(DEVICE)
                  for shape in ((1, 4, 6, 8), (1, 2, 9, 8), (1, 2, 9, 5), (1, 4, 6, 9))]

        def call(q, k, v, mask):
            return forward(q, k, v, mask, True, 0.4, 0.3, seed)
    inputs = [t.detach().requires_grad_() for t in inputs]
    out, lse = call(*inputs)
    g = torch.Generator().manual_seed(4)
    grad_out, grad_lse = (torch.randn(t.shape, generator=g, dtype=torch.float64).to(DEVICE)
                          for t in (out, lse))
    kernels = torch.autograd.grad((out, lse), inputs, (grad_out, grad_lse), retain_graph=True)
    math = torch.autograd.grad((out, lse), inputs, (grad_out, grad_lse), create_graph=True)
    for got, want in zip(math, kernels):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradgradcheck(call, inputs, fast_mode=True)


@pytest.mark.parametrize("backend,dtype", _params(LOW_PRECISION))
@pytest.mark.parametrize("case", ["causal_gqa", "float_mask_grad"])
def test_dropout_double_backward_matches_float64(backend, dtype, case):
    """A gradient penalty through attention with dropout, by the 2x rule against float64
    attention that drops the probabilities the kernels drop (PyTorch's math backend would
    draw a mask of its own)."""
    spec, dropout_p = DROPOUT_CASES[case], 0.3
    g = torch.Generator().manual_seed(5)
    inputs = [torch.randn(spec[n], generator=g).to(dtype).to(DEVICE) for n in "qkv"]
    _skip_if_backend_cannot(backend, inputs, {"dropout_p": dropout_p})
    if "float_mask" in spec:
        inputs.append(torch.randn(spec["float_mask"], generator=g).to(dtype).to(DEVICE))
    causal, scale = spec.get("causal", False), inputs[0].shape[-1] ** -0.5
    grad_out = torch.randn(inputs[0].shape[:-1] + inputs[2].shape[-1:],
                           generator=g).to(dtype).to(DEVICE)

    def run(compute, call):
        leaves = [t.detach().to(compute).requires_grad_() for t in inputs]
        return _penalty(call, leaves, grad_out.to(compute))

    torch.manual_seed(7)
    with testing.poison_outputs():
        got = run(dtype, lambda q, k, v, mask=None: tilesmith.ops.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal, enable_gqa=True,
            backend=backend))
    torch.manual_seed(7)
    seed = attention_ops.draw_dropout_seed(inputs[0].device)
    keep = tilesmith.ops.attention_dropout_mask(seed, *inputs[0].shape[:3],
                                                inputs[1].shape[2], dropout_p)

    def reference(q, k, v, mask=None):
        return _dropout_reference(q, k, v, mask, causal, scale, keep, dropout_p)

    ref, base = run(torch.float64, reference), run(dtype, reference)
    _check_penalty(got, ref, base, dtype)


@pytest.mark.parametrize("dropout_p", [0.1, 0.5])
def test_dropout_mask_keeps_one_minus_p_and_varies_everywhere(dropout_p):
    seed = attention_ops.draw_dropout_seed(DEVICE)
    keep = tilesmith.ops.attention_dropout_mask(seed, 2, 4, 64, 96, dropout_p)
    # 49152 draws: the kept fraction's standard deviation is at most 0.0023.
    assert abs(keep.float().mean().item() - (1 - dropout_p)) < 0.012
    # Every (batch, head) stream, row and group of four keys draws its own numbers.
    flat = keep.reshape(8, 64, 96)
    assert all(not torch.equal(flat[0], flat[i]) for i in range(1, 8))
    assert not torch.equal(keep[0, 0, 0], keep[0, 0, 1])
    assert not torch.equal(keep[0, 0, :, 0:4], keep[0, 0, :, 4:8])
    again = tilesmith.ops.attention_dropout_mask(seed.clone(), 2, 4, 64, 96, dropout_p)
    assert torch.equal(keep, again)
    other = tilesmith.ops.attention_dropout_mask(seed + 1, 2, 4, 64, 96, dropout_p)
    assert not torch.equal(keep, other)


def _philox4x32_10(counter, key):
    """Philox4x32-10 (Salmon et al., SC'11) written from the paper's definition."""
    mask32 = 0xFFFFFFFF
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        p0, p2 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p2 >> 32) ^ c1 ^ k0, p2 & mask32, (p0 >> 32) ^ c3 ^ k1, p0 & mask32)
        k0, k1 = (k0 + 0x9E3779B9) & mask32, (k1 + 0xBB67AE85) & mask32
    return c0, c1, c2, c3


def test_dropout_mask_is_philox4x32_10():
    """The documented mask: Philox4x32-10 keyed by the seed (low, high words), counter
    (key // 4, row, batch * heads + head, 0), word key % 4, kept when >= p * 2**32."""
    # Known-answer vectors of Random123's kat_vectors for philox4x32_10.
    assert _philox4x32_10((0, 0, 0, 0), (0, 0)) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C,
                                                     0x9B00DBD8)
    assert _philox4x32_10((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
                          (0xA4093822, 0x299F31D0)) == (0xD16CFE09, 0x94FDCCEB, 0x5001E420,
                                                        0x24126EA1)
    seed_value, dropout_p = 0x0123456789ABCDEF, 0.4
    batch, heads, seqlen_q, seqlen_k = 2, 2, 5, 11
    keep = tilesmith.ops.attention_dropout_mask(
        torch.tensor([seed_value], dtype=torch.int64, device=DEVICE), batch, heads, seqlen_q,
        seqlen_k, dropout_p).cpu()
    key = (seed_value & 0xFFFFFFFF, seed_value >> 32)
    threshold = round(dropout_p * 2**32)
    for b in range(batch):
        for h in range(heads):
            for row in range(seqlen_q):
                for col in range(seqlen_k):
                    word = _philox4x32_10((col // 4, row, b * heads + h, 0), key)[col % 4]
                    assert keep[b, h, row, col].item() == (word >= threshold), (b, h, row, col)


@pytest.mark.parametrize("backend", kernel_backends("attention", torch.bfloat16))
def test_dropout_follows_torch_manual_seed(backend):
    q, k, v = _sample("basic_b2h3s17", torch.bfloat16).args
    _skip_if_backend_cannot(backend, (q, k, v), {"dropout_p": 0.2})

    def run(seed):
        torch.manual_seed(seed)
        return tilesmith.ops.scaled_dot_product_attention(q, k, v, dropout_p=0.2,
                                                          backend=backend)
    first = run(0)
    assert torch.equal(first, run(0))
    assert not torch.equal(first, run(1))
    plain = tilesmith.ops.scaled_dot_product_attention(q, k, v, backend=backend)
    assert not torch.equal(first, plain)


@pytest.mark.parametrize("backend", kernel_backends("attention", torch.bfloat16))
def test_dropout_op_checks_its_seed(backend):
    q = torch.randn(1, 1, 4, 64, device=DEVICE).to(torch.bfloat16)
    op = getattr(torch.ops.tilesmith, f"attention_fwd_{backend}")
    error = ValueError if backend == "triton" else RuntimeError  # the C++ checks' type
    with pytest.raises(error, match="dropout_p > 0 needs seed.*None"):
        op(q, q, q, None, False, 1.0, 0.5, None)
    with pytest.raises(error, match="dropout_p > 0 needs seed.*(int32|Int)"):
        op(q, q, q, None, False, 1.0, 0.5, torch.zeros(1, dtype=torch.int32, device=DEVICE))


def test_backends_name_what_their_kernels_do_not_take():
    q = torch.randn(1, 2, 4, 64, dtype=torch.bfloat16)
    mask = torch.ones(4, 4, dtype=torch.bool)
    assert attention_ops.kernel_limits(q, q)["cuda"] is None
    assert attention_ops.kernel_limits(q, q, mask=mask)["cuda"] is None
    assert attention_ops.kernel_limits(q[..., :40], q[..., :40])["cuda"] is None
    assert attention_ops.kernel_limits(q[..., :8], q[..., :8])["cuda"] is None
    # Head dims above 128 run in the head-dim-256 kernels (on the CPU: no shared-memory
    # limit to check).
    for d in (136, 256):
        assert attention_ops.kernel_limits(torch.randn(1, 1, 1, d),
                                           torch.randn(1, 1, 1, d))["cuda"] is None, d
    # ... where the GPU allows the 128 KiB of shared memory those kernels' blocks ask for.
    for allowed, routed in ((227 * 1024, False), (99 * 1024, True)):
        props = type("Props", (), {"name": "GPU", "shared_memory_per_block_optin": allowed})
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(torch.cuda, "is_available", lambda: True)
            patch.setattr(torch.cuda, "get_device_properties", lambda device: props)
            why = attention_ops._cuda_shared_memory_short(torch.device("cuda", 0))
        assert (why is not None) == routed and (not routed or "99 KiB" in why), why
    for qd, vd in ((36, 36), (64, 32), (136, 128)):
        assert "multiple of 8 and at most 256" in attention_ops.kernel_limits(
            torch.randn(1, 1, 1, qd), torch.randn(1, 1, 1, vd))["cuda"], (qd, vd)
    assert attention_ops.kernel_limits(q, q, 0.1) == {"triton": None, "cuda": None}
    assert attention_ops.kernel_limits(q[..., :36], q[..., :36])["triton"] is None
    assert tilesmith.ops.attention_kernel_limits is attention_ops.kernel_limits
    # Named explicitly, a call the kernels cannot take raises with that reason; by default
    # it goes to a backend that can.
    with pytest.raises(tilesmith.BackendUnavailableError, match="multiple of 8|CUDA tensors"):
        tilesmith.ops.scaled_dot_product_attention(q[..., :36], q[..., :36], q[..., :36],
                                                   backend="cuda")


def test_kernels_take_at_most_65535_sequences_and_heads():
    """Batch and heads lie along a CUDA grid axis each (y, z: 65535 programs at most), which
    the interpreter does not enforce: past that the kernels step aside by name."""
    limit = 65535
    for shape, fits in (((limit, 1, 1, 8), True), ((limit + 1, 1, 1, 8), False),
                        ((1, limit + 1, 1, 8), False)):
        q = torch.empty(shape, device="meta")
        limits = attention_ops.kernel_limits(q, q)
        for backend in ("triton", "cuda"):
            assert (limits[backend] is None) == fits, (shape, limits)
            assert fits or "at most 65535 sequences and 65535 heads" in limits[backend]
    packed = torch.empty(10, 2, 8, device="meta")
    assert attention_ops.kernel_limits(packed, packed, batch=limit)["triton"] is None
    assert "65535" in attention_ops.kernel_limits(packed, packed, batch=limit + 1)["cuda"]
    # Named explicitly, such a call raises; varlen counts its sequences from cu_seqlens.
    q = torch.randn(limit + 1, 1, 1, 8)
    with pytest.raises(tilesmith.BackendUnavailableError, match="65536 and 1"):
        tilesmith.ops.scaled_dot_product_attention(q, q, q, backend="triton")
    tokens = torch.randn(limit + 1, 1, 8)
    cu_seqlens = torch.arange(limit + 2, dtype=torch.int32)
    with pytest.raises(tilesmith.BackendUnavailableError, match="65536 and 1"):
        tilesmith.ops.varlen_attention(tokens, tokens, tokens, cu_seqlens, cu_seqlens, 1, 1,
                                       backend="triton")
    with pytest.raises(ValueError, match="attention_dropout_mask: at most 65535"):
        tilesmith.ops.attention_dropout_mask(torch.zeros(1, dtype=torch.int64), 1, limit + 1,
                                             1, 1, 0.5)


@requires_gpu
@pytest.mark.parametrize("backend", kernel_backends("attention", torch.bfloat16))
def test_batch_times_heads_past_65535_launches_on_the_gpu(backend):
    """2048 sequences x 32 heads = 65536 (batch, head) pairs, an inference-sized call: a grid
    axis each, so it launches (the Triton kernels once put the product on one axis, which
    the interpreter runs and a GPU refuses)."""
    q, k, v = (torch.randn(2048, 32, 16, 64, device=DEVICE).to(torch.bfloat16)
               .requires_grad_() for _ in range(3))
    grad_out = torch.randn(2048, 32, 16, 64, device=DEVICE).to(torch.bfloat16)
    out = tilesmith.ops.scaled_dot_product_attention(q, k, v, is_causal=True, backend=backend)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)

    def pytorch(dtype):
        xs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        o = torch.nn.functional.scaled_dot_product_attention(*xs, is_causal=True)
        return (o, *torch.autograd.grad(o, xs, grad_out.to(dtype)))

    for got, want, baseline, name in zip((out, *grads), pytorch(torch.float64),
                                         pytorch(torch.bfloat16), ("out", "dq", "dk", "dv")):
        testing.assert_close_to_reference(got, want, baseline, name=name)


def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(shape, dtype=dtype, device=device)


BAD_INPUTS = [
    ("head_dims_differ", lambda: ((_t(1, 2, 4, 8), _t(1, 2, 4, 16), _t(1, 2, 4, 16)), {}),
     ValueError, r"head dims differ \(8 != 16\)"),
    ("gqa_not_divisible", lambda: ((_t(1, 6, 4, 8), _t(1, 4, 4, 8), _t(1, 4, 4, 8)),
                                   {"enable_gqa": True}), ValueError, "multiple of"),
    ("gqa_flag_missing", lambda: ((_t(1, 4, 4, 8), _t(1, 2, 4, 8), _t(1, 2, 4, 8)), {}),
     ValueError, "enable_gqa=True"),
    ("kv_heads_differ", lambda: ((_t(1, 4, 4, 8), _t(1, 2, 4, 8), _t(1, 4, 4, 8)),
                                 {"enable_gqa": True}), ValueError, "same number of heads"),
    ("rank1", lambda: ((_t(8), _t(8), _t(8)), {}), ValueError,
     r"query must be at least 2-D \(\.\.\., heads, seq, head_dim\), got shape \(8,\)"),
    ("int_dtype", lambda: ((torch.ones(1, 1, 2, 8, dtype=torch.int64),) * 3, {}), TypeError,
     "float16, bfloat16"),
    ("mixed_dtype", lambda: ((_t(1, 1, 2, 8), _t(1, 1, 2, 8, dtype=torch.float64),
                              _t(1, 1, 2, 8)), {}), TypeError, "one dtype"),
    ("wrong_device", lambda: ((_t(1, 1, 2, 8), _t(1, 1, 2, 8, device="meta"), _t(1, 1, 2, 8)),
                              {}), ValueError, "one device"),
    ("batch_differs", lambda: ((_t(2, 1, 2, 8), _t(3, 1, 2, 8), _t(3, 1, 2, 8)), {}),
     ValueError, "batch sizes differ"),
    ("rank5_batch_differs", lambda: ((_t(2, 3, 1, 2, 8), _t(2, 2, 1, 2, 8), _t(2, 1, 1, 2, 8)),
                                     {}), ValueError, "batch sizes differ"),
    ("rank5_mask_batch", lambda: ((_t(2, 3, 1, 2, 8),) * 3, {"attn_mask": _t(2, 2, 1, 2, 2)}),
     ValueError, r"attn_mask of shape \(2, 2, 1, 2, 2\) does not broadcast over the batch "
     r"dimensions \(2, 3\)"),
    ("kv_len_differs", lambda: ((_t(1, 1, 2, 8), _t(1, 1, 3, 8), _t(1, 1, 4, 8)), {}),
     ValueError, "sequence lengths differ"),
    ("mask_not_broadcastable", lambda: ((_t(1, 2, 4, 8),) * 3,
                                        {"attn_mask": torch.ones(3, 4, dtype=torch.bool)}),
     ValueError, r"does not broadcast to \(batch, heads, seq_q, seq_k\) = \(1, 2, 4, 4\)"),
    ("mask_wrong_dtype", lambda: ((_t(1, 2, 4, 8),) * 3,
                                  {"attn_mask": torch.ones(4, 4, dtype=torch.int32)}),
     TypeError, "attn_mask must be bool"),
    ("mask_bf16_for_fp32_query", lambda: ((_t(1, 2, 4, 8),) * 3,
                                          {"attn_mask": torch.ones(4, 4, dtype=torch.bfloat16)}),
     TypeError, "attn_mask must be bool, float32 or the query's dtype torch.float32"),
    ("mask_and_causal", lambda: ((_t(1, 2, 4, 8),) * 3,
                                 {"attn_mask": torch.ones(4, 4, dtype=torch.bool),
                                  "is_causal": True}), ValueError, "not both"),
    ("dropout_out_of_range", lambda: ((_t(1, 2, 4, 8),) * 3, {"dropout_p": 1.5}), ValueError,
     r"dropout_p must be in \[0, 1\)"),
    # A string would pass as a true flag, and float("x")'s error names no argument.
    ("is_causal_not_bool", lambda: ((_t(1, 2, 4, 8),) * 3, {"is_causal": "yes"}), TypeError,
     "scaled_dot_product_attention: is_causal must be a bool, got 'yes'"),
    ("enable_gqa_not_bool", lambda: ((_t(1, 2, 4, 8),) * 3, {"enable_gqa": "no"}), TypeError,
     "enable_gqa must be a bool, got 'no'"),
    ("scale_not_number", lambda: ((_t(1, 2, 4, 8),) * 3, {"scale": "x"}), TypeError,
     "scale must be a real number, got 'x'"),
    ("dropout_not_number", lambda: ((_t(1, 2, 4, 8),) * 3, {"dropout_p": "0.1"}), TypeError,
     "dropout_p must be a real number, got '0.1'"),
    ("mask_not_tensor", lambda: ((_t(1, 2, 4, 8),) * 3, {"attn_mask": [[True] * 4] * 4}),
     TypeError, "attn_mask must be a torch.Tensor or None, got list"),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case,make,error,match", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_clear_error(backend, case, make, error, match):
    args, kwargs = make()
    with pytest.raises(error, match=match):
        tilesmith.ops.scaled_dot_product_attention(*args, backend=backend, **kwargs)


def test_varlen_bad_input():
    q = _t(10, 2, 8)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    with pytest.raises(TypeError, match="cu_seqlens_q must be a 1-D int32 tensor"):
        tilesmith.ops.varlen_attention(q, q, q, cu.long(), cu, 6, 6)
    with pytest.raises(ValueError, match="batch \\+ 1 entries"):
        tilesmith.ops.varlen_attention(q, q, q, cu, cu[:2], 6, 6)
    with pytest.raises(ValueError, match="3-D"):
        tilesmith.ops.varlen_attention(q[None], q[None], q[None], cu, cu, 6, 6)
    with pytest.raises(TypeError, match="max_seqlen_q and max_seqlen_k must be ints, got 6.5"):
        tilesmith.ops.varlen_attention(q, q, q, cu, cu, 6.5, 6)
    with pytest.raises(TypeError, match="varlen_attention: causal must be a bool, got 1"):
        tilesmith.ops.varlen_attention(q, q, q, cu, cu, 6, 6, causal=1, backend="triton")
    with pytest.raises(TypeError, match="return_lse must be a bool, got 'yes'"):
        tilesmith.ops.varlen_attention(q, q, q, cu, cu, 6, 6, return_lse="yes")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_attention_checks_argument_types(backend):
    q = _t(1, 2, 4, 8)
    with pytest.raises(TypeError, match="attention: causal must be a bool, got 'yes'"):
        tilesmith.ops.attention(q, q, q, causal="yes", backend=backend)
    with pytest.raises(TypeError, match="attention: scale must be a real number"):
        tilesmith.ops.attention(q, q, q, scale=torch.tensor([0.5, 0.5]), backend=backend)
    # A 0-d tensor is a number here, as in PyTorch's function.
    out, _ = tilesmith.ops.attention(q, q, q, scale=torch.tensor(0.5), backend=backend)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, q, q, scale=0.5))


def test_split_keys_bad_counts():
    """A negative count reached the kernels and gave garbage: refused on entry, as are
    non-integers; a count that is not a whole number of key blocks at the call."""
    for keys in (-16, "x", True, 2.0):
        with pytest.raises(ValueError, match="split_keys: keys must be None or an int >= 0"):
            with tilesmith.ops.attention_split_keys(keys):
                pass
    q, k = _t(1, 2, 3, 16, device=DEVICE), _t(1, 2, 100, 16, device=DEVICE)
    with tilesmith.ops.attention_split_keys(40):
        with pytest.raises(ValueError, match=r"40 keys per split is not a multiple of the "
                                             r"forward's \d+-key blocks"):
            tilesmith.ops.scaled_dot_product_attention(q, k, k, backend="triton")


def test_dropout_mask_bad_input():
    seed = torch.zeros(1, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"attention_dropout_mask: dropout_p must be in \[0, 1\), "
                                         "got 1.2"):
        tilesmith.ops.attention_dropout_mask(seed, 1, 2, 3, 4, 1.2)
    with pytest.raises(ValueError, match="sizes must be >= 0, got batch 1, heads 2, seqlen_q -3"):
        tilesmith.ops.attention_dropout_mask(seed, 1, 2, -3, 4, 0.5)
    with pytest.raises(TypeError, match="seed must be a 1-element int64 tensor"):
        tilesmith.ops.attention_dropout_mask(seed.float(), 1, 2, 3, 4, 0.5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("entries,max_seqlen,match", [
    ([0, 4, 12], 8, "must run from 0 to q's token count \\(10\\).*last 12"),  # past the tokens
    ([0, 4, 8], 6, "must run from 0 to q's token count \\(10\\).*last 8"),  # tokens left out
    ([2, 4, 10], 6, "first entry 2"),
    ([0, 7, 4, 10], 6, "decreasing somewhere"),
    ([0, 4, 10], 5, "max_seqlen_q=5 is less than the longest sequence in cu_seqlens_q \\(6\\)"),
], ids=["past_the_tokens", "tokens_left_out", "not_from_0", "decreasing", "max_seqlen_short"])
def test_varlen_checks_cu_seqlens_contents(backend, entries, max_seqlen, match):
    """The kernels read cu_seqlens on the device: entries that would take them past the
    tensors, or leave tokens (and their output rows) unwritten, raise first."""
    q, kv = _t(10, 2, 8), _t(10, 2, 8)
    cu_q = torch.tensor(entries, dtype=torch.int32)
    cu_k = torch.tensor([0] * (len(entries) - 1) + [10], dtype=torch.int32)
    with pytest.raises(ValueError, match=match):
        tilesmith.ops.varlen_attention(q, kv, kv, cu_q, cu_k, max_seqlen, 10, backend=backend)
    # The same entries as cu_seqlens_k, named as such.
    with pytest.raises(ValueError, match=match.replace("q's", "k's").replace("_q", "_k")):
        tilesmith.ops.varlen_attention(kv, q, q, cu_k, cu_q, 10, max_seqlen, backend=backend)


def test_varlen_reads_each_cu_seqlens_once_while_unchanged(monkeypatch):
    """The host read (a sync on a GPU) happens once per cu_seqlens tensor, again after an
    in-place change, and for an inference tensor once (it has no version counter)."""
    reads = []
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist",
                        lambda self: reads.append(self.numel()) or real_tolist(self))
    q = _t(10, 2, 8)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    for _ in range(3):
        tilesmith.ops.varlen_attention(q, q, q, cu, cu, 6, 6, backend="triton")
    assert reads == [3]
    cu[1] = 12  # now decreasing: seen again, and refused
    with pytest.raises(ValueError, match="decreasing somewhere"):
        tilesmith.ops.varlen_attention(q, q, q, cu, cu, 6, 6, backend="triton")
    assert reads == [3, 3]
    with torch.inference_mode():
        frozen = torch.tensor([0, 4, 10], dtype=torch.int32)
        for _ in range(2):
            tilesmith.ops.varlen_attention(q, q, q, frozen, frozen, 6, 6, backend="triton")
    assert reads == [3, 3, 3]
