// The kernels of tilesmith._C_sm90a (compiled for sm_90a only) that tilesmith._C's ops run on
// a GPU of compute capability 9.0: the wgmma matmul/gemm, conv2d (forward, dgrad and wgrad)
// and attention (forward and backward). The two extensions are separate shared libraries, so
// _C reaches them through this table of function pointers: tilesmith._C_sm90a exports it as
// the capsule `hopper_kernels`, and backend.py hands that to tilesmith._C._set_hopper_kernels
// (None: the sm_80 kernels everywhere). Each entry launches and returns true, storing the
// launch's error code in *error, where its kernels take the call on the current device;
// otherwise it returns false having launched nothing, and the caller runs its sm_80 kernel.
#pragma once

#include <cuda_runtime.h>

#include "../attention/attention.h"
#include "../conv2d/conv2d.h"
#include "../matmul/matmul.h"

namespace tilesmith {

struct HopperKernels {
  bool (*matmul)(const MatmulParams& params, bool bf16, cudaStream_t stream,
                 cudaError_t* error);
  bool (*conv2d_fwd)(const ConvParams& conv, const MatmulParams& out, bool bf16,
                     cudaStream_t stream, cudaError_t* error);
  bool (*conv2d_dgrad)(const ConvParams& conv, const MatmulParams& out, bool bf16,
                       cudaStream_t stream, cudaError_t* error);
  bool (*conv2d_wgrad)(const ConvParams& conv, const MatmulParams& out, int splits, bool bf16,
                       cudaStream_t stream, cudaError_t* error);
  bool (*attention_fwd)(const AttentionParams& params, bool causal, bool bf16,
                        cudaStream_t stream, cudaError_t* error);
  bool (*attention_bwd)(const AttentionParams& params, bool causal, bool bf16,
                        cudaStream_t stream, cudaError_t* error);
};

// In tilesmith._C (registration.cpp): the table in use, or nullptr.
const HopperKernels* hopper_kernels();
void set_hopper_kernels(const HopperKernels* kernels);

// In tilesmith._C_sm90a: the entries, and whether the current device runs sm_90a code.
bool run_matmul_sm90a(const MatmulParams& params, bool bf16, cudaStream_t stream,
                      cudaError_t* error);
bool run_conv2d_fwd_sm90a(const ConvParams& conv, const MatmulParams& out, bool bf16,
                          cudaStream_t stream, cudaError_t* error);
bool run_conv2d_dgrad_sm90a(const ConvParams& conv, const MatmulParams& out, bool bf16,
                            cudaStream_t stream, cudaError_t* error);
bool run_conv2d_wgrad_sm90a(const ConvParams& conv, const MatmulParams& out, int splits,
                            bool bf16, cudaStream_t stream, cudaError_t* error);
bool run_attention_fwd_sm90a(const AttentionParams& params, bool causal, bool bf16,
                             cudaStream_t stream, cudaError_t* error);
bool run_attention_bwd_sm90a(const AttentionParams& params, bool causal, bool bf16,
                             cudaStream_t stream, cudaError_t* error);
bool current_device_is_sm90();

// Whether matmul/gemm (matmul_tma_sm90a.cuh), scaled_gemm and the attention forward
// (attention_fwd_tma_sm90a.cuh) take their TMA kernels where the TMA can read the operands
// (the default), or their cp.async ones; process-wide, for tests and benchmarks of the
// latter (backend.hopper_kernels(tma=False)).
void set_tma_kernels(bool enabled);
bool tma_kernels();

}  // namespace tilesmith
