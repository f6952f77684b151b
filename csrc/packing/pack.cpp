// C++ CPU twins of the packing ops; semantics documented in pack.h and kernels/packing.py (the reference).
#include "pack.h"

#include <algorithm>
#include <cstring>
#include <numeric>
#include <stdexcept>

namespace packing {

namespace {

using Bin = std::vector<int64_t>;

// Split a bin's members (already in decreasing-length order) into two, greedily balancing tokens.
void split_bin(const Bin& members, const std::vector<int64_t>& len, Bin* a, Bin* b) {
  int64_t ta = 0, tb = 0;
  for (int64_t m : members) {
    if (ta <= tb) { a->push_back(m); ta += len[m]; }
    else { b->push_back(m); tb += len[m]; }
  }
}

}  // namespace

std::vector<std::vector<std::vector<int64_t>>> plan_bins_cpu(const std::vector<int64_t>& lengths,
                                                             int64_t max_tokens, int64_t num_ranks, bool truncate) {
  if (max_tokens < 1) throw std::invalid_argument("max_tokens must be >= 1, got " + std::to_string(max_tokens));
  if (num_ranks < 1) throw std::invalid_argument("num_ranks must be >= 1, got " + std::to_string(num_ranks));
  const int64_t n = static_cast<int64_t>(lengths.size());
  std::vector<int64_t> len(lengths);
  for (int64_t i = 0; i < n; ++i) {
    if (len[i] < 1)
      throw std::invalid_argument("lengths[" + std::to_string(i) + "] = " + std::to_string(len[i]) +
                                  ": every sample needs at least 1 token");
    if (len[i] > max_tokens) {
      if (!truncate)
        throw std::invalid_argument("lengths[" + std::to_string(i) + "] = " + std::to_string(len[i]) +
                                    " exceeds max_tokens=" + std::to_string(max_tokens) +
                                    " (raise max_tokens or pass truncate=True)");
      len[i] = max_tokens;
    }
  }
  // First-fit decreasing; stable sort keeps ties in index order, which makes the plan deterministic.
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return len[x] > len[y]; });
  std::vector<Bin> bins;
  std::vector<int64_t> load;
  for (int64_t i : order) {
    size_t b = 0;
    while (b < bins.size() && load[b] + len[i] > max_tokens) ++b;
    if (b == bins.size()) { bins.emplace_back(); load.push_back(0); }
    bins[b].push_back(i);
    load[b] += len[i];
  }
  // Equal bin counts per rank: split the fullest multi-sample bins before resorting to empty bins.
  while (bins.size() % num_ranks != 0) {
    int64_t best = -1;
    for (size_t b = 0; b < bins.size(); ++b) {
      if (bins[b].size() < 2) continue;
      if (best < 0 || bins[b].size() > bins[best].size() ||
          (bins[b].size() == bins[best].size() && load[b] > load[best]))
        best = static_cast<int64_t>(b);
    }
    if (best < 0) { bins.emplace_back(); load.push_back(0); continue; }
    Bin a, c;
    split_bin(bins[best], len, &a, &c);
    int64_t tc = 0;
    for (int64_t m : c) tc += len[m];
    bins[best] = a;
    load[best] -= tc;
    bins.push_back(c);
    load.push_back(tc);
  }
  // Longest-processing-time assignment under the equal-count constraint; ties go to the lower index.
  const int64_t per_rank = static_cast<int64_t>(bins.size()) / num_ranks;
  std::vector<int64_t> border(bins.size());
  std::iota(border.begin(), border.end(), 0);
  std::stable_sort(border.begin(), border.end(), [&](int64_t x, int64_t y) { return load[x] > load[y]; });
  std::vector<std::vector<Bin>> out(num_ranks);
  std::vector<int64_t> rank_load(num_ranks, 0);
  for (int64_t b : border) {
    int64_t r_best = -1;
    for (int64_t r = 0; r < num_ranks; ++r) {
      if (static_cast<int64_t>(out[r].size()) >= per_rank) continue;
      if (r_best < 0 || rank_load[r] < rank_load[r_best]) r_best = r;
    }
    out[r_best].push_back(bins[b]);
    rank_load[r_best] += load[b];
  }
  return out;
}

void gather_segments_cpu(const uintptr_t* srcs, const int32_t* cu, int64_t num_segments, void* dst,
                         int64_t elem_bytes) {
  auto* out = static_cast<char*>(dst);
  for (int64_t b = 0; b < num_segments; ++b) {
    const int64_t n = static_cast<int64_t>(cu[b + 1]) - cu[b];
    if (n > 0) std::memcpy(out + cu[b] * elem_bytes, reinterpret_cast<const void*>(srcs[b]), n * elem_bytes);
  }
}

