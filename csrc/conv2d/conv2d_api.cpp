// tilesmith::conv2d_{fwd,dgrad,wgrad}_cuda: checks, channels-last operands, outputs and the
// ConvParams/MatmulParams fill. The schemas live in python/tilesmith/ops/conv2d.py;
// registration.cpp binds these functions to them for CUDA tensors.
#include "conv2d_api.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cmath>

#include "../common/check.h"
#include "../common/hopper_kernels.h"
#include "../matmul/matmul_api.h"
#include "conv2d.h"
#include "depthwise.h"

namespace tilesmith {

namespace {

void check_operand(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.is_cuda(), "conv2d (cuda backend): ", name, " must be a CUDA tensor, got ",
              t.device());
  TORCH_CHECK(t.device() == like.device(), "conv2d: ", name, " is on ", t.device(), ", not ",
              like.device());
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf,
              "conv2d (cuda backend): ", name, " must be float16 or bfloat16, got ",
              t.scalar_type());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "conv2d: ", name, " has dtype ",
              t.scalar_type(), ", expected ", like.scalar_type());
  TORCH_CHECK(t.dim() == 4, "conv2d: ", name, " must be 4-D, got shape ", t.sizes());
}

// The channels-last layout the kernels read, 16-byte aligned (copies only when needed).
at::Tensor channels_last(const at::Tensor& t) {
  at::Tensor out = t.contiguous(at::MemoryFormat::ChannelsLast);
  if (reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 != 0) {
    out = out.clone(at::MemoryFormat::ChannelsLast);
  }
  return out;
}

// tilesmith's rule for "the input's memory format" (python/tilesmith/ops/conv2d.py).
bool is_channels_last(const at::Tensor& t) {
  return t.is_contiguous(at::MemoryFormat::ChannelsLast) &&
         t.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
}

// A channels-last result copied to NCHW, with NCHW strides also where the two layouts
// coincide (one channel, 1x1 pixels; .contiguous() would keep the channels-last strides),
// as the ops' fake implementations and PyTorch's convolutions have them.
at::Tensor as_nchw(const at::Tensor& t) { return t.clone(at::MemoryFormat::Contiguous); }

// c and k: all input channels and filters; c_group: the weight's second dimension (c over
// the groups).
ConvParams geometry(int64_t n, int64_t c, int64_t h, int64_t w, int64_t k, int64_t c_group,
                    int64_t r, int64_t s, at::IntArrayRef stride, at::IntArrayRef padding,
                    at::IntArrayRef dilation) {
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "conv2d: stride, padding and dilation must each have 2 entries");
  TORCH_CHECK(c_group > 0 && c % c_group == 0 && k % (c / c_group) == 0,
              "conv2d: ", c, " input channels and ", k, " filters do not split into groups of ",
              c_group, " input channels");
  const int64_t groups = c / c_group;
  TORCH_CHECK(c_group % 8 == 0 && (k / groups) % 8 == 0,
              "conv2d (cuda backend): input channels and filters per group must be multiples of "
              "8 (16-byte rows), got ", c_group, " and ", k / groups, " (groups ", groups, ")");
  ConvParams cp{};
  cp.batch = n;
  cp.height = h;
  cp.width = w;
  cp.channels = c_group;
  cp.filters = k / groups;
  cp.groups = groups;
  cp.kernel_h = r;
  cp.kernel_w = s;
  cp.stride_h = static_cast<int>(stride[0]);
  cp.stride_w = static_cast<int>(stride[1]);
  cp.pad_h = static_cast<int>(padding[0]);
  cp.pad_w = static_cast<int>(padding[1]);
  cp.dilation_h = static_cast<int>(dilation[0]);
  cp.dilation_w = static_cast<int>(dilation[1]);
  cp.out_h = (h + 2 * padding[0] - dilation[0] * (r - 1) - 1) / stride[0] + 1;
  cp.out_w = (w + 2 * padding[1] - dilation[1] * (s - 1) - 1) / stride[1] + 1;
  TORCH_CHECK(cp.out_h > 0 && cp.out_w > 0, "conv2d: empty output for input ", h, "x", w,
              " and kernel ", r, "x", s);
  return cp;
}

