"""tilesmith.nn: drop-in modules, convert(), patch_sdpa(), autocast, the examples, DDP."""

import copy
import importlib.util
import operator
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, HAS_GPU, check_compiled_dynamic, compile_backends, requires_gpu

import tilesmith
from tilesmith import testing

ROOT = Path(__file__).resolve().parent.parent
# Our kernels where they can run fast enough: Triton (the interpreter on the CPU) for small
# modules; whole models on the CPU go through the torch backend of each op (the interpreter
# takes minutes per ResNet step), which still exercises convert, the modules' argument
# handling and every layer of dispatch.
KERNELS = "triton"
MODELS = "triton" if HAS_GPU else "torch"
# The examples draw their loss curves where matplotlib is installed (`make test` installs it).
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def _close(got, want, rtol=1e-5, name="output"):
    """fp32 against torch's fp32 module: the same math, so IEEE-level agreement."""
    err = testing.rel_error(got, want)
    assert err <= rtol, f"{name}: relative error {err:.2e} > {rtol:.0e}"


def test_linear_module_is_a_drop_in():
    torch.manual_seed(0)
    ref = torch.nn.Linear(20, 12, device=DEVICE)
    ours = tilesmith.nn.Linear(20, 12, device=DEVICE, backend=KERNELS)
    ours.load_state_dict(ref.state_dict())
    assert ours.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(3, 4, 20, device=DEVICE, requires_grad=True)
    _close(ours(x), ref(x))
    gelu = tilesmith.nn.Linear(20, 12, device=DEVICE, activation="gelu", backend=KERNELS)
    gelu.load_state_dict(ref.state_dict())
    _close(gelu(x), F.gelu(ref(x)))
    grads = torch.autograd.grad(gelu(x).sum(), (x, gelu.weight, gelu.bias))
    want = torch.autograd.grad(F.gelu(ref(x)).sum(), (x, ref.weight, ref.bias))
    for g, w in zip(grads, want):
        _close(g, w, name="grad")


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_conv2d_module_is_a_drop_in(padding_mode, channels_last):
    torch.manual_seed(0)
    ref = torch.nn.Conv2d(3, 6, 3, stride=2, padding=1, padding_mode=padding_mode,
                          device=DEVICE)
    ours = tilesmith.nn.Conv2d(3, 6, 3, stride=2, padding=1, padding_mode=padding_mode,
                               device=DEVICE, activation="relu", backend=KERNELS)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 9, 9, device=DEVICE)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out = ours(x)
    _close(out, F.relu(ref(x)))
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_gradient_penalty_through_converted_layers():
    """WGAN-GP's penalty, ((|d critic / d x| - 1)^2).mean(), differentiated with respect to
    the critic's parameters: the double backward through conv2d and gemm with fused
    activations (the layers' second derivatives) matches torch's modules."""
    torch.manual_seed(0)
    native = torch.nn.ModuleDict(dict(
        conv1=torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), conv2=torch.nn.Conv2d(8, 8, 3),
        fc1=torch.nn.Linear(8 * 2 * 2, 16), fc2=torch.nn.Linear(16, 1))).to(DEVICE)
    ours = torch.nn.ModuleDict(dict(
        conv1=tilesmith.nn.Conv2d(3, 8, 3, stride=2, padding=1, activation="silu",
                                  backend=KERNELS),
        conv2=tilesmith.nn.Conv2d(8, 8, 3, backend=KERNELS),
        fc1=tilesmith.nn.Linear(8 * 2 * 2, 16, activation="gelu", backend=KERNELS),
        fc2=tilesmith.nn.Linear(16, 1, backend=KERNELS))).to(DEVICE)
    ours.load_state_dict(native.state_dict())

    def native_critic(x):
        h = F.relu(native.conv2(F.silu(native.conv1(x))))
        return native.fc2(F.gelu(native.fc1(h.flatten(1))))

    def our_critic(x):
        h = F.relu(ours.conv2(ours.conv1(x)))
        return ours.fc2(ours.fc1(h.flatten(1)))

    x = torch.randn(4, 3, 8, 8, device=DEVICE)
    grads = []
    for critic, model in ((our_critic, ours), (native_critic, native)):
        x = x.detach().requires_grad_()
        grad_x, = torch.autograd.grad(critic(x).sum(), x, create_graph=True)
        penalty = (grad_x.flatten(1).norm(dim=1) - 1).square().mean()
        # (the last bias does not reach grad_x: its gradient is 0)
        grads.append(torch.autograd.grad(penalty, list(model.parameters()), allow_unused=True,
                                         materialize_grads=True))
    for (name, _), got, want in zip(ours.named_parameters(), *grads):
        _close(got, want, rtol=1e-4, name=f"penalty grad {name}")


@pytest.mark.parametrize("need_weights", [False, True], ids=["no_weights", "weights"])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("masks", ["none", "bool_attn", "float_attn", "key_padding", "both",
                                   "causal"])
def test_multihead_attention_matches_torch(batch_first, masks, need_weights):
    """Outputs, the attention weights (need_weights=True: per head with batch_first, else
    averaged over the heads) and every gradient, through both, as torch's module."""
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(32, 4, batch_first=batch_first, device=DEVICE)
    ours = copy.deepcopy(ref)
    tilesmith.nn.convert(ours, backend=KERNELS)
    assert type(ours) is tilesmith.nn.MultiheadAttention
    L, S, B = 7, 9, 2
    shape = (B, L, 32) if batch_first else (L, B, 32)
    kv_shape = (B, S, 32) if batch_first else (S, B, 32)
    q = torch.randn(shape, device=DEVICE, requires_grad=True)
    kv = torch.randn(kv_shape, device=DEVICE, requires_grad=True)
    kwargs = {}
    if masks in ("bool_attn", "both"):
        kwargs["attn_mask"] = torch.rand(L, S, device=DEVICE) > 0.7
    if masks == "float_attn":
        kwargs["attn_mask"] = torch.randn(B * 4, L, S, device=DEVICE)
    if masks in ("key_padding", "both"):
        kwargs["key_padding_mask"] = torch.rand(B, S, device=DEVICE) > 0.7
    if masks == "causal":
        kv = q
        kwargs["attn_mask"] = torch.nn.Transformer.generate_square_subsequent_mask(
            L, device=DEVICE)
        kwargs["is_causal"] = True
    kwargs.update(need_weights=need_weights, average_attn_weights=not batch_first)
    out, weights = ours(q, kv, kv, **kwargs)
    want, want_weights = ref(q, kv, kv, **kwargs)
    _close(out, want, rtol=1e-5)
    loss, want_loss = out.square().sum(), want.square().sum()
    if need_weights:
        assert weights.shape == want_weights.shape
        _close(weights, want_weights, rtol=1e-5, name="weights")
        probe = torch.randn(weights.shape, device=DEVICE)
        loss, want_loss = loss + (weights * probe).sum(), want_loss + (want_weights * probe).sum()
    else:
        assert weights is None
    leaves = list({id(t): t for t in (q, kv)}.values())
    grads = torch.autograd.grad(loss, (*leaves, *ours.parameters()))
    want_grads = torch.autograd.grad(want_loss, (*leaves, *ref.parameters()))
    for g, w in zip(grads, want_grads):
        _close(g, w, rtol=1e-5, name="grad")


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")  # torch's
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_multihead_attention_float32_mask_with_key_padding(dtype):
    """torch adds a float32 attn_mask and a key_padding_mask in float32 beside fp16/bf16
    queries; so does ours (it cast the sum to the queries' dtype: its relative error against
    float64 was 42x torch's in fp16, 28x in bf16, with this mask near -300)."""
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(32, 2, batch_first=True, device=DEVICE, dtype=dtype)
    ours = tilesmith.nn.convert(copy.deepcopy(ref), backend=KERNELS)
    q = torch.randn(3, 5, 32, device=DEVICE, dtype=dtype)
    kv = torch.randn(3, 7, 32, device=DEVICE, dtype=dtype)
    attn_mask = torch.randn(5, 7, device=DEVICE) * 3 - 300
    padding = torch.zeros(3, 7, dtype=torch.bool, device=DEVICE)
    padding[0, -2:] = True
    kwargs = dict(attn_mask=attn_mask, key_padding_mask=padding, need_weights=False)
    want = ref(q, kv, kv, **kwargs)[0]
    exact = copy.deepcopy(ref).double()(q.double(), kv.double(), kv.double(),
                                        **{**kwargs, "attn_mask": attn_mask.double()})[0]
    testing.assert_close_to_reference(ours(q, kv, kv, **kwargs)[0], exact, want)


def test_multihead_attention_is_causal_hint_as_torch_reads_it():
    """is_causal=True stands for the attn_mask given with it (torch computes causal attention
    whatever that mask holds, unless a key_padding_mask is merged in), and needs one."""
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(16, 2, batch_first=True, device=DEVICE)
    ours = tilesmith.nn.convert(copy.deepcopy(ref), backend=KERNELS)
    x = torch.randn(2, 6, 16, device=DEVICE)
    not_causal = torch.zeros(6, 6, dtype=torch.bool, device=DEVICE)  # True: masked out
    padding = torch.tensor([[False] * 5 + [True]] * 2, device=DEVICE)
    for kwargs in ({}, {"key_padding_mask": padding}):
        want = ref(x, x, x, need_weights=False, attn_mask=not_causal, is_causal=True, **kwargs)
        got = ours(x, x, x, need_weights=False, attn_mask=not_causal, is_causal=True, **kwargs)
        _close(got[0], want[0])
    for module in (ref, ours):
        with pytest.raises(RuntimeError, match="is_causal"):
            module(x, x, x, need_weights=False, is_causal=True)


