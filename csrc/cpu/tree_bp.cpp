// biasfast::tree_bp on the CPU: exact belief propagation on the hierarchical model's binary tree.
// One SIMD lane per sequence (8 floats / 4 doubles per AVX2 register): every message of a group of sequences
// stays in L1, the grammar is walked as its non-zero rules, messages are renormalised at every node and the
// normalisers kept as mantissa·2^exponent. Sequences whose messages leave linear-space range (evidence so peaked
// that a normaliser falls below ~1e-30 in float) are recomputed exactly in log space.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/isa.h"
#include "cpu/tree_bp_plan.h"

// The lane types are 32-byte vectors also in the portable build; they never cross an ABI boundary.
#pragma GCC diagnostic ignored "-Wpsabi"
#include "cpu/tree_bp_lanes.h"

namespace biasfast::tree_bp_detail {
namespace {

// One entry per instruction set; each gets its own copy of the force-inlined lane code (tree_bp_lanes.h).
template <typename T>
void run_range_portable(const Plan<T>& plan, const T* evidence, const T* scale, T* out, T* log_z, int64_t batch,
                        int64_t begin, int64_t end) {
  Lanes<T>::run_range(plan, evidence, scale, out, log_z, batch, begin, end);
}

#ifdef BIASFAST_HAVE_AVX2_BUILD
template <typename T>
BIASFAST_AVX2 void run_range_avx2(const Plan<T>& plan, const T* evidence, const T* scale, T* out, T* log_z,
                                  int64_t batch, int64_t begin, int64_t end) {
  Lanes<T>::run_range(plan, evidence, scale, out, log_z, batch, begin, end);
}
#endif

template <typename T>
void run(const Plan<T>& plan, const T* evidence, const T* scale, T* out, T* log_z, int64_t batch) {
  constexpr int64_t lanes = Lanes<T>::W;
  const int64_t groups = (batch + lanes - 1) / lanes;
  const bool avx2 = use_avx2();
  at::parallel_for(0, groups, 16, [&](int64_t g0, int64_t g1) {
    const int64_t begin = g0 * lanes, end = std::min(batch, g1 * lanes);
#ifdef BIASFAST_HAVE_AVX2_BUILD
    if (avx2) {
      BIASFAST_MARK_AVX2_BODY("tree_bp");
      return run_range_avx2(plan, evidence, scale, out, log_z, batch, begin, end);
    }
#endif
    run_range_portable(plan, evidence, scale, out, log_z, batch, begin, end);
  });
  (void)avx2;
}

bool is_power_of_two(int64_t n) { return n >= 1 && (n & (n - 1)) == 0; }

std::tuple<at::Tensor, at::Tensor> tree_bp_cpu(const at::Tensor& evidence, const at::Tensor& scale,
                                               const at::Tensor& grammar, const at::Tensor& top) {
  select_cpu_isa("tree_bp");
  BIASFAST_CHECK_ARG(evidence.dim() == 3, "evidence", "expected a (batch, leaves, q) tensor, got shape ",
                     evidence.sizes());
  const int64_t batch = evidence.size(0), leaves = evidence.size(1), q = evidence.size(2);
  BIASFAST_CHECK_ARG(leaves >= 2 && is_power_of_two(leaves), "evidence", "the number of leaves must be a power of two >= 2, got ", leaves);
  BIASFAST_CHECK_ARG(q >= 1, "evidence", "needs at least one symbol");
  BIASFAST_CHECK_ARG(scale.dim() == 1 && scale.size(0) == batch, "scale", "expected shape (", batch, "), got ",
                     scale.sizes());
  BIASFAST_CHECK_ARG(grammar.dim() == 3 && grammar.size(0) == q && grammar.size(1) == q && grammar.size(2) == q,
                     "grammar", "expected shape (", q, ", ", q, ", ", q, "), got ", grammar.sizes());
  BIASFAST_CHECK_ARG(top.dim() == 3 && is_power_of_two(top.size(0)) && top.size(0) <= leaves && top.size(1) == q &&
                         top.size(2) == q,
                     "top", "expected shape (2^k, ", q, ", ", q, ") with 2^k <= ", leaves, ", got ", top.sizes());
  for (const auto& [t, name] : {std::pair{&evidence, "evidence"}, {&scale, "scale"}, {&grammar, "grammar"}, {&top, "top"}})
    BIASFAST_CHECK_ARG(at::isFloatingType(t->scalar_type()), name, "expected a floating dtype, got ", t->scalar_type());
  const auto dtype = accumulate_dtype(evidence.scalar_type());
  at::Tensor ev = evidence.to(dtype).contiguous(), sc = scale.to(dtype).contiguous();
  at::Tensor gr = grammar.to(dtype).contiguous(), tp = top.to(dtype).contiguous();
  at::Tensor out = at::empty({batch, leaves, q}, evidence.options().dtype(dtype));
  at::Tensor log_z = at::empty({batch}, evidence.options().dtype(dtype));
  if (batch == 0) return {out, log_z};
  AT_DISPATCH_FLOATING_TYPES(dtype, "tree_bp_cpu", [&] {
    Plan<scalar_t> plan(gr.data_ptr<scalar_t>(), tp.data_ptr<scalar_t>(), int(q), int(leaves), int(top.size(0)));
    run<scalar_t>(plan, ev.data_ptr<scalar_t>(), sc.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                  log_z.data_ptr<scalar_t>(), batch);
  });
  return {out, log_z};
}

}  // namespace

TORCH_LIBRARY_IMPL(biasfast, CPU, m) {
  m.impl("tree_bp", &tree_bp_cpu);
}

}  // namespace biasfast::tree_bp_detail