// Depthwise (groups = channels = filters, one filter per channel): the direct kernels of
// depthwise.cuh take it; the implicit GEMM would leave 15/16 of each tile idle.
bool is_depthwise(int64_t channels, int64_t filters, int64_t weight_channels) {
  return weight_channels == 1 && filters == channels && channels > 1;
}

DepthwiseParams depthwise_geometry(int64_t n, int64_t c, int64_t h, int64_t w, int64_t r,
                                   int64_t s, at::IntArrayRef stride, at::IntArrayRef padding,
                                   at::IntArrayRef dilation) {
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "conv2d: stride, padding and dilation must each have 2 entries");
  TORCH_CHECK(c % 8 == 0, "conv2d (cuda backend): depthwise channels must be a multiple of 8 "
              "(16-byte vectors), got ", c);
  DepthwiseParams p{};
  p.batch = n;
  p.height = h;
  p.width = w;
  p.channels = c;
  p.kernel_h = r;
  p.kernel_w = s;
  p.stride_h = static_cast<int>(stride[0]);
  p.stride_w = static_cast<int>(stride[1]);
  p.pad_h = static_cast<int>(padding[0]);
  p.pad_w = static_cast<int>(padding[1]);
  p.dilation_h = static_cast<int>(dilation[0]);
  p.dilation_w = static_cast<int>(dilation[1]);
  p.out_h = (h + 2 * padding[0] - dilation[0] * (r - 1) - 1) / stride[0] + 1;
  p.out_w = (w + 2 * padding[1] - dilation[1] * (s - 1) - 1) / stride[1] + 1;
  TORCH_CHECK(p.out_h > 0 && p.out_w > 0, "conv2d: empty output for input ", h, "x", w,
              " and kernel ", r, "x", s);
  return p;
}

// A (C, 1, R, S) depthwise weight as the kernels read it: (R, S, C), C contiguous.
at::Tensor depthwise_weight(const at::Tensor& weight) {
  return weight.select(1, 0).permute({1, 2, 0}).contiguous();
}

// An output matrix of rows x cols, row stride cols, with no epilogue.
MatmulParams plain_output(void* data, int64_t rows, int64_t cols) {
  MatmulParams out{};
  out.c = data;
  out.batch = 1;
  out.m = rows;
  out.n = cols;
  out.c_row_stride = cols;
  return out;
}

// A 1x1 convolution with stride 1, no padding and one group is a plain GEMM over the
// channels-last pixels, (N*H*W, C) x (C, K), and its dgrad and wgrad are GEMMs too: all
// three run on the matmul kernels (on Hopper the TMA-fed, persistent ones), which need no
// per-row pixel arithmetic or padding checks.
bool is_pointwise(const ConvParams& cp) {
  return cp.kernel_h == 1 && cp.kernel_w == 1 && cp.stride_h == 1 && cp.stride_w == 1 &&
         cp.pad_h == 0 && cp.pad_w == 0 && cp.groups == 1;
}

// An operand of a pointwise GEMM: element (row, col) at data + row * row_stride +
// col * col_stride (elements), one of them 1.
struct GemmOperand {
  const void* data;
  int64_t row_stride, col_stride;
};

// out (its output, batch and epilogue already set) = a @ b, a (m, k) and b (k, n), on the
// current stream of `like`'s device.
void launch_pointwise(MatmulParams out, GemmOperand a, GemmOperand b, int64_t k,
                      const at::Tensor& like) {
  out.a = a.data;
  out.a_row_stride = a.row_stride;
  out.a_col_stride = a.col_stride;
  out.b = b.data;
  out.b_row_stride = b.row_stride;
  out.b_col_stride = b.col_stride;
  out.k = k;
  launch_matmul(out, like);
}