def _count_op_calls(monkeypatch, *names):
    """A list that records the name of each tilesmith.ops function in ``names`` called."""
    calls = []
    for name in names:
        monkeypatch.setattr(tilesmith.ops, name,
                            lambda *a, _f=getattr(tilesmith.ops, name), _n=name, **k:
                            calls.append(_n) or _f(*a, **k))
    return calls


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_multihead_attention_packs_its_input_projections(batch_first, monkeypatch):
    """Self-attention (query, key and value one tensor) projects in one GEMM against the
    whole in_proj_weight, key-is-value attention (a decoder reading the encoder's memory)
    k and v in one; outputs and every gradient as torch's module, in both layouts."""
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(16, 2, batch_first=batch_first, device=DEVICE)
    ours = tilesmith.nn.convert(copy.deepcopy(ref), backend=KERNELS)
    calls = _count_op_calls(monkeypatch, "gemm")
    shape = (2, 5, 16) if batch_first else (5, 2, 16)
    x, memory, other = (torch.randn(shape, device=DEVICE, requires_grad=True)
                        for _ in range(3))
    for inputs, gemms in (((x, x, x), 2), ((x, memory, memory), 3), ((x, memory, other), 4)):
        leaves = list({id(t): t for t in inputs}.values())
        calls.clear()
        got = ours(*inputs, need_weights=False)[0]
        assert calls.count("gemm") == gemms
        want = ref(*inputs, need_weights=False)[0]
        _close(got, want)
        probe = torch.randn(got.shape, device=DEVICE)
        grads = torch.autograd.grad((got * probe).sum(), (*leaves, *ours.parameters()))
        want_grads = torch.autograd.grad((want * probe).sum(), (*leaves, *ref.parameters()))
        for g, w in zip(grads, want_grads):
            _close(g, w, name="grad")


def test_multihead_attention_built_directly_takes_a_backend():
    """Built by its constructor, as tilesmith.nn.Linear and Conv2d are (convert is the
    other way in): torch's arguments, plus backend."""
    torch.manual_seed(0)
    ours = tilesmith.nn.MultiheadAttention(16, 2, batch_first=True, device=DEVICE,
                                           backend=KERNELS)
    assert ours.backend == KERNELS and f"backend='{KERNELS}'" in repr(ours)
    ref = torch.nn.MultiheadAttention(16, 2, batch_first=True, device=DEVICE)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 5, 16, device=DEVICE)
    _close(ours(x, x, x, need_weights=False)[0], ref(x, x, x, need_weights=False)[0])


@pytest.mark.parametrize("add_bias_kv,add_zero_attn", [(True, False), (False, True),
                                                        (True, True)],
                         ids=["bias_kv", "zero_attn", "both"])
@pytest.mark.parametrize("need_weights", [False, True], ids=["no_weights", "weights"])
def test_multihead_attention_extra_keys(add_bias_kv, add_zero_attn, need_weights):
    """add_bias_kv (a learned key and value) and add_zero_attn (zeros) appended to every
    sequence's keys, past its masks, as torch's module does: outputs, weights and every
    gradient (bias_k and bias_v's too), with masks, and with the is_causal hint."""
    torch.manual_seed(0)
    kw = dict(add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn, device=DEVICE)
    ref = torch.nn.MultiheadAttention(16, 2, **kw)
    ours = tilesmith.nn.convert(copy.deepcopy(ref), backend=KERNELS)
    assert type(ours) is tilesmith.nn.MultiheadAttention
    L, S, B = 5, 6, 2
    q = torch.randn(L, B, 16, device=DEVICE, requires_grad=True)
    kv = torch.randn(S, B, 16, device=DEVICE, requires_grad=True)
    masks = dict(attn_mask=torch.rand(L, S, device=DEVICE) > 0.7,
                 key_padding_mask=torch.rand(B, S, device=DEVICE) > 0.7)
    causal = dict(attn_mask=torch.nn.Transformer.generate_square_subsequent_mask(
        L, device=DEVICE), is_causal=True)
    for inputs, kwargs in (((q, kv, kv), masks), ((q, q, q), causal)):
        out, weights = ours(*inputs, need_weights=need_weights, **kwargs)
        want, want_weights = ref(*inputs, need_weights=need_weights, **kwargs)
        _close(out, want)
        loss, want_loss = out.square().sum(), want.square().sum()
        if need_weights:
            assert weights.shape == want_weights.shape
            _close(weights, want_weights, name="weights")
            loss, want_loss = loss + weights.square().sum(), want_loss + want_weights.square().sum()
        leaves = list({id(t): t for t in inputs}.values())
        grads = torch.autograd.grad(loss, (*leaves, *ours.parameters()))
        want_grads = torch.autograd.grad(want_loss, (*leaves, *ref.parameters()))
        for g, w in zip(grads, want_grads):
            _close(g, w, name="grad")


_Q, _KV = (2, 5, 16), (2, 6, 16)  # batch_first: (batch, seq, embed)


@pytest.mark.parametrize("shapes,kwargs,error,match", [
    ((_Q, _KV, _KV), {"key_padding_mask": torch.zeros(2, 5, dtype=torch.bool)}, ValueError,
     r"key_padding_mask must have shape \(2, 6\), got \(2, 5\) \(query \(2, 5, 16\)"),
    ((_Q, _KV, _KV), {"attn_mask": torch.zeros(5, 5, dtype=torch.bool)}, ValueError,
     r"attn_mask must have shape \(5, 6\) or \(4, 5, 6\), got \(5, 5\)"),
    ((_Q, _KV, _KV), {"attn_mask": torch.zeros(3, 5, 6)}, ValueError,
     r"attn_mask must have shape \(5, 6\) or \(4, 5, 6\), got \(3, 5, 6\)"),
    ((_Q, _KV, _KV), {"attn_mask": torch.zeros(5, 6, dtype=torch.int32)}, TypeError,
     "attn_mask must be bool or floating point, got torch.int32"),
    (((2, 5, 12), _KV, _KV), {}, ValueError,
     r"query must have 16 features in its last dimension, got query \(2, 5, 12\)"),
    ((_Q, _KV, (2, 7, 16)), {}, ValueError, "key and value must have one sequence length"),
    ((_Q, (3, 6, 16), (3, 6, 16)), {}, ValueError,
     r"query, key and value must have one batch size \(batch_first=True\)"),
    (((1, 2, 5, 16), _KV, _KV), {}, ValueError, "must all be 3-D .* or all 2-D"),
    ((_Q, (6, 16), (6, 16)), {}, ValueError, "must all be 3-D .* or all 2-D"),
], ids=["key_padding_mask", "attn_mask_2d", "attn_mask_3d", "int_mask", "embed_dim",
        "key_value_lengths", "batch", "query_rank", "key_rank"])
@pytest.mark.parametrize("need_weights", [False, True], ids=["no_weights", "weights"])
def test_multihead_attention_bad_input(shapes, kwargs, error, match, need_weights):
    """Arguments torch's module refuses: an error that names the argument and the shapes."""
    attention = tilesmith.nn.MultiheadAttention(16, 2, batch_first=True, backend=KERNELS)
    query, key, value = (torch.randn(shape) for shape in shapes)
    with pytest.raises(error, match=match):
        attention(query, key, value, need_weights=need_weights, **kwargs)


def test_multihead_attention_need_weights_and_kdim_paths(monkeypatch):
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(16, 2, kdim=12, vdim=10, dropout=0.5, batch_first=True,
                                      device=DEVICE).eval()
    ours = tilesmith.nn.convert(copy.deepcopy(ref), backend=KERNELS)
    calls = _count_op_calls(monkeypatch, "attention", "scaled_dot_product_attention", "matmul")
    q = torch.randn(2, 5, 16, device=DEVICE)
    k = torch.randn(2, 6, 12, device=DEVICE)
    v = torch.randn(2, 6, 10, device=DEVICE)
    _close(ours(q, k, v, need_weights=False)[0], ref(q, k, v, need_weights=False)[0])
    assert calls == ["scaled_dot_product_attention"]
    for inputs in ((q, k, v), (q[0], k[0], v[0])):  # batched and unbatched
        calls.clear()
        (out, weights), (want, want_weights) = ours(*inputs), ref(*inputs)  # need_weights=True
        assert calls == ["attention", "matmul"]
        _close(out, want)
        _close(weights, want_weights, name="weights")
    # Training with dropout: the weights returned are those after dropout, so the output
    # is their product with v (two matmuls); without need_weights the kernels draw it.
    ours.train()
    calls.clear()
    out, weights = ours(q, k, v)
    assert calls == ["matmul", "matmul"] and weights.shape == (2, 5, 6)
    assert ours(q, k, v, need_weights=False)[1] is None
    assert calls[2:] == ["scaled_dot_product_attention"]


def test_multihead_attention_weights_with_dropout():
    """need_weights=True in training with dropout: the weights are the probabilities with
    dropout applied (each 0, or kept and scaled by 1/(1-p)), the output is their product
    with v as torch's module computes it, and the gradients are those of that expression
    (gradcheck in float64, fast mode, the dropout mask held by reseeding)."""
    torch.manual_seed(0)
    p = 0.5
    ref = torch.nn.MultiheadAttention(16, 2, dropout=p, batch_first=True, device=DEVICE)
    ours = tilesmith.nn.convert(copy.deepcopy(ref), backend=KERNELS)
    x = torch.randn(2, 6, 16, device=DEVICE)
    padding = torch.tensor([[False] * 5 + [True], [False] * 6], device=DEVICE)
    out, weights = ours(x, x, x, key_padding_mask=padding, average_attn_weights=False)
    probabilities = ref.eval()(x, x, x, key_padding_mask=padding,
                               average_attn_weights=False)[1]
    kept = weights != 0
    assert 0.3 < kept[probabilities != 0].float().mean() < 0.7
    _close(weights[kept] * (1 - p), probabilities[kept], name="kept weights")
    values = F.linear(x, *(t.chunk(3)[2] for t in (ref.in_proj_weight, ref.in_proj_bias)))
    heads = weights @ values.view(2, 6, 2, 8).transpose(1, 2)  # (batch, heads, seq, dim)
    _close(out, ref.out_proj(heads.transpose(1, 2).reshape(2, 6, 16)))

    double = copy.deepcopy(ours).double()
    x64 = x.double().requires_grad_()

    def attention(x):
        torch.manual_seed(1)  # the same dropout mask at every call
        return double(x, x, x, key_padding_mask=padding, average_attn_weights=False)

    assert torch.autograd.gradcheck(attention, (x64,), fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_multihead_attention_weights_in_low_precision(dtype, backend=KERNELS):
    """need_weights=True in fp16/bf16: the output, the weights (the log-sum-exp of the
    attention kernel, which computes the scores in fp32, against the scores of a separate
    matmul, rounded to the dtype) and the gradients through both, against float64 (the 2x
    rule against torch's module in the same dtype)."""
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(32, 4, batch_first=True, device=DEVICE, dtype=dtype)
    ours = tilesmith.nn.convert(copy.deepcopy(ref), backend=backend)
    exact = copy.deepcopy(ref).double()
    x = torch.randn(2, 7, 32, device=DEVICE, dtype=dtype, requires_grad=True)
    # A float key padding mask, added (in the queries' dtype: torch's module refuses
    # another with need_weights=True).
    padding = torch.randn(2, 7, device=DEVICE).to(dtype)
    probe = torch.randn(2, 4, 7, 7, device=DEVICE)
    results = []
    for module, inputs, mask in ((ours, x, padding), (ref, x, padding),
                                 (exact, x.double(), padding.double())):
        out, weights = module(inputs, inputs, inputs, key_padding_mask=mask,
                              average_attn_weights=False)
        loss = out.double().square().sum() + (weights.double() * probe).sum()
        results.append((out, weights, *torch.autograd.grad(loss, (x, module.in_proj_weight))))
    for name, got, want, exact in zip(("output", "weights", "grad x", "grad in_proj_weight"),
                                      *results):
        testing.assert_close_to_reference(got, exact, want, name=name)


def test_multihead_attention_weights_of_a_row_with_no_key():
    """A query row whose keys are all masked: zero output and zero weights, and no NaN in
    any gradient (torch's module gives NaN for the row's output, weights and gradients)."""
    torch.manual_seed(0)
    ours = tilesmith.nn.MultiheadAttention(8, 2, batch_first=True, device=DEVICE,
                                           backend=KERNELS)
    x = torch.randn(2, 5, 8, device=DEVICE, requires_grad=True)
    no_key = torch.zeros(5, 5, dtype=torch.bool, device=DEVICE)  # True: masked out
    no_key[1] = True
    out, weights = ours(x, x, x, attn_mask=no_key, average_attn_weights=False)
    assert not out[:, 1].any() and not weights[:, :, 1].any()
    assert torch.allclose(weights[:, :, [0, 2, 3, 4]].sum(-1), torch.ones((), device=DEVICE),
                          atol=1e-6)
    grads = torch.autograd.grad(out.sum() + weights.square().sum(), (x, *ours.parameters()))
    assert all(torch.isfinite(g).all() for g in grads)


def _transformer():
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0,
                                             batch_first=True, device=DEVICE)
    return torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


