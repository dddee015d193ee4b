// Thin wrappers over the sm_90a warpgroup instructions the FP8 GEMM, the Hopper matmul
// (matmul/matmul_sm90a.cuh) and the Hopper attention forward are built from: wgmma
// (asynchronous warpgroup MMA reading its operands from shared memory through matrix
// descriptors, or A from registers), its fences, and the proxy fence that makes cp.async's
// shared-memory writes visible to it. sm_90a only: these do not exist on any other GPU.
//
// Under TILESMITH_CPU_EMULATION (tests/emulation/sm90a_emulator.h, included first) the
// wrappers come from the CPU emulator instead.
#pragma once

#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <type_traits>

#include "mma_sm80.cuh"

namespace tilesmith {

// A shared-memory matrix descriptor for an operand tile stored in the 128-byte swizzle:
// rows of 128 bytes, the 16-byte chunks of row r permuted by XOR with (r % 8), the pattern
// 1024-byte aligned (the tiles' bases are). The stride byte offset (between groups of 8
// rows) is 1024 bytes. For a K-major operand (rows along M or N, 128 bytes of K each) the
// leading byte offset is unused (16 bytes, i.e. 1, by convention) and K advances within the
// row by adding to the start address. For an MN-major operand (rows along K, 128 bytes of
// M or N each: 64 16-bit elements) it is the distance between such 64-wide column blocks,
// and K advances by whole rows (PTX ISA, "Matrix Descriptor Format" and the canonical
// layouts: MN-major 128B swizzle is ((T,8,m),(8,k)):((1,T,LBO),(8T,SBO))).
__device__ __forceinline__ uint64_t smem_descriptor_sw128(uint32_t shared_address,
                                                          uint32_t leading_byte_offset = 16) {
  uint64_t desc = (shared_address & 0x3FFFF) >> 4;                // bits 0-13: start / 16
  desc |= uint64_t{(leading_byte_offset & 0x3FFFF) >> 4} << 16;  // bits 16-29: LBO / 16
  desc |= uint64_t{1024 >> 4} << 32;                              // bits 32-45: SBO / 16
  desc |= uint64_t{1} << 62;  // bits 62-63: 1 = the 128-byte swizzle
  return desc;
}

// d (+)= A B for a 64xNx32 block (N = 128 or 256): A 64 rows x 32 K and B N rows x 32 K,
// both fp8, K-major, from shared memory. accumulate = 0 overwrites d. Each of the
// warpgroup's four warps holds 16 rows of d: d[4j + e] is row 16 warp + lane/4 + 8 (e/2),
// column 8j + 2 (lane % 4) + e % 2 (the mma.sync m16n8 accumulator layout, N/8 times across).
template <typename A, typename B>
__device__ __forceinline__ void wgmma_m64n128k32(float (&d)[64], uint64_t desc_a, uint64_t desc_b,
                                                 int accumulate);
template <typename A, typename B>
__device__ __forceinline__ void wgmma_m64n256k32(float (&d)[128], uint64_t desc_a,
                                                 uint64_t desc_b, int accumulate);

// d (+)= A B for a 64xNx16 block of 16-bit operands (T: __nv_bfloat16 or __half; N = 64,
// 128 or 256) from shared memory; kMnMajorA / kMnMajorB: A stored M-major / B N-major (the
// instruction's transpose immediates), else K-major. Accumulators as wgmma_m64n128k32's.
template <int kN, typename T, int kMnMajorA, int kMnMajorB>
__device__ __forceinline__ void wgmma_m64nk16(float (&d)[kN / 2], uint64_t desc_a,
                                              uint64_t desc_b, int accumulate);

// d (+)= A B for a 64xNx16 block (N = 64 or 128) whose A comes from registers: a[] holds
// this thread's share of its warp's 16 rows of A (rows 16 warp .. 16 warp + 15 of the
// warpgroup's 64) in the mma.sync m16n8k16 A layout: a[0] row lane / 4, k 2 (lane % 4) and
// + 1; a[1] the row 8 below; a[2] and a[3] the same at k + 8. That is, pair by pair, the
// accumulator layout above, so a product computed by one wgmma feeds the next without
// leaving registers. B from shared memory as in wgmma_m64nk16 (kMnMajorB: stored N-major).
// The registers of a are read asynchronously too: ptxas keeps them until the wgmma retires.
template <int kN, typename T, int kMnMajorB>
__device__ __forceinline__ void wgmma_m64nk16_a_registers(float (&d)[kN / 2],
                                                          const uint32_t (&a)[4],
                                                          uint64_t desc_b, int accumulate);

#ifndef TILESMITH_CPU_EMULATION
// The accumulator registers of m64n64 (32 per thread), m64n128 (64) and m64n256 (128) fp32
// wgmma, as the instruction's register list and the asm operands.
#define TILESMITH_WGMMA_REGISTERS_0_31 \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, " \
  "%12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, " \
  "%24, %25, %26, %27, %28, %29, %30, %31"
#define TILESMITH_WGMMA_REGISTERS_0_63 \
  TILESMITH_WGMMA_REGISTERS_0_31 ", %32, %33, %34, %35, " \
  "%36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, " \
  "%60, %61, %62, %63"
#define TILESMITH_WGMMA_REGISTERS_64_127 \
  "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, " \
  "%76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, " \
  "%88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, " \
  "%100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, " \
  "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, " \
  "%124, %125, %126, %127"
#define TILESMITH_WGMMA_D32_REGISTERS "{" TILESMITH_WGMMA_REGISTERS_0_31 "}"
#define TILESMITH_WGMMA_D64_REGISTERS "{" TILESMITH_WGMMA_REGISTERS_0_63 "}"
#define TILESMITH_WGMMA_D128_REGISTERS \
  "{" TILESMITH_WGMMA_REGISTERS_0_63 ", " TILESMITH_WGMMA_REGISTERS_64_127 "}"
#define TILESMITH_WGMMA_D32_OPERANDS(d) \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), \
  "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), \
  "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), \
  "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), \
  "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define TILESMITH_WGMMA_D64_OPERANDS(d) \
  TILESMITH_WGMMA_D32_OPERANDS(d), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), \
  "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), \
  "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), \
  "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
  "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), \
  "+f"(d[63])