// A pointwise convolution's wgrad, split over its pixels: partial[z] (`out`: fp32, one
// (K, C) matrix per split) = grad^T @ x over split z's `split_pixels` pixels, grad (pixels,
// K) and x (pixels, C) channels-last. The splits that are full run as one batched GEMM, a
// shorter last one as a GEMM of its own.
void pointwise_wgrad(MatmulParams out, int64_t split_pixels, int64_t pixels,
                     const at::Tensor& grad, const at::Tensor& x) {
  const int64_t filters = out.m, channels = out.n, full = pixels / split_pixels;
  const int64_t element_bytes = x.element_size();
  const auto* grad_bytes = static_cast<const char*>(grad.data_ptr());
  const auto* x_bytes = static_cast<const char*>(x.data_ptr());
  auto splits_from = [&](int64_t first, int64_t count, int64_t k) {
    MatmulParams part = out;
    part.c = static_cast<float*>(out.c) + first * out.c_batch_stride;
    part.batch = count;
    part.a_batch_stride = split_pixels * filters;
    part.b_batch_stride = split_pixels * channels;
    const int64_t first_pixel = first * split_pixels;
    launch_pointwise(part, {grad_bytes + first_pixel * filters * element_bytes, 1, filters},
                     {x_bytes + first_pixel * channels * element_bytes, channels, 1}, k, x);
  };
  if (full > 0) splits_from(0, full, split_pixels);
  if (pixels > full * split_pixels) splits_from(full, 1, pixels - full * split_pixels);
}

// Whether this call's conv2d kernels are the wgmma ones (tilesmith._C_sm90a, whose entries
// take every call on a device of compute capability 9.0).
bool runs_hopper_kernels(const at::Tensor& t) {
  if (hopper_kernels() == nullptr) return false;
  int major = 0, minor = 0;
  TILESMITH_CHECK_LAUNCH(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor,
                                                t.device().index()));
  TILESMITH_CHECK_LAUNCH(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor,
                                                t.device().index()));
  return major == 9 && minor == 0;
}

int multiprocessors(const at::Tensor& t) {
  int count = 0;
  TILESMITH_CHECK_LAUNCH(
      cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, t.device().index()));
  return count;
}

// How many sm_80 conv blocks share one of t's SMs: as many as its shared memory holds (each
// block also takes the runtime's reserved share), at most the two their __launch_bounds__
// keep registers for.
int sm80_blocks_per_sm(const at::Tensor& t) {
  int per_sm = 0, reserved = 0;
  TILESMITH_CHECK_LAUNCH(cudaDeviceGetAttribute(
      &per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, t.device().index()));
  TILESMITH_CHECK_LAUNCH(cudaDeviceGetAttribute(
      &reserved, cudaDevAttrReservedSharedMemoryPerBlock, t.device().index()));
  return std::clamp(per_sm / (kSm80ConvSmemBytes + reserved), 1, 2);
}

cudaStream_t stream_of(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

// The residual the epilogue adds before the activation, shaped like the (N, K, P, Q) output,
// in the kernels' channels-last layout; undefined when there is none.
at::Tensor checked_residual(const std::optional<at::Tensor>& residual, const at::Tensor& out,
                            const at::Tensor& x) {
  if (!residual.has_value()) return at::Tensor();
  check_operand(*residual, "residual", x);
  TORCH_CHECK(residual->sizes() == out.sizes(), "conv2d: residual must have the output's shape ",
              out.sizes(), ", got ", residual->sizes());
  return channels_last(*residual);
}

at::Tensor checked_bias(const std::optional<at::Tensor>& bias, int64_t k, const at::Tensor& x) {
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == k &&
                                    bias->device() == x.device()),
              "conv2d: bias must be a (", k, ",) tensor on ", x.device());
  return bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
}