def test_convert_transformer_encoder_outputs_and_grads():
    native = _transformer()
    ours, report = tilesmith.nn.convert(copy.deepcopy(native), backend=KERNELS,
                                        return_report=True)
    assert sum(n.endswith("self_attn") for n in report.converted) == 2
    assert not report.skipped
    x = torch.randn(2, 11, 32, device=DEVICE, requires_grad=True)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(11, device=DEVICE)
    out, want = ours(x, mask=mask), native(x, mask=mask)
    _close(out, want, rtol=1e-5)
    # A random projection, not out.square().sum(): after the final LayerNorm that sum is
    # constant, and its gradients would be pure rounding noise.
    probe = torch.randn(out.shape, device=DEVICE)
    grads = torch.autograd.grad((out * probe).sum(), (x, *ours.parameters()))
    want_grads = torch.autograd.grad((want * probe).sum(), (x, *native.parameters()))
    for g, w in zip(grads, want_grads):
        _close(g, w, rtol=1e-5, name="grad")


def test_converted_transformer_encoder_runs_tilesmith_at_inference(monkeypatch):
    """In eval mode without gradients PyTorch's TransformerEncoderLayer runs one fused op on
    its submodules' weights, and TransformerEncoder packs a padded batch into nested
    tensors; convert() turns both off where they would bypass converted modules, so that
    tilesmith's attention and GEMMs run. Outputs as the native model's at the real tokens
    (PyTorch's nested path writes zeros at the padding)."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0,
                                             batch_first=True, device=DEVICE)
    native = torch.nn.TransformerEncoder(layer, 2).eval()  # enable_nested_tensor=True
    ours = tilesmith.nn.convert(copy.deepcopy(native), backend=KERNELS)
    tilesmith.nn.convert(ours, backend=KERNELS)  # again: still one hook per layer
    assert all(len(converted._forward_pre_hooks) == 1 for converted in ours.layers)
    calls = _count_op_calls(monkeypatch, "scaled_dot_product_attention", "gemm")
    x = torch.randn(2, 7, 32, device=DEVICE)
    padding = torch.zeros(2, 7, dtype=torch.bool, device=DEVICE)
    padding[1, 5:] = True
    with torch.no_grad():
        for kwargs, real in (({}, ~torch.zeros_like(padding)),
                             ({"src_key_padding_mask": padding}, ~padding)):
            calls.clear()
            out, want = ours(x, **kwargs), native(x, **kwargs)
            assert calls.count("scaled_dot_product_attention") == 2
            assert calls.count("gemm") == 2 * 4  # in_proj (q, k, v in one), out_proj, linear1, 2
            _close(out[real], want[real], rtol=1e-5)


def test_convert_resnet18_outputs_grads_and_state_dict():
    torchvision = pytest.importorskip("torchvision", reason="torchvision is not installed")
    torch.manual_seed(0)
    native = torchvision.models.resnet18(num_classes=10).to(DEVICE).eval()
    ours, report = tilesmith.nn.convert(copy.deepcopy(native), backend=MODELS,
                                        return_report=True)
    assert len(report.converted) == 21  # 20 convolutions and the classifier
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    out, want = ours(x), native(x)
    _close(out, want, rtol=1e-4)  # 21 layers deep: fp32 rounding accumulates
    grads = torch.autograd.grad(out.square().sum(), list(ours.parameters()))
    want_grads = torch.autograd.grad(want.square().sum(), list(native.parameters()))
    for g, w in zip(grads, want_grads):
        _close(g, w, rtol=1e-4, name="grad")
    # state_dict round trip both ways: same keys, same tensors, same outputs.
    assert ours.state_dict().keys() == native.state_dict().keys()
    fresh = torchvision.models.resnet18(num_classes=10).to(DEVICE).eval()
    fresh.load_state_dict(ours.state_dict())
    torch.testing.assert_close(fresh(x), want)
    fresh_ours = tilesmith.nn.convert(torchvision.models.resnet18(num_classes=10).to(DEVICE)
                                      .eval(), backend=MODELS)
    fresh_ours.load_state_dict(native.state_dict())
    torch.testing.assert_close(fresh_ours(x), out)


def test_convert_vision_transformer_with_fused_mlp(monkeypatch):
    """torchvision's ViT: its MLP blocks (torchvision.ops.MLP, an nn.Sequential) fuse their
    GELU into the first Linear; its attention (nn.MultiheadAttention, need_weights=False)
    runs tilesmith's SDPA; outputs and gradients as the native model's, training and at
    inference (where converted encoder layers skip PyTorch's fused fast path)."""
    pytest.importorskip("torchvision", reason="torchvision is not installed")
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    native = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                               hidden_dim=32, mlp_dim=64, num_classes=10).to(DEVICE)
    ours, report = tilesmith.nn.convert(copy.deepcopy(native), backend=MODELS,
                                        fuse_activations=True, return_report=True)
    assert [activation for _, _, activation in report.fused] == ["gelu", "gelu"]
    assert not report.skipped
    calls = _count_op_calls(monkeypatch, "scaled_dot_product_attention")
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    out, want = ours(x), native(x)
    assert len(calls) == 2
    _close(out, want, rtol=1e-4)
    grads = torch.autograd.grad(out.square().sum(), list(ours.parameters()))
    want_grads = torch.autograd.grad(want.square().sum(), list(native.parameters()))
    for g, w in zip(grads, want_grads):
        _close(g, w, rtol=1e-4, name="grad")
    with torch.no_grad():
        _close(ours.eval()(x), native.eval()(x), rtol=1e-4)
    assert len(calls) == 4


def test_convert_keeps_parameters_and_reports_skips():
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LazyLinear(4),
                              torch.nn.MultiheadAttention(4, 2, add_bias_kv=True))
    params = list(net.parameters())
    with pytest.warns(UserWarning, match="1 \\(a lazy module"):
        net, report = tilesmith.nn.convert(net, return_report=True)
    assert list(net.parameters()) == params  # the very same Parameter objects
    assert report.converted == ["0", "2"] and report.skipped[0][0] == "1"
    assert type(net[0]) is tilesmith.nn.Linear and type(net[1]) is torch.nn.LazyLinear
    assert type(net[2]) is tilesmith.nn.MultiheadAttention
    for fp8, scaling in ((True, "row"), ("tensor", "tensor"), ("block", "block")):
        linear = torch.nn.Linear(16, 8)
        want = linear(torch.ones(3, 16))
        converted = tilesmith.nn.convert(torch.nn.Sequential(linear), fp8=fp8)
        assert type(converted[0]) is tilesmith.nn.Float8Linear
        assert converted[0].scaling == scaling
        # Runs (a switched class must carry every attribute its forward reads).
        assert testing.sqnr_db(converted(torch.ones(3, 16)), want) > 20
    # Converted before: a Linear becomes a Float8Linear with its activation, a Float8Linear
    # takes the new scaling; fp8=False leaves it.
    model = tilesmith.nn.convert(torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU()),
                                 fuse_activations=True)
    assert type(model[0]) is tilesmith.nn.Linear and model[0].activation == "relu"
    want = model(torch.ones(3, 16))
    for fp8, scaling in ((True, "row"), ("block", "block"), (False, "block")):
        tilesmith.nn.convert(model, fp8=fp8, backend="torch")
        assert type(model[0]) is tilesmith.nn.Float8Linear and model[0].scaling == scaling
        assert model[0].activation == "relu" and model[0].backend == "torch"
        assert testing.sqnr_db(model(torch.ones(3, 16)), want) > 20
    with pytest.raises(ValueError, match="fp8 must be"):
        tilesmith.nn.convert(torch.nn.Sequential(torch.nn.Linear(4, 4)), fp8="column")
    with pytest.raises(ValueError, match="include may name"):
        tilesmith.nn.convert(net, include=("lstm",))
    only_linear = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Conv2d(1, 1, 1))
    tilesmith.nn.convert(only_linear, include="linear")  # one name: not its letters
    assert type(only_linear[0]) is tilesmith.nn.Linear
    assert type(only_linear[1]) is torch.nn.Conv2d
    with pytest.raises(TypeError, match="convert: model must be a torch.nn.Module, got str"):
        tilesmith.nn.convert("net")


