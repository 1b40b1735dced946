// The grammar of a tree-BP call in the form the kernels read (sparse rules, top matrices), and the exact
// log-space scalar path used for the rare sequences whose messages leave linear-space range.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace biasfast::tree_bp_detail {

template <typename T>
struct Rule {
  int parent, left, right;
  T weight;
};

// M[a,b,c] kept as its non-zero entries sorted by parent (q·q_eff of the q³ for the paper's grammar).
template <typename T>
struct Plan {
  int q, leaves, top_nodes;
  std::vector<Rule<T>> rules, by_left, by_right;  // grouped by parent, by left child, by right child
  std::vector<int> rule_start, left_start, right_start;  // group of symbol s: [start[s], start[s+1])
  const T* top;                 // (top_nodes, q, q) row-major

  Plan(const T* grammar, const T* top_matrices, int q_, int leaves_, int top_nodes_)
      : q(q_), leaves(leaves_), top_nodes(top_nodes_), top(top_matrices) {
    for (int a = 0; a < q; ++a)
      for (int b = 0; b < q; ++b)
        for (int c = 0; c < q; ++c)
          if (T w = grammar[(a * q + b) * q + c]; w != T(0)) rules.push_back({a, b, c, w});
    rule_start = group_by(rules, &Rule<T>::parent);
    by_left = rules, by_right = rules;
    left_start = group_by(by_left, &Rule<T>::left);
    right_start = group_by(by_right, &Rule<T>::right);
  }

 private:
  std::vector<int> group_by(std::vector<Rule<T>>& list, int Rule<T>::*key) const {
    std::stable_sort(list.begin(), list.end(), [&](const Rule<T>& x, const Rule<T>& y) { return x.*key < y.*key; });
    std::vector<int> start(q + 1, 0);
    for (const Rule<T>& r : list) ++start[r.*key + 1];
    for (int s = 0; s < q; ++s) start[s + 1] += start[s];
    return start;
  }
};

inline double log_add(double x, double y) {
  if (x < y) std::swap(x, y);
  return y == -INFINITY ? x : x + std::log1p(std::exp(y - x));
}

// Exact BP of one sequence in log space (double): the same messages as the lane kernel, without range limits.
// Writes the leaf posteriors (NaN when the evidence is impossible) and returns log Z.
template <typename T>
double log_space_row(const Plan<T>& plan, const T* evidence, T scale, T* out) {
  const int q = plan.q, L = plan.leaves, J = plan.top_nodes;
  const double ninf = -INFINITY;
  std::vector<double> up(2 * L * q), down(2 * L * q, ninf), to_root(J * q), prefix(J * q), suffix(J * q);
  for (int e = 0; e < L * q; ++e) up[L * q + e] = double(scale) * double(evidence[e]);
  for (int v = L - 1; v >= J; --v) {
    for (int a = 0; a < q; ++a) up[v * q + a] = ninf;
    for (const Rule<T>& r : plan.rules)
      up[v * q + r.parent] = log_add(up[v * q + r.parent],
                                     std::log(double(r.weight)) + up[2 * v * q + r.left] + up[(2 * v + 1) * q + r.right]);
  }
  for (int j = 0; j < J; ++j)
    for (int a = 0; a < q; ++a) {
      double acc = ninf;
      for (int b = 0; b < q; ++b) acc = log_add(acc, std::log(double(plan.top[(j * q + a) * q + b])) + up[(J + j) * q + b]);
      to_root[j * q + a] = acc;
    }
  double log_z = ninf;
  for (int a = 0; a < q; ++a) {
    double running = 0;
    for (int j = 0; j < J; ++j) prefix[j * q + a] = running, running += to_root[j * q + a];
    log_z = log_add(log_z, running);
    running = 0;
    for (int j = J - 1; j >= 0; --j) suffix[j * q + a] = running, running += to_root[j * q + a];
  }
  log_z -= std::log(double(q));
  for (int j = 0; j < J; ++j)
    for (int a = 0; a < q; ++a)
      for (int b = 0; b < q; ++b)
        down[(J + j) * q + b] = log_add(down[(J + j) * q + b], std::log(double(plan.top[(j * q + a) * q + b])) +
                                                                   prefix[j * q + a] + suffix[j * q + a]);
  for (int v = J; v < L; ++v)
    for (const Rule<T>& r : plan.rules) {
      double t = std::log(double(r.weight)) + down[v * q + r.parent];
      down[2 * v * q + r.left] = log_add(down[2 * v * q + r.left], t + up[(2 * v + 1) * q + r.right]);
      down[(2 * v + 1) * q + r.right] = log_add(down[(2 * v + 1) * q + r.right], t + up[2 * v * q + r.left]);
    }
  for (int i = 0; i < L; ++i) {
    const double* u = &up[(L + i) * q];
    const double* d = &down[(L + i) * q];
    double norm = ninf;
    for (int a = 0; a < q; ++a) norm = log_add(norm, u[a] + d[a]);
    for (int a = 0; a < q; ++a) out[i * q + a] = T(norm == ninf ? NAN : std::exp(u[a] + d[a] - norm));
  }
  return log_z;
}

}  // namespace biasfast::tree_bp_detail
