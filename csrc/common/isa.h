// The one vector instruction set the CPU kernels add to the portable build, and the one run-time check that
// chooses it. The build stays baseline x86-64; a kernel's AVX2 variant carries BIASFAST_AVX2 and runs only where
// use_avx2() holds. One level for every kernel (AVX2 with FMA and F16C, which every AVX2 CPU has), so no
// kernel carries its own feature test.
//
// BIASFAST_CPU_ISA=generic forces every kernel's portable variant (so tests and CI run the code that CPUs without
// AVX2 get), =avx2 requires the AVX2 one; unset or empty chooses by the CPU. It is read at each op call
// (select_cpu_isa at the op's CPU entry), so a process can switch between calls, and never within one: the
// kernels' inner chunks read the choice that entry made. Each op's last choice is kept for biasfast.info().
#pragma once

#include <atomic>
#include <cstdlib>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#define BIASFAST_HAVE_AVX2_BUILD 1
#define BIASFAST_AVX2 __attribute__((target("avx2,fma,f16c")))
// The same level without FMA, for float64 sums that must round every product as the portable code does: GCC
// contracts a · b + c (intrinsics included) into one FMA wherever FMA is enabled.
#define BIASFAST_AVX2_NO_FMA __attribute__((target("avx2,f16c")))
#endif

namespace biasfast {

// Whether this build has AVX2 variants and this CPU can run them.
inline bool cpu_supports_avx2() {
#ifdef BIASFAST_HAVE_AVX2_BUILD
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

// The variant BIASFAST_CPU_ISA asks for; std::invalid_argument naming the variable for a value it cannot honour.
inline bool avx2_requested() {
  const char* value = std::getenv("BIASFAST_CPU_ISA");
  if (value == nullptr || *value == '\0') return cpu_supports_avx2();
  const std::string isa(value);
  if (isa == "generic") return false;
  if (isa == "avx2") {
    if (!cpu_supports_avx2())
      throw std::invalid_argument(
          "BIASFAST_CPU_ISA=avx2, but this CPU (or this build) has no AVX2+FMA+F16C; unset BIASFAST_CPU_ISA or set "
          "it to 'generic'");
    return true;
  }
  throw std::invalid_argument("BIASFAST_CPU_ISA='" + isa +
                              "' is not a CPU kernel variant; expected 'generic' or 'avx2' (or unset: chosen by the CPU)");
}

// The variant the current op call chose (-1 before any call): written by select_cpu_isa, read by the kernels.
inline std::atomic<int>& avx2_choice() {
  static std::atomic<int> choice{-1};
  return choice;
}

// Each op's variant on its last CPU call, by op name (guarded by variants_mutex).
inline std::mutex& variants_mutex() {
  static std::mutex mutex;
  return mutex;
}
inline std::map<std::string, const char*>& variants_ran() {
  static std::map<std::string, const char*> ran;
  return ran;
}

// Called once at an op's CPU entry: reads BIASFAST_CPU_ISA now and records the variant this call runs.
// `has_avx2_variant` false for ops with one portable kernel (they always run "generic", and still check the value).
inline bool select_cpu_isa(const char* op, bool has_avx2_variant = true) {
  const bool avx2 = avx2_requested() && has_avx2_variant;
  if (has_avx2_variant) avx2_choice().store(avx2 ? 1 : 0, std::memory_order_relaxed);
  std::lock_guard<std::mutex> lock(variants_mutex());
  variants_ran()[op] = avx2 ? "avx2" : "generic";
  return avx2;
}

// Whether the CPU kernels run their AVX2 variant: the single point every kernel's inner code consults.
inline bool use_avx2() {
  int choice = avx2_choice().load(std::memory_order_relaxed);
  if (choice < 0) {
    choice = avx2_requested() ? 1 : 0;
    avx2_choice().store(choice, std::memory_order_relaxed);
  }
  return choice == 1;
}

// The AVX2 bodies that ran since the last take_avx2_bodies_ran(), by name ("knn/fused", "snr_loss", ...). Marked
// inside the branch that runs a body, not at the op's entry, so a test can tell the code that ran from the label
// select_cpu_isa writes: an op that stopped consulting use_avx2() would keep its label and lose its mark.
struct Avx2Bodies {
  std::mutex mutex;
  std::map<std::string, std::atomic<bool>> ran;  // map nodes never move, so a mark's reference stays valid
};
inline Avx2Bodies& avx2_bodies() {
  static Avx2Bodies bodies;
  return bodies;
}
inline std::atomic<bool>& avx2_body_mark(const char* body) {
  std::lock_guard<std::mutex> lock(avx2_bodies().mutex);
  return avx2_bodies().ran[body];
}
// The names marked since the last call, clearing them.
inline std::vector<std::string> take_avx2_bodies_ran() {
  std::lock_guard<std::mutex> lock(avx2_bodies().mutex);
  std::vector<std::string> names;
  for (auto& [name, ran] : avx2_bodies().ran)
    if (ran.exchange(false, std::memory_order_relaxed)) names.push_back(name);
  return names;
}

// The variant BIASFAST_CPU_ISA selects now, "avx2" or "generic" (reported by biasfast.info()).
inline const char* cpu_isa() { return avx2_requested() ? "avx2" : "generic"; }

}  // namespace biasfast

// Marks the AVX2 body `name` as run (one relaxed store; the lookup happens once per call site).
#define BIASFAST_MARK_AVX2_BODY(name)                                                              \
  do {                                                                                             \
    static std::atomic<bool>& biasfast_body_mark_ = ::biasfast::avx2_body_mark(name);              \
    biasfast_body_mark_.store(true, std::memory_order_relaxed);                                    \
  } while (0)