@pytest.mark.parametrize("make,match", [
    (lambda: tilesmith.nn.Linear(4, 4, activation="tanh"),
     "Linear: activation must be one of .*'gelu_tanh'.*, got 'tanh'"),
    (lambda: tilesmith.nn.Conv2d(3, 4, 3, activation="gelu_tanh"),
     "Conv2d: activation must be one of .*'hardsigmoid'\\), got 'gelu_tanh'"),
    (lambda: tilesmith.nn.Linear(4, 4, backend="gpu"), "Linear: backend must be one of"),
    (lambda: tilesmith.nn.Conv2d(3, 4, 3, backend="cudnn"), "Conv2d: backend must be one of"),
    (lambda: tilesmith.nn.Float8Linear(32, 32, backend="x"), "Float8Linear: backend must be"),
    (lambda: tilesmith.nn.MultiheadAttention(8, 2, backend="x"),
     "MultiheadAttention: backend must be one of"),
    (lambda: tilesmith.nn.convert(torch.nn.Linear(4, 4), backend="x"), "convert: backend must"),
    (lambda: tilesmith.nn.patch_sdpa(backend="x"), "patch_sdpa: backend must be one of"),
], ids=["linear_activation", "conv2d_activation", "linear_backend", "conv2d_backend",
        "float8_backend", "mha_backend", "convert_backend", "patch_sdpa_backend"])
def test_module_options_are_checked_when_given(make, match):
    """A misspelt option fails where it is written, not at the first forward."""
    original_sdpa = torch.nn.functional.scaled_dot_product_attention
    with pytest.raises(ValueError, match=match):
        make()
    assert torch.nn.functional.scaled_dot_product_attention is original_sdpa


def test_convert_parametrized_lazy_subclassed_and_converted_modules():
    from torch.nn.utils import parametrizations, parametrize

    class DoubledLinear(torch.nn.Linear):  # a user's subclass: its own forward
        def forward(self, x):
            return 2 * super().forward(x)

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        parametrizations.weight_norm(torch.nn.Linear(8, 18)), torch.nn.Unflatten(1, (2, 3, 3)),
        parametrizations.spectral_norm(torch.nn.Conv2d(2, 4, 3, padding=1)),
        torch.nn.Flatten(), DoubledLinear(36, 5), torch.nn.MultiheadAttention(5, 1)).eval()
    x = torch.randn(3, 8, device=DEVICE)
    net.to(DEVICE)

    def run():
        y = net[:5](x)
        return net[5](y, y, y, need_weights=False)[0]

    want, keys, params = run(), list(net.state_dict()), list(net.parameters())
    want_grads = torch.autograd.grad(want.square().sum(), params)
    with pytest.warns(UserWarning, match=r"4 \(a subclass of torch.nn.Linear \(DoubledLinear\)"):
        _, report = tilesmith.nn.convert(net, backend=KERNELS, return_report=True)
    # Parametrized modules keep their parametrizations on tilesmith's class; the attention's
    # out_proj (torch's own subclass of Linear) is passed over without a word.
    assert report.converted == ["0", "2", "5"] and [n for n, _ in report.skipped] == ["4"]
    assert isinstance(net[0], tilesmith.nn.Linear) and parametrize.is_parametrized(net[0])
    assert isinstance(net[2], tilesmith.nn.Conv2d) and parametrize.is_parametrized(net[2])
    assert list(net.state_dict()) == keys and list(net.parameters()) == params
    got = run()
    _close(got, want)
    for got_grad, want_grad in zip(torch.autograd.grad(got.square().sum(), params),
                                   want_grads):
        _close(got_grad, want_grad, rtol=1e-4, name="grad")
    parametrize.remove_parametrizations(net[0], "weight")
    assert type(net[0]) is tilesmith.nn.Linear

    # Converting again: converted modules take the new backend; lazy modules wait for a forward.
    with pytest.warns(UserWarning, match="DoubledLinear"):
        tilesmith.nn.convert(net, backend="torch")
    assert net[0].backend == net[2].backend == net[5].backend == "torch"
    assert all("backend='torch'" in repr(net[i]) for i in (0, 2, 5))
    lazy = torch.nn.Sequential(torch.nn.LazyLinear(3))
    with pytest.warns(UserWarning, match="lazy module"):
        tilesmith.nn.convert(lazy)
    lazy(torch.randn(2, 4))
    assert type(tilesmith.nn.convert(lazy)[0]) is tilesmith.nn.Linear


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_activation_checkpointing(use_reentrant, backend=KERNELS, dtype=torch.float32):
    """torch.utils.checkpoint over a converted encoder layer with attention dropout: the
    recomputed forward draws the same dropout seed (checkpoint restores the RNG state the
    kernels draw it from), so the output and every gradient equal those of the plain
    run, bit for bit."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    layer = tilesmith.nn.convert(
        torch.nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.3,
                                         batch_first=True, device=DEVICE, dtype=dtype),
        backend=backend)
    x = torch.randn(2, 7, 16, device=DEVICE, dtype=dtype, requires_grad=True)
    leaves = (x, *layer.parameters())

    def run(checkpointed):
        torch.manual_seed(5)
        for t in leaves:
            t.grad = None
        y = checkpoint(layer, x, use_reentrant=use_reentrant) if checkpointed else layer(x)
        y.float().square().sum().backward()  # (reentrant checkpoints refuse autograd.grad)
        return [y, *(t.grad for t in leaves)]

    for got, want in zip(run(True), run(False)):
        assert torch.equal(got, want)


def test_convert_module_filter():
    """module_filter(module, name) picks the modules converted: FP8 training with the
    output head kept in full precision, as torchao's module_filter_fn does."""
    net = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(),
                              torch.nn.Sequential(torch.nn.Linear(32, 32)),
                              torch.nn.Linear(32, 4))
    seen = []

    def not_the_head(module, name):
        seen.append(name)
        return name != "3"

    _, report = tilesmith.nn.convert(net, fp8=True, module_filter=not_the_head,
                                     return_report=True)
    assert seen == ["0", "2.0", "3"]  # asked about the candidates only
    assert report.converted == ["0", "2.0"] and not report.skipped
    assert [type(m) for m in (net[0], net[2][0], net[3])] == [
        tilesmith.nn.Float8Linear, tilesmith.nn.Float8Linear, torch.nn.Linear]
    with pytest.raises(TypeError, match="module_filter must be a callable"):
        tilesmith.nn.convert(net, module_filter="head")


def test_convert_fuses_activations_into_the_layers_before_them():
    """fuse_activations=True: an activation module that follows a converted Linear or
    Conv2d in an nn.Sequential becomes the layer's epilogue; what would change another
    use's result (a shared layer, hooks) or that the layer cannot fuse stays as it was.
    Outputs, gradients and state_dict keys as the native model's."""
    torch.manual_seed(0)
    shared = torch.nn.Linear(16, 16)
    hooked = torch.nn.ReLU()
    hooked.register_forward_hook(lambda *args: None)
    native = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(inplace=True),  # fused
        torch.nn.Conv2d(8, 8, 3), torch.nn.GELU(approximate="tanh"),  # conv2d: no gelu_tanh
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 4 * 4, 16), torch.nn.GELU(approximate="tanh"),  # fused
        torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.SiLU()),  # fused (nested)
        shared, torch.nn.GELU(), shared,  # shared: not fused
        torch.nn.Linear(16, 16), hooked,  # a hook on the activation: not fused
        torch.nn.Linear(16, 4), torch.nn.Tanh()).to(DEVICE)  # not an epilogue activation
    ours, report = tilesmith.nn.convert(copy.deepcopy(native), backend=KERNELS,
                                        fuse_activations=True, return_report=True)
    assert report.fused == [("0", "1", "relu"), ("5", "6", "gelu_tanh"),
                            ("7.0", "7.1", "silu")]
    assert [type(m).__name__ for m in ours[:4]] == ["Conv2d", "Identity", "Conv2d", "GELU"]
    assert ours[0].activation == "relu" and ours[2].activation is None
    assert ours[5].activation == "gelu_tanh" and ours[7][0].activation == "silu"
    assert ours[8].activation is None and ours[11].activation is None
    assert list(ours.state_dict()) == list(native.state_dict())
    x = torch.randn(2, 3, 6, 6, device=DEVICE)
    got, want = ours(x), native(x)
    _close(got, want)
    for g, w in zip(torch.autograd.grad(got.square().sum(), list(ours.parameters())),
                    torch.autograd.grad(want.square().sum(), list(native.parameters()))):
        _close(g, w, rtol=1e-4, name="grad")
    # Without the option, or again on a fused model: nothing (more) is fused.
    assert not tilesmith.nn.convert(copy.deepcopy(native), return_report=True)[1].fused
    assert not tilesmith.nn.convert(ours, fuse_activations=True, return_report=True)[1].fused
    fp8 = tilesmith.nn.convert(torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU()),
                               fp8=True, fuse_activations=True)
    assert fp8[0].activation == "relu" and type(fp8[1]) is torch.nn.Identity


@torch.no_grad()
def _redraw_constant_parameters(model):
    """``model`` with each parameter whose elements start all equal (zero heads and biases,
    LayerNorm's ones, layer scales) drawn uniformly around its value's scale instead."""
    generator = torch.Generator().manual_seed(2)
    for parameter in model.parameters():
        first = parameter.flatten()[0]
        if parameter.numel() > 1 and bool((parameter == first).all()):
            low, high = (-0.5, 0.5) if first == 0 else (0.5, 1.5)
            parameter.copy_(torch.empty(parameter.shape).uniform_(low, high,
                                                                  generator=generator))
    return model