std::tuple<at::Tensor, at::Tensor> depthwise_fwd(const at::Tensor& x_in, const at::Tensor& weight,
                                                 const std::optional<at::Tensor>& bias,
                                                 const std::optional<at::Tensor>& residual,
                                                 at::IntArrayRef stride, at::IntArrayRef padding,
                                                 at::IntArrayRef dilation,
                                                 c10::string_view activation, bool save_pre) {
  const int64_t n = x_in.size(0), c = x_in.size(1);
  DepthwiseParams p = depthwise_geometry(n, c, x_in.size(2), x_in.size(3), weight.size(2),
                                         weight.size(3), stride, padding, dilation);
  const at::Tensor x = channels_last(x_in), w = depthwise_weight(weight);
  const auto options = x.options().memory_format(at::MemoryFormat::ChannelsLast);
  at::Tensor out = at::empty({n, c, p.out_h, p.out_w}, options);
  at::Tensor pre = save_pre ? at::empty({n, c, p.out_h, p.out_w}, options)
                            : at::empty({0, 0, 0, 0}, x.options());
  if (poison_outputs()) {
    out.fill_(NAN);
    pre.fill_(NAN);
  }
  const at::Tensor bias_f32 = checked_bias(bias, c, x);
  const at::Tensor residual_nhwc = checked_residual(residual, out, x);
  p.x = x.data_ptr();
  p.weight = w.data_ptr();
  p.out = out.data_ptr();
  p.pre = save_pre ? pre.data_ptr() : nullptr;
  p.residual = residual_nhwc.defined() ? residual_nhwc.data_ptr() : nullptr;
  p.bias = bias.has_value() ? bias_f32.data_ptr<float>() : nullptr;
  p.activation = parse_activation(activation, "conv2d");
  TILESMITH_CHECK_LAUNCH(x.scalar_type() == at::kBFloat16
                             ? run_depthwise_fwd_bf16(p, stream_of(x))
                             : run_depthwise_fwd_fp16(p, stream_of(x)));
  if (!is_channels_last(x_in)) return {as_nchw(out), as_nchw(pre)};
  return {out, pre};
}

