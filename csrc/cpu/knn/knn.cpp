// Exact k-nearest neighbours on the CPU.
//
// Candidates come from tiled inner products (‖y'‖² − 2·x'·y' on transformed float32 rows, never an nq × nr
// matrix), kept in a running top-(k + margin) heap per query. They are then re-ranked with direct differences
// accumulated in float64 on the original inputs, and each query's answer is *certified*: the worst candidate's
// approximate distance, minus a rigorous bound on the inner-product rounding error, must exceed the k-th exact
// distance. Queries that fail (genuine near-ties at the rounding scale, groups of duplicates) are searched again
// with four times the candidates, round after round, and by brute force with exact differences once the wider
// heaps would outgrow the workspace, so results always equal a float64 brute force up to ties.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "cpu/knn/common.h"
#include "cpu/knn/fused.h"
#include "cpu/knn/gemm.h"
#include "cpu/knn/packed.h"
#include "cpu/knn/rows.h"

namespace biasfast {
namespace {

// Per-row affine transform of a metric: row' = (row − shift_row − center) · scale_row, in float64.
// The exact distances divide by the norm (correctly rounded, so parallel rows normalise identically).
struct RowTransform {
  double shift = 0.0;
  double norm = 1.0;
  double scale = 1.0;  // 1 / norm, for the approximate candidates
};

template <typename ref_t>
struct StridedRows {
  const ref_t* data;
  int64_t rows, d, s0, s1;

  void read(int64_t row, double* out) const {
    const ref_t* p = data + row * s0;
    if (s1 == 1) {
      for (int64_t t = 0; t < d; ++t) out[t] = static_cast<double>(p[t]);
    } else {
      for (int64_t t = 0; t < d; ++t) out[t] = static_cast<double>(p[t * s1]);
    }
  }
};

// Shift/scale of one row for the metric; false where it is undefined (a zero or constant row).
template <typename row_t>
bool try_row_transform(const row_t* row, int64_t d, Metric metric, RowTransform* tr) {
  *tr = RowTransform{};
  if (metric == Metric::SqEuclidean || metric == Metric::L2) return true;
  if (metric == Metric::Pearson) tr->shift = row_sum(row, d) / static_cast<double>(d);
  const double ss = row_sum_of_squares(row, tr->shift, d);
  if (!(ss > 0)) return false;
  tr->norm = std::sqrt(ss);
  tr->scale = 1.0 / tr->norm;
  return true;
}

// Shift/scale of one row for the metric; throws (naming the tensor and global row) where undefined.
RowTransform row_transform(const double* row, int64_t d, Metric metric, const char* name, int64_t global_row) {
  RowTransform tr;
  BIASFAST_CHECK_ARG(try_row_transform(row, d, metric, &tr), name, "row ", global_row,
                     metric == Metric::Pearson ? " is constant: its pearson distance is undefined"
                                               : " has zero norm: its cosine distance is undefined");
  return tr;
}

int64_t first_non_finite_row(const double* rows, int64_t n, int64_t d) {
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t t = 0; t < d; ++t) {
      if (!std::isfinite(rows[i * d + t])) return i;
    }
  }
  return -1;
}