def _with_running_statistics(model):
    """``model`` with each BatchNorm's statistics and affine parameters away from their
    initial 0/1, as a trained model's are (a fold of the initial ones barely changes the
    weights), in eval mode."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            for tensor, low, high in ((module.running_mean, -0.5, 0.5),
                                      (module.running_var, 0.5, 2.0),
                                      (module.weight, 0.5, 1.5), (module.bias, -0.5, 0.5)):
                if tensor is not None:
                    with torch.no_grad():
                        tensor.copy_(torch.empty(tensor.shape).uniform_(low, high,
                                                                        generator=generator))
    return model.eval()


class _ConvBatchNormNet(torch.nn.Module):
    """Each way a forward applies BatchNorm and activations, with the cases that must be
    left alone beside them."""

    def __init__(self):
        super().__init__()
        conv = torch.nn.Conv2d
        self.stem = conv(3, 8, 3, padding=1, bias=False)
        self.stem_bn = torch.nn.BatchNorm2d(8)
        self.act = torch.nn.ReLU(inplace=True)  # one module, called after three layers
        self.conv = conv(8, 8, 3, padding=1)
        self.bn = torch.nn.SyncBatchNorm(8, affine=False)  # in eval mode as BatchNorm2d
        self.twice = conv(8, 8, 1)  # called twice: neither folded nor fused
        self.twice_bn = torch.nn.BatchNorm2d(8)
        self.branch = conv(8, 8, 1)  # its output also feeds the sum: not folded
        self.branch_bn = torch.nn.BatchNorm2d(8)
        self.batch_stats = conv(8, 8, 1)  # BatchNorm without running statistics: not folded
        self.batch_stats_bn = torch.nn.BatchNorm2d(8, track_running_stats=False)
        self.tanh_conv = conv(8, 8, 1)  # conv2d's epilogue has no gelu_tanh: not fused
        self.fc1 = torch.nn.Linear(8, 16)
        self.fc2 = torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x):
        x = self.act(self.stem_bn(self.stem(x)))
        x = F.silu(self.bn(self.conv(x)))
        x = self.twice_bn(self.twice(x)) + self.twice(x)
        branch = self.branch(x)
        x = self.branch_bn(branch) + branch
        x = torch.relu(self.batch_stats_bn(self.batch_stats(x)))
        x = F.gelu(self.tanh_conv(x), approximate="tanh").mean((2, 3))
        x = F.gelu(self.fc1(x), approximate="tanh")
        x = self.fc2(x).relu()
        return self.act(self.head(x))


def test_optimize_for_inference_folds_batchnorm_and_fuses_activations():
    """optimize_for_inference on a traced forward: BatchNorms after convolutions folded
    into them, activations called as modules, functions and methods fused into the layers
    before them; what would change another use's result left alone. Outputs as the
    model's in eval mode, which stays as it was."""
    torch.manual_seed(0)
    native = _with_running_statistics(_ConvBatchNormNet().to(DEVICE))
    before = copy.deepcopy(native.state_dict())
    ours, report = tilesmith.nn.optimize_for_inference(native, backend=KERNELS,
                                                       return_report=True)
    assert isinstance(ours, torch.fx.GraphModule) and not ours.training
    assert report.folded == [("stem", "stem_bn"), ("conv", "bn")]
    assert report.fused == [("stem", "act", "relu"), ("conv", "silu", "silu"),
                            ("fc1", "gelu_1", "gelu_tanh"), ("fc2", "relu_1", "relu"),
                            ("head", "act", "relu")]
    assert len(report.converted) == 9 and not report.skipped
    assert ours.stem.activation == "relu" and ours.stem.bias is not None
    assert ours.tanh_conv.activation is None and ours.twice.activation is None
    kept = {name for name, module in ours.named_modules()
            if isinstance(module, torch.nn.BatchNorm2d)}
    assert kept == {"twice_bn", "branch_bn", "batch_stats_bn"}
    x = torch.randn(2, 3, 7, 7, device=DEVICE)
    with torch.no_grad():
        _close(ours(x), native(x))
    for name, tensor in native.state_dict().items():  # the model itself is untouched
        assert torch.equal(tensor, before[name]), name
    assert not any(isinstance(m, tilesmith.nn.Conv2d) for m in native.modules())
    # Again on the result (tilesmith's modules, traced whole): nothing more to do.
    again = tilesmith.nn.optimize_for_inference(ours, return_report=True)[1]
    assert not again.folded and not again.fused


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_optimize_for_inference_resnet18(dtype):
    """torchvision's ResNet-18 at inference: its 20 BatchNorms folded, each block's
    residual sum taken into its second convolution (whose call moves after the
    downsampling shortcut's, where a block has one) and all 17 ReLUs fused, 8 of them after
    those sums; output within the GUIDE §3 rule against the float64 model (the folded
    weights are rounded to the dtype once more than the model's); torch.export takes the
    result."""
    torchvision = pytest.importorskip("torchvision", reason="torchvision is not installed")
    torch.manual_seed(0)
    native = _with_running_statistics(torchvision.models.resnet18(num_classes=10).to(DEVICE))
    ours, report = tilesmith.nn.optimize_for_inference(native.to(dtype), backend=MODELS,
                                                       return_report=True)
    assert len(report.folded) == 20 and len(report.fused) == 17
    assert [layer for layer, _ in report.residuals] == [
        f"layer{stage}.{block}.conv2" for stage in range(1, 5) for block in range(2)]
    assert not any("bn" in key or "downsample.1" in key for key in ours.state_dict())
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    with torch.no_grad():
        out, base = ours(x.to(dtype)), native(x.to(dtype))
        ref = copy.deepcopy(native).double()(x.double())
    if dtype == torch.float32:
        _close(out, base, rtol=1e-5)
        exported = torch.export.export(ours, (x,))  # a GraphModule exports as it is
        with torch.no_grad():
            torch.testing.assert_close(exported.module()(x), out, rtol=0, atol=0)
    else:
        testing.assert_close_to_reference(out, ref, base)


class _BasicBlock(torch.nn.Module):
    """A ResNet block as torchvision writes it: the shortcut (downsampled after the block's
    last convolution, where it is) added in place, the ReLU applied to the sum."""

    def __init__(self, channels, filters, stride):
        super().__init__()
        conv, batchnorm = torch.nn.Conv2d, torch.nn.BatchNorm2d
        self.conv1 = conv(channels, filters, 3, stride, 1, bias=False)
        self.bn1, self.bn2 = batchnorm(filters), batchnorm(filters)
        self.conv2 = conv(filters, filters, 3, 1, 1, bias=False)
        self.relu = torch.nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or channels != filters:
            self.downsample = torch.nn.Sequential(conv(channels, filters, 1, stride, bias=False),
                                                  batchnorm(filters))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_optimize_for_inference_fuses_resnet_blocks_on_the_kernels(dtype):
    """Each block becomes three kernels: conv1 + ReLU, the shortcut's 1x1 conv (its
    BatchNorm folded), and conv2 with the shortcut added before its ReLU; no add or ReLU
    left in the graph. On the kernels (Triton), in channels-last; the output as the eval
    model's (fp32), within the GUIDE §3 rule in bf16."""
    torch.manual_seed(0)
    native = _with_running_statistics(torch.nn.Sequential(
        _BasicBlock(8, 8, 1), _BasicBlock(8, 16, 2)).to(DEVICE))
    ours, report = tilesmith.nn.optimize_for_inference(native.to(dtype), backend=KERNELS,
                                                       return_report=True)
    assert [layer for layer, _ in report.residuals] == ["0.conv2", "1.conv2"]
    assert sorted(layer for layer, _, _ in report.fused) == ["0.conv1", "0.conv2", "1.conv1",
                                                             "1.conv2"]
    assert len(report.folded) == 5
    kinds = [(node.op, node.target) for node in ours.graph.nodes]
    assert not any(target in (operator.add, operator.iadd) or "relu" in str(target)
                   for _, target in kinds)
    x = torch.randn(2, 8, 9, 9, device=DEVICE).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out, base = ours(x.to(dtype)), native(x.to(dtype))
        ref = copy.deepcopy(native).double()(x.double())
    if dtype == torch.float32:
        _close(out, base)
    else:
        testing.assert_close_to_reference(out, ref, base)


class _InvertedResidual(torch.nn.Module):
    """A MobileNet block: ReLU6 as a module, Hardswish and ReLU6 as functions, a residual
    sum without an activation after it."""

    def __init__(self, channels=8, expanded=16):
        super().__init__()
        conv, batchnorm = torch.nn.Conv2d, torch.nn.BatchNorm2d
        self.expand, self.bn1 = conv(channels, expanded, 1, bias=False), batchnorm(expanded)
        self.act = torch.nn.ReLU6(inplace=True)
        self.depthwise = conv(expanded, expanded, 3, padding=1, groups=expanded, bias=False)
        self.bn2 = batchnorm(expanded)
        self.project, self.bn3 = conv(expanded, channels, 1, bias=False), batchnorm(channels)
        self.head = torch.nn.Linear(channels, 4)

    def forward(self, x):
        y = self.act(self.bn1(self.expand(x)))
        y = F.hardswish(self.bn2(self.depthwise(y)))
        y = self.bn3(self.project(y)) + x
        return F.relu6(self.head(y.mean((2, 3))))


def test_mobilenet_activations_fuse():
    """ReLU6 and Hardswish, modules and functions, move into the epilogues (on the
    kernels: Triton here) by optimize_for_inference and by convert's nn.Sequential rule;
    outputs as the model's."""
    torch.manual_seed(0)
    native = _with_running_statistics(_InvertedResidual().to(DEVICE))
    ours, report = tilesmith.nn.optimize_for_inference(native, backend=KERNELS,
                                                       return_report=True)
    assert sorted((layer, name) for layer, _, name in report.fused) == [
        ("depthwise", "hardswish"), ("expand", "relu6"), ("head", "relu6")]
    assert [layer for layer, _ in report.residuals] == ["project"]
    x = torch.randn(2, 8, 7, 9, device=DEVICE) * 3  # past relu6's 6 and hardswish's +-3
    with torch.no_grad():
        _close(ours(x), native(x))
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Hardswish(),
                              torch.nn.Linear(16, 8), torch.nn.ReLU6()).to(DEVICE)
    want = mlp(x[:, :, 0, 0])
    converted, report = tilesmith.nn.convert(mlp, backend=KERNELS, fuse_activations=True,
                                             return_report=True)
    assert [name for _, _, name in report.fused] == ["hardswish", "relu6"]
    _close(converted(x[:, :, 0, 0]), want)


class _SqueezeExcitation(torch.nn.Module):
    """Squeeze-and-excitation gates as MobileNetV3 (Hardsigmoid) and EfficientNet (Sigmoid)
    write them, as a module, a function and a tensor method."""

    def __init__(self, channels=16, squeezed=8):
        super().__init__()
        self.fc1, self.fc2 = (torch.nn.Conv2d(channels, squeezed, 1),
                              torch.nn.Conv2d(squeezed, channels, 1))
        self.fc3, self.fc4 = (torch.nn.Conv2d(channels, squeezed, 1),
                              torch.nn.Conv2d(squeezed, channels, 1))
        self.gate = torch.nn.Sigmoid()
        self.head = torch.nn.Linear(channels, 4)

    def forward(self, x):
        x = x * F.hardsigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
        x = x * self.gate(self.fc4(F.silu(self.fc3(x.mean((2, 3), keepdim=True)))))
        return self.head(x.mean((2, 3))).sigmoid()


