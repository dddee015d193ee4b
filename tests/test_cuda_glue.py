"""The cuda backend's Python, on the CPU: the op tests' own checks (float64 references, the
2x rule, memory formats), run with backend="cuda" on CPU tensors whose registered cuda ops
are tests/cuda_standins.py's PyTorch stand-ins. What this covers is everything around the
kernels: argument marshalling, zero-filled channels, packed GQA rows, layouts, the autograd
formulas and the backward ops they call, each stand-in checking the C++ function's
preconditions. The kernels themselves: test_cuda_emulated and the GPU run."""

import pytest
import torch
import test_attention as attention_tests
import test_conv2d as conv2d_tests
import test_fp8 as fp8_tests
import test_gemm as gemm_tests
import test_matmul as matmul_tests
import test_nn as nn_tests
from conftest import HAS_GPU

import tilesmith
from tilesmith import testing
from tilesmith.ops.gemm import ACTIVATION_NAMES

import cuda_standins

pytestmark = pytest.mark.skipif(HAS_GPU, reason="on a GPU the op tests run the cuda backend "
                                                "itself")

LOW_PRECISION = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]


def through_cuda_ops(check, *args):
    """An op test's ``check(*args)`` with the stand-ins in place; it must have reached them
    (not another backend)."""
    with cuda_standins.enabled() as calls:
        check(*args)
    assert calls, "no cuda op ran: the call did not reach the cuda backend"


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("name", matmul_tests.SAMPLE_NAMES)
def test_matmul_forward(dtype, name):
    through_cuda_ops(matmul_tests.test_forward_matches_float64, "cuda", dtype, name)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("name", matmul_tests.GRAD_SAMPLES)
def test_matmul_gradients(dtype, name):
    through_cuda_ops(matmul_tests.test_gradients_match_float64, "cuda", dtype, name)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("name", [s.name for s in testing.gemm_sample_inputs("cpu", torch.float16)])
def test_gemm_forward_and_gradients(dtype, name):
    through_cuda_ops(gemm_tests.test_forward_and_gradients_match_float64, "cuda", dtype, name)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("name", conv2d_tests.SAMPLE_NAMES)
def test_conv2d_forward_and_gradients(dtype, name):
    through_cuda_ops(conv2d_tests.test_forward_and_gradients_match_float64, "cuda", dtype, name)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("activation", list(ACTIVATION_NAMES))
def test_gemm_double_backward(dtype, activation):
    through_cuda_ops(gemm_tests.test_double_backward_matches_float64, "cuda", dtype, activation)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("case", list(conv2d_tests.DOUBLE_BACKWARD_CASES))
def test_conv2d_double_backward(dtype, case):
    through_cuda_ops(conv2d_tests.test_double_backward_matches_float64, "cuda", dtype, case)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("case", list(attention_tests.DOUBLE_BACKWARD_CASES))
def test_attention_double_backward(dtype, case):
    through_cuda_ops(attention_tests.test_double_backward_matches_float64, "cuda", dtype, case)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("case", ["causal_gqa", "float_mask_grad"])
def test_attention_dropout_double_backward(dtype, case):
    through_cuda_ops(attention_tests.test_dropout_double_backward_matches_float64, "cuda",
                     dtype, case)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("case", attention_tests.VARLEN_DOUBLE_BACKWARD_CASES)
def test_varlen_attention_double_backward(dtype, case):
    through_cuda_ops(attention_tests.test_varlen_double_backward_matches_float64, "cuda", dtype,
                     case)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("name", attention_tests.SAMPLE_NAMES)
def test_attention_forward_and_gradients(dtype, name):
    through_cuda_ops(attention_tests._check_sample, "cuda", dtype, name)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("name", attention_tests.VARLEN_NAMES)
def test_varlen_attention_forward_and_gradients(dtype, name):
    through_cuda_ops(attention_tests._check_varlen_sample, "cuda", dtype, name)


