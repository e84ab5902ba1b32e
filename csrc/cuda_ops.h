// Host entry points of the CUDA kernels (csrc/cuda_ops.cu), called by the pybind11 bindings in
// csrc/cuda_bindings.cpp. Everything is a raw device pointer plus shapes, row strides (elements)
// and dtype codes (0 = fp32, 1 = fp16, 2 = bf16); `stream` is a cudaStream_t as an integer. No
// torch headers: the extension does not depend on torch's C++ ABI.
#pragma once

#include <cstdint>
#include <string>

namespace safemerge_cuda {

// Workspace a lowrank_passes call needs, in fp32 and fp64 elements.
struct LowrankPlan {
  int splits1;         // row splits of pass 1 (partial T per split, summed in a fixed order)
  int splits2;         // column splits of pass 2 (partial P per split)
  int64_t ws_floats;   // fp32 workspace: max(splits1 * d_in, splits2 * d_out) * r (0 if no split)
  int64_t ws_doubles;  // fp64 workspace: ||V||^2 partials plus the result slot
};
LowrankPlan lowrank_plan(int64_t d_out, int64_t d_in, int64_t r, int num_sms);

// T = V^T B (d_in x r fp32), P = V T (d_out x r fp32); ||V||^2 goes to ws_d[plan.ws_doubles - 1].
// The workspace lengths are checked against the plan; `device` is made current for the launches.
void lowrank_passes(const void* wa, const void* wu, int64_t d_out, int64_t d_in, int64_t lda, int64_t ldu,
                    int dtype, const float* B, int64_t r, float* T, float* P, float* ws_f, int64_t ws_f_len,
                    double* ws_d, int64_t ws_d_len, const LowrankPlan& plan, int device, uintptr_t stream);

// Full-rank scoring over column blocks J of dW: M_J = V^T dW[:, J] into m_scratch (d_in x col_block
// fp32), N_J = V M_J (written into n_out with row stride d_in when n_out is not null).
// sums[0..3] = ||M||^2, ||N||^2, ||dW||^2, ||V||^2 (float64, device memory).
int64_t fullrank_partials(int64_t d_out, int64_t d_in, int64_t col_block);
void fullrank(const void* wa, const void* wu, int w_dtype, const void* delta, int d_dtype, int64_t d_out,
              int64_t d_in, int64_t lda, int64_t ldu, int64_t ldd, int64_t col_block, float* m_scratch,
              float* n_out, double* partials, int64_t partials_len, double* sums, int device, uintptr_t stream);

// Empty string when the runtime sees a device, else why not.
std::string device_problem();
int sm_count(int device);

}  // namespace safemerge_cuda
