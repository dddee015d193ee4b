"""The CUDA backends of attention, conv2d and scaled_gemm as parts of a training step: no
host synchronisation, capturable in a CUDA graph, on the caller's stream, and bad input
rejected by the registered ops themselves (for callers that bypass tilesmith.ops). GPU only:
their numerics are tested in test_attention/test_conv2d/test_fp8 (on the GPU) and in
test_cuda_emulated (on the CPU)."""

import pytest
import torch
from conftest import requires_gpu

import tilesmith
from tilesmith import backend, testing

pytestmark = requires_gpu


def _needs(op, dtype):
    why = backend.unavailable_reason("cuda", op, torch.device("cuda"), dtype)
    if why:
        pytest.skip(why)


def _attention_step():
    q, k, v = (torch.randn(2, 4, 100, 64, device="cuda", dtype=torch.bfloat16,
                           requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 4, 100, 100, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step():
        out = tilesmith.ops.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                                         backend="cuda")
        return torch.autograd.grad(out.float().square().sum(), (q, k, v, bias))
    return step


def _dropout_step():
    q, k, v = (torch.randn(2, 4, 100, 128, device="cuda", dtype=torch.bfloat16,
                           requires_grad=True) for _ in range(3))
    # The op with a fixed seed tensor: graph replays must repeat the eager step's mask.
    seed = torch.tensor([0x5EED], device="cuda")

    def step():
        out, _ = torch.ops.tilesmith.attention_fwd_cuda(q, k, v, None, True, 128 ** -0.5, 0.1,
                                                        seed)
        return torch.autograd.grad(out.float().square().sum(), (q, k, v))
    return step


def _varlen_step():
    cu = torch.tensor([0, 37, 100], device="cuda", dtype=torch.int32)
    q, k, v = (torch.randn(100, 4, 128, device="cuda", dtype=torch.float16,
                           requires_grad=True) for _ in range(3))

    def step():
        out = tilesmith.ops.varlen_attention(q, k, v, cu, cu, 63, 63, causal=True,
                                             backend="cuda")
        return torch.autograd.grad(out.float().square().sum(), (q, k, v))
    return step


def _gemm_step():
    a = torch.randn(100, 72, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(72, 136, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(136, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step():
        out = tilesmith.ops.gemm(a, b, bias=bias, activation="gelu", backend="cuda")
        return torch.autograd.grad(out.float().square().sum(), (a, b, bias))
    return step


def _conv2d_step():
    x = torch.randn(2, 16, 13, 13, device="cuda", dtype=torch.bfloat16).contiguous(
        memory_format=torch.channels_last).requires_grad_(True)
    w = torch.randn(24, 16, 3, 3, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(24, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step():
        out = tilesmith.ops.conv2d(x, w, b, 2, 1, activation="relu", backend="cuda")
        return torch.autograd.grad(out.float().square().sum(), (x, w, b))
    return step


def _scaled_gemm_step():
    quant = testing.quantize_fp8_reference
    qa, sa = quant(torch.randn(130, 256, device="cuda"), torch.float8_e4m3fn, "row")
    qw, sw = quant(torch.randn(200, 256, device="cuda"), torch.float8_e4m3fn, "row")

    def step():
        return (tilesmith.ops.scaled_gemm(qa, qw.t(), sa, sw.t(), backend="cuda"),)
    return step


def _float8_linear_step(scaling="row"):
    # 264 input and 200 output features: neither product's k is a multiple of 16 (the
    # zero-padding copy), and the backward quantizes transposed views.
    layer = tilesmith.nn.Float8Linear(264, 200, dtype=torch.bfloat16, device="cuda",
                                      scaling=scaling)
    x = torch.randn(130, 264, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step():
        with tilesmith.use_backend("cuda"):
            out = layer(x)
            grads = torch.autograd.grad(out.float().square().sum(), (x, layer.weight))
        q, _ = tilesmith.ops.quantize_fp8(x.detach(), backend="cuda")  # per-tensor: 2 kernels
        return (*grads, q.view(torch.uint8))
    return step


STEPS = {"attention": ("attention", torch.bfloat16, _attention_step),
         "attention_dropout": ("attention", torch.bfloat16, _dropout_step),
         "varlen_attention": ("attention", torch.float16, _varlen_step),
         "gemm": ("gemm", torch.bfloat16, _gemm_step),
         "conv2d": ("conv2d", torch.bfloat16, _conv2d_step),
         "scaled_gemm": ("fp8", torch.float8_e4m3fn, _scaled_gemm_step),
         "float8_linear": ("fp8", torch.bfloat16, _float8_linear_step),
         "float8_linear_block": ("fp8", torch.bfloat16,
                                 lambda: _float8_linear_step(scaling="block"))}


@pytest.mark.parametrize("name", list(STEPS))
def test_no_host_sync_and_cuda_graph_capture(name):
    op, dtype, make = STEPS[name]
    _needs(op, dtype)
    step = make()
    eager = step()  # warm up: extension load, first-launch attributes
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # Replays of the captured step write the same values the eager step computed.
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm up on the side stream, as graph capture wants
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(captured, eager):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(STEPS))
def test_runs_on_the_current_stream(name):
    op, dtype, make = STEPS[name]
    _needs(op, dtype)
    step = make()
    want = [t.float().sum() for t in step()]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = [t.float().sum() for t in step()]  # same stream: ordered after the kernels
    stream.synchronize()
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_registered_cuda_ops_reject_bad_input():
    _needs("attention", torch.bfloat16)
    ops = torch.ops.tilesmith
    q = torch.randn(1, 2, 8, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="multiple of 8 and at most 256"):
        ops.attention_fwd_cuda(q[..., :36], q[..., :36], q[..., :36], None, False, 0.1, 0.0, None)
    with pytest.raises(RuntimeError, match="needs seed"):
        ops.attention_fwd_cuda(q, q, q, None, False, 0.1, 0.1, None)
    with pytest.raises(RuntimeError, match="multiple of key/value heads"):
        ops.attention_fwd_cuda(q, q[:, :1].expand(1, 3, 8, 64), q[:, :1].expand(1, 3, 8, 64),
                               None, False, 0.1, 0.0, None)
    with pytest.raises(RuntimeError, match="does not broadcast"):
        ops.attention_fwd_cuda(q, q, q, torch.ones(1, 1, 3, 8, device="cuda", dtype=torch.bool),
                               False, 0.1, 0.0, None)
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        ops.attention_fwd_cuda(q.float(), q.float(), q.float(), None, False, 0.1, 0.0, None)
    cu = torch.tensor([0, 8], device="cuda", dtype=torch.int64)
    with pytest.raises(RuntimeError, match="int32"):
        ops.varlen_attention_fwd_cuda(q[0].transpose(0, 1), q[0].transpose(0, 1),
                                      q[0].transpose(0, 1), cu, cu, 8, 8, False, 0.1, 0.0, None)
    x = torch.randn(1, 12, 8, 8, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="multiples of 8"):
        ops.conv2d_fwd_cuda(x, torch.randn(8, 12, 3, 3, device="cuda", dtype=torch.bfloat16),
                            None, None, [1, 1], [1, 1], [1, 1], "none", False)
    with pytest.raises(RuntimeError, match="depthwise channels must be a multiple of 8"):
        ops.conv2d_fwd_cuda(x, torch.randn(12, 1, 3, 3, device="cuda", dtype=torch.bfloat16),
                            None, None, [1, 1], [1, 1], [1, 1], "none", False)
    with pytest.raises(RuntimeError, match="do not split into groups"):
        ops.conv2d_fwd_cuda(x, torch.randn(8, 5, 3, 3, device="cuda", dtype=torch.bfloat16),
                            None, None, [1, 1], [1, 1], [1, 1], "none", False)
    pre = torch.randn(16, 24, device="cuda", dtype=torch.bfloat16)
    bf16 = torch.bfloat16
    with pytest.raises(RuntimeError, match="2-D of one shape"):
        ops.activation_backward_cuda(pre[:, :8], pre, "gelu", True, bf16)
    with pytest.raises(RuntimeError, match="dz_dtype must be float16 or bfloat16"):
        ops.activation_backward_cuda(pre.float(), pre.float(), "gelu", True, torch.float32)
    with pytest.raises(RuntimeError, match="pre must be float32 or dz_dtype"):
        ops.activation_backward_cuda(pre, pre.half(), "gelu", True, bf16)
    with pytest.raises(RuntimeError, match="grad must be float32 or pre's dtype"):
        ops.activation_backward_cuda(pre.half(), pre, "gelu", True, bf16)
    with pytest.raises(RuntimeError, match="grad must be float32 or pre's dtype"):
        ops.activation_backward_cuda(pre, pre.float(), "gelu", True, bf16)
    with pytest.raises(RuntimeError, match="activation must be none, relu"):
        ops.activation_backward_cuda(pre, pre, "tanh", True, bf16)
    if backend._C_SM90A is not None:
        a = torch.randn(16, 48, device="cuda").to(torch.float8_e4m3fn)
        one = torch.ones((), device="cuda")
        with pytest.raises(RuntimeError, match="inner dimension|must be \\(m, k\\)"):
            ops.scaled_gemm_cuda(a, a, one, one, None, None, "none", torch.bfloat16, 0, 0,
                                 False)
        with pytest.raises(RuntimeError, match="scale shapes|compute capability"):
            ops.scaled_gemm_cuda(a, a.t(), torch.ones(3, device="cuda"), one, None, None,
                                 "none", torch.bfloat16, 1, 0, False)
        with pytest.raises(RuntimeError, match="activation must be none, relu|compute cap"):
            ops.scaled_gemm_cuda(a, a.t(), one, one, None, None, "tanh", torch.bfloat16, 0, 0,
                                 False)
        with pytest.raises(RuntimeError, match=r"residual must be an \(16, 16\)|compute cap"):
            ops.scaled_gemm_cuda(a, a.t(), one, one, None, one, "none", torch.bfloat16, 0, 0,
                                 False)
        x = torch.randn(16, 48, device="cuda")
        with pytest.raises(RuntimeError, match="must be 2-D"):
            ops.quantize_fp8_cuda(x[None], torch.float8_e4m3fn, 1, 1, 1)
        with pytest.raises(RuntimeError, match="powers of two"):
            ops.quantize_fp8_cuda(x, torch.float8_e4m3fn, 2, 1, 100)
        with pytest.raises(RuntimeError, match="bfloat16, float16 or float32"):
            ops.quantize_fp8_cuda(x.double(), torch.float8_e4m3fn, 1, 1, 1)