@pytest.mark.parametrize("name", ["causal_gqa", "with_empty_sequence"])
def test_varlen_attention_logsumexp_gradient(name):
    through_cuda_ops(attention_tests._check_varlen_lse, "cuda", torch.bfloat16, name, False)


@pytest.mark.parametrize("case", list(attention_tests.DROPOUT_CASES))
def test_attention_dropout(case):
    through_cuda_ops(attention_tests._check_against_float64, "cuda", torch.bfloat16,
                     attention_tests.DROPOUT_CASES[case], 0.3)


@pytest.mark.parametrize("name", ["causal_gqa", "with_empty_sequence"])
def test_varlen_attention_dropout(name):
    through_cuda_ops(attention_tests.test_varlen_dropout_matches_float64_with_the_kernels_mask,
                     "cuda", torch.bfloat16, name)


@pytest.mark.parametrize("uses_out", [True, False], ids=["out_and_lse", "lse_only"])
@pytest.mark.parametrize("case", list(attention_tests.LSE_GRAD_CASES))
def test_attention_logsumexp_and_its_gradient(case, uses_out):
    through_cuda_ops(attention_tests.test_logsumexp_gradient_matches_float64, "cuda",
                     torch.bfloat16, case, uses_out)


@pytest.mark.parametrize("bias", list(attention_tests.BROADCAST_BIAS_SHAPES))
def test_attention_deterministic_broadcast_mask_gradient(bias, monkeypatch):
    through_cuda_ops(
        attention_tests.test_deterministic_algorithms_sum_a_broadcast_mask_gradient_in_torch,
        "cuda", torch.bfloat16, bias, monkeypatch)


@pytest.mark.parametrize("kind", ["float", "bool"])
def test_attention_masks(kind):
    through_cuda_ops(attention_tests.test_fully_masked_row_gives_zeros_and_finite_grads,
                     "cuda", kind)
    through_cuda_ops(attention_tests.test_one_dimensional_mask_broadcasts_over_batch_heads_and_rows,
                     "cuda", torch.bfloat16, kind == "bool")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_attention_returns_logsumexp(causal):
    through_cuda_ops(attention_tests.test_attention_returns_logsumexp, "cuda", torch.bfloat16,
                     causal)


def test_attention_layouts():
    for dtype in (torch.float16, torch.bfloat16):
        through_cuda_ops(attention_tests.test_float32_mask_with_low_precision_queries, "cuda",
                         dtype)
    through_cuda_ops(attention_tests.test_varlen_takes_strided_cu_seqlens, "cuda")
    through_cuda_ops(attention_tests.test_output_is_laid_out_as_sequence_major_queries, "cuda")


@pytest.mark.parametrize("gran", fp8_tests.GRANULARITIES, ids=fp8_tests._gran_id)
@pytest.mark.parametrize("dtype", fp8_tests.FP8, ids=["e4m3", "e5m2"])
def test_quantize_fp8(dtype, gran):
    for shape in fp8_tests.SHAPES:
        through_cuda_ops(fp8_tests.test_quantize_is_bit_exact, "cuda", dtype, gran, shape,
                         torch.bfloat16)
    for shape in [(64, 272), (21, 130)]:
        through_cuda_ops(fp8_tests.test_quantize_of_transposed_views_is_bit_exact, "cuda", gran,
                         shape)


@pytest.mark.parametrize("granularity", ["tensor", "row", "block"])
def test_scaled_gemm(granularity):
    for shape in [(70, 300, 90), (129, 17, 130), (0, 64, 8)]:
        through_cuda_ops(fp8_tests.test_scaled_gemm_sqnr, "cuda", granularity, shape,
                         torch.bfloat16)
    through_cuda_ops(fp8_tests.test_scaled_gemm_mixed_e5m2_e4m3, "cuda")
    through_cuda_ops(fp8_tests.test_scaled_gemm_takes_a_strided_bias, "cuda")


