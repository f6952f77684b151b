// Packing of variable-length multimodal samples into one row of tokens: declarations shared by the C++ CPU
// twins (pack.cpp) and the CUDA twins (pack.cu). Every function takes raw pointers and sizes, never torch types,
// so the extension builds against any torch (CPU-only included). The Python reference and the argument checks
// live in kernels/packing.py; bindings*.cpp check what can be checked without reading tensor data.
//
// Letters: B samples (segments), T packed tokens, N images, L a sample's length.
// cu_seqlens is int32 [B+1], cu_seqlens[0] == 0, non-decreasing, cu_seqlens[B] == T.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace packing {

// Error codes the mrope kernels report (the CPU twin throws, the CUDA twin writes them to a device flag).
// Encoded as sample * kNumErrors + code so that atomicMin reports the lowest bad sample deterministically.
enum MropeError : int32_t {
  kOk = 0,
  kEmptySample = 1,     // cu_seqlens[b + 1] <= cu_seqlens[b]
  kBadTokenType = 2,    // a token type other than 0 (text) or 1 (image)
  kRunMismatch = 3,     // an image run whose length differs from t*h*w/merge^2 of its grid row
  kTooFewGrids = 4,     // more image runs than image_grid_thw rows
  kTooManyGrids = 5,    // fewer image runs than image_grid_thw rows (reported with sample == B)
  kNumErrors = 8,
};

// --- plan_bins (CPU only: the input is a short list of lengths) -----------------------------------------
// Returns per-rank lists of bins, each a list of sample indices. Throws std::invalid_argument on bad input.
std::vector<std::vector<std::vector<int64_t>>> plan_bins_cpu(const std::vector<int64_t>& lengths,
                                                             int64_t max_tokens, int64_t num_ranks, bool truncate);

// --- CPU twins -------------------------------------------------------------------------------------------
// dst[cu[b] + j] = srcs[b][j] for j < cu[b+1] - cu[b]; elements of elem_bytes bytes.
void gather_segments_cpu(const uintptr_t* srcs, const int32_t* cu, int64_t num_segments, void* dst,
                         int64_t elem_bytes);
// out[i] = b for cu[b] <= i < cu[b+1].
void sample_index_cpu(const int32_t* cu, int64_t num_segments, int32_t* out);
// out[b, j] = values[cu[b] + j] if j < len_b else pad (pad holds the element's bytes, little-endian).
void unpack_cpu(const void* values, const int32_t* cu, int64_t num_segments, int64_t max_len, void* out,
                uint64_t pad_bits, int64_t elem_bytes);
// out[cu[b] + j] = padded[b, j] for j < len_b (the inverse of unpack).
void repack_cpu(const void* padded, const int32_t* cu, int64_t num_segments, int64_t max_len, void* out,
                int64_t elem_bytes);
// pos [4, T] int64, deltas [B] int64; types [T] int32; grid [N, 3] int64. Throws std::invalid_argument with a
// message naming the sample.
void mrope_positions_cpu(const int32_t* types, const int32_t* cu, int64_t num_segments, const int64_t* grid,
                         int64_t num_images, int64_t merge, int64_t* pos, int64_t* deltas);

// Text of an encoded error (shared by both modules, hence inline).
inline std::string mrope_error_message(int32_t encoded, int64_t num_segments) {
  const int32_t code = encoded % kNumErrors;
  const int32_t b = encoded / kNumErrors;
  const std::string s = "sample " + std::to_string(b);
  switch (code) {
    case kEmptySample: return s + " is empty (cu_seqlens must be strictly increasing)";
    case kBadTokenType: return s + ": mm_token_type_ids must be 0 (text) or 1 (image); videos are not supported";
    case kRunMismatch: return s + ": an image-token run's length differs from t*h*w/merge^2 of its image_grid_thw row";
    case kTooFewGrids: return s + ": more image-token runs than image_grid_thw rows";
    case kTooManyGrids: return "image_grid_thw has more rows than the image-token runs of the " +
                               std::to_string(num_segments) + " samples";
    default: return "unknown mrope error " + std::to_string(encoded);
  }
}


// --- CUDA twins (pack.cu); pointers are device pointers, stream is a cudaStream_t as an integer ------------
// srcs is a device array of num_segments device pointers. Also writes sample_index when it is not null.
void gather_segments_cuda(const uintptr_t* srcs, const int32_t* cu, int64_t num_segments, int64_t num_tokens,
                          void* dst, int64_t elem_bytes, int32_t* sample_index, int device, uintptr_t stream);
void unpack_cuda(const void* values, const int32_t* cu, int64_t num_segments, int64_t max_len, void* out,
                 uint64_t pad_bits, int64_t elem_bytes, int device, uintptr_t stream);
void repack_cuda(const void* padded, const int32_t* cu, int64_t num_segments, int64_t max_len, void* out,
                 int64_t elem_bytes, int device, uintptr_t stream);
// The caller validated cu_seqlens on the host (cu[B] == num_tokens). err: device int32 [1], set to INT32_MAX by the caller; on return (asynchronous) holds the lowest encoded error.
// scratch: device int32 [num_segments + 1] for the per-sample image-run counts.
void mrope_positions_cuda(const int32_t* types, const int32_t* cu, int64_t num_segments, int64_t num_tokens,
                          const int64_t* grid, int64_t num_images, int64_t merge, int64_t* pos, int64_t* deltas, int32_t* scratch,
                          int32_t* err, int device, uintptr_t stream);

}  // namespace packing
