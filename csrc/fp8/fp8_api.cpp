// tilesmith::scaled_gemm_cuda: checks, operand layouts, output and the ScaledGemmParams fill.
// Compiled into tilesmith._C_sm90a with the sm_90a kernels; the schema lives in
// python/tilesmith/ops/fp8.py, registration_sm90a.cpp binds this function to it.
#include "fp8_api.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../common/check.h"
#include "scaled_gemm.h"

namespace tilesmith {

namespace {

bool is_fp8(at::ScalarType t) { return t == at::kFloat8_e4m3fn || t == at::kFloat8_e5m2; }

// k contiguous, rows 16-byte aligned: the layout cp.async and the swizzled tiles need.
at::Tensor k_major(const at::Tensor& t) {
  const bool ok = t.stride(1) == 1 && t.stride(0) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  return ok ? t : t.contiguous().clone();
}

}  // namespace

at::Tensor scaled_gemm_cuda(const at::Tensor& a_in, const at::Tensor& b_in,
                            const at::Tensor& scale_a_in, const at::Tensor& scale_b_in,
                            const std::optional<at::Tensor>& bias, at::ScalarType out_dtype,
                            int64_t scale_a_kind, int64_t scale_b_kind) {
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
  TORCH_CHECK(k % 16 == 0, "scaled_gemm (cuda backend): k must be a multiple of 16 (16-byte "
              "fp8 rows), got a ", a_in.sizes());
  TORCH_CHECK(scale_a_kind >= 0 && scale_a_kind <= 2 && scale_b_kind >= 0 && scale_b_kind <= 2 &&
                  (scale_a_kind == 2) == (scale_b_kind == 2),
              "scaled_gemm: bad scale kinds ", scale_a_kind, ", ", scale_b_kind);
  c10::cuda::CUDAGuard guard(a_in.device());
  int major = 0, minor = 0;
  const int device = a_in.device().index();
  TILESMITH_CHECK_LAUNCH(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  TILESMITH_CHECK_LAUNCH(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  TORCH_CHECK(major == 9 && minor == 0, "scaled_gemm (cuda backend): the wgmma kernels are built "
              "for sm_90a and run on compute capability 9.0 only, this GPU has ", major, ".",
              minor);

  const at::Tensor a = k_major(a_in);
  const at::Tensor b_t = k_major(b_in.t());  // (n, k)
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
  at::Tensor out = at::empty({m, n}, a.options().dtype(out_dtype));
  if (out.numel() == 0) return out;
  if (k == 0) {  // an empty sum: the bias alone
    out.zero_();
    if (bias.has_value()) out.add_(bias_f32);
    return out;
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
  p.k = k;
  p.a_row_stride = a.stride(0);
  p.b_row_stride = b_t.stride(0);
  p.scale_a_kind = static_cast<ScaleKind>(scale_a_kind);
  p.scale_b_kind = static_cast<ScaleKind>(scale_b_kind);
  p.scale_a_row_stride = blocks_k;
  p.scale_b_row_stride = blocks_n;
  p.out_dtype = out_dtype == at::kBFloat16 ? OutDtype::kBFloat16
                : out_dtype == at::kHalf   ? OutDtype::kFloat16
                                           : OutDtype::kFloat32;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  const bool b_e5m2 = b_in.scalar_type() == at::kFloat8_e5m2;
  TILESMITH_CHECK_LAUNCH(a.scalar_type() == at::kFloat8_e5m2
                             ? run_scaled_gemm_sm90a_a_e5m2(p, b_e5m2, stream)
                             : run_scaled_gemm_sm90a_a_e4m3(p, b_e5m2, stream));
  return out;
}

}  // namespace tilesmith