@pytest.mark.parametrize("scaling,features,tokens", [
    ("row", (48, 24), 5), ("tensor", (48, 24), 5), ("block", (48, 24), 5),
    ("block", (300, 200), 70)], ids=["row", "tensor", "block", "block_300x200"])
def test_float8_linear(scaling, features, tokens):
    through_cuda_ops(fp8_tests.test_float8_linear_matches_linear_shapes_and_grads, "cuda",
                     scaling, features, tokens)


@pytest.mark.parametrize("scaling", ["row", "tensor", "block"])
def test_float8_linear_at_inference(scaling, monkeypatch):
    through_cuda_ops(fp8_tests.test_float8_linear_quantizes_its_weight_once_at_inference,
                     "cuda", scaling, monkeypatch)


def test_standins_check_what_the_cpp_checks():
    """A call that the C++ function would refuse is refused by its stand-in too, so that
    glue passing it would fail here rather than first on a GPU."""
    with cuda_standins.enabled():
        x = torch.randn(1, 12, 5, 5, dtype=torch.bfloat16)
        with pytest.raises(RuntimeError, match="multiples of 8"):
            torch.ops.tilesmith.conv2d_fwd_cuda(x, torch.randn(8, 12, 3, 3).bfloat16(), None,
                                                None, [1, 1], [0, 0], [1, 1], "none", False)
        q = torch.randn(1, 2, 4, 16, dtype=torch.bfloat16)
        for mask in (torch.zeros(4, 4), torch.zeros(1, 1, 4, 4, dtype=torch.float16)):
            with pytest.raises(RuntimeError, match="attn_mask must be a 4-D bool, "):
                torch.ops.tilesmith.attention_fwd_cuda(q, q, q, mask, False, 1.0, 0.0, None)


# opcheck (schema, fake implementations against the outputs' shapes, dtypes and strides,
# autograd registration, AOT dispatch) of every cuda op, and torch.compile(fullgraph=True)
# of gemm and conv2d: the op tests' GPU checks, which the Triton interpreter cannot run.

@pytest.mark.parametrize("name", ["17x17x17", "both_transposed", "batched_3d", "zero_k"])
def test_matmul_opcheck(name):
    through_cuda_ops(matmul_tests.test_opcheck, "cuda", name)


def test_gemm_opcheck_and_compile():
    through_cuda_ops(gemm_tests.test_opcheck_and_compile, "cuda")


def test_conv2d_opcheck_and_compile():
    through_cuda_ops(conv2d_tests.test_opcheck_and_compile, "cuda")


@pytest.mark.parametrize("name", ["basic_b2h3s17", "float_mask_1_h_sq_sk"])
def test_attention_opcheck(name):
    through_cuda_ops(attention_tests.test_opcheck, "cuda", name)


def test_attention_backward_and_varlen_opcheck():
    through_cuda_ops(attention_tests._backward_and_varlen_opchecks, "cuda", "cpu")


def test_attention_compile():
    through_cuda_ops(attention_tests.test_torch_compile_fullgraph, "cuda")


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_multihead_attention_weights(dtype):
    """nn.MultiheadAttention's need_weights=True path: cuda attention's log-sum-exp and
    cuda matmul's scores make the weights."""
    through_cuda_ops(nn_tests.test_multihead_attention_weights_in_low_precision, dtype, "cuda")


def test_activation_checkpointing_with_dropout():
    """The cuda ops under torch.utils.checkpoint: the recomputed forward's dropout seed."""
    through_cuda_ops(nn_tests.test_activation_checkpointing, False, "cuda", torch.bfloat16)


