// The one vector instruction set the CPU kernels add to the portable build, and the one run-time check that
// chooses it. The build stays baseline x86-64; a kernel's AVX2 variant carries BIASFAST_AVX2 and runs only where
// cpu_has_avx2() holds. One level for every kernel (AVX2 with FMA and F16C, which every AVX2 CPU has), so no
// kernel carries its own feature test.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#define BIASFAST_HAVE_AVX2_BUILD 1
#define BIASFAST_AVX2 __attribute__((target("avx2,fma,f16c")))
// The same level without FMA, for float64 sums that must round every product as the portable code does: GCC
// contracts a · b + c (intrinsics included) into one FMA wherever FMA is enabled.
#define BIASFAST_AVX2_NO_FMA __attribute__((target("avx2,f16c")))

namespace biasfast {

inline bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
  return has;
}

}  // namespace biasfast
#endif
