"""Tiled matmul, c[z] = a[z] @ b[z], fp32 accumulation (fp64 for fp64 inputs).

Any strides: Triton specialises a stride equal to 1, so a transposed view gets the loads of
its own layout without a copy. Program ids are grouped (GROUP_M block rows walk together) so
that the B tiles neighbouring programs share are still in L2. The tile loop and the program
order are helpers that kernels/gemm.py shares.
"""

import os

import triton
import triton.language as tl

from ._common import spilled_program_id, to_output

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _config(block_m, block_n, block_k, stages, warps, group_m=8):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k,
                          "GROUP_M": group_m}, num_stages=stages, num_warps=warps)


# The autotune space on a GPU. Every entry is checked for correctness on its own (tests:
# test_every_autotune_config_is_correct), not only the ones autotuning happens to pick.
GPU_CONFIGS = [
    # Large squares.
    _config(128, 256, 64, 3, 8),
    _config(256, 128, 64, 3, 8),
    _config(128, 128, 64, 4, 4),
    _config(128, 128, 64, 3, 8),
    _config(128, 64, 64, 4, 4),
    _config(64, 128, 64, 4, 4),
    _config(128, 128, 32, 4, 4),
    # Skinny M (decode-like LLM shapes, M = 16..64): long K slices, narrow rows.
    _config(16, 128, 128, 4, 4),
    _config(32, 128, 128, 4, 4),
    _config(64, 64, 128, 4, 4),
    _config(64, 256, 64, 3, 8),
]


def matmul_configs():
    """The configs the autotuner chooses from. TILESMITH_TRITON_AUTOTUNE=first takes only
    the first general-purpose one: the GPU test run uses it so that hundreds of
    (dtype x layout x config) compilations do not eat its time budget."""
    if INTERPRETING:
        # The interpreter costs ~1 ms per program instance and times nothing: one small
        # tile keeps CPU tests quick and still exercises every edge mask.
        return [_config(32, 32, 32, 1, 4)]
    if os.environ.get("TILESMITH_TRITON_AUTOTUNE", "full") == "first":
        return [GPU_CONFIGS[2]]
    return GPU_CONFIGS


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 GROUP_M: tl.constexpr):
    """(row tile, column tile) of program ``pid``: GROUP_M row tiles walk together so the
    B tiles neighbouring programs share are still in L2."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    programs_per_group = GROUP_M * tiles_n
    group = pid // programs_per_group
    first_m = group * GROUP_M
    group_rows = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % programs_per_group) % group_rows
    pid_n = (pid % programs_per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def accumulate_tile(a_ptr, b_ptr, offs_m, offs_n, M, N, K, stride_am, stride_ak, stride_bk,
                    stride_bn, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                    ACC_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    """sum over k of a[offs_m, k] * b[k, offs_n], in ACC_DTYPE; out-of-range rows, columns
    and k contribute zeros. (a_ptr, b_ptr already point at this batch's matrices.)"""
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        k_left = K - k0
        a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & (offs_n[None, :] < N), other=0.0)
        if UPCAST:
            a = a.to(ACC_DTYPE)
            b = b.to(ACC_DTYPE)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.autotune(configs=matmul_configs(), key=["M", "N", "K", "A_K_UNIT", "B_N_UNIT"])
@triton.jit
def matmul_kernel(
    a_ptr, b_ptr, c_ptr,
    M, N, K, batch,
    stride_az, stride_am, stride_ak,
    stride_bz, stride_bk, stride_bn,
    stride_cz, stride_cm, stride_cn,
    A_K_UNIT: tl.constexpr,  # a's k stride is 1 (part of the autotune key: layout matters)
    B_N_UNIT: tl.constexpr,  # b's n stride is 1
    UPCAST: tl.constexpr,  # load-then-cast to fp32: the interpreter cannot compute in bf16
    INPUT_PRECISION: tl.constexpr,  # "ieee" or "tf32" for fp32 inputs
    ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    z = spilled_program_id()  # the batch entry: grid axes 1 and 2 (spill_grid)
    if z >= batch:
        return
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    # 64-bit row/column offsets: m * stride_am overflows int32 past 2**31 elements.
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = accumulate_tile(a_ptr + z * stride_az, b_ptr + z * stride_bz, offs_m, offs_n, M, N, K,
                          stride_am, stride_ak, stride_bk, stride_bn, UPCAST, INPUT_PRECISION,
                          ACC_DTYPE, BLOCK_M, BLOCK_N, BLOCK_K)
    c_ptrs = c_ptr + z * stride_cz + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, to_output(acc, c_ptr, UPCAST),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))