// Σ diff(t)² over t < d in float64, in four interleaved partial sums (vectorised; no single latency chain).
template <typename Diff>
inline double sum_of_squares(int64_t d, Diff diff) {
  double acc[4] = {0, 0, 0, 0};
  int64_t t = 0;
  for (; t + 4 <= d; t += 4) {
    for (int u = 0; u < 4; ++u) {
      const double v = diff(t + u);
      acc[u] += v * v;
    }
  }
  for (; t < d; ++t) {
    const double v = diff(t);
    acc[0] += v * v;
  }
  return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

// Exact distance (in transformed squared-L2 units) between two rows given in float64.
inline double exact_distance(const double* x, const RowTransform& tx, const double* y, const RowTransform& ty,
                             int64_t d) {
  if (tx.shift == 0.0 && ty.shift == 0.0 && tx.norm == 1.0 && ty.norm == 1.0)
    return sum_of_squares(d, [&](int64_t t) { return x[t] - y[t]; });
  return sum_of_squares(d, [&](int64_t t) { return (x[t] - tx.shift) / tx.norm - (y[t] - ty.shift) / ty.norm; });
}

template <typename scalar_t, typename ref_t>
class ExactSearch {
 public:
  // What a recheck of some queries of an earlier search carries over. Same center, so the rows transform (and
  // round) exactly as they did there; limits: per query, the approximate value ‖y'‖² − 2·x'·y' above which a
  // reference cannot be among its k nearest (from the earlier exact k-th distance).
  struct Recheck {
    int64_t candidates = 0;     // heap capacity; 0: a first pass, k + max(8, k / 4)
    std::vector<int64_t> ids;   // each query's row in the caller's query set, for exclude_self (empty: identity)
    std::vector<double> limits, center;
  };

  ExactSearch(const at::Tensor& query, const at::Tensor& ref, int64_t k, Metric metric, int64_t offset,
              bool exclude_self, int64_t workspace_bytes, Recheck recheck = {})
      : nq_(query.size(0)), d_(query.size(1)), k_(k), metric_(metric), offset_(offset), exclude_self_(exclude_self),
        workspace_bytes_(workspace_bytes),
        ref_{ref.data_ptr<ref_t>(), ref.size(0), ref.size(1), ref.stride(0), ref.stride(1)},
        query_in_(query), ref_in_(ref), recheck_(std::move(recheck)) {
    // Exact in float64, and our own copy: for cosine / pearson prepare_queries transforms it in place.
    query_ = query.to(at::kDouble, /*non_blocking=*/false, /*copy=*/true, at::MemoryFormat::Contiguous);
    const int64_t first_pass = k_ + std::max<int64_t>(8, k_ / 4);
    candidates_ = std::min<int64_t>(recheck_.candidates > 0 ? recheck_.candidates : first_pass, ref_.rows);
    // The float32 kernels pack through pack_ref_panels, which also records the references' transforms.
    direct_rows_ = std::is_same_v<scalar_t, float> && std::is_same_v<ref_t, float> && ref_.s1 == 1 &&
                   cpu_has_avx2_fma();
    if (direct_rows_ && !is_l2()) ref_tr_.resize(ref_.rows);
  }

  std::tuple<at::Tensor, at::Tensor> run() {
    search();
    return finish();
  }

 private:
  // Exact squared (transformed) distances and indices of every query in dist_ / index_.
  void search() {
    prepare_queries();
    scan();
    const auto failed = rerank_and_certify();
    if (failed.empty()) return;
    // Queries whose k-th neighbour is within rounding of their worst candidate (groups of near-duplicates, ties)
    // are searched again by the same kernels, collecting every reference that could still beat their k-th exact
    // distance into heaps four times wider (round after round while a range overflows them): far cheaper than
    // brute force, which is left for when the wider heaps would not fit the workspace.
    const int64_t wider = std::min(ref_.rows, 4 * candidates_);
    const int64_t heap_bytes = static_cast<int64_t>(failed.size()) * wider * at::get_num_threads() *
                               static_cast<int64_t>(sizeof(Entry<scalar_t>));  // every lane's heaps
    if (wider > candidates_ && heap_bytes <= workspace_bytes_) recheck(failed, wider); else brute_force(failed);
  }

  void recheck(const std::vector<int64_t>& failed, int64_t candidates) {
    Recheck next{candidates, {}, {}, center_};
    for (const int64_t i : failed) {
      next.ids.push_back(query_id(i));
      // A reference whose approximate value reaches this is farther than the k-th exact distance found here.
      const double kth = dist_.data_ptr<double>()[i * k_ + k_ - 1];
      next.limits.push_back(kth - qnorm_[i] + 2 * rounding_bound(i));
    }
    const at::Tensor rows = at::tensor(failed, at::kLong);
    ExactSearch sub(query_in_.index_select(0, rows), ref_in_, k_, metric_, offset_, exclude_self_, workspace_bytes_,
                    std::move(next));
    sub.search();
    dist_.index_copy_(0, rows, sub.dist_);
    index_.index_copy_(0, rows, sub.index_);
  }

  // Rigorous bound on the rounding error of query i's approximate distances (‖x'‖² + ‖y'‖² − 2·x'·y' against the
  // exact distance of the untransformed rows); valid once the scan has measured max_ref_norm_.
  double rounding_bound(int64_t i) const {
    const double u = std::numeric_limits<scalar_t>::epsilon() / 2;
    const double n = static_cast<double>(d_ + 8);
    const double gamma = 1.01 * (n * u / (1 - n * u) + 8 * u);
    return gamma * std::pow(std::sqrt(qnorm_[i]) + max_ref_norm_, 2);
  }

  // The heap limit of query i, rounded up to the heap's precision (a value that rounds down could wrongly skip).
  scalar_t heap_limit(int64_t i) const {
    if (recheck_.limits.empty()) return std::numeric_limits<scalar_t>::infinity();
    const double limit = recheck_.limits[i];
    scalar_t rounded = static_cast<scalar_t>(limit);
    if (static_cast<double>(rounded) < limit) {
      rounded = std::nextafter(rounded, std::numeric_limits<scalar_t>::infinity());
    }
    return rounded;
  }

  const double* qrow(int64_t i) const { return query_.data_ptr<double>() + i * d_; }
  bool is_l2() const { return metric_ == Metric::SqEuclidean || metric_ == Metric::L2; }
  int64_t query_id(int64_t i) const { return recheck_.ids.empty() ? i : recheck_.ids[i]; }
  int64_t self_index(int64_t i) const { return exclude_self_ ? query_id(i) : -1; }

  void prepare_queries() {
    double* qm = query_.data_ptr<double>();  // our own copy (the constructor's)
    const double* q = qm;
    const int64_t bad = first_bad_query([&](int64_t i) { return first_non_finite_row(q + i * d_, 1, d_) == 0; });
    BIASFAST_CHECK_ARG(bad < 0, "query", "contains NaN or Inf (first bad row ", bad, ")");
    center_.assign(d_, 0.0);
    if (!recheck_.center.empty()) {
      center_ = recheck_.center;
    } else if (metric_ == Metric::SqEuclidean || metric_ == Metric::L2) {
      // Centering by the query mean removes a common offset before the inner products (no cancellation).
      // Parallel over features; each column is summed in query order.
      at::parallel_for(0, d_, 64, [&](int64_t t0, int64_t t1) {
        for (int64_t i = 0; i < nq_; ++i)
          for (int64_t t = t0; t < t1; ++t) center_[t] += q[i * d_ + t];
      });
      for (auto& c : center_) c /= static_cast<double>(nq_);
    }
    qtr_.resize(nq_);
    qpacked_ = at::empty({nq_, d_}, at::CppTypeToScalarType<scalar_t>::value);
    qnorm_.resize(nq_);
    scalar_t* out = qpacked_.data_ptr<scalar_t>();
    const int64_t undefined = first_bad_query([&](int64_t i) {
      if (!try_row_transform(q + i * d_, d_, metric_, &qtr_[i])) return true;
      double norm = 0;
      for (int64_t t = 0; t < d_; ++t) {
        const scalar_t v = static_cast<scalar_t>((q[i * d_ + t] - qtr_[i].shift - center_[t]) * qtr_[i].scale);
        out[i * d_ + t] = v;
        norm += static_cast<double>(v) * static_cast<double>(v);
      }
      qnorm_[i] = norm;
      if (!is_l2()) {
        // The exact distances only ever use the transformed query (x − shift) / norm: keep that in place of the
        // row, computed as exact_distance computes it, so the re-rank divides only the reference side.
        for (int64_t t = 0; t < d_; ++t) qm[i * d_ + t] = (qm[i * d_ + t] - qtr_[i].shift) / qtr_[i].norm;
        qtr_[i] = RowTransform{};
      }
      return false;
    });
    if (undefined >= 0) row_transform(q + undefined * d_, d_, metric_, "query", undefined);  // throws its message
    heaps_.assign(nq_ * candidates_, Entry<scalar_t>{});
    heap_sizes_.assign(nq_, 0);
    heap_limits_.resize(nq_);
    for (int64_t i = 0; i < nq_; ++i) heap_limits_[i] = heap_limit(i);
  }

  // Runs bad(i) for every query, in parallel; returns the first i for which it was true, or −1.
  template <typename Bad>
  int64_t first_bad_query(Bad bad) const {
    std::vector<int64_t> first(at::get_num_threads() + 1, std::numeric_limits<int64_t>::max());
    at::parallel_for(0, nq_, 16, [&](int64_t begin, int64_t end) {
      int64_t& mine = first[at::get_thread_num()];
      for (int64_t i = begin; i < end; ++i)
        if (bad(i)) mine = std::min(mine, i);
    });
    const int64_t i = *std::min_element(first.begin(), first.end());
    return i == std::numeric_limits<int64_t>::max() ? -1 : i;
  }

  // Pack one reference tile: transform to scalar_t, norms, NaN/Inf check (first bad row is global). The layout is
  // that of pack_blocked: w-row panels in depth blocks of `step` features, `padded` rows (a multiple of w; the rows
  // past `rows` are zeros with norm +inf); w = 1 with step = d is row-major. Returns the first row (local index
  // + j0) holding NaN/Inf, or −1; the caller reports it (check_ref_rows).
  int64_t pack_ref_tile(int64_t j0, int64_t rows, int64_t w, int64_t step, int64_t padded, scalar_t* packed,
                     scalar_t* norms, double* max_norm) {
    if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<ref_t, float>) {
      if (direct_rows_) {
        TORCH_INTERNAL_ASSERT(w == kPanel, "the float32 kernels pack 16-row panels");
        return pack_ref_panels(j0, rows, step, padded, packed, norms, max_norm);
      }
    }
    std::vector<int64_t> bad_rows(at::get_num_threads() + 1, std::numeric_limits<int64_t>::max());
    std::vector<double> max_norms(at::get_num_threads() + 1, 0.0);
    at::parallel_for(0, padded / w, std::max<int64_t>(1, 64 / w), [&](int64_t begin, int64_t end) {
      std::vector<double> row(d_);
      std::vector<scalar_t> values(d_);
      const int tid = at::get_thread_num();
      for (int64_t r = begin * w; r < end * w; ++r) {
        if (r < rows) {
          ref_.read(j0 + r, row.data());
          if (first_non_finite_row(row.data(), 1, d_) >= 0) {
            bad_rows[tid] = std::min(bad_rows[tid], j0 + r);
            continue;
          }
          const RowTransform tr = row_transform(row.data(), d_, metric_, "ref", j0 + r + offset_);
          for (int64_t t = 0; t < d_; ++t)
            values[t] = static_cast<scalar_t>((row[t] - tr.shift - center_[t]) * tr.scale);
          const double norm = sum_of_squares(d_, [&](int64_t t) { return static_cast<double>(values[t]); });
          norms[r] = static_cast<scalar_t>(norm);
          max_norms[tid] = std::max(max_norms[tid], norm);
        } else {
          std::fill(values.begin(), values.end(), scalar_t(0));
          norms[r] = std::numeric_limits<scalar_t>::infinity();
        }
        for (int64_t pc = 0; pc < d_; pc += step) {
          const int64_t kc = std::min(step, d_ - pc);
          scalar_t* dst = packed + pc * padded + r / w * w * kc + r % w;
          for (int64_t t = 0; t < kc; ++t) dst[t * w] = values[pc + t];
        }
      }
    });
    for (double m : max_norms) *max_norm = std::max(*max_norm, m);
    const int64_t bad = *std::min_element(bad_rows.begin(), bad_rows.end());
    return bad == std::numeric_limits<int64_t>::max() ? -1 : bad;
  }

  // pack_ref_tile for contiguous float32 references: the same packed values, computed with AVX2 one 16-row panel
  // at a time (knn_rows.h) instead of through a float64 copy and a strided scatter. Keeps each row's
  // cosine / pearson transform (ref_tr_) for the re-rank. A bad row is a NaN / Inf or an undefined transform
  // (check_ref_rows tells which).
  int64_t pack_ref_panels(int64_t j0, int64_t rows, int64_t step, int64_t padded, float* packed, float* norms,
                          double* max_norm) {
    std::vector<int64_t> bad_rows(at::get_num_threads() + 1, std::numeric_limits<int64_t>::max());
    std::vector<double> max_norms(at::get_num_threads() + 1, 0.0);
    at::parallel_for(0, padded / kPanel, 4, [&](int64_t begin, int64_t end) {
      std::vector<float> panel(kPanel * d_);
      const int tid = at::get_thread_num();
      for (int64_t p = begin; p < end; ++p) {
        for (int64_t i = 0; i < kPanel; ++i) {
          const int64_t r = p * kPanel + i;
          float* values = panel.data() + i * d_;
          const float* row = r < rows ? ref_.data + (j0 + r) * ref_.s0 : nullptr;
          if (row == nullptr || has_non_finite(row, d_)) {
            if (row != nullptr) bad_rows[tid] = std::min(bad_rows[tid], j0 + r);
            std::fill(values, values + d_, 0.0f);
            norms[r] = std::numeric_limits<float>::infinity();
            continue;
          }
          RowTransform tr;
          if (!try_row_transform(row, d_, metric_, &tr)) {
            bad_rows[tid] = std::min(bad_rows[tid], j0 + r);
            continue;
          }
          if (!is_l2()) ref_tr_[j0 + r] = tr;
          const double norm = transform_row(row, tr.shift, center_.data(), tr.scale, d_, values);
          norms[r] = static_cast<float>(norm);
          max_norms[tid] = std::max(max_norms[tid], norm);
        }
        for (int64_t pc = 0; pc < d_; pc += step) {
          const int64_t kc = std::min(step, d_ - pc);
          store_panel<kPanel>(panel.data() + pc, d_, kc, packed + pc * padded + p * kPanel * kc);
        }
      }
    });
    for (double m : max_norms) *max_norm = std::max(*max_norm, m);
    const int64_t bad = *std::min_element(bad_rows.begin(), bad_rows.end());
    return bad == std::numeric_limits<int64_t>::max() ? -1 : bad;
  }

  // Exact distance (transformed squared-L2 units) of query i to reference row j (local index); row: d_ scratch.
  double exact_to_ref(int64_t i, int64_t j, double* row) const {
    if constexpr (std::is_same_v<ref_t, float>) {
      if (direct_rows_) {
        const float* y = ref_.data + j * ref_.s0;
        if (is_l2()) return sq_distance(qrow(i), y, d_);
        return sq_distance_affine(qrow(i), y, ref_tr_[j].shift, ref_tr_[j].norm, d_);
      }
    }
    ref_.read(j, row);
    const RowTransform tr = row_transform(row, d_, metric_, "ref", j + offset_);
    return exact_distance(qrow(i), qtr_[i], row, tr, d_);
  }

  // Reports the bad row `bad` (local index; −1: none): NaN / Inf, or else its undefined transform.
  void check_ref_rows(int64_t bad) const {
    if (bad < 0) return;
    std::vector<double> row(d_);
    ref_.read(bad, row.data());
    BIASFAST_CHECK_ARG(first_non_finite_row(row.data(), 1, d_) < 0, "ref", "contains NaN or Inf (first bad row ",
                       bad + offset_, ")");
    row_transform(row.data(), d_, metric_, "ref", bad + offset_);  // throws: the row's transform is undefined
  }

  void scan() {
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (cpu_has_avx2_fma()) return d_ <= kFusedMaxDim ? scan_fused() : scan_packed();
    }
    scan_gemm();
  }

  // Lanes: one per thread, each with its own tile workspace and its own heaps (lane 0: the result heaps; the
  // others merged into them at the end), so a search is one parallel region with no barrier per tile. The
  // references are cut into equal tiles (at most `tile` rows, their count a multiple of the lanes) that the lanes
  // claim in order, so a core slowed by a neighbour does not hold the others up; the merged heaps are the same
  // whichever lane scanned a tile. With few references and many queries one lane (lanes = 1) scans each tile in
  // parallel over query blocks instead. per_tile(lane, j0, padded, panels, panel_norms) scans one packed tile
  // (pack_ref_tile with 16-row panels in depth blocks of `step`); it runs inside the lane's thread.
  template <typename PerTile>
  void scan_in_lanes(int64_t lanes, int64_t tile, int64_t step, PerTile per_tile) {
    const int64_t tiles = ((ref_.rows + tile - 1) / tile + lanes - 1) / lanes * lanes;
    tile = ((ref_.rows + tiles - 1) / tiles + kPanel - 1) / kPanel * kPanel;
    at::Tensor workspace = at::empty({lanes * (tile * d_ + tile)}, at::kFloat);
    lane_heaps_.assign((lanes - 1) * nq_ * candidates_, Entry<float>{});
    lane_sizes_.assign((lanes - 1) * nq_, 0);
    std::vector<int64_t> lane_bad(lanes, -1);
    std::vector<double> lane_max(lanes, 0.0);
    std::atomic<int64_t> next_tile{0};
    std::atomic<bool> stop{false};  // a bad row was found: claim no more tiles
    auto scan_lane = [&](int64_t lane) {
      float* panels = workspace.data_ptr<float>() + lane * (tile * d_ + tile);
      float* panel_norms = panels + tile * d_;
      while (!stop) {
        const int64_t j0 = next_tile++ * tile;
        if (j0 >= ref_.rows) return;
        const int64_t nr = std::min(tile, ref_.rows - j0), padded = (nr + kPanel - 1) / kPanel * kPanel;
        lane_bad[lane] = pack_ref_tile(j0, nr, kPanel, step, padded, reinterpret_cast<scalar_t*>(panels),
                                       reinterpret_cast<scalar_t*>(panel_norms), &lane_max[lane]);
        if (lane_bad[lane] >= 0) {
          stop = true;
          return;
        }
        per_tile(lane, j0, padded, panels, panel_norms);
      }
    };
    if (lanes == 1) {
      scan_lane(0);
    } else {
      at::parallel_for(0, lanes, 1, [&](int64_t begin, int64_t end) {
        for (int64_t lane = begin; lane < end; ++lane) scan_lane(lane);
      });
    }
    // Tiles are claimed in order and packed whole, so every tile before a bad one was checked: the least bad row
    // over the lanes is the global first.
    int64_t first_bad = -1;
    for (int64_t bad : lane_bad)
      if (bad >= 0 && (first_bad < 0 || bad < first_bad)) first_bad = bad;
    check_ref_rows(first_bad);
    for (int64_t lane = 1; lane < lanes; ++lane)
      merge_heaps(reinterpret_cast<Entry<float>*>(heaps_.data()), heap_sizes_.data(), lane_entries(lane),
                  lane_sizes(lane), nq_, candidates_);
    max_ref_norm_ = std::sqrt(*std::max_element(lane_max.begin(), lane_max.end()));
  }

  Entry<float>* lane_entries(int64_t lane) {
    return lane == 0 ? reinterpret_cast<Entry<float>*>(heaps_.data()) : lane_heaps_.data() + (lane - 1) * nq_ * candidates_;
  }
  int64_t* lane_sizes(int64_t lane) { return lane == 0 ? heap_sizes_.data() : lane_sizes_.data() + (lane - 1) * nq_; }

  // Lanes for a search whose parallel tasks are `blocks` query blocks and whose tiles hold `tile` references.
  int64_t lane_count(int64_t blocks, int64_t tile) const {
    const int64_t threads = at::get_num_threads();
    if (blocks >= threads && ref_.rows < threads * tile) return 1;
    return std::max<int64_t>(1, std::min(threads, (ref_.rows + kPanel - 1) / kPanel));
  }

  // Small d: register-tiled inner products fused with the selection (knn_fused.h), over 6-query tiles.
  void scan_fused() {
    const int64_t tile = std::clamp<int64_t>((256 * 1024 / (d_ * 4)) / kPanel * kPanel, kPanel, 4096);
    const int64_t blocks = (nq_ + kRows - 1) / kRows, lanes = lane_count(blocks, tile);
    scan_in_lanes(lanes, tile, d_, [&](int64_t lane, int64_t j0, int64_t padded, const float* panels,
                                       const float* panel_norms) {
      auto scan_blocks = [&](int64_t begin, int64_t end) {
        for (int64_t block = begin; block < end; ++block) {
          const int64_t i0 = block * kRows, count = std::min(kRows, nq_ - i0);
          const float* q[kRows];
          int64_t self[kRows];
          HeapView<float> heaps[kRows];
          for (int64_t r = 0; r < kRows; ++r) {
            const int64_t qi = i0 + std::min(r, count - 1);
            q[r] = reinterpret_cast<const float*>(qpacked_.data_ptr<scalar_t>()) + qi * d_;
            self[r] = self_index(qi);
            heaps[r] = {lane_entries(lane) + qi * candidates_, candidates_, lane_sizes(lane) + qi, heap_limits_[qi]};
          }
          fused_scan_6x16(q, count, panels, panel_norms, padded / kPanel, d_, j0 + offset_, self, heaps);
        }
      };
      if (lanes == 1) at::parallel_for(0, blocks, 1, scan_blocks); else scan_blocks(0, blocks);
    });
  }

  // Large d: cache-blocked packed micro-kernels fused with the selection (knn_packed.h), over kMc-query blocks.
  void scan_packed() {
    const int64_t threads = at::get_num_threads();
    const int64_t step = depth_step(d_), qpadded = (nq_ + kRows - 1) / kRows * kRows;
    at::Tensor qpanels = at::empty({qpadded * d_}, at::kFloat);
    at::parallel_for(0, qpadded / kRows, 16, [&](int64_t begin, int64_t end) {
      pack_blocked<kRows>(reinterpret_cast<const float*>(qpacked_.data_ptr<scalar_t>()), nq_, d_, step, qpadded,
                          begin * kRows, end * kRows, qpanels.data_ptr<float>());
    });
    std::vector<int64_t> self_of(exclude_self_ ? nq_ : 0);
    for (int64_t i = 0; i < static_cast<int64_t>(self_of.size()); ++i) self_of[i] = self_index(i);
    const int64_t qblocks = (nq_ + kMc - 1) / kMc, lanes = lane_count(qblocks, kNc);
    const PackedPlan plan = plan_packed(lanes, threads);
    const int64_t cbuf = kMc * plan.block;
    at::Tensor cbufs = at::empty({threads * cbuf}, at::kFloat);
    const int64_t tile = plan.tile;
    scan_in_lanes(lanes, tile, step, [&](int64_t lane, int64_t j0, int64_t padded, const float* panels,
                                         const float* panel_norms) {
      auto scan_blocks = [&](int64_t begin, int64_t end) {
        float* cbuf_t = cbufs.data_ptr<float>() + at::get_thread_num() * cbuf;
        for (int64_t b = begin; b < end; ++b) {
          const int64_t i0 = b * kMc;
          const QueryBlock block{qpanels.data_ptr<float>(), qpadded, i0, std::min(kMc, nq_ - i0),
                                 lane_entries(lane) + i0 * candidates_, lane_sizes(lane) + i0, candidates_,
                                 exclude_self_ ? self_of.data() + i0 : nullptr,
                                 reinterpret_cast<const float*>(heap_limits_.data()) + i0};
          packed_scan_block(block, panels, panel_norms, padded, 0, padded, d_, j0 + offset_, plan.block, cbuf_t);
        }
      };
      if (lanes == 1) at::parallel_for(0, qblocks, 1, scan_blocks); else scan_blocks(0, qblocks);
    });
  }

  // Reference rows per packed tile and per partial-sum block of scan_packed.
  struct PackedPlan {
    int64_t tile, block;
  };

  // The largest tile (at most what stays in L3) whose buffers fit the workspace: each lane a packed tile of
  // tile × (d + 1) floats, each thread kMc × block partial sums (block = min(tile, kNc)) and one 16-row panel of
  // packing scratch.
  PackedPlan plan_packed(int64_t lanes, int64_t threads) const {
    const int64_t floats = workspace_bytes_ / 4 - threads * kPanel * d_;
    const int64_t l3_rows = std::max<int64_t>(kTileBytes / (4 * d_), kNc) / kPanel * kPanel;
    const int64_t full_blocks = floats - threads * kMc * kNc;  // room left once the partial sums are full size
    int64_t tile = full_blocks >= lanes * kNc * (d_ + 1) ? full_blocks / (lanes * (d_ + 1))
                                                          : floats / (lanes * (d_ + 1) + threads * kMc);
    tile = std::min(tile, l3_rows) / kPanel * kPanel;
    BIASFAST_CHECK_ARG(tile >= kPanel, "workspace_mb", "too small for feature size ", d_, " (", workspace_bytes_ >> 20,
                       " MB holds fewer than ", kPanel, " packed references per thread)");
    return {tile, std::min(tile, kNc)};
  }

  // Any d: inner-product blocks through the BLAS (at::mm), then the selection.
  void scan_gemm() {
    const TilePlan plan = plan_tiles(nq_, ref_.rows, d_, sizeof(scalar_t), workspace_bytes_);
    at::Tensor workspace = at::empty({plan.workspace_elements}, at::CppTypeToScalarType<scalar_t>::value);
    scalar_t* packed = workspace.data_ptr<scalar_t>();
    scalar_t* norms = packed + plan.ref_tile * d_;
    scalar_t* ip = norms + plan.ref_tile;
    double max_sq = 0;
    for (int64_t j0 = 0; j0 < ref_.rows; j0 += plan.ref_tile) {
      const int64_t nr = std::min(plan.ref_tile, ref_.rows - j0);
      check_ref_rows(pack_ref_tile(j0, nr, 1, d_, nr, packed, norms, &max_sq));
      for (int64_t i0 = 0; i0 < nq_; i0 += plan.query_tile) {
        const int64_t nq = std::min(plan.query_tile, nq_ - i0);
        inner_products(qpacked_.data_ptr<scalar_t>() + i0 * d_, packed, ip, nq, nr, d_);
        at::parallel_for(0, nq, 16, [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) {
            const int64_t qi = i0 + i;
            HeapView<scalar_t> heap{heaps_.data() + qi * candidates_, candidates_, &heap_sizes_[qi], heap_limits_[qi]};
            select_row(heap, ip + i * nr, norms, nr, j0 + offset_, self_index(qi));
          }
        });
      }
    }
    max_ref_norm_ = std::sqrt(max_sq);
  }

  // Exact distances of the candidates, sorted; returns the queries whose answer could not be certified.
  std::vector<int64_t> rerank_and_certify() {
    dist_ = at::empty({nq_, k_}, at::kDouble);
    index_ = at::empty({nq_, k_}, at::kLong);
    std::vector<char> failed(nq_, 0);
    at::parallel_for(0, nq_, 8, [&](int64_t begin, int64_t end) {
      std::vector<double> row(d_);
      std::vector<std::pair<double, int64_t>> exact;
      for (int64_t i = begin; i < end; ++i) {
        const Entry<scalar_t>* heap = heaps_.data() + i * candidates_;
        const int64_t size = heap_sizes_[i];
        exact.clear();
        for (int64_t c = 0; c < size; ++c) {
          exact.emplace_back(exact_to_ref(i, heap[c].index - offset_, row.data()), heap[c].index);
        }
        std::sort(exact.begin(), exact.end());
        write_row(i, exact);
        // Certified when every eligible reference was a candidate, or no non-candidate can beat the k-th.
        const bool all_seen = size >= ref_.rows - (exclude_self_ && in_range(i) ? 1 : 0);
        if (!all_seen) {
          // Every reference left out has an approximate value at or above the heap's final threshold. (A recheck's
          // range holding fewer than k references cannot happen with a sound limit; it fails safely.)
          const HeapView<scalar_t> final_heap{heaps_.data() + i * candidates_, candidates_, &heap_sizes_[i],
                                              heap_limits_[i]};
          const double worst = qnorm_[i] + static_cast<double>(final_heap.threshold());
          const bool too_few = static_cast<int64_t>(exact.size()) < k_;
          if (too_few || !(worst - rounding_bound(i) > exact[k_ - 1].first)) failed[i] = 1;
        }
      }
    });
    std::vector<int64_t> list;
    for (int64_t i = 0; i < nq_; ++i)
      if (failed[i]) list.push_back(i);
    return list;
  }

  bool in_range(int64_t i) const { return query_id(i) >= offset_ && query_id(i) < offset_ + ref_.rows; }

  void write_row(int64_t i, const std::vector<std::pair<double, int64_t>>& exact) {
    double* dist = dist_.data_ptr<double>() + i * k_;
    int64_t* index = index_.data_ptr<int64_t>() + i * k_;
    for (int64_t c = 0; c < k_; ++c) {
      const bool valid = c < static_cast<int64_t>(exact.size());
      dist[c] = valid ? exact[c].first : std::numeric_limits<double>::infinity();
      index[c] = valid ? exact[c].second : -1;
    }
  }

  // Exact search over every reference for the queries that could not be certified.
  void brute_force(const std::vector<int64_t>& queries) {
    if (queries.empty()) return;
    at::parallel_for(0, static_cast<int64_t>(queries.size()), 1, [&](int64_t begin, int64_t end) {
      std::vector<double> row(d_);
      std::vector<std::pair<double, int64_t>> best;
      for (int64_t b = begin; b < end; ++b) {
        const int64_t i = queries[b];
        best.clear();
        for (int64_t j = 0; j < ref_.rows; ++j) {
          const int64_t jg = j + offset_;
          if (jg == self_index(i)) continue;
          const std::pair<double, int64_t> cand{exact_to_ref(i, j, row.data()), jg};
          if (static_cast<int64_t>(best.size()) < k_) {
            best.push_back(cand);
            std::push_heap(best.begin(), best.end());
          } else if (cand < best.front()) {
            std::pop_heap(best.begin(), best.end());
            best.back() = cand;
            std::push_heap(best.begin(), best.end());
          }
        }
        std::sort_heap(best.begin(), best.end());
        write_row(i, best);
      }
    });
  }

  std::tuple<at::Tensor, at::Tensor> finish() {
    at::Tensor dist = dist_;
    if (metric_ == Metric::L2) {
      dist = dist.sqrt();
    } else if (metric_ == Metric::Cosine || metric_ == Metric::Pearson) {
      dist = dist * 0.5;  // 1 − cos(u, v) = ‖û − v̂‖² / 2
    }
    return {dist.to(at::CppTypeToScalarType<scalar_t>::value), index_};
  }

  int64_t nq_, d_, k_;
  Metric metric_;
  int64_t offset_;
  bool exclude_self_;
  int64_t workspace_bytes_;
  StridedRows<ref_t> ref_;
  at::Tensor query_in_, ref_in_;  // the caller's inputs, for a recheck
  Recheck recheck_;
  int64_t candidates_ = 0;
  bool direct_rows_ = false;  // contiguous float32 references (and AVX2): the knn_rows.h fast paths
  at::Tensor query_, qpacked_, dist_, index_;
  std::vector<double> center_, qnorm_;
  std::vector<RowTransform> qtr_;
  std::vector<RowTransform> ref_tr_;  // cosine / pearson transforms of the references (direct_rows_ only)
  std::vector<Entry<scalar_t>> heaps_;
  std::vector<int64_t> heap_sizes_;
  std::vector<scalar_t> heap_limits_;  // HeapView::limit of each query's heap (+inf in a first pass)
  std::vector<Entry<float>> lane_heaps_;  // heaps of lanes 1.. (scan_in_lanes)
  std::vector<int64_t> lane_sizes_;
  double max_ref_norm_ = 0;
};

