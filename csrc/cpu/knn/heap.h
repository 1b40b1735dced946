// Running top-k selection of the CPU kNN: fixed-capacity max-heaps over caller-owned storage, the feed of one row of
// approximate values into a heap, and the per-query heaps of a search.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace biasfast {

template <typename value_t>
struct Entry {
  value_t value = std::numeric_limits<value_t>::infinity();
  int64_t index = -1;
};

template <typename value_t>
inline bool worse(const Entry<value_t>& a, const Entry<value_t>& b) {
  return a.value > b.value || (a.value == b.value && a.index > b.index);
}

// A max-heap (by value, then index) of fixed capacity over caller-owned storage: the running top-k of a query.
// Values at or above `limit` are not wanted (a recheck knows they cannot matter), even while the heap is not full.
template <typename value_t>
struct HeapView {
  Entry<value_t>* data;
  int64_t capacity;
  int64_t* size;
  value_t limit = std::numeric_limits<value_t>::infinity();

  value_t threshold() const { return *size < capacity ? limit : std::min(limit, data[0].value); }

  void push(Entry<value_t> e) {
    if (*size < capacity) {
      int64_t c = (*size)++;
      while (c > 0) {
        const int64_t p = (c - 1) / 2;
        if (!worse(e, data[p])) break;
        data[c] = data[p];
        c = p;
      }
      data[c] = e;
      return;
    }
    if (!worse(data[0], e)) return;
    int64_t c = 0;
    for (;;) {
      int64_t child = 2 * c + 1;
      if (child >= capacity) break;
      if (child + 1 < capacity && worse(data[child + 1], data[child])) ++child;
      if (!worse(data[child], e)) break;
      data[c] = data[child];
      c = child;
    }
    data[c] = e;
  }
};

// Feed one query's row of ‖y‖² − 2·x·y values (references base .. base + n − 1, scanned in increasing index
// order, so a value equal to the threshold never wins its tie) into its heap.
template <typename value_t>
inline void select_row(HeapView<value_t>& heap, const value_t* ip, const value_t* norms, int64_t n, int64_t base,
                       int64_t self) {
  value_t threshold = heap.threshold();
  for (int64_t j = 0; j < n; ++j) {
    const value_t v = norms[j] - 2 * ip[j];
    if (v < threshold && base + j != self) {
      heap.push({v, base + j});
      threshold = heap.threshold();
    }
  }
}

// Push every entry of the `from` heaps (n queries, same capacity) into the `into` heaps.
inline void merge_heaps(Entry<float>* into, int64_t* into_sizes, const Entry<float>* from, const int64_t* from_sizes,
                        int64_t n, int64_t capacity) {
  for (int64_t i = 0; i < n; ++i) {
    HeapView<float> heap{into + i * capacity, capacity, into_sizes + i};
    for (int64_t c = 0; c < from_sizes[i]; ++c) heap.push(from[i * capacity + c]);
  }
}

// Every query's heap of one search, `capacity` entries each. A query's limit is a bound that a recheck knows no
// wanted value reaches (given in float64; +inf, or none given, in a first pass), rounded up to the heap's
// precision: a limit that rounded down could wrongly skip a reference.
template <typename value_t>
struct Candidates {
  int64_t capacity;
  std::vector<Entry<value_t>> entries;
  std::vector<int64_t> sizes;
  std::vector<value_t> limits;

  Candidates(int64_t queries, int64_t capacity, const std::vector<double>& limits_in)
      : capacity(capacity), entries(queries * capacity), sizes(queries, 0), limits(queries) {
    for (int64_t i = 0; i < queries; ++i) {
      limits[i] = std::numeric_limits<value_t>::infinity();
      if (limits_in.empty()) continue;
      limits[i] = static_cast<value_t>(limits_in[i]);
      if (static_cast<double>(limits[i]) < limits_in[i])
        limits[i] = std::nextafter(limits[i], std::numeric_limits<value_t>::infinity());
    }
  }

  Entry<value_t>* heap_entries(int64_t i) { return entries.data() + i * capacity; }
  HeapView<value_t> heap(int64_t i) { return {heap_entries(i), capacity, &sizes[i], limits[i]}; }
};

}  // namespace biasfast
