// pybind11 bindings of the CUDA kernels (csrc/cuda_ops.cu) as safemerge_ext._cuda. Pointers are
// integers from tensor.data_ptr(), streams from torch.cuda.current_stream().cuda_stream; no torch
// headers, so the extension does not depend on torch's C++ ABI.

#include <pybind11/pybind11.h>

#include "cuda_ops.h"

namespace py = pybind11;
using namespace safemerge_cuda;

namespace {
template <class T> T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }
}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "SafeMERGE CUDA kernels (pointer-based; no torch C++ ABI).";
  // module_local: another build of this module may be loaded in the same process (an installed
  // extension beside one a test or a second checkout built); a global type would refuse it.
  py::class_<LowrankPlan>(m, "LowrankPlan", py::module_local())
      .def_readonly("splits1", &LowrankPlan::splits1)
      .def_readonly("splits2", &LowrankPlan::splits2)
      .def_readonly("ws_floats", &LowrankPlan::ws_floats)
      .def_readonly("ws_doubles", &LowrankPlan::ws_doubles);
  m.def("lowrank_plan", &lowrank_plan, py::arg("d_out"), py::arg("d_in"), py::arg("r"), py::arg("num_sms"),
        "Row/column splits and the fp32/fp64 workspace sizes of a lowrank_passes call (r <= 256).");
  m.def(
      "lowrank_passes",
      [](uintptr_t wa, uintptr_t wu, int64_t d_out, int64_t d_in, int64_t lda, int64_t ldu, int dtype, uintptr_t b,
         int64_t r, uintptr_t t, uintptr_t p, uintptr_t ws_f, int64_t ws_f_len, uintptr_t ws_d, int64_t ws_d_len,
         const LowrankPlan& plan, int device, uintptr_t stream) {
        lowrank_passes(ptr<const void>(wa), ptr<const void>(wu), d_out, d_in, lda, ldu, dtype, ptr<const float>(b), r,
                       ptr<float>(t), ptr<float>(p), ptr<float>(ws_f), ws_f_len, ptr<double>(ws_d), ws_d_len, plan,
                       device, stream);
      },
      py::call_guard<py::gil_scoped_release>(), py::arg("wa"), py::arg("wu"), py::arg("d_out"), py::arg("d_in"),
      py::arg("lda"), py::arg("ldu"), py::arg("dtype"), py::arg("b"), py::arg("r"), py::arg("t_out"),
      py::arg("p_out"), py::arg("ws_f"), py::arg("ws_f_len"), py::arg("ws_d"), py::arg("ws_d_len"), py::arg("plan"),
      py::arg("device"), py::arg("stream"),
      "Enqueue T = V^T B and P = V T (fp32) on `stream`; ||V||^2 lands in ws_d[plan.ws_doubles - 1].");
  m.def("fullrank_partials", &fullrank_partials, py::arg("d_out"), py::arg("d_in"), py::arg("col_block"),
        "Number of float64 partial slots a fullrank call needs.");
  m.def(
      "fullrank",
      [](uintptr_t wa, uintptr_t wu, int w_dtype, uintptr_t delta, int d_dtype, int64_t d_out, int64_t d_in,
         int64_t lda, int64_t ldu, int64_t ldd, int64_t col_block, uintptr_t m_scratch, uintptr_t n_out,
         uintptr_t partials, int64_t partials_len, uintptr_t sums, int device, uintptr_t stream) {
        fullrank(ptr<const void>(wa), ptr<const void>(wu), w_dtype, ptr<const void>(delta), d_dtype, d_out, d_in, lda,
                 ldu, ldd, col_block, ptr<float>(m_scratch), ptr<float>(n_out), ptr<double>(partials), partials_len,
                 ptr<double>(sums), device, stream);
      },
      py::call_guard<py::gil_scoped_release>(), py::arg("wa"), py::arg("wu"), py::arg("w_dtype"), py::arg("delta"),
      py::arg("d_dtype"), py::arg("d_out"), py::arg("d_in"), py::arg("lda"), py::arg("ldu"), py::arg("ldd"),
      py::arg("col_block"), py::arg("m_scratch"), py::arg("n_out"), py::arg("partials"), py::arg("partials_len"),
      py::arg("sums"), py::arg("device"), py::arg("stream"),
      "Enqueue the full-rank passes; sums[0:4] = ||V^T dW||^2, ||V V^T dW||^2, ||dW||^2, ||V||^2 (float64).\n"
      "n_out = 0 skips writing N = V V^T dW.");
  m.def("device_problem", &device_problem, "Empty when a CUDA device is visible, else why not.");
  m.def("sm_count", &sm_count, py::arg("device"), "Multiprocessor count of a device.");
}
