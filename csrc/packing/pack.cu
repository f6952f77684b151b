// CUDA twins of the packing ops (semantics in pack.h; reference in kernels/packing.py). Built by setup.py with
// nvcc into kernels._packing_cuda when a CUDA toolkit exists; linked against the static cudart so the module
// needs no libcudart at run time. Pointers are device pointers; `stream` is a cudaStream_t passed as an integer.
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "pack.h"

namespace packing {

namespace {

constexpr int kThreads = 256;

// Copy elements as unsigned integers of the same width: a byte copy that works for every dtype of that size.
template <int N> struct Word;
template <> struct Word<1> { using type = uint8_t; };
template <> struct Word<2> { using type = uint16_t; };
template <> struct Word<4> { using type = uint32_t; };
template <> struct Word<8> { using type = unsigned long long; };

void check_launch(const char* what) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

// Makes `device` current for the launch and restores the caller's device (torch keeps its own notion).
struct DeviceGuard {
  int prev = -1;
  explicit DeviceGuard(int device) {
    cudaError_t err = cudaGetDevice(&prev);
    if (err != cudaSuccess) throw std::runtime_error(std::string("cudaGetDevice: ") + cudaGetErrorString(err));
    if (prev != device) cudaSetDevice(device);
  }
  ~DeviceGuard() { if (prev >= 0) cudaSetDevice(prev); }
};

unsigned blocks_for(int64_t n) {
  int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b < 1 ? 1 : (b > 65535 * 16 ? 65535 * 16 : b));  // grid-stride loops cover the rest
}

// Segment of token i: the last b with cu[b] <= i (binary search over B+1 offsets).
__device__ int64_t segment_of(const int32_t* cu, int64_t num_segments, int64_t i) {
  int64_t lo = 0, hi = num_segments;  // invariant: cu[lo] <= i < cu[hi]
  while (hi - lo > 1) {
    int64_t mid = (lo + hi) / 2;
    if (cu[mid] <= i) lo = mid; else hi = mid;
  }
  return lo;
}

template <typename T>
__global__ void gather_kernel(const uintptr_t* srcs, const int32_t* cu, int64_t num_segments, int64_t num_tokens,
                              T* dst, int32_t* sample_index) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < num_tokens; i += (int64_t)gridDim.x * blockDim.x) {
    int64_t b = segment_of(cu, num_segments, i);
    dst[i] = reinterpret_cast<const T*>(srcs[b])[i - cu[b]];
    if (sample_index != nullptr) sample_index[i] = static_cast<int32_t>(b);
  }
}

template <typename T>
__global__ void unpack_kernel(const T* values, const int32_t* cu, int64_t num_segments, int64_t max_len, T* out,
                              T pad) {
  const int64_t n = num_segments * max_len;
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < n; idx += (int64_t)gridDim.x * blockDim.x) {
    int64_t b = idx / max_len, j = idx % max_len;
    out[idx] = j < cu[b + 1] - cu[b] ? values[cu[b] + j] : pad;
  }
}

template <typename T>
__global__ void repack_kernel(const T* padded, const int32_t* cu, int64_t num_segments, int64_t max_len, T* out) {
  const int64_t n = num_segments * max_len;
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < n; idx += (int64_t)gridDim.x * blockDim.x) {
    int64_t b = idx / max_len, j = idx % max_len;
    if (j < cu[b + 1] - cu[b]) out[cu[b] + j] = padded[idx];
  }
}

__device__ void report(int32_t* err, int64_t b, int32_t code) {
  atomicMin(err, static_cast<int32_t>(b * kNumErrors + code));  // lowest bad sample wins: deterministic message
}

// One block per sample: count its image runs into counts[b] and flag bad token types.
__global__ void count_runs_kernel(const int32_t* types, const int32_t* cu, int32_t* counts, int32_t* err) {
  const int64_t b = blockIdx.x, start = cu[b], end = cu[b + 1];
  __shared__ int32_t total;
  if (threadIdx.x == 0) total = 0;
  __syncthreads();
  int32_t mine = 0;
  for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) {
    const int32_t ty = types[i];
    if (ty != 0 && ty != 1) report(err, b, kBadTokenType);
    mine += ty == 1 && (i == start || types[i - 1] != 1);
  }
  atomicAdd(&total, mine);
  __syncthreads();
  if (threadIdx.x == 0) {
    counts[b] = total;
    if (end <= start) report(err, b, kEmptySample);
  }
}