#define TILESMITH_WGMMA_D128_OPERANDS(d) \
  TILESMITH_WGMMA_D64_OPERANDS(d), \
  "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), \
  "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), \
  "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), \
  "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), \
  "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), \
  "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), \
  "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), \
  "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), \
  "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), \
  "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), \
  "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])

// One specialisation per (n, a format, b format); the descriptors and the accumulate flag
// follow the accumulators in the operand numbering.
#define TILESMITH_WGMMA_FP8(n, regs, a_name, b_name, AType, BType, desc_a_op, desc_b_op, \
                            flag_op)                                                      \
  template <>                                                                              \
  __device__ __forceinline__ void wgmma_m64n##n##k32<AType, BType>(                        \
      float(&d)[n / 2], uint64_t desc_a, uint64_t desc_b, int accumulate) {                \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " flag_op ", 0;\n"                     \
                 "wgmma.mma_async.sync.aligned.m64n" #n "k32.f32." a_name "." b_name " "   \
                 TILESMITH_WGMMA_D##regs##_REGISTERS ", " desc_a_op ", " desc_b_op          \
                 ", p, 1, 1;\n}\n"                                                        \
                 : TILESMITH_WGMMA_D##regs##_OPERANDS(d)                                   \
                 : "l"(desc_a), "l"(desc_b), "r"(accumulate));                             \
  }
#define TILESMITH_WGMMA_FP8_PAIRS(n, regs, desc_a_op, desc_b_op, flag_op)                   \
  TILESMITH_WGMMA_FP8(n, regs, "e4m3", "e4m3", __nv_fp8_e4m3, __nv_fp8_e4m3, desc_a_op,     \
                      desc_b_op, flag_op)                                                  \
  TILESMITH_WGMMA_FP8(n, regs, "e4m3", "e5m2", __nv_fp8_e4m3, __nv_fp8_e5m2, desc_a_op,     \
                      desc_b_op, flag_op)                                                  \
  TILESMITH_WGMMA_FP8(n, regs, "e5m2", "e4m3", __nv_fp8_e5m2, __nv_fp8_e4m3, desc_a_op,     \
                      desc_b_op, flag_op)                                                  \
  TILESMITH_WGMMA_FP8(n, regs, "e5m2", "e5m2", __nv_fp8_e5m2, __nv_fp8_e5m2, desc_a_op,     \
                      desc_b_op, flag_op)
TILESMITH_WGMMA_FP8_PAIRS(128, 64, "%64", "%65", "%66")
TILESMITH_WGMMA_FP8_PAIRS(256, 128, "%128", "%129", "%130")
#undef TILESMITH_WGMMA_FP8_PAIRS
#undef TILESMITH_WGMMA_FP8

// The 16-bit form: the transpose immediates follow the accumulate flag.
#define TILESMITH_WGMMA_K16(n, regs, type_name, desc_a_op, desc_b_op, flag_op, tnsp_a_op,    \
                            tnsp_b_op)                                                      \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " flag_op ", 0;\n"                         \
               "wgmma.mma_async.sync.aligned.m64n" #n "k16.f32." type_name "." type_name " " \
               TILESMITH_WGMMA_D##regs##_REGISTERS ", " desc_a_op ", " desc_b_op ", p, 1, 1, " \
               tnsp_a_op ", " tnsp_b_op ";\n}\n"                                           \
               : TILESMITH_WGMMA_D##regs##_OPERANDS(d)                                     \
               : "l"(desc_a), "l"(desc_b), "r"(accumulate), "n"(kMnMajorA), "n"(kMnMajorB))
