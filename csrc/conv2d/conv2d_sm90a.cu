// tilesmith._C_sm90a's entries for the Hopper conv2d passes (common/hopper_kernels.h). They
// take every call the sm_80 kernels take (channels-last, 16-byte aligned operands, C and K
// per group multiples of 8), on a device of compute capability 9.0.
#include "../common/hopper_kernels.h"

namespace tilesmith {

bool run_conv2d_fwd_sm90a(const ConvParams& conv, const MatmulParams& out, bool bf16,
                          cudaStream_t stream, cudaError_t* error) {
  if (!current_device_is_sm90()) return false;
  *error = bf16 ? run_conv2d_fwd_sm90a_bf16(conv, out, stream)
                : run_conv2d_fwd_sm90a_fp16(conv, out, stream);
  return true;
}

bool run_conv2d_dgrad_sm90a(const ConvParams& conv, const MatmulParams& out, bool bf16,
                            cudaStream_t stream, cudaError_t* error) {
  if (!current_device_is_sm90()) return false;
  *error = bf16 ? run_conv2d_dgrad_sm90a_bf16(conv, out, stream)
                : run_conv2d_dgrad_sm90a_fp16(conv, out, stream);
  return true;
}

bool run_conv2d_wgrad_sm90a(const ConvParams& conv, const MatmulParams& out, int splits,
                            bool bf16, cudaStream_t stream, cudaError_t* error) {
  if (!current_device_is_sm90()) return false;
  *error = bf16 ? run_conv2d_wgrad_sm90a_bf16(conv, out, splits, stream)
                : run_conv2d_wgrad_sm90a_fp16(conv, out, splits, stream);
  return true;
}

}  // namespace tilesmith