// Exclusive prefix sum of the per-sample run counts (B is small: one thread), plus the total-count check.
__global__ void scan_counts_kernel(int32_t* counts, int64_t num_segments, int64_t num_images, int32_t* err) {
  int32_t run = 0;
  for (int64_t b = 0; b < num_segments; ++b) { int32_t c = counts[b]; counts[b] = run; run += c; }
  counts[num_segments] = run;
  if (run < num_images) report(err, num_segments, kTooManyGrids);
}

// Inclusive block scan (Hillis-Steele in shared memory); sh must hold blockDim.x elements. The tile total is
// sh[blockDim.x - 1] afterwards; callers read it before the next scan reuses sh.
template <typename T, typename Op>
__device__ T block_scan(T v, T* sh, Op op) {
  sh[threadIdx.x] = v;
  __syncthreads();
  for (unsigned off = 1; off < blockDim.x; off <<= 1) {
    T x = threadIdx.x >= off ? sh[threadIdx.x - off] : v;
    __syncthreads();
    if (threadIdx.x >= off) v = op(v, x);
    sh[threadIdx.x] = v;
    __syncthreads();
  }
  return v;
}

struct Sum { template <typename T> __device__ T operator()(T a, T b) const { return a + b; } };
struct Max { template <typename T> __device__ T operator()(T a, T b) const { return a > b ? a : b; } };

// One block per sample, tiles of blockDim tokens. A token's position counter P is the sample's text tokens and
// finished images before it: text adds 1, the last token of an image adds max(h, w)/merge, so every token of
// one image sees the same P (the run's start position), exactly like the sequential walk in pack.cpp.
__global__ void mrope_kernel(const int32_t* types, const int32_t* cu, int64_t num_segments, int64_t total_tokens,
                             const int64_t* grid, int64_t num_images, int64_t merge, const int32_t* image_base,
                             int64_t* pos, int64_t* deltas, int32_t* err) {
  __shared__ int32_t sh_count[kThreads];
  __shared__ int64_t sh_start[kThreads];
  __shared__ int64_t sh_pos[kThreads];
  const int64_t b = blockIdx.x, start = cu[b], end = cu[b + 1];
  if (start < 0 || end > total_tokens || end <= start) return;  // flagged by count_runs_kernel / Python
  int64_t carry_pos = 0, carry_start = start, local_max = 0;
  int32_t carry_runs = 0;
  for (int64_t tile = start; tile < end; tile += blockDim.x) {
    const int64_t i = tile + threadIdx.x;
    const bool valid = i < end;
    const bool img = valid && types[i] == 1;
    const bool first = img && (i == start || types[i - 1] != 1);
    const bool last = img && (i + 1 == end || types[i + 1] != 1);
    const int32_t runs = block_scan<int32_t>(first ? 1 : 0, sh_count, Sum());
    const int32_t tile_runs = sh_count[blockDim.x - 1];
    const int64_t run_start = block_scan<int64_t>(first ? i : -1, sh_start, Max());
    const int64_t tile_start = sh_start[blockDim.x - 1];
    int64_t gt = 0, gh = 0, gw = 0, image = image_base[b] + carry_runs + runs - 1;
    if (img && image >= num_images) { report(err, b, kTooFewGrids); }
    else if (img) { gt = grid[3 * image]; gh = grid[3 * image + 1] / merge; gw = grid[3 * image + 2] / merge; }
    const int64_t step = !valid ? 0 : !img ? 1 : last ? (gh > gw ? gh : gw) : 0;
    const int64_t incl = block_scan<int64_t>(step, sh_pos, Sum());
    const int64_t tile_steps = sh_pos[blockDim.x - 1];
    const int64_t p = carry_pos + incl - step;
    if (valid) {
      int64_t r1 = p, r2 = p, r3 = p;
      if (img) {
        const int64_t k = i - (run_start >= 0 ? run_start : carry_start), area = gh * gw;
        if (area == 0 || k >= gt * area || (last && k + 1 != gt * area)) {
          report(err, b, kRunMismatch);
        } else {
          r1 = p + k / area; r2 = p + (k / gw) % gh; r3 = p + k % gw;
        }
      }
      pos[i] = i - start;
      pos[total_tokens + i] = r1;
      pos[2 * total_tokens + i] = r2;
      pos[3 * total_tokens + i] = r3;
      local_max = max(local_max, max(r1, max(r2, r3)));
    }
    carry_pos += tile_steps;
    carry_runs += tile_runs;
    if (tile_start >= 0) carry_start = tile_start;
    __syncthreads();  // the tile totals are read before the next tile's scans overwrite shared memory
  }
  const int64_t block_max = block_scan<int64_t>(local_max, sh_pos, Max());
  if (threadIdx.x == blockDim.x - 1) deltas[b] = block_max + 1 - (end - start);
}

