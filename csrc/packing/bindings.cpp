// pybind11 bindings of the C++ CPU twins: module kernels._packing. Python passes data_ptr() integers and sizes;
// kernels/packing.py checks dtypes, devices and shapes, and these checks guard what reaches raw memory.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>

#include "pack.h"

namespace py = pybind11;

#define PACK_CHECK(cond, msg) \
  do { if (!(cond)) throw std::invalid_argument(std::string(msg)); } while (0)

namespace {

void check_common(uintptr_t cu, int64_t num_segments, int64_t elem_bytes) {
  PACK_CHECK(num_segments >= 0, "num_segments must be >= 0, got " + std::to_string(num_segments));
  PACK_CHECK(cu != 0, "cu_seqlens pointer is null");
  PACK_CHECK(elem_bytes == 1 || elem_bytes == 2 || elem_bytes == 4 || elem_bytes == 8,
             "elem_bytes must be 1, 2, 4 or 8, got " + std::to_string(elem_bytes));
}

template <typename T> T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

}  // namespace

PYBIND11_MODULE(_packing, m) {
  m.doc() = "C++ CPU twins of kernels/packing.py (raw pointers; no torch dependency)";
  m.def("plan_bins", &packing::plan_bins_cpu, py::arg("lengths"), py::arg("max_tokens"), py::arg("num_ranks"),
        py::arg("truncate"), "First-fit-decreasing bins, split/balanced over ranks: [rank][bin][sample].");
  m.def("gather_segments", [](const std::vector<uintptr_t>& srcs, uintptr_t cu, uintptr_t dst, int64_t elem_bytes) {
          check_common(cu, static_cast<int64_t>(srcs.size()), elem_bytes);
          PACK_CHECK(dst != 0, "dst pointer is null");
          py::gil_scoped_release nogil;
          packing::gather_segments_cpu(srcs.data(), ptr<const int32_t>(cu), srcs.size(), ptr<void>(dst), elem_bytes);
        }, py::arg("srcs"), py::arg("cu_seqlens"), py::arg("dst"), py::arg("elem_bytes"),
        "dst[cu[b]:cu[b+1]] = srcs[b] (byte copy).");
  m.def("sample_index", [](uintptr_t cu, int64_t num_segments, uintptr_t out) {
          check_common(cu, num_segments, 4);
          py::gil_scoped_release nogil;
          packing::sample_index_cpu(ptr<const int32_t>(cu), num_segments, ptr<int32_t>(out));
        }, py::arg("cu_seqlens"), py::arg("num_segments"), py::arg("out"), "out[i] = sample of token i (int32).");
  m.def("unpack", [](uintptr_t values, uintptr_t cu, int64_t num_segments, int64_t max_len, uintptr_t out,
                     uint64_t pad_bits, int64_t elem_bytes) {
          check_common(cu, num_segments, elem_bytes);
          PACK_CHECK(max_len >= 0, "max_len must be >= 0, got " + std::to_string(max_len));
          py::gil_scoped_release nogil;
          packing::unpack_cpu(ptr<const void>(values), ptr<const int32_t>(cu), num_segments, max_len, ptr<void>(out),
                              pad_bits, elem_bytes);
        }, py::arg("values"), py::arg("cu_seqlens"), py::arg("num_segments"), py::arg("max_len"), py::arg("out"),
        py::arg("pad_bits"), py::arg("elem_bytes"), "[T] -> [B, max_len] padded with pad_bits.");
  m.def("repack", [](uintptr_t padded, uintptr_t cu, int64_t num_segments, int64_t max_len, uintptr_t out,
                     int64_t elem_bytes) {
          check_common(cu, num_segments, elem_bytes);
          PACK_CHECK(max_len >= 0, "max_len must be >= 0, got " + std::to_string(max_len));
          py::gil_scoped_release nogil;
          packing::repack_cpu(ptr<const void>(padded), ptr<const int32_t>(cu), num_segments, max_len, ptr<void>(out),
                              elem_bytes);
        }, py::arg("padded"), py::arg("cu_seqlens"), py::arg("num_segments"), py::arg("max_len"), py::arg("out"),
        py::arg("elem_bytes"), "[B, max_len] -> [T], the inverse of unpack.");
  m.def("mrope_positions", [](uintptr_t types, uintptr_t cu, int64_t num_segments, uintptr_t grid,
                              int64_t num_images, int64_t merge, uintptr_t pos, uintptr_t deltas) {
          check_common(cu, num_segments, 4);
          PACK_CHECK(merge >= 1, "spatial_merge_size must be >= 1, got " + std::to_string(merge));
          PACK_CHECK(num_images >= 0, "num_images must be >= 0, got " + std::to_string(num_images));
          PACK_CHECK(num_images == 0 || grid != 0, "image_grid_thw pointer is null");
          py::gil_scoped_release nogil;
          packing::mrope_positions_cpu(ptr<const int32_t>(types), ptr<const int32_t>(cu), num_segments,
                                       ptr<const int64_t>(grid), num_images, merge, ptr<int64_t>(pos),
                                       ptr<int64_t>(deltas));
        }, py::arg("types"), py::arg("cu_seqlens"), py::arg("num_segments"), py::arg("grid"), py::arg("num_images"),
        py::arg("merge"), py::arg("pos"), py::arg("deltas"), "Packed M-RoPE positions [4, T] and deltas [B].");
}