def test_squeeze_excitation_gates_fuse():
    """Sigmoid and Hardsigmoid, module, function and method, move into the epilogues by
    optimize_for_inference and by convert's nn.Sequential rule; outputs as the model's."""
    torch.manual_seed(0)
    native = _SqueezeExcitation().to(DEVICE).eval()
    with torch.no_grad():  # gates past hardsigmoid's +-3 and into sigmoid's tails
        native.fc2.weight.mul_(40)
        native.fc4.weight.mul_(40)
    ours, report = tilesmith.nn.optimize_for_inference(native, backend=KERNELS,
                                                       return_report=True)
    assert sorted((layer, name) for layer, _, name in report.fused) == [
        ("fc1", "relu"), ("fc2", "hardsigmoid"), ("fc3", "silu"), ("fc4", "sigmoid"),
        ("head", "sigmoid")]
    x = torch.randn(2, 16, 5, 7, device=DEVICE) * 4
    with torch.no_grad():
        _close(ours(x), native(x))
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Hardsigmoid(),
                              torch.nn.Linear(16, 8), torch.nn.Sigmoid()).to(DEVICE)
    want = mlp(x[:, :8, 0, 0])
    converted, report = tilesmith.nn.convert(mlp, backend=KERNELS, fuse_activations=True,
                                             return_report=True)
    assert [name for _, _, name in report.fused] == ["hardsigmoid", "sigmoid"]
    _close(converted(x[:, :8, 0, 0]), want)


def test_conv2d_module_adds_a_residual():
    """Conv2d.forward(x, residual) is activation(conv(x) + residual): in the kernel's epilogue
    where the residual has the output's shape and dtype (outputs and all four gradients as
    torch's), else added apart with torch's broadcasting and type promotion, the activation
    after the sum."""
    torch.manual_seed(0)
    ref = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1, device=DEVICE)
    ours = tilesmith.nn.Conv2d(4, 6, 3, stride=2, padding=1, device=DEVICE, activation="relu",
                               backend=KERNELS)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 4, 9, 7, device=DEVICE, requires_grad=True)
    residual = torch.randn(2, 6, 5, 4, device=DEVICE, requires_grad=True)
    got, want = ours(x, residual), F.relu(ref(x) + residual)
    _close(got, want)
    grads = torch.autograd.grad(got.square().sum(), (x, residual, ours.weight, ours.bias))
    want_grads = torch.autograd.grad(want.square().sum(), (x, residual, ref.weight, ref.bias))
    for g, w in zip(grads, want_grads):
        _close(g, w, name="grad")
    with torch.no_grad():
        broadcast = torch.randn(6, 1, 1, device=DEVICE)
        _close(ours(x, broadcast), F.relu(ref(x) + broadcast))
        _close(ours(x, residual.double()), F.relu(ref(x).double() + residual.double()))
        no_activation = copy.deepcopy(ours)
        no_activation.activation = None
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            got, want = ours(x, residual), F.relu(no_activation(x) + residual)
        assert got.dtype == torch.float32  # the fp32 residual promotes the sum
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        circular = tilesmith.nn.Conv2d(4, 6, 3, padding=1, padding_mode="circular",
                                       device=DEVICE, backend=KERNELS)
        plain = torch.nn.Conv2d(4, 6, 3, padding=1, padding_mode="circular", device=DEVICE)
        plain.load_state_dict(circular.state_dict())
        shortcut = torch.randn(2, 6, 9, 7, device=DEVICE)
        _close(circular(x, shortcut), plain(x) + shortcut)


class _ResidualNet(torch.nn.Module):
    """The ways a forward adds a Linear's output to a residual, with dropout between them
    and attention through F.scaled_dot_product_attention."""

    def __init__(self, width=16):
        super().__init__()
        linear = torch.nn.Linear
        self.qkv, self.proj = linear(width, 3 * width), linear(width, width)
        self.drop = torch.nn.Dropout(0.5)
        self.fc1, self.fc2, self.fc3, self.fc4, self.fc5 = (linear(width, width)
                                                            for _ in range(5))
        self.fc6 = linear(width, 1)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, -1)).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.drop(self.proj(y.transpose(1, 2).flatten(2)))  # fused, dropout gone
        x = F.dropout(F.gelu(self.fc1(x)), 0.5, training=self.training) + x  # fused
        x = torch.add(self.fc2(x), x)  # fused
        y = self.fc3(x)
        y += x  # which the trace records as y + x: fused
        y = self.fc4(y)
        x = x + y + y  # the layer's output used twice: not fused
        z = self.fc5(x) + x.sin()  # the residual comes after the layer, which moves: fused
        return self.fc6(z) + z  # (..., 1) + (..., 16): broadcast, added apart at run time


def test_optimize_for_inference_residuals_dropout_and_sdpa():
    """A transformer-style forward: eval-mode dropouts dropped, the GELU fused, residual
    sums taken into the Linear epilogues where that computes the same, F.sdpa calls routed
    to tilesmith's; outputs as the model's in eval mode."""
    torch.manual_seed(0)
    native = _ResidualNet().to(DEVICE).eval()
    ours, report = tilesmith.nn.optimize_for_inference(native, backend=KERNELS,
                                                       return_report=True)
    assert report.fused == [("fc1", "gelu", "gelu")]
    assert [layer for layer, _ in report.residuals] == ["proj", "fc1", "fc2", "fc3", "fc5",
                                                        "fc6"]
    assert "scaled_dot_product_attention" in report.converted
    targets = [node.target for node in ours.graph.nodes]
    assert F.scaled_dot_product_attention not in targets
    assert tilesmith.ops.scaled_dot_product_attention in targets
    assert F.dropout not in targets and "drop" not in dict(ours.named_modules())
    x = torch.randn(2, 5, 16, device=DEVICE)
    with torch.no_grad():
        _close(ours(x), native(x))


def test_optimize_for_inference_in_fp8():
    """fp8=True: the Linear layers become Float8Linear (row-wise e4m3), which take the
    GELU and the residual sums into their FP8 GEMM's epilogue as Linear does and quantize
    their weights once; the output within fp8's precision of the model's."""
    torch.manual_seed(0)
    native = _ResidualNet(width=32).to(DEVICE).eval()
    ours, report = tilesmith.nn.optimize_for_inference(native, backend=KERNELS, fp8=True,
                                                       return_report=True)
    layers = [m for m in ours.modules() if isinstance(m, torch.nn.Linear)]
    assert layers and all(type(m) is tilesmith.nn.Float8Linear for m in layers)
    assert report.fused == [("fc1", "gelu", "gelu")]
    assert [layer for layer, _ in report.residuals] == ["proj", "fc1", "fc2", "fc3", "fc5",
                                                        "fc6"]
    x = torch.randn(2, 5, 32, device=DEVICE)
    with torch.no_grad():  # seeds 0-3 through the interpreter: 23.0-25.8 dB (7 fp8 layers)
        assert testing.sqnr_db(ours(x), native(x)) >= 20


@pytest.mark.parametrize("backend", compile_backends("attention", torch.bfloat16))
def test_optimize_for_inference_compiles_with_dynamic_shapes(backend):
    """torch.compile(fullgraph=True, dynamic=True) of an optimized model (the residual
    keyword of its Linear calls, the routed SDPA calls, the fused epilogues): one graph
    over batch and sequence sizes that change, outputs as eager."""
    torch.manual_seed(0)
    dtype = torch.float32 if backend == "torch" else torch.bfloat16
    model = _ResidualNet().to(DEVICE, dtype).eval()
    ours = tilesmith.nn.optimize_for_inference(model, backend=backend)
    with torch.no_grad():
        check_compiled_dynamic(ours, [(torch.randn(2, 5, 16, device=DEVICE, dtype=dtype),),
                                      (torch.randn(3, 7, 16, device=DEVICE, dtype=dtype),)])


def test_linear_module_adds_a_residual():
    """Linear.forward(x, residual): in the GEMM's epilogue where the residual has the
    output's shape and dtype (outputs and all four gradients as torch's layer(x) + r; in
    bf16 within the GUIDE §3 rule), else added apart with torch's broadcasting and type
    promotion (under autocast an fp32 residual keeps the sum in fp32)."""
    torch.manual_seed(0)
    ref = torch.nn.Linear(20, 12, device=DEVICE)
    ours = tilesmith.nn.Linear(20, 12, device=DEVICE, activation="gelu", backend=KERNELS)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 4, 20, device=DEVICE, requires_grad=True)
    residual = torch.randn(3, 4, 12, device=DEVICE, requires_grad=True)
    got, want = ours(x, residual), F.gelu(ref(x)) + residual
    _close(got, want)
    grads = torch.autograd.grad(got.square().sum(), (x, residual, ours.weight, ours.bias))
    want_grads = torch.autograd.grad(want.square().sum(), (x, residual, ref.weight, ref.bias))
    for g, w in zip(grads, want_grads):
        _close(g, w, rtol=1e-5, name="grad")
    low = copy.deepcopy(ours).to(torch.bfloat16)
    ref64 = copy.deepcopy(ref).double()
    with torch.no_grad():
        testing.assert_close_to_reference(
            low(x.bfloat16(), residual.bfloat16()),
            F.gelu(ref64(x.double())) + residual.double(),
            F.gelu(copy.deepcopy(ref).to(torch.bfloat16)(x.bfloat16())) + residual.bfloat16())
        broadcast = torch.randn(12, device=DEVICE)
        _close(ours(x, broadcast), F.gelu(ref(x)) + broadcast)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            got, want = ours(x, residual), ours(x) + residual
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_adds_a_residual(batch_first, monkeypatch):
    """MultiheadAttention.forward(..., residual=r): (output + r, weights), r added in the
    output projection's epilogue where it has the output's shape and dtype (values and
    gradients as torch's module followed by +; unbatched too), else added apart with
    torch's broadcasting and promotion."""
    gemm, residuals = tilesmith.ops.gemm, []
    monkeypatch.setattr(tilesmith.ops, "gemm",
                        lambda *a, **k: residuals.append(k.get("residual")) or gemm(*a, **k))
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(16, 2, batch_first=batch_first, device=DEVICE)
    ours = tilesmith.nn.MultiheadAttention(16, 2, batch_first=batch_first, device=DEVICE,
                                           backend=KERNELS)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 5, 16, device=DEVICE, requires_grad=True)
    residual = torch.randn(3, 5, 16, device=DEVICE, requires_grad=True)
    (got, got_weights), (want, want_weights) = (ours(x, x, x, residual=residual),
                                                ref(x, x, x))
    want = want + residual
    assert residuals[-1] is not None  # the output projection's
    _close(got, want)
    _close(got_weights, want_weights)
    leaves = (x, residual, ours.out_proj.weight, ours.in_proj_weight)
    grads = torch.autograd.grad(got.square().sum(), leaves)
    want_grads = torch.autograd.grad(want.square().sum(),
                                     (x, residual, ref.out_proj.weight, ref.in_proj_weight))
    for g, w in zip(grads, want_grads):
        _close(g, w, rtol=1e-5, name="grad")
    with torch.no_grad():
        for r in (torch.randn(16, device=DEVICE),  # broadcast
                  torch.randn(3, 5, 16, device=DEVICE, dtype=torch.float64)):  # promoted
            got = ours(x, x, x, need_weights=False, residual=r)[0]
            want = ref(x, x, x, need_weights=False)[0] + r
            assert got.dtype == want.dtype and residuals[-1] is None
            _close(got, want)
        unbatched = x[0]
        _close(ours(unbatched, unbatched, unbatched, residual=residual[0])[0],
               ref(unbatched, unbatched, unbatched)[0] + residual[0])


