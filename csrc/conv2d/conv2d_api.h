#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>

namespace tilesmith {

// conv2d on fp16/bf16 CUDA tensors whose channel and filter counts per group are multiples
// of 8 (the groups are read off the weight's shape), or depthwise (one filter per channel,
// channels a multiple of 8: direct kernels). Inputs in either memory format (NCHW ones are
// copied to channels-last, the layout the kernels read); outputs in the input's memory
// format. out = act(conv + bias + residual), residual (optional) shaped like out, in x's
// dtype. Returns (out, pre-activation), the latter empty unless save_pre.
std::tuple<at::Tensor, at::Tensor> conv2d_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                   const std::optional<at::Tensor>& bias,
                                                   const std::optional<at::Tensor>& residual,
                                                   at::IntArrayRef stride,
                                                   at::IntArrayRef padding,
                                                   at::IntArrayRef dilation,
                                                   c10::string_view activation, bool save_pre);

// The input gradient, (N, C, H, W) in channels-last or NCHW as asked.
at::Tensor conv2d_dgrad_cuda(const at::Tensor& grad, const at::Tensor& weight,
                             at::IntArrayRef input_shape, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation,
                             bool channels_last);

// The weight gradient (K, C, R, S) with channels-last strides, summed in fp32.
at::Tensor conv2d_wgrad_cuda(const at::Tensor& grad, const at::Tensor& x,
                             at::IntArrayRef weight_shape, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation);

}  // namespace tilesmith