at::Tensor depthwise_dgrad(const at::Tensor& grad_in, const at::Tensor& weight,
                           at::IntArrayRef input_shape, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation,
                           bool want_channels_last) {
  const int64_t n = input_shape[0], c = input_shape[1], h = input_shape[2], w = input_shape[3];
  DepthwiseParams p = depthwise_geometry(n, c, h, w, weight.size(2), weight.size(3), stride,
                                         padding, dilation);
  TORCH_CHECK(grad_in.size(0) == n && grad_in.size(1) == c && grad_in.size(2) == p.out_h &&
                  grad_in.size(3) == p.out_w,
              "conv2d dgrad: grad has shape ", grad_in.sizes(), ", the forward's output was (",
              n, ", ", c, ", ", p.out_h, ", ", p.out_w, ")");
  const at::Tensor grad = channels_last(grad_in), wt = depthwise_weight(weight);
  at::Tensor dx = at::empty({n, c, h, w},
                            grad.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (poison_outputs()) dx.fill_(NAN);
  p.grad_out = grad.data_ptr();
  p.weight = wt.data_ptr();
  p.out = dx.data_ptr();
  TILESMITH_CHECK_LAUNCH(grad.scalar_type() == at::kBFloat16
                             ? run_depthwise_dgrad_bf16(p, stream_of(grad))
                             : run_depthwise_dgrad_fp16(p, stream_of(grad)));
  return want_channels_last ? dx : as_nchw(dx);
}

at::Tensor depthwise_wgrad(const at::Tensor& grad_in, const at::Tensor& x_in,
                           at::IntArrayRef weight_shape, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation) {
  const int64_t c = x_in.size(1), r = weight_shape[2], s = weight_shape[3];
  DepthwiseParams p = depthwise_geometry(x_in.size(0), c, x_in.size(2), x_in.size(3), r, s,
                                         stride, padding, dilation);
  TORCH_CHECK(grad_in.size(0) == x_in.size(0) && grad_in.size(1) == c &&
                  grad_in.size(2) == p.out_h && grad_in.size(3) == p.out_w,
              "conv2d wgrad: grad has shape ", grad_in.sizes(), ", the forward's output was (",
              x_in.size(0), ", ", c, ", ", p.out_h, ", ", p.out_w, ")");
  const at::Tensor grad = channels_last(grad_in), x = channels_last(x_in);
  // Each thread reduces its split of the output pixels: ~1024 pixels per split keeps a few
  // thousand threads busy on a large layer without long serial loops.
  const int64_t pixels = p.batch * p.out_h * p.out_w;
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>(65535, (pixels + 1023) / 1024));
  p.split_pixels = (pixels + splits - 1) / splits;
  at::Tensor partial = at::zeros({splits, r, s, c}, x.options().dtype(at::kFloat));
  p.x = x.data_ptr();
  p.grad_out = grad.data_ptr();
  p.weight_grad = partial.data_ptr<float>();
  if (pixels > 0) {
    const int split_count = static_cast<int>(splits);
    TILESMITH_CHECK_LAUNCH(x.scalar_type() == at::kBFloat16
                               ? run_depthwise_wgrad_bf16(p, split_count, stream_of(x))
                               : run_depthwise_wgrad_fp16(p, split_count, stream_of(x)));
  }
  // Splits summed in a fixed order (deterministic); (R, S, C) seen as (C, 1, R, S), then
  // given channels-last strides, as the generic wgrad's and the op's fake implementation
  // have them (torch.compile checks the real strides against the fake's).
  return partial.sum(0).permute({2, 0, 1}).unsqueeze(1).to(
      x.scalar_type(), /*non_blocking=*/false, /*copy=*/false, at::MemoryFormat::ChannelsLast);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> conv2d_fwd_cuda(const at::Tensor& x_in,
                                                   const at::Tensor& weight_in,
                                                   const std::optional<at::Tensor>& bias,
                                                   const std::optional<at::Tensor>& residual,
                                                   at::IntArrayRef stride,
                                                   at::IntArrayRef padding,
                                                   at::IntArrayRef dilation,
                                                   c10::string_view activation, bool save_pre) {
  check_operand(x_in, "input", x_in);
  check_operand(weight_in, "weight", x_in);
  c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t n = x_in.size(0), k = weight_in.size(0);
  if (is_depthwise(x_in.size(1), k, weight_in.size(1))) {
    return depthwise_fwd(x_in, weight_in, bias, residual, stride, padding, dilation, activation,
                         save_pre);
  }
  ConvParams cp = geometry(n, x_in.size(1), x_in.size(2), x_in.size(3), k, weight_in.size(1),
                           weight_in.size(2), weight_in.size(3), stride, padding, dilation);
  const at::Tensor x = channels_last(x_in), weight = channels_last(weight_in);
  const auto options = x.options().memory_format(at::MemoryFormat::ChannelsLast);
  at::Tensor out = at::empty({n, k, cp.out_h, cp.out_w}, options);
  at::Tensor pre = save_pre ? at::empty({n, k, cp.out_h, cp.out_w}, options)
                            : at::empty({0, 0, 0, 0}, x.options());
  if (poison_outputs()) {
    out.fill_(NAN);
    pre.fill_(NAN);
  }
  const at::Tensor bias_f32 = checked_bias(bias, k, x);
  const at::Tensor residual_nhwc = checked_residual(residual, out, x);
  cp.x = x.data_ptr();
  cp.weight = weight.data_ptr();
  MatmulParams epilogue = plain_output(out.data_ptr(), n * cp.out_h * cp.out_w, k);
  epilogue.n = cp.filters;  // one group's columns; the kernel offsets to its group
  epilogue.bias = bias.has_value() ? bias_f32.data_ptr<float>() : nullptr;
  epilogue.activation = parse_activation(activation, "conv2d");
  if (residual_nhwc.defined()) {
    epilogue.residual = residual_nhwc.data_ptr();
    epilogue.residual_row_stride = k;
    epilogue.residual_before_activation = true;
  }
  if (save_pre) {
    epilogue.pre = pre.data_ptr();
    epilogue.pre_row_stride = k;
  }
  if (out.numel() > 0) {
    if (is_pointwise(cp)) {
      // The (K, C, 1, 1) channels-last weight is (K, C) row-major: b = its transpose.
      const int64_t c = cp.channels;
      launch_pointwise(epilogue, {x.data_ptr(), c, 1}, {weight.data_ptr(), 1, c}, c, x);
    } else {
      const bool bf16 = x.scalar_type() == at::kBFloat16;
      const HopperKernels* hopper = hopper_kernels();
      cudaError_t error = cudaSuccess;
      if (hopper == nullptr || !hopper->conv2d_fwd(cp, epilogue, bf16, stream_of(x), &error)) {
        error = bf16 ? run_conv2d_fwd_sm80_bf16(cp, epilogue, stream_of(x))
                     : run_conv2d_fwd_sm80_fp16(cp, epilogue, stream_of(x));
      }
      TILESMITH_CHECK_LAUNCH(error);
    }
  }
  if (!is_channels_last(x_in)) return {as_nchw(out), as_nchw(pre)};
  return {out, pre};
}

at::Tensor conv2d_dgrad_cuda(const at::Tensor& grad_in, const at::Tensor& weight_in,
                             at::IntArrayRef input_shape, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation,
                             bool want_channels_last) {
  check_operand(grad_in, "grad", grad_in);
  check_operand(weight_in, "weight", grad_in);
  TORCH_CHECK(input_shape.size() == 4, "conv2d dgrad: input_shape must have 4 entries, got ",
              input_shape);
  c10::cuda::CUDAGuard guard(grad_in.device());
  const int64_t n = input_shape[0], c = input_shape[1], h = input_shape[2], w = input_shape[3];
  const int64_t k = weight_in.size(0);
  if (is_depthwise(c, k, weight_in.size(1))) {
    return depthwise_dgrad(grad_in, weight_in, input_shape, stride, padding, dilation,
                           want_channels_last);
  }
  ConvParams cp = geometry(n, c, h, w, k, weight_in.size(1), weight_in.size(2),
                           weight_in.size(3), stride, padding, dilation);
  TORCH_CHECK(grad_in.size(0) == n && grad_in.size(1) == k &&
                  grad_in.size(2) == cp.out_h && grad_in.size(3) == cp.out_w,
              "conv2d dgrad: grad has shape ", grad_in.sizes(), ", the forward's output was (",
              n, ", ", k, ", ", cp.out_h, ", ", cp.out_w, ")");
  TORCH_CHECK(dgrad_phases(cp) <= 65535,
              "conv2d dgrad on the cuda backend takes stride_h * stride_w up to 65535 (a grid "
              "slice per phase of the stride), got stride ", stride);
  const at::Tensor grad = channels_last(grad_in), weight = channels_last(weight_in);
  at::Tensor dx = at::empty({n, c, h, w},
                            grad.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (poison_outputs()) dx.fill_(NAN);
  cp.grad_out = grad.data_ptr();
  cp.weight = weight.data_ptr();
  if (dx.numel() > 0) {
    MatmulParams out = plain_output(dx.data_ptr(), n * h * w, c);
    out.n = cp.channels;  // one group's channels
    if (is_pointwise(cp)) {  // (N*H*W, K) grad times the (K, C) weight, both row-major
      launch_pointwise(out, {grad.data_ptr(), k, 1}, {weight.data_ptr(), c, 1}, k, grad);
    } else {
      const bool bf16 = grad.scalar_type() == at::kBFloat16;
      const HopperKernels* hopper = hopper_kernels();
      cudaError_t error = cudaSuccess;
      if (hopper == nullptr || !hopper->conv2d_dgrad(cp, out, bf16, stream_of(grad), &error)) {
        error = bf16 ? run_conv2d_dgrad_sm80_bf16(cp, out, stream_of(grad))
                     : run_conv2d_dgrad_sm80_fp16(cp, out, stream_of(grad));
      }
      TILESMITH_CHECK_LAUNCH(error);
    }
  }
  return want_channels_last ? dx : as_nchw(dx);
}

at::Tensor conv2d_wgrad_cuda(const at::Tensor& grad_in, const at::Tensor& x_in,
                             at::IntArrayRef weight_shape, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_operand(grad_in, "grad", grad_in);
  check_operand(x_in, "input", grad_in);
  TORCH_CHECK(weight_shape.size() == 4, "conv2d wgrad: weight_shape must have 4 entries, got ",
              weight_shape);
  c10::cuda::CUDAGuard guard(x_in.device());
  // c: the weight's input channels (per group).
  const int64_t k = weight_shape[0], c = weight_shape[1], r = weight_shape[2],
                s = weight_shape[3];
  if (is_depthwise(x_in.size(1), k, c)) {
    return depthwise_wgrad(grad_in, x_in, weight_shape, stride, padding, dilation);
  }
  ConvParams cp = geometry(x_in.size(0), x_in.size(1), x_in.size(2), x_in.size(3), k, c, r, s,
                           stride, padding, dilation);
  TORCH_CHECK(grad_in.size(0) == x_in.size(0) && grad_in.size(1) == k &&
                  grad_in.size(2) == cp.out_h && grad_in.size(3) == cp.out_w,
              "conv2d wgrad: grad has shape ", grad_in.sizes(), ", the forward's output was (",
              x_in.size(0), ", ", k, ", ", cp.out_h, ", ", cp.out_w, ")");
  const at::Tensor grad = channels_last(grad_in), x = channels_last(x_in);
  // Split the N*P*Q reduction when the weight alone gives too few blocks to fill the GPU,
  // or leaves a last wave mostly empty (wgrad_splits), each split at least 8 K slices of 64
  // pixels. Blocks per split and per SM as the kernels that will run have them: on Hopper's
  // wgmma kernels 128 x 256 tiles where the channels fill them and one block per SM (their
  // 161-193 KiB of shared memory), else 128 x 128 tiles, two blocks per SM where its shared
  // memory holds two (an H100's), else one (an A100's).
  const int64_t pixels = cp.batch * cp.out_h * cp.out_w;
  const bool wgmma = runs_hopper_kernels(x);
  const int64_t tile_n = wgmma && c >= 256 ? 256 : 128;
  const int64_t blocks = ((cp.filters + 127) / 128) * ((c + tile_n - 1) / tile_n) * r * s *
                         cp.groups;
  int64_t splits =
      wgrad_splits(pixels, blocks, (wgmma ? 1 : sm80_blocks_per_sm(x)) * multiprocessors(x),
                   8 * 64);
  cp.split_pixels = ((pixels + splits - 1) / splits + 63) / 64 * 64;
  splits = pixels > 0 ? (pixels + cp.split_pixels - 1) / cp.split_pixels : 1;
  at::Tensor partial = at::zeros({splits, k, r * s * c}, x.options().dtype(at::kFloat));
  cp.x = x.data_ptr();
  cp.grad_out = grad.data_ptr();
  if (pixels > 0 && partial.numel() > 0) {
    MatmulParams out = plain_output(partial.data_ptr(), cp.filters, c);  // one group's rows
    out.batch = splits;
    out.c_batch_stride = k * r * s * c;
    out.c_row_stride = r * s * c;
    out.out_fp32 = true;
    if (is_pointwise(cp)) {
      pointwise_wgrad(out, cp.split_pixels, pixels, grad, x);
    } else {
      const int split_count = static_cast<int>(splits);
      const bool bf16 = x.scalar_type() == at::kBFloat16;
      const HopperKernels* hopper = hopper_kernels();
      cudaError_t error = cudaSuccess;
      if (hopper == nullptr ||
          !hopper->conv2d_wgrad(cp, out, split_count, bf16, stream_of(x), &error)) {
        error = bf16 ? run_conv2d_wgrad_sm80_bf16(cp, out, split_count, stream_of(x))
                     : run_conv2d_wgrad_sm80_fp16(cp, out, split_count, stream_of(x));
      }
      TILESMITH_CHECK_LAUNCH(error);
    }
  }
  // Splits summed in a fixed order (deterministic); (K, R, S, C) seen as (K, C, R, S).
  return partial.sum(0).view({k, r, s, c}).permute({0, 3, 1, 2}).to(x.scalar_type());
}

}  // namespace tilesmith
