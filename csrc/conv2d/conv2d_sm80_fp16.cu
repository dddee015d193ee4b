// One dtype per file: forward, dgrad and wgrad (implicit GEMM and depthwise) compile in
// parallel with the other dtype's.
#include "conv2d_sm80.cuh"
#include "depthwise.cuh"

namespace tilesmith {
cudaError_t run_conv2d_fwd_sm80_fp16(const ConvParams& conv, const MatmulParams& out,
                                     cudaStream_t stream) {
  return conv2d_sm80::run_fwd<__half>(conv, out, stream);
}
cudaError_t run_conv2d_dgrad_sm80_fp16(const ConvParams& conv, const MatmulParams& out,
                                       cudaStream_t stream) {
  return conv2d_sm80::run_dgrad<__half>(conv, out, stream);
}
cudaError_t run_conv2d_wgrad_sm80_fp16(const ConvParams& conv, const MatmulParams& out,
                                       int splits, cudaStream_t stream) {
  return conv2d_sm80::run_wgrad<__half>(conv, out, splits, stream);
}
cudaError_t run_depthwise_fwd_fp16(const DepthwiseParams& p, cudaStream_t stream) {
  return depthwise::run_fwd<__half>(p, stream);
}
cudaError_t run_depthwise_dgrad_fp16(const DepthwiseParams& p, cudaStream_t stream) {
  return depthwise::run_dgrad<__half>(p, stream);
}
cudaError_t run_depthwise_wgrad_fp16(const DepthwiseParams& p, int splits, cudaStream_t stream) {
  return depthwise::run_wgrad<__half>(p, splits, stream);
}
}  // namespace tilesmith