void sample_index_cpu(const int32_t* cu, int64_t num_segments, int32_t* out) {
  for (int64_t b = 0; b < num_segments; ++b) std::fill(out + cu[b], out + cu[b + 1], static_cast<int32_t>(b));
}

void unpack_cpu(const void* values, const int32_t* cu, int64_t num_segments, int64_t max_len, void* out,
                uint64_t pad_bits, int64_t elem_bytes) {
  const auto* src = static_cast<const char*>(values);
  auto* dst = static_cast<char*>(out);
  for (int64_t b = 0; b < num_segments; ++b) {
    const int64_t n = static_cast<int64_t>(cu[b + 1]) - cu[b];
    char* row = dst + b * max_len * elem_bytes;
    std::memcpy(row, src + cu[b] * elem_bytes, n * elem_bytes);
    // Little-endian: the low elem_bytes bytes of pad_bits are the element's bytes.
    for (int64_t j = n; j < max_len; ++j) std::memcpy(row + j * elem_bytes, &pad_bits, elem_bytes);
  }
}

void repack_cpu(const void* padded, const int32_t* cu, int64_t num_segments, int64_t max_len, void* out,
                int64_t elem_bytes) {
  const auto* src = static_cast<const char*>(padded);
  auto* dst = static_cast<char*>(out);
  for (int64_t b = 0; b < num_segments; ++b) {
    const int64_t n = static_cast<int64_t>(cu[b + 1]) - cu[b];
    std::memcpy(dst + cu[b] * elem_bytes, src + b * max_len * elem_bytes, n * elem_bytes);
  }
}

void mrope_positions_cpu(const int32_t* types, const int32_t* cu, int64_t num_segments, const int64_t* grid,
                         int64_t num_images, int64_t merge, int64_t* pos, int64_t* deltas) {
  const int64_t total = cu[num_segments];
  int64_t img = 0;  // image_grid_thw rows are consumed in order across samples
  for (int64_t b = 0; b < num_segments; ++b) {
    const int64_t start = cu[b], end = cu[b + 1];
    auto fail = [&](int32_t code, const std::string& detail) {
      throw std::invalid_argument(mrope_error_message(static_cast<int32_t>(b * kNumErrors + code), num_segments) +
                                  detail);
    };
    if (end <= start) fail(kEmptySample, "");
    int64_t cur = 0, max_pos = 0;
    int64_t i = start;
    while (i < end) {
      const int32_t ty = types[i];
      if (ty == 0) {  // text: one position for all three rows
        pos[total + i] = pos[2 * total + i] = pos[3 * total + i] = cur;
        max_pos = std::max(max_pos, cur);
        ++cur; ++i;
        continue;
      }
      if (ty != 1) fail(kBadTokenType, " (token " + std::to_string(i - start) + " has type " +
                                           std::to_string(ty) + ")");
      int64_t j = i;
      while (j < end && types[j] == 1) ++j;
      if (img >= num_images) fail(kTooFewGrids, " (" + std::to_string(num_images) + " rows)");
      const int64_t gt = grid[3 * img], gh = grid[3 * img + 1] / merge, gw = grid[3 * img + 2] / merge;
      if (j - i != gt * gh * gw)
        fail(kRunMismatch, " (run of " + std::to_string(j - i) + " tokens at offset " + std::to_string(i - start) +
                               ", image_grid_thw row " + std::to_string(img) + " = [" + std::to_string(gt) + ", " +
                               std::to_string(grid[3 * img + 1]) + ", " + std::to_string(grid[3 * img + 2]) +
                               "], merge " + std::to_string(merge) + ")");
      // Images use a temporal step of 1 (transformers >= 5.19 scales only videos by tokens_per_second).
      for (int64_t k = 0; k < j - i; ++k) {
        pos[total + i + k] = cur + k / (gh * gw);
        pos[2 * total + i + k] = cur + (k / gw) % gh;
        pos[3 * total + i + k] = cur + k % gw;
      }
      max_pos = std::max(max_pos, cur + std::max(gt - 1, std::max(gh - 1, gw - 1)));
      cur += std::max(gh, gw);
      ++img;
      i = j;
    }
    for (int64_t k = start; k < end; ++k) pos[k] = k - start;
    deltas[b] = max_pos + 1 - (end - start);
  }
  if (img != num_images) {
    throw std::invalid_argument(mrope_error_message(static_cast<int32_t>(num_segments * kNumErrors + kTooManyGrids),
                                                    num_segments) +
                                " (" + std::to_string(num_images) + " rows, " + std::to_string(img) + " runs)");
  }
}

}  // namespace packing