template <int kN, typename T, int kMnMajorA, int kMnMajorB>
__device__ __forceinline__ void wgmma_m64nk16(float (&d)[kN / 2], uint64_t desc_a,
                                              uint64_t desc_b, int accumulate) {
  static_assert(kN == 64 || kN == 128 || kN == 256, "wgmma widths wrapped: 64, 128, 256");
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  static_assert(kBf16 || std::is_same_v<T, __half>, "16-bit wgmma: bf16 or fp16 operands");
  if constexpr (kN == 64 && kBf16) {
    TILESMITH_WGMMA_K16(64, 32, "bf16", "%32", "%33", "%34", "%35", "%36");
  } else if constexpr (kN == 64) {
    TILESMITH_WGMMA_K16(64, 32, "f16", "%32", "%33", "%34", "%35", "%36");
  } else if constexpr (kN == 128 && kBf16) {
    TILESMITH_WGMMA_K16(128, 64, "bf16", "%64", "%65", "%66", "%67", "%68");
  } else if constexpr (kN == 128) {
    TILESMITH_WGMMA_K16(128, 64, "f16", "%64", "%65", "%66", "%67", "%68");
  } else if constexpr (kBf16) {
    TILESMITH_WGMMA_K16(256, 128, "bf16", "%128", "%129", "%130", "%131", "%132");
  } else {
    TILESMITH_WGMMA_K16(256, 128, "f16", "%128", "%129", "%130", "%131", "%132");
  }
}
#undef TILESMITH_WGMMA_K16

// A from registers: the four A registers follow the accumulators, then B's descriptor, the
// accumulate flag and B's transpose immediate (there is none for A).
#define TILESMITH_WGMMA_K16_A_REGISTERS(n, regs, type_name, a_ops, desc_b_op, flag_op,        \
                                        tnsp_b_op)                                           \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " flag_op ", 0;\n"                          \
               "wgmma.mma_async.sync.aligned.m64n" #n "k16.f32." type_name "." type_name " " \
               TILESMITH_WGMMA_D##regs##_REGISTERS ", {" a_ops "}, " desc_b_op ", p, 1, 1, "  \
               tnsp_b_op ";\n}\n"                                                          \
               : TILESMITH_WGMMA_D##regs##_OPERANDS(d)                                     \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate),   \
                 "n"(kMnMajorB))
template <int kN, typename T, int kMnMajorB>
__device__ __forceinline__ void wgmma_m64nk16_a_registers(float (&d)[kN / 2],
                                                          const uint32_t (&a)[4],
                                                          uint64_t desc_b, int accumulate) {
  static_assert(kN == 64 || kN == 128, "wrapped for 64- and 128-wide tiles");
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  static_assert(kBf16 || std::is_same_v<T, __half>, "16-bit wgmma: bf16 or fp16 operands");
  if constexpr (kN == 64 && kBf16) {
    TILESMITH_WGMMA_K16_A_REGISTERS(64, 32, "bf16", "%32, %33, %34, %35", "%36", "%37", "%38");
  } else if constexpr (kN == 64) {
    TILESMITH_WGMMA_K16_A_REGISTERS(64, 32, "f16", "%32, %33, %34, %35", "%36", "%37", "%38");
  } else if constexpr (kBf16) {
    TILESMITH_WGMMA_K16_A_REGISTERS(128, 64, "bf16", "%64, %65, %66, %67", "%68", "%69", "%70");
  } else {
    TILESMITH_WGMMA_K16_A_REGISTERS(128, 64, "f16", "%64, %65, %66, %67", "%68", "%69", "%70");
  }
}
#undef TILESMITH_WGMMA_K16_A_REGISTERS

// Orders this thread's register accesses to the accumulators before the next wgmma.
__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}
// Pins registers at this point of the PTX: the compiler front end may compute their values
// no later and read them no earlier (an empty asm statement that reads and rewrites each).
// wgmma's accumulators are outputs of its asm statement, which the front end believes final
// when the statement ends, though the tensor cores write them until wgmma_wait: fencing them
// after the wait keeps their reads after it. Fencing values before a wait keeps the work
// that makes them ahead of it in the PTX. ptxas schedules the SASS itself (it knows wgmma's
// register semantics, and may still move a wait earlier).
template <int kCount>
__device__ __forceinline__ void fence_registers(float (&registers)[kCount]) {
#pragma unroll
  for (int i = 0; i < kCount; ++i) asm volatile("" : "+f"(registers[i])::"memory");
}
// cp.async writes shared memory through the generic proxy, wgmma reads it through the async
// proxy: each thread fences its landed copies before the barrier that precedes the wgmma.
__device__ __forceinline__ void fence_proxy_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
#endif  // TILESMITH_CPU_EMULATION

// m64nNk32 for a kernel templated on its tile width N.
template <int kN, typename A, typename B>
__device__ __forceinline__ void wgmma_m64nk32(float (&d)[kN / 2], uint64_t desc_a,
                                              uint64_t desc_b, int accumulate) {
  static_assert(kN == 128 || kN == 256, "wgmma tile widths wrapped here: 128 and 256");
  if constexpr (kN == 128) {
    wgmma_m64n128k32<A, B>(d, desc_a, desc_b, accumulate);
  } else {
    wgmma_m64n256k32<A, B>(d, desc_a, desc_b, accumulate);
  }
}

}  // namespace tilesmith