class _AttentionBlocks(torch.nn.Module):
    """Transformer blocks around nn.MultiheadAttention: pre-norm (the sum fuses),
    post-norm with the weights used too (fuses), and one whose residual is computed after
    the attention call (left apart: the call does not move)."""

    def __init__(self, width=16):
        super().__init__()
        self.norm1, self.norm2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.attn1, self.attn2, self.attn3 = (
            torch.nn.MultiheadAttention(width, 2, batch_first=True) for _ in range(3))

    def forward(self, x):
        x = x + self.attn1(self.norm1(x), self.norm1(x), self.norm1(x),
                           need_weights=False)[0]
        out, weights = self.attn2(x, x, x)
        x = self.norm2(out + x)
        y = self.attn3(x, x, x, need_weights=False)[0]
        return y + x.sin(), weights


def test_optimize_for_inference_fuses_attention_residuals():
    torch.manual_seed(0)
    native = _AttentionBlocks().to(DEVICE).eval()
    ours, report = tilesmith.nn.optimize_for_inference(native, backend=KERNELS,
                                                       return_report=True)
    assert [layer for layer, _ in report.residuals] == ["attn1", "attn2"]
    x = torch.randn(2, 7, 16, device=DEVICE)
    with torch.no_grad():
        for got, want in zip(ours(x), native(x)):
            _close(got, want)


def test_optimize_for_inference_with_concrete_args():
    """concrete_args fixes an optional argument for the trace, as symbolic_trace's does: a
    forward that branches on ``mask is None`` is traced with no mask (and fuses the ReLU
    behind the branch); the result then refuses a mask, rather than ignoring it."""

    class Masked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)

        def forward(self, x, mask=None):
            y = self.fc(x)
            if mask is not None:
                y = y.masked_fill(mask, 0.0)
            return y.relu()

    torch.manual_seed(0)
    native = Masked().to(DEVICE).eval()
    ours, report = tilesmith.nn.optimize_for_inference(
        native, backend=KERNELS, concrete_args={"mask": None}, return_report=True)
    assert report.fused == [("fc", "relu", "relu")]
    x = torch.randn(3, 8, device=DEVICE)
    with torch.no_grad():
        _close(ours(x), native(x))
        with pytest.raises(AssertionError, match="mask has been specialized to have value None"):
            ours(x, torch.ones(3, 8, dtype=torch.bool, device=DEVICE))