template <template <typename> class F, typename... Args>
void dispatch_bytes(int64_t elem_bytes, Args&&... args) {
  switch (elem_bytes) {
    case 1: F<Word<1>::type>::run(args...); break;
    case 2: F<Word<2>::type>::run(args...); break;
    case 4: F<Word<4>::type>::run(args...); break;
    case 8: F<Word<8>::type>::run(args...); break;
    default: throw std::invalid_argument("elem_bytes must be 1, 2, 4 or 8, got " + std::to_string(elem_bytes));
  }
}

template <typename T> struct Gather {
  static void run(const uintptr_t* srcs, const int32_t* cu, int64_t nseg, int64_t ntok, void* dst, int32_t* si,
                  cudaStream_t s) {
    gather_kernel<T><<<blocks_for(ntok), kThreads, 0, s>>>(srcs, cu, nseg, ntok, static_cast<T*>(dst), si);
  }
};
template <typename T> struct Unpack {
  static void run(const void* v, const int32_t* cu, int64_t nseg, int64_t max_len, void* out, uint64_t pad,
                  cudaStream_t s) {
    T pad_t;
    memcpy(&pad_t, &pad, sizeof(T));  // little-endian: the low bytes are the element
    unpack_kernel<T><<<blocks_for(nseg * max_len), kThreads, 0, s>>>(static_cast<const T*>(v), cu, nseg, max_len,
                                                                     static_cast<T*>(out), pad_t);
  }
};
template <typename T> struct Repack {
  static void run(const void* p, const int32_t* cu, int64_t nseg, int64_t max_len, void* out, cudaStream_t s) {
    repack_kernel<T><<<blocks_for(nseg * max_len), kThreads, 0, s>>>(static_cast<const T*>(p), cu, nseg, max_len,
                                                                     static_cast<T*>(out));
  }
};

}  // namespace

void gather_segments_cuda(const uintptr_t* srcs, const int32_t* cu, int64_t num_segments, int64_t num_tokens,
                          void* dst, int64_t elem_bytes, int32_t* sample_index, int device, uintptr_t stream) {
  if (num_tokens == 0) return;
  DeviceGuard guard(device);
  dispatch_bytes<Gather>(elem_bytes, srcs, cu, num_segments, num_tokens, dst, sample_index,
                         reinterpret_cast<cudaStream_t>(stream));
  check_launch("gather_segments_cuda");
}

void unpack_cuda(const void* values, const int32_t* cu, int64_t num_segments, int64_t max_len, void* out,
                 uint64_t pad_bits, int64_t elem_bytes, int device, uintptr_t stream) {
  if (num_segments * max_len == 0) return;
  DeviceGuard guard(device);
  dispatch_bytes<Unpack>(elem_bytes, values, cu, num_segments, max_len, out, pad_bits,
                         reinterpret_cast<cudaStream_t>(stream));
  check_launch("unpack_cuda");
}

void repack_cuda(const void* padded, const int32_t* cu, int64_t num_segments, int64_t max_len, void* out,
                 int64_t elem_bytes, int device, uintptr_t stream) {
  if (num_segments * max_len == 0) return;
  DeviceGuard guard(device);
  dispatch_bytes<Repack>(elem_bytes, padded, cu, num_segments, max_len, out, reinterpret_cast<cudaStream_t>(stream));
  check_launch("repack_cuda");
}

void mrope_positions_cuda(const int32_t* types, const int32_t* cu, int64_t num_segments, int64_t total_tokens,
                          const int64_t* grid, int64_t num_images, int64_t merge, int64_t* pos, int64_t* deltas, int32_t* scratch,
                          int32_t* err, int device, uintptr_t stream) {
  if (num_segments == 0) return;
  DeviceGuard guard(device);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  count_runs_kernel<<<static_cast<unsigned>(num_segments), kThreads, 0, s>>>(types, cu, scratch, err);
  scan_counts_kernel<<<1, 1, 0, s>>>(scratch, num_segments, num_images, err);
  mrope_kernel<<<static_cast<unsigned>(num_segments), kThreads, 0, s>>>(
      types, cu, num_segments, total_tokens, grid, num_images, merge, scratch, pos, deltas, err);
  check_launch("mrope_positions_cuda");
}

}  // namespace packing