# torch.compile(fullgraph=True, dynamic=True): the cuda ops' fake implementations and
# argument handling with symbolic shapes (and the ints derived from them).
@pytest.mark.parametrize("test", [matmul_tests.test_torch_compile_dynamic_shapes,
                                  gemm_tests.test_torch_compile_dynamic_shapes,
                                  conv2d_tests.test_torch_compile_dynamic_shapes,
                                  attention_tests.test_torch_compile_dynamic_shapes,
                                  attention_tests.test_varlen_torch_compile_fullgraph_dynamic,
                                  fp8_tests.test_torch_compile_dynamic_shapes,
                                  nn_tests.test_torch_compile_dynamic_shapes_of_the_modules],
                         ids=["matmul", "gemm", "conv2d", "attention", "varlen_attention",
                              "fp8", "nn_modules"])
def test_compile_with_dynamic_shapes(test):
    through_cuda_ops(test, "cuda")


@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
def test_conv2d_zero_filled_compile(memory_format):
    """An RGB first layer (channels zero-filled to 8 around the op) compiles whole, with
    the gradients' values and strides of eager mode; the input's gradient has PyTorch's
    strides (the weight's has the weight's own format, as on the unfilled path)."""
    fmt = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format

    def check():
        x = torch.randn(2, 3, 9, 9).to(torch.bfloat16).contiguous(memory_format=fmt)
        w = torch.randn(16, 3, 3, 3).to(torch.bfloat16)
        b = torch.randn(16).to(torch.bfloat16)
        inputs = [t.requires_grad_() for t in (x, w, b)]

        def loss(conv2d, x, w, b):
            return conv2d(x, w, b, padding=1).relu().float().square().sum()

        def ours(x, w, b, padding):
            return tilesmith.ops.conv2d(x, w, b, padding=padding, backend="cuda")

        torch._dynamo.reset()
        compiled = torch.autograd.grad(
            torch.compile(lambda *t: loss(ours, *t), fullgraph=True)(*inputs), inputs)
        eager = torch.autograd.grad(loss(ours, *inputs), inputs)
        pytorch = torch.autograd.grad(loss(torch.nn.functional.conv2d, *inputs), inputs)
        for got, want in zip(compiled, eager):
            torch.testing.assert_close(got, want)
            assert got.stride() == want.stride()
        assert compiled[0].stride() == pytorch[0].stride()

    through_cuda_ops(check)


def test_fp8_opcheck():
    def check():
        x = torch.randn(64, 256, dtype=torch.bfloat16)
        for granularity, block_m, block_k in ((0, 1, 1), (1, 1, 1), (2, 1, 128), (3, 32, 64)):
            torch.library.opcheck(torch.ops.tilesmith.quantize_fp8_cuda,
                                  (x, torch.float8_e4m3fn, granularity, block_m, block_k))
            torch.library.opcheck(torch.ops.tilesmith.quantize_fp8_cuda,
                                  (x.t(), torch.float8_e5m2, granularity, block_m, block_k))
        for granularity, kind in (("tensor", 0), ("row", 1), ("block", 2)):
            qa, qb, sa, sb = fp8_tests._quantized_operands(64, 256, 128, granularity)
            fp8_tests.scaled_gemm_opcheck(torch.ops.tilesmith.scaled_gemm_cuda,
                                          (qa, qb, sa, sb, torch.randn(128), None, "none",
                                           torch.bfloat16, kind, kind, False))
            fp8_tests.scaled_gemm_opcheck(torch.ops.tilesmith.scaled_gemm_cuda,
                                          (qa, qb, sa, sb, torch.randn(128),
                                           torch.randn(64, 128), "silu", torch.bfloat16,
                                           kind, kind, True))

    through_cuda_ops(check)


def _model_check(native, make_input, what):
    """A bf16 model converted with backend="cuda": its output and every parameter's
    gradient within twice the error of the native bf16 model, against the same model in
    float64 (GUIDE §3's rule, on whole models)."""
    import copy

    from tilesmith import nn as tnn

    ours = tnn.convert(copy.deepcopy(native), backend="cuda")
    reference = copy.deepcopy(native).double()
    x = make_input()
    probe = None
    results = []
    for model, dtype in ((ours, torch.bfloat16), (native, torch.bfloat16),
                         (reference, torch.float64)):
        out = model(x.to(dtype))
        probe = torch.randn(out.shape) if probe is None else probe
        grads = torch.autograd.grad((out * probe.to(dtype)).sum(), list(model.parameters()))
        results.append((out, grads))
    (out, grads), (base, base_grads), (ref, ref_grads) = results
    testing.assert_close_to_reference(out, ref, base, name=f"{what} output")
    for (name, _), got, baseline, want in zip(native.named_parameters(), grads, base_grads,
                                             ref_grads):
        testing.assert_close_to_reference(got, want, baseline, name=f"{what} grad {name}")