class _LayerScaled(torch.nn.Module):
    """Layer scales after Linear layers: timm's/CaiT's ``x * gamma`` and ConvNeXt's
    ``gamma * permute(linear(x), [0, 3, 1, 2])``; and two that cannot fold."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3, self.fc4 = (torch.nn.Linear(8, 8) for _ in range(4))
        self.gamma = torch.nn.Parameter(torch.rand(8) + 0.5)
        self.register_buffer("beta", torch.rand(8, 1, 1) + 0.5)
        self.one = torch.nn.Parameter(torch.rand(1) + 0.5)

    def forward(self, x):  # (N, H, W, 8)
        y = self.fc1(x) * self.gamma  # folded
        y = torch.mul(self.beta, self.fc2(y).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # folded
        y = self.fc3(y) * self.one  # one value for every feature: a broadcast, left
        return self.fc4(y) * self.gamma + self.fc4(x)  # fc4 runs twice: left


def test_optimize_for_inference_folds_layer_scales():
    """A per-feature scale after a Linear goes into its weight and bias (in float64, stored
    in the weight's dtype), directly or through the permute to channels first; the output
    as the model's."""
    torch.manual_seed(0)
    native = _LayerScaled().to(DEVICE).eval()
    weights = [layer.weight.clone() for layer in (native.fc1, native.fc2)]
    ours, report = tilesmith.nn.optimize_for_inference(native, backend=KERNELS,
                                                       return_report=True)
    assert report.folded == [("fc1", "gamma"), ("fc2", "beta")]
    muls = [n for n in ours.graph.nodes if n.target in (operator.mul, torch.mul)]
    assert len(muls) == 2  # fc3's and fc4's
    x = torch.randn(2, 3, 5, 8, device=DEVICE)
    with torch.no_grad():
        _close(ours(x), native(x))
    assert all(torch.equal(layer.weight, weight)  # the model itself is unchanged
               for layer, weight in zip((native.fc1, native.fc2), weights))


class _ChannelsFirstSum(torch.nn.Module):
    """ConvNeXt's block ending, ``permute(linear(x), [0, 3, 1, 2]) + r``, with an addend
    given as an argument."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 6)

    def forward(self, x, r):  # x (N, H, W, 8)
        return self.fc(x).permute(0, 3, 1, 2) + r


@pytest.mark.parametrize("shape,dtype", [
    ((2, 6, 3, 5), torch.float32),  # the output's shape: the epilogue adds it
    ((2, 6, 3, 5), torch.float64),  # promoted as torch's + promotes it: added apart
    ((6, 1, 1), torch.float32),  # broadcasts along the channels
    ((5,), torch.float32),  # and along the width
    ((), torch.float64),  # a 0-d tensor promotes as a number does
    ((4, 2, 6, 3, 5), torch.float32),  # the sum has more dimensions than the output
])
def test_optimize_for_inference_fuses_a_sum_behind_a_permute(shape, dtype, monkeypatch):
    """The sum moves into the Linear's epilogue as its channels-last view of the addend
    (and the permute after it): outputs as the model's for every addend that broadcasts,
    with its dtype; the GEMM reads an addend of the output's shape and dtype in place
    when it is channels-last in memory."""
    gemm, residuals = tilesmith.ops.gemm, []
    monkeypatch.setattr(tilesmith.ops, "gemm",
                        lambda *a, **k: residuals.append(k["residual"]) or gemm(*a, **k))
    torch.manual_seed(0)
    native = _ChannelsFirstSum().to(DEVICE).eval()
    ours, report = tilesmith.nn.optimize_for_inference(native, backend=KERNELS,
                                                       return_report=True)
    assert [layer for layer, _ in report.residuals] == ["fc"]
    x = torch.randn(2, 3, 5, 8, device=DEVICE)
    r = torch.randn(shape, device=DEVICE, dtype=dtype)
    with torch.no_grad():
        want = native(x, r)
        got = ours(x, r)
        assert got.shape == want.shape and got.dtype == want.dtype
        _close(got, want)
        fused = shape == (2, 6, 3, 5) and dtype == x.dtype  # the output's
        assert (residuals[-1] is not None) == fused
        if fused:
            channels_last = r.to(memory_format=torch.channels_last)
            _close(ours(x, channels_last), want)
            assert residuals[-1].data_ptr() == channels_last.data_ptr()


@pytest.mark.parametrize("name,folded,fused,residuals", [
    # Depthwise convolutions; ReLU, Hardswish and the squeeze-excitations' Hardsigmoid; the
    # inverted residuals' sums.
    ("mobilenet_v3_small", 34, 42, 6),
    ("efficientnet_b0", 49, 65, 9),  # SiLU after the folded BatchNorms, Sigmoid gates; sums
    ("densenet121", 59, 59, 0),  # BatchNorms before convolutions stay
    ("convnext_tiny", 18, 18, 18),  # the layer scales and sums (through a permute); GELU
    ("vit_b_16", 0, 12, 24),  # the MLP's GELU, its residual sum and the attention's
    ("swin_t", 0, 12, 12),  # the same behind torchvision's stochastic depth (removed)
])
def test_optimize_for_inference_on_torchvision_models(name, folded, fused, residuals):
    """Architectures beyond the ResNets trace, fold and fuse, and give the eval model's
    output (random weights, BatchNorm statistics of their own, and the parameters that
    start constant redrawn: ViT's zero head made every output 0, ConvNeXt's 1e-6 layer
    scales its blocks' outputs negligible). Every torchvision classification model under
    100M parameters (63, torchvision 0.29) was checked by hand the same way, all within
    9.6e-7 (the largest error over the largest output) in fp32 with the torch backend."""
    torchvision = pytest.importorskip("torchvision", reason="torchvision is not installed")
    torch.manual_seed(0)
    native = _with_running_statistics(
        _redraw_constant_parameters(getattr(torchvision.models, name)().to(DEVICE)))
    ours, report = tilesmith.nn.optimize_for_inference(native, backend=MODELS,
                                                       return_report=True)
    assert (len(report.folded), len(report.fused), len(report.residuals)) == (
        folded, fused, residuals)
    assert not report.skipped
    x = torch.randn(1, 3, 224, 224, device=DEVICE)
    with torch.no_grad():
        _close(ours(x), native(x), rtol=1e-5)


def test_optimize_for_inference_rejects_what_it_cannot_do():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="model is in training mode; call model.eval"):
        tilesmith.nn.optimize_for_inference(model)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got function"):
        tilesmith.nn.optimize_for_inference(lambda x: x)
    with pytest.raises(ValueError, match="backend"):
        tilesmith.nn.optimize_for_inference(model.eval(), backend="cudnn")

    class DataDependent(torch.nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(ValueError, match="torch.fx cannot trace DataDependent's forward "
                                         ".*convert\\(model, fuse_activations=True\\)"):
        tilesmith.nn.optimize_for_inference(DataDependent().eval())


def test_torch_export_of_a_converted_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 5))
    tilesmith.nn.convert(model, backend="torch")
    x = torch.randn(2, 3, 8, 8)
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), model(x), rtol=0, atol=0)


def test_patch_sdpa_routes_and_restores(monkeypatch):
    original = F.scaled_dot_product_attention
    calls = []
    real = tilesmith.ops.scaled_dot_product_attention
    monkeypatch.setattr(tilesmith.ops, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(k.get("backend")) or real(*a, **k))
    q = torch.randn(1, 2, 5, 8, device=DEVICE)
    native_attention = torch.nn.MultiheadAttention(8, 2, device=DEVICE)
    with tilesmith.nn.patch_sdpa(backend=KERNELS):
        assert F.scaled_dot_product_attention is not original
        out = F.scaled_dot_product_attention(q, q, q, is_causal=True)
        out_3d = F.scaled_dot_product_attention(q[0], q[0], q[0])  # (heads, seq, dim)
        # torch's own module reaches it too (F.multi_head_attention_forward calls it).
        native_attention(q[0], q[0], q[0], need_weights=False)
    assert F.scaled_dot_product_attention is original
    assert calls == [KERNELS, KERNELS, KERNELS]
    torch.testing.assert_close(out, original(q, q, q, is_causal=True))
    torch.testing.assert_close(out_3d, original(q[0], q[0], q[0]))
    tilesmith.nn.patch_sdpa()
    assert F.scaled_dot_product_attention is not original
    tilesmith.nn.unpatch_sdpa()
    assert F.scaled_dot_product_attention is original


@pytest.mark.parametrize("module", ["linear", "conv2d", "attention", "float8_linear"])
def test_autocast_dtypes_match_native(module):
    device_type = DEVICE.type
    dtype = torch.bfloat16
    torch.manual_seed(0)
    if module in ("linear", "float8_linear"):
        native, inputs = torch.nn.Linear(8, 4, device=DEVICE), (torch.randn(3, 8, device=DEVICE),)
    elif module == "conv2d":
        native = torch.nn.Conv2d(3, 4, 3, device=DEVICE)
        inputs = (torch.randn(1, 3, 6, 6, device=DEVICE),)
    else:
        native = torch.nn.MultiheadAttention(8, 2, batch_first=True, device=DEVICE)
        x = torch.randn(2, 5, 8, device=DEVICE)
        inputs = (x, x, x)
    ours = tilesmith.nn.convert(copy.deepcopy(native), backend=KERNELS,
                                fp8=module == "float8_linear")
    kwargs = {"need_weights": False} if module == "attention" else {}
    with torch.autocast(device_type, dtype=dtype):
        got = ours(*inputs, **kwargs)
        want = native(*inputs, **kwargs)
        if module == "attention":  # the weights: float32 under CUDA autocast, as torch's
            weights, want_weights = ours(*inputs)[1], native(*inputs)[1]
    if module == "attention":
        assert weights.dtype == want_weights.dtype
        exact = copy.deepcopy(native).double()(*(x.double() for x in inputs))[1]
        testing.assert_close_to_reference(weights, exact, want_weights, name="weights")
    got, want = (got[0], want[0]) if module == "attention" else (got, want)
    assert got.dtype == want.dtype == dtype
    if module == "float8_linear":  # fp8 products (e4m3: 3 mantissa bits) of fp32 weights
        assert testing.sqnr_db(got, native(*inputs)) > 20
    else:
        testing.assert_close_to_reference(got, want.double(), want, factor=2.0)


def test_cifar_example_trains_a_few_steps(tmp_path):
    sys.path.insert(0, str(ROOT / "examples"))
    import cifar_resnet

    results, same = cifar_resnet.main(["--steps", "3", "--batch-size", "8", "--width", "4",
                                       "--blocks", "1", "--device", str(DEVICE),
                                       "--backend", MODELS, "--out", str(tmp_path)])
    assert len(results["tilesmith"]["losses"]) == 3 and same
    # At inference the folded model gives the trained one's logits (fp32 on the CPU).
    assert results["inference"]["logits_rel_diff"] < 1e-5
    assert results["inference"]["same_class"] == 1.0
    assert (tmp_path / "cifar_resnet.json").exists()
    assert (tmp_path / "cifar_resnet.png").exists() == HAS_MATPLOTLIB  # the loss curves
    # The generated data set is in CIFAR-10's own format, readable as the real one is.
    data = cifar_resnet.write_synthetic_cifar(tmp_path / "cifar", images_per_batch=10)
    x, y = cifar_resnet.load_cifar(data)
    assert x.shape == (50, 3, 32, 32) and y.shape == (50,)


def test_gpt_example_trains_a_few_steps(tmp_path):
    sys.path.insert(0, str(ROOT / "examples"))
    import gpt_char

    results, same = gpt_char.main(["--steps", "3", "--batch-size", "2", "--seq-len", "32",
                                   "--d-model", "32", "--heads", "2", "--layers", "1",
                                   "--max-chars", "20000", "--device", str(DEVICE),
                                   "--backend", MODELS, "--out", str(tmp_path)])
    assert len(results["native"]["losses"]) == 3 and same
    assert (tmp_path / "gpt_char.png").exists() == HAS_MATPLOTLIB
    # Decoding with the KV cache picks the tokens of the full forward (fp32 on the CPU).
    assert results["generation"]["same_tokens"] == 1.0
    assert len(results["generation"]["text"]) == 32


def test_gpt_example_trains_in_fp8(capsys):
    """--fp8: the blocks' four Linear layers as Float8Linear (the MLP's GELU in the first's
    epilogue), the head in bf16; a few steps train to the native model's loss."""
    sys.path.insert(0, str(ROOT / "examples"))
    import gpt_char

    results, same = gpt_char.main(["--steps", "3", "--batch-size", "2", "--seq-len", "32",
                                   "--d-model", "32", "--heads", "2", "--layers", "1",
                                   "--max-chars", "20000", "--device", str(DEVICE),
                                   "--backend", MODELS, "--fp8", "row"])
    assert len(results["tilesmith"]["losses"]) == 3 and same
    assert ("fp8: 4 Linear layers as Float8Linear (row-wise scaling; GELUs in their "
            "epilogue: 1), the output head in bf16") in capsys.readouterr().out


@pytest.mark.parametrize("example,argv,message", [
    ("cifar_resnet", ["--steps", "0"], "argument --steps: must be >= 1, got 0"),
    ("cifar_resnet", ["--backend", "cudnn"], "argument --backend: invalid choice: 'cudnn'"),
    ("cifar_resnet", ["--data-dir", "/no/such/dir"], "argument --data-dir: /no/such/dir does "
     "not exist"),
    ("gpt_char", ["--d-model", "10", "--heads", "3"], "--d-model \\(10\\) must be a multiple"),
    ("gpt_char", ["--text", "/no/such/file"], "argument --text: /no/such/file does not exist"),
], ids=["steps", "backend", "data_dir", "heads", "text"])
def test_examples_refuse_bad_arguments_before_training(example, argv, message, capsys):
    """A usage error from argparse (exit status 2), not a traceback halfway through: --steps
    0 used to end in an IndexError after training, a missing --data-dir in a
    FileNotFoundError."""
    sys.path.insert(0, str(ROOT / "examples"))
    module = importlib.import_module(example)
    with pytest.raises(SystemExit) as stopped:
        module.main(argv)
    assert stopped.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_ddp_gradients_equal_single_process(tmp_path):
    """Two gloo processes, half the batch each, DistributedDataParallel over a converted
    model: the averaged gradients equal one process's gradients on the whole batch."""
    sys.path.insert(0, str(Path(__file__).parent))
    import _ddp_worker

    env = dict(os.environ, TILESMITH_TEST_BACKEND=KERNELS,
               PYTHONPATH=os.pathsep.join([str(ROOT / "python"), str(ROOT),
                                           os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "grads.pt"
    procs = [subprocess.Popen([sys.executable, str(Path(__file__).parent / "_ddp_worker.py"),
                               str(rank), "2", str(out), str(tmp_path / "rendezvous")],
                              env=env, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"DDP worker failed:\n{err[-3000:]}"
    ddp_grads = torch.load(out)
    os.environ["TILESMITH_TEST_BACKEND"] = KERNELS
    try:
        single = _ddp_worker.gradients(_ddp_worker.model(), *_ddp_worker.data())
    finally:
        del os.environ["TILESMITH_TEST_BACKEND"]
    for got, want in zip(ddp_grads, single):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", compile_backends("attention", torch.bfloat16))
def test_torch_compile_dynamic_shapes_of_the_modules(backend):
    """torch.compile(fullgraph=True, dynamic=True) of tilesmith's Linear, Conv2d and
    MultiheadAttention (self-attention with a key padding mask, with and without the
    weights): one graph each over symbolic batch and sequence or image sizes, outputs and
    input gradients against eager."""
    dtype = torch.float32 if backend == "torch" else torch.bfloat16
    kw = dict(device=DEVICE, dtype=dtype, backend=backend)

    def r(*shape):
        return torch.randn(shape, device=DEVICE).to(dtype).requires_grad_()

    linear = tilesmith.nn.Linear(32, 48, activation="gelu", **kw)
    check_compiled_dynamic(linear, [(r(5, 32),), (r(2, 9, 32),), (r(3, 4, 32),)])
    conv = tilesmith.nn.Conv2d(8, 16, 3, padding=1, activation="relu", **kw)
    check_compiled_dynamic(conv, [(r(2, 8, 9, 9),), (r(3, 8, 12, 7),)])
    attention = tilesmith.nn.MultiheadAttention(32, 4, batch_first=True, **kw)

    def self_attention(x, padding):
        return attention(x, x, x, key_padding_mask=padding, need_weights=False)[0]

    def padding_mask(batch, seq):
        mask = torch.zeros(batch, seq, dtype=torch.bool, device=DEVICE)
        mask[0, -2:] = True
        return mask

    def with_weights(x, padding):  # need_weights=True: the output and the weights
        out, weights = attention(x, x, x, key_padding_mask=padding)
        return torch.cat([out, weights], dim=-1)

    for f in (self_attention, with_weights):
        check_compiled_dynamic(f, [(r(2, 7, 32), padding_mask(2, 7)),
                                   (r(3, 12, 32), padding_mask(3, 12))])


@requires_gpu
def test_compile_and_cuda_graph_of_a_converted_training_step():
    model = tilesmith.nn.convert(_transformer(), backend="triton")
    x = torch.randn(2, 64, 32, device="cuda")
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    static_x = x.clone()

    def step():
        opt.zero_grad(set_to_none=False)
        loss = model(static_x).square().mean()
        loss.backward()
        opt.step()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.isfinite(static_loss)