std::tuple<at::Tensor, at::Tensor> knn_cpu(const at::Tensor& query, const at::Tensor& ref, int64_t k,
                                           c10::string_view metric, int64_t index_offset, bool exclude_self,
                                           int64_t workspace_mb) {
  check_matrix(query, "query");
  check_matrix(ref, "ref");
  BIASFAST_CHECK_ARG(ref.size(1) == query.size(1), "ref", "feature size ", ref.size(1), " does not match query's ",
                     query.size(1));
  BIASFAST_CHECK_ARG(k >= 1, "k", "must be at least 1, got ", k);
  BIASFAST_CHECK_ARG(query.size(0) > 0 && query.size(1) > 0, "query", "is empty (shape ", query.sizes(), ")");
  BIASFAST_CHECK_ARG(ref.size(0) > 0, "ref", "is empty (shape ", ref.sizes(), ")");
  BIASFAST_CHECK_ARG(workspace_mb >= 1, "workspace_mb", "must be at least 1, got ", workspace_mb);
  const Metric m = parse_metric(std::string(metric));
  const bool dbl = query.scalar_type() == at::kDouble || ref.scalar_type() == at::kDouble;
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ref.scalar_type(), "knn_cpu", [&] {
    using ref_t = scalar_t;
    if (dbl) {
      out = ExactSearch<double, ref_t>(query, ref, k, m, index_offset, exclude_self, workspace_mb << 20).run();
    } else {
      out = ExactSearch<float, ref_t>(query, ref, k, m, index_offset, exclude_self, workspace_mb << 20).run();
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(biasfast, CPU, m) {
  m.impl("knn", &knn_cpu);
}

}  // namespace biasfast