def test_converted_resnet18_channels_last():
    torchvision = pytest.importorskip("torchvision", reason="torchvision is not installed")
    torch.manual_seed(0)
    native = torchvision.models.resnet18(num_classes=10).to(torch.bfloat16).to(
        memory_format=torch.channels_last)
    through_cuda_ops(_model_check, native, lambda: torch.randn(2, 3, 32, 32).to(
        memory_format=torch.channels_last), "resnet18")


def test_resnet18_optimized_for_inference():
    """optimize_for_inference with backend="cuda" on a bf16 channels-last ResNet-18 whose
    BatchNorms hold statistics of their own: the folded convolutions with their fused ReLU
    give the model's output within the GUIDE §3 rule against float64."""
    torchvision = pytest.importorskip("torchvision", reason="torchvision is not installed")
    import copy

    from tilesmith import nn as tnn

    torch.manual_seed(0)
    native = nn_tests._with_running_statistics(torchvision.models.resnet18(num_classes=10))
    reference = copy.deepcopy(native).double()
    native = native.to(torch.bfloat16).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)

    def check():
        ours = tnn.optimize_for_inference(native, backend="cuda")
        with torch.no_grad():
            testing.assert_close_to_reference(ours(x.bfloat16()), reference(x.double()),
                                              native(x.bfloat16()), name="resnet18")

    through_cuda_ops(check)


def test_gpt_optimized_for_inference():
    """optimize_for_inference with backend="cuda" on the GPT example's bf16 model: its
    MLP's GELU and four residual sums in the GEMM epilogues, its SDPA calls on tilesmith's;
    the logits within the GUIDE §3 rule against float64."""
    import copy
    import sys
    from pathlib import Path

    from tilesmith import nn as tnn

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    import gpt_char

    torch.manual_seed(0)
    native = gpt_char.GPT(vocab=40, d_model=32, heads=2, layers=2, seq_len=24).eval()
    reference = copy.deepcopy(native).double()
    native = native.to(torch.bfloat16)
    idx = torch.randint(0, 40, (2, 24))

    def check():
        ours, report = tnn.optimize_for_inference(native, backend="cuda", return_report=True)
        assert len(report.fused) == 2 and len(report.residuals) == 4
        with torch.no_grad():
            testing.assert_close_to_reference(ours(idx), reference(idx), native(idx),
                                              name="gpt")

    through_cuda_ops(check)


def test_converted_transformer_encoder():
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0,
                                             batch_first=True, dtype=torch.bfloat16)
    native = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    through_cuda_ops(_model_check, native, lambda: torch.randn(2, 11, 32), "transformer")



def test_gpu_smoke_script(monkeypatch, capsys):
    """tools/sanitize_cuda.py, the first thing `make gpu-report` runs on a GPU (and the
    compute-sanitizer workload), on CPU tensors through the stand-ins: every call it
    makes is well-formed and every check it applies passes on correct results."""
    import importlib.util
    from pathlib import Path

    monkeypatch.setenv("TILESMITH_SMOKE_DEVICE", "cpu")
    path = Path(__file__).resolve().parent.parent / "tools" / "sanitize_cuda.py"
    spec = importlib.util.spec_from_file_location("sanitize_cuda", path)
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    through_cuda_ops(lambda: (smoke.probe_tma_kernels(), smoke.main()))
    assert smoke.FAILURES == [], capsys.readouterr().out
