// tilesmith::quantize_fp8_cuda and scaled_gemm_cuda: checks, operand layouts, outputs and the
// params fill.
// Compiled into tilesmith._C_sm90a with the sm_90a kernels; the schema lives in
// python/tilesmith/ops/fp8.py, registration_sm90a.cpp binds this function to it.
#include "fp8_api.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../common/check.h"
#include "../matmul/matmul_api.h"  // parse_activation
#include "quantize.h"
#include "scaled_gemm.h"

namespace tilesmith {

namespace {

bool is_fp8(at::ScalarType t) { return t == at::kFloat8_e4m3fn || t == at::kFloat8_e5m2; }

// The epilogue's activation as ATen's op, for the k == 0 call that launches no kernel.
at::Tensor activate_as_torch(const at::Tensor& z, Activation activation) {
  switch (activation) {
    case Activation::kRelu: return at::relu(z);
    case Activation::kGelu: return at::gelu(z);
    case Activation::kGeluTanh: return at::gelu(z, "tanh");
    case Activation::kSilu: return at::silu(z);
    case Activation::kRelu6: return at::hardtanh(z, 0.0, 6.0);
    case Activation::kHardswish: return at::hardswish(z);
    case Activation::kSigmoid: return at::sigmoid(z);
    case Activation::kHardsigmoid: return at::hardsigmoid(z);
    default: return z;
  }
}

// t (rows, k) with k contiguous, 16-byte aligned rows and k_padded columns: the layout
// cp.async and the swizzled tiles need. Anything else is copied, zero-padded to k_padded
// columns (zeros add nothing to the products).
at::Tensor k_major(const at::Tensor& t, int64_t k_padded) {
  const bool ok = t.size(1) == k_padded && t.stride(1) == 1 && t.stride(0) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  if (ok) return t;
  at::Tensor padded = at::zeros({t.size(0), k_padded}, t.options());
  padded.narrow(1, 0, t.size(1)).copy_(t);
  return padded;
}

// This extension holds sm_90a code only: on another GPU say so instead of failing to launch.
void check_sm90(const at::Device& device, const char* op) {
  int major = 0, minor = 0;
  TILESMITH_CHECK_LAUNCH(
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device.index()));
  TILESMITH_CHECK_LAUNCH(
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device.index()));
  TORCH_CHECK(major == 9 && minor == 0, op, " (cuda backend): tilesmith._C_sm90a is built for "
              "sm_90a and runs on compute capability 9.0 only, this GPU has ", major, ".", minor);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> quantize_fp8_cuda(const at::Tensor& x_in,
                                                     at::ScalarType dtype, int64_t granularity,
                                                     int64_t block_m, int64_t block_k) {
  TILESMITH_CHECK_CUDA_TENSOR(x_in);
  TORCH_CHECK(x_in.dim() == 2, "quantize_fp8: x must be 2-D, got ", x_in.sizes());
  TORCH_CHECK(x_in.scalar_type() == at::kBFloat16 || x_in.scalar_type() == at::kHalf ||
                  x_in.scalar_type() == at::kFloat,
              "quantize_fp8: x must be bfloat16, float16 or float32, got ", x_in.scalar_type());
  TORCH_CHECK(is_fp8(dtype), "quantize_fp8: dtype must be float8_e4m3fn or float8_e5m2, got ",
              dtype);
  TORCH_CHECK(granularity >= 0 && granularity <= 3, "quantize_fp8: bad granularity ",
              granularity);
  const auto power_of_two = [](int64_t b) {
    return b >= 16 && b <= (1 << 30) && (b & (b - 1)) == 0;
  };
  const auto kind = static_cast<Granularity>(granularity);
  TORCH_CHECK((kind != Granularity::kBlock && kind != Granularity::kBlock2d) ||
                  (power_of_two(block_k) &&
                   (kind == Granularity::kBlock || power_of_two(block_m))),
              "quantize_fp8: block sizes must be powers of two >= 16, got ", block_m, " x ",
              block_k);
  c10::cuda::CUDAGuard guard(x_in.device());
  check_sm90(x_in.device(), "quantize_fp8");
  // x's part of the kernels' parameters.
  const auto describe = [&](const at::Tensor& t) {
    QuantizeParams p{};
    p.x = t.data_ptr();
    p.m = t.size(0);
    p.k = t.size(1);
    p.x_row_stride = t.stride(0);
    p.x_col_stride = t.stride(1);
    p.granularity = kind;
    p.input = t.scalar_type() == at::kBFloat16 ? QuantizeInput::kBFloat16
              : t.scalar_type() == at::kHalf   ? QuantizeInput::kFloat16
                                               : QuantizeInput::kFloat32;
    return p;
  };
  // A transposed (column-major) x, as Float8Linear's backward passes, is read in place where
  // the transposing kernel takes it (quantizes_column_major), else made row-major first: the
  // other kernels walk rows, and a warp reading a column of x touches 32 cache lines a step.
  const bool column_major = x_in.stride(1) != 1 && x_in.stride(0) == 1;
  const at::Tensor x =
      column_major && !quantizes_column_major(describe(x_in)) ? x_in.contiguous() : x_in;

  const int64_t m = x.size(0), k = x.size(1);
  const int64_t blocks_k = kind == Granularity::kBlock || kind == Granularity::kBlock2d
                               ? (k + block_k - 1) / block_k
                               : 1;
  // Column groups go to gridDim.y (at most 65535); per-tensor groups are >= 256 wide.
  TORCH_CHECK(blocks_k <= 65535 && k / 256 < 65535, "quantize_fp8 (cuda backend): x ",
              x.sizes(), " has too many column blocks (", blocks_k, ") of ", block_k);
  const at::Tensor q = at::empty({m, k}, x.options().dtype(dtype));
  const auto scale_options = x.options().dtype(at::kFloat);
  at::Tensor scale;
  switch (kind) {
    case Granularity::kTensor: scale = at::empty({}, scale_options); break;
    case Granularity::kRow: scale = at::empty({m, 1}, scale_options); break;
    case Granularity::kBlock: scale = at::empty({m, blocks_k}, scale_options); break;
    case Granularity::kBlock2d:
      scale = at::empty({(m + block_m - 1) / block_m, blocks_k}, scale_options);
      break;
  }
  const bool e5m2 = dtype == at::kFloat8_e5m2;
  if (q.numel() == 0) {  // no values: every group's amax is the 1e-12 floor
    const double fp8_max = e5m2 ? 57344.0 : 448.0;
    scale.fill_(static_cast<float>(static_cast<double>(1e-12f) / fp8_max));
    return {q, scale};
  }
  const at::Tensor amax =
      kind == Granularity::kTensor ? at::zeros({}, scale_options) : at::Tensor();

  QuantizeParams p = describe(x);
  p.q = q.data_ptr();
  p.scale = scale.data_ptr<float>();
  p.scale_row_stride = blocks_k;
  p.amax = amax.defined() ? amax.data_ptr<float>() : nullptr;
  p.block_m = static_cast<int>(block_m);
  p.block_k = static_cast<int>(block_k);
  p.e5m2 = e5m2;
  TILESMITH_CHECK_LAUNCH(run_quantize_fp8_sm90a(
      p, c10::cuda::getCurrentCUDAStream(x.device().index()).stream()));
  return {q, scale};
}

std::tuple<at::Tensor, at::Tensor> scaled_gemm_cuda(
    const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& scale_a_in,
    const at::Tensor& scale_b_in, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual, c10::string_view activation_name,
    at::ScalarType out_dtype, int64_t scale_a_kind, int64_t scale_b_kind, bool save_pre) {
  TILESMITH_CHECK_CUDA_TENSOR(a_in);
  TILESMITH_CHECK_CUDA_TENSOR(b_in);
  TORCH_CHECK(a_in.dim() == 2 && b_in.dim() == 2 && a_in.size(1) == b_in.size(0),
              "scaled_gemm: a and b must be (m, k) and (k, n), got ", a_in.sizes(), " and ",
              b_in.sizes());
  TORCH_CHECK(is_fp8(a_in.scalar_type()) && is_fp8(b_in.scalar_type()),
              "scaled_gemm: a and b must be float8_e4m3fn or float8_e5m2, got ",
              a_in.scalar_type(), " and ", b_in.scalar_type());
  TORCH_CHECK(a_in.device() == b_in.device() && scale_a_in.device() == a_in.device() &&
                  scale_b_in.device() == a_in.device(),
              "scaled_gemm: a, b and the scales must be on one device");
  TORCH_CHECK(out_dtype == at::kBFloat16 || out_dtype == at::kHalf || out_dtype == at::kFloat,
              "scaled_gemm: out_dtype must be bfloat16, float16 or float32, got ", out_dtype);
  const int64_t m = a_in.size(0), k = a_in.size(1), n = b_in.size(1);
  TORCH_CHECK(scale_a_kind >= 0 && scale_a_kind <= 2 && scale_b_kind >= 0 && scale_b_kind <= 2 &&
                  (scale_a_kind == 2) == (scale_b_kind == 2),
              "scaled_gemm: bad scale kinds ", scale_a_kind, ", ", scale_b_kind);
  const Activation activation = parse_activation(activation_name, "scaled_gemm");
  c10::cuda::CUDAGuard guard(a_in.device());
  check_sm90(a_in.device(), "scaled_gemm");
  const int device = a_in.device().index();

  // 16-byte rows for cp.async: k is padded to a multiple of 16 (a copy) where it is not one.
  const int64_t k_padded = (k + 15) / 16 * 16;
  const at::Tensor a = k_major(a_in, k_padded);
  const at::Tensor b_t = k_major(b_in.t(), k_padded);  // (n, k)
  const at::Tensor scale_a = scale_a_in.to(at::kFloat).contiguous();
  const at::Tensor scale_b = scale_b_in.to(at::kFloat).contiguous();
  const int64_t blocks_k = (k + 127) / 128, blocks_n = (n + 127) / 128;
  const int64_t want_a = scale_a_kind == 0 ? 1 : scale_a_kind == 1 ? m : m * blocks_k;
  const int64_t want_b = scale_b_kind == 0 ? 1 : scale_b_kind == 1 ? n : blocks_k * blocks_n;
  TORCH_CHECK(scale_a.numel() == want_a && scale_b.numel() == want_b,
              "scaled_gemm: scale shapes ", scale_a_in.sizes(), " and ", scale_b_in.sizes(),
              " do not match their kinds for a ", a_in.sizes(), " and b ", b_in.sizes());
  at::Tensor bias_f32;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->device() == a.device(),
                "scaled_gemm: bias must be a (", n, ",) tensor on ", a.device());
    bias_f32 = bias->to(at::kFloat).contiguous();
  }
  at::Tensor residual_out;  // read in the output's dtype, unit column stride
  if (residual.has_value()) {
    TORCH_CHECK(residual->dim() == 2 && residual->size(0) == m && residual->size(1) == n &&
                    residual->device() == a.device(),
                "scaled_gemm: residual must be an (", m, ", ", n, ") tensor on ", a.device(),
                ", got ", residual->sizes(), " on ", residual->device());
    residual_out = residual->to(out_dtype);
    if (residual_out.stride(1) != 1) residual_out = residual_out.contiguous();
  }
  at::Tensor out = at::empty({m, n}, a.options().dtype(out_dtype));
  at::Tensor pre = at::empty(save_pre ? at::IntArrayRef{m, n} : at::IntArrayRef{0, 0},
                             a.options().dtype(out_dtype));
  if (out.numel() == 0) return {out, pre};
  if (k == 0) {  // an empty sum: the epilogue of zeros, in torch ops
    at::Tensor z = at::zeros({m, n}, a.options().dtype(at::kFloat));
    if (bias.has_value()) z.add_(bias_f32);
    if (save_pre) pre.copy_(z);
    z = activate_as_torch(z, activation);
    if (residual.has_value()) z.add_(residual_out);
    out.copy_(z);
    return {out, pre};
  }

  ScaledGemmParams p{};
  p.a = a.data_ptr();
  p.b = b_t.data_ptr();
  p.out = out.data_ptr();
  p.scale_a = scale_a.data_ptr<float>();
  p.scale_b = scale_b.data_ptr<float>();
  p.bias = bias.has_value() ? bias_f32.data_ptr<float>() : nullptr;
  p.m = m;
  p.n = n;
  p.k = k_padded;  // the same 128-deep scale blocks: 128 is a multiple of 16
  p.a_row_stride = a.stride(0);
  p.b_row_stride = b_t.stride(0);
  p.scale_a_kind = static_cast<ScaleKind>(scale_a_kind);
  p.scale_b_kind = static_cast<ScaleKind>(scale_b_kind);
  p.scale_a_row_stride = blocks_k;
  p.scale_b_row_stride = blocks_n;
  p.out_dtype = out_dtype == at::kBFloat16 ? OutDtype::kBFloat16
                : out_dtype == at::kHalf   ? OutDtype::kFloat16
                                           : OutDtype::kFloat32;
  p.activation = activation;
  if (residual.has_value()) {
    p.residual = residual_out.data_ptr();
    p.residual_row_stride = residual_out.stride(0);
  }
  p.pre = save_pre ? pre.data_ptr() : nullptr;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  const bool b_e5m2 = b_in.scalar_type() == at::kFloat8_e5m2;
  TILESMITH_CHECK_LAUNCH(a.scalar_type() == at::kFloat8_e5m2
                             ? run_scaled_gemm_sm90a_a_e5m2(p, b_e5m2, stream)
                             : run_scaled_gemm_sm90a_a_e4m3(p, b_e5m2, stream));
  return {out, pre};
}

}  // namespace tilesmith
