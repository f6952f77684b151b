// pybind11 bindings of the CUDA twins: module kernels._packing_cuda, linked with the nvcc-built pack.cu object
// and the static cudart. A separate module from kernels._packing so that a machine without a CUDA runtime still
// imports the CPU one. Calls are asynchronous on the given stream (mrope reports errors through a device flag).
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "pack.h"

namespace py = pybind11;

#define PACK_CHECK(cond, msg) \
  do { if (!(cond)) throw std::invalid_argument(std::string(msg)); } while (0)

namespace {

template <typename T> T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

void check_common(uintptr_t cu, int64_t num_segments, int64_t elem_bytes) {
  PACK_CHECK(num_segments >= 0, "num_segments must be >= 0, got " + std::to_string(num_segments));
  PACK_CHECK(cu != 0, "cu_seqlens pointer is null");
  PACK_CHECK(elem_bytes == 1 || elem_bytes == 2 || elem_bytes == 4 || elem_bytes == 8,
             "elem_bytes must be 1, 2, 4 or 8, got " + std::to_string(elem_bytes));
}

}  // namespace

PYBIND11_MODULE(_packing_cuda, m) {
  m.doc() = "CUDA twins of kernels/packing.py (raw device pointers and a stream; no torch dependency)";
  m.def("gather_segments", [](uintptr_t srcs, uintptr_t cu, int64_t num_segments, int64_t num_tokens, uintptr_t dst,
                              int64_t elem_bytes, uintptr_t sample_index, int device, uintptr_t stream) {
          check_common(cu, num_segments, elem_bytes);
          PACK_CHECK(num_tokens == 0 || (srcs != 0 && dst != 0), "srcs and dst pointers must not be null");
          packing::gather_segments_cuda(ptr<const uintptr_t>(srcs), ptr<const int32_t>(cu), num_segments, num_tokens,
                                        ptr<void>(dst), elem_bytes, ptr<int32_t>(sample_index), device, stream);
        }, py::arg("srcs"), py::arg("cu_seqlens"), py::arg("num_segments"), py::arg("num_tokens"), py::arg("dst"),
        py::arg("elem_bytes"), py::arg("sample_index"), py::arg("device"), py::arg("stream"),
        "dst[cu[b]:cu[b+1]] = srcs[b]; srcs is a device array of pointers; sample_index optional (0).");
  m.def("unpack", [](uintptr_t values, uintptr_t cu, int64_t num_segments, int64_t max_len, uintptr_t out,
                     uint64_t pad_bits, int64_t elem_bytes, int device, uintptr_t stream) {
          check_common(cu, num_segments, elem_bytes);
          PACK_CHECK(max_len >= 0, "max_len must be >= 0, got " + std::to_string(max_len));
          packing::unpack_cuda(ptr<const void>(values), ptr<const int32_t>(cu), num_segments, max_len, ptr<void>(out),
                               pad_bits, elem_bytes, device, stream);
        }, py::arg("values"), py::arg("cu_seqlens"), py::arg("num_segments"), py::arg("max_len"), py::arg("out"),
        py::arg("pad_bits"), py::arg("elem_bytes"), py::arg("device"), py::arg("stream"),
        "[T] -> [B, max_len] padded with pad_bits.");
  m.def("repack", [](uintptr_t padded, uintptr_t cu, int64_t num_segments, int64_t max_len, uintptr_t out,
                     int64_t elem_bytes, int device, uintptr_t stream) {
          check_common(cu, num_segments, elem_bytes);
          PACK_CHECK(max_len >= 0, "max_len must be >= 0, got " + std::to_string(max_len));
          packing::repack_cuda(ptr<const void>(padded), ptr<const int32_t>(cu), num_segments, max_len, ptr<void>(out),
                               elem_bytes, device, stream);
        }, py::arg("padded"), py::arg("cu_seqlens"), py::arg("num_segments"), py::arg("max_len"), py::arg("out"),
        py::arg("elem_bytes"), py::arg("device"), py::arg("stream"), "[B, max_len] -> [T], the inverse of unpack.");
  m.def("mrope_positions", [](uintptr_t types, uintptr_t cu, int64_t num_segments, int64_t num_tokens,
                              uintptr_t grid, int64_t num_images, int64_t merge, uintptr_t pos, uintptr_t deltas,
                              uintptr_t scratch, uintptr_t err, int device, uintptr_t stream) {
          check_common(cu, num_segments, 4);
          PACK_CHECK(merge >= 1, "spatial_merge_size must be >= 1, got " + std::to_string(merge));
          PACK_CHECK(num_images >= 0, "num_images must be >= 0, got " + std::to_string(num_images));
          PACK_CHECK(num_images == 0 || grid != 0, "image_grid_thw pointer is null");
          PACK_CHECK(scratch != 0 && err != 0, "scratch and err pointers must not be null");
          packing::mrope_positions_cuda(ptr<const int32_t>(types), ptr<const int32_t>(cu), num_segments, num_tokens,
                                        ptr<const int64_t>(grid), num_images, merge, ptr<int64_t>(pos),
                                        ptr<int64_t>(deltas), ptr<int32_t>(scratch), ptr<int32_t>(err), device,
                                        stream);
        }, py::arg("types"), py::arg("cu_seqlens"), py::arg("num_segments"), py::arg("num_tokens"), py::arg("grid"),
        py::arg("num_images"), py::arg("merge"), py::arg("pos"), py::arg("deltas"), py::arg("scratch"),
        py::arg("err"), py::arg("device"), py::arg("stream"),
        "Packed M-RoPE positions [4, T] and deltas [B]; err[0] gets the lowest encoded error (see error_message).");
  m.def("error_message", &packing::mrope_error_message, py::arg("encoded"), py::arg("num_segments"),
        "Text of an encoded mrope error.");
}
