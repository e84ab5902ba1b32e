// CUDA kernels for SafeMERGE's scoring over V = W_aligned - W_unaligned (SPEC section 1), for GPUs
// where Triton is missing. V, dW and C = V V^T / ||V|| are never stored: every kernel forms its
// tiles of V (and dW) in shared memory from the stored fp32/fp16/bf16 weights, in fp32.
//
// Determinism: no atomics. Every partial (a split's T or P, a tile's sum of squares) has its own
// slot and is reduced in a fixed order, so the same inputs give the same bits on the same GPU.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "cuda_ops.h"

namespace safemerge_cuda {
namespace {

// dtype code -> element load converted to fp32 (one table for every kernel).
template <int DT> struct Ld;
template <> struct Ld<0> {
  static __device__ __forceinline__ float at(const void* p, int64_t i) { return static_cast<const float*>(p)[i]; }
};
template <> struct Ld<1> {
  static __device__ __forceinline__ float at(const void* p, int64_t i) {
    return __half2float(static_cast<const __half*>(p)[i]);
  }
};
template <> struct Ld<2> {
  static __device__ __forceinline__ float at(const void* p, int64_t i) {
    return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  }
};

constexpr int kThreads = 256;

// Sum of `x` over the block in a fixed tree order (float64); result valid in thread 0.
__device__ double block_sum(double x) {
  __shared__ double red[kThreads];
  red[threadIdx.x] = x;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
    __syncthreads();
  }
  return red[0];
}

// out[0] = sum of in[0:n) in a fixed order (one block).
__global__ void reduce_doubles(const double* in, int64_t n, double* out) {
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) s += in[i];
  s = block_sum(s);
  if (threadIdx.x == 0) out[0] = s;
}

// out[e] = sum_s part[s * n + e] for e < n, s in order (the split-K reduction).
__global__ void reduce_splits(const float* part, int splits, int64_t n, float* out) {
  const int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (e >= n) return;
  float s = 0.0f;
  for (int k = 0; k < splits; ++k) s += part[int64_t(k) * n + e];
  out[e] = s;
}

constexpr int kTile = 32;  // rows and columns of V per shared tile in the low-rank passes
constexpr int kRankGroups = kThreads / kTile;  // 8 rank lanes; thread owns ranks g, g + 8, ...

// Pass 1, one block = 32 columns of V and one row split:
//   T[j, k] = sum_{i in split} (WA[i, j] - WU[i, j]) * B[i, k],  sq = sum_{i in split} V[i, j]^2.
// V is formed in fp32 in shared memory (fp16/bf16 differences are exact in fp32 unless the two
// exponents differ by more than 16 for bf16, 13 for fp16; then they round once), accumulated in
// fp32 registers (RPT ranks per thread); the block's sum of squares is reduced in float64 into its
// own slot of vsq_part. With splits > 1, T is a partial in slot blockIdx.y of `out`.
template <int DT, int RPT>
__global__ void __launch_bounds__(kThreads) lowrank_pass1(const void* wa, const void* wu, int64_t d_out,
                                                          int64_t d_in, int64_t lda, int64_t ldu,
                                                          const float* B, int r, int64_t rows_per_split,
                                                          float* out, double* vsq_part) {
  __shared__ float Vs[kTile][kTile + 1];
  __shared__ float Bs[kTile][kRankGroups * RPT];
  const int t = threadIdx.x, jj = t % kTile, g = t / kTile;
  const int64_t j = int64_t(blockIdx.x) * kTile + jj;
  const int64_t i_begin = int64_t(blockIdx.y) * rows_per_split;
  const int64_t i_end = min(d_out, i_begin + rows_per_split);
  float acc[RPT];
#pragma unroll
  for (int m = 0; m < RPT; ++m) acc[m] = 0.0f;
  double sq = 0.0;  // fp32 within a tile, float64 across tiles: a split may span 16k rows
  for (int64_t i0 = i_begin; i0 < i_end; i0 += kTile) {
    float tile_sq = 0.0f;
#pragma unroll
    for (int q = 0; q < kTile / kRankGroups; ++q) {
      const int ii = g + kRankGroups * q;
      const int64_t i = i0 + ii;
      float v = 0.0f;
      if (i < i_end && j < d_in) v = Ld<DT>::at(wa, i * lda + j) - Ld<DT>::at(wu, i * ldu + j);
      Vs[ii][jj] = v;
      tile_sq += v * v;
    }
    sq += double(tile_sq);
    for (int e = t; e < kTile * kRankGroups * RPT; e += kThreads) {
      const int ii = e / (kRankGroups * RPT), k = e % (kRankGroups * RPT);
      const int64_t i = i0 + ii;
      Bs[ii][k] = (i < i_end && k < r) ? B[i * r + k] : 0.0f;
    }
    __syncthreads();
#pragma unroll 8
    for (int ii = 0; ii < kTile; ++ii) {
      const float v = Vs[ii][jj];
#pragma unroll
      for (int m = 0; m < RPT; ++m) acc[m] += v * Bs[ii][g + kRankGroups * m];
    }
    __syncthreads();
  }
  if (j < d_in) {
    float* o = out + int64_t(blockIdx.y) * d_in * r + j * r;
#pragma unroll
    for (int m = 0; m < RPT; ++m) {
      const int k = g + kRankGroups * m;
      if (k < r) o[k] = acc[m];
    }
  }
  const double s = block_sum(sq);
  if (t == 0) vsq_part[int64_t(blockIdx.y) * gridDim.x + blockIdx.x] = s;
}

// Pass 2, one block = 32 rows of V and one column split: P[i, k] = sum_{j in split} V[i, j] T[j, k].
// Same tiling and dtype choices as pass 1; with splits > 1, P is a partial in slot blockIdx.y.
template <int DT, int RPT>
__global__ void __launch_bounds__(kThreads) lowrank_pass2(const void* wa, const void* wu, int64_t d_out,
                                                          int64_t d_in, int64_t lda, int64_t ldu,
                                                          const float* T, int r, int64_t cols_per_split,
                                                          float* out) {
  __shared__ float Vs[kTile][kTile + 1];  // Vs[i][j]
  __shared__ float Ts[kTile][kRankGroups * RPT];
  const int t = threadIdx.x, ii = t % kTile, g = t / kTile;
  const int64_t i = int64_t(blockIdx.x) * kTile + ii;
  const int64_t j_begin = int64_t(blockIdx.y) * cols_per_split;
  const int64_t j_end = min(d_in, j_begin + cols_per_split);
  float acc[RPT];
#pragma unroll
  for (int m = 0; m < RPT; ++m) acc[m] = 0.0f;
  for (int64_t j0 = j_begin; j0 < j_end; j0 += kTile) {
    // coalesced along j: thread t reads column t % 32 of rows t / 32 + 8 q
#pragma unroll
    for (int q = 0; q < kTile / kRankGroups; ++q) {
      const int ri = g + kRankGroups * q;
      const int64_t row = int64_t(blockIdx.x) * kTile + ri, col = j0 + (t % kTile);
      float v = 0.0f;
      if (row < d_out && col < j_end) v = Ld<DT>::at(wa, row * lda + col) - Ld<DT>::at(wu, row * ldu + col);
      Vs[ri][t % kTile] = v;
    }
    for (int e = t; e < kTile * kRankGroups * RPT; e += kThreads) {
      const int jj = e / (kRankGroups * RPT), k = e % (kRankGroups * RPT);
      const int64_t j = j0 + jj;
      Ts[jj][k] = (j < j_end && k < r) ? T[j * r + k] : 0.0f;
    }
    __syncthreads();
#pragma unroll 8
    for (int jj = 0; jj < kTile; ++jj) {
      const float v = Vs[ii][jj];
#pragma unroll
      for (int m = 0; m < RPT; ++m) acc[m] += v * Ts[jj][g + kRankGroups * m];
    }
    __syncthreads();
  }
  if (i < d_out) {
    float* o = out + int64_t(blockIdx.y) * d_out * r + i * r;
#pragma unroll
    for (int m = 0; m < RPT; ++m) {
      const int k = g + kRankGroups * m;
      if (k < r) o[k] = acc[m];
    }
  }
}

int ceil_div(int64_t a, int64_t b) { return int((a + b - 1) / b); }

// Splits so that about 4 blocks per SM are in flight, each with at least 256 rows/columns.
int choose_splits(int64_t tiles, int64_t length, int num_sms) {
  const int64_t want = std::max<int64_t>(1, (4LL * std::max(num_sms, 1) + tiles - 1) / tiles);
  return int(std::max<int64_t>(1, std::min<int64_t>(want, length / 256)));
}

constexpr int kMaxRank = kRankGroups * 32;  // 256 ranks per launch; more are done in groups

template <int DT, int RPT>
void launch_lowrank(const void* wa, const void* wu, int64_t d_out, int64_t d_in, int64_t lda, int64_t ldu,
                    const float* B, int r, float* T, float* P, float* ws_f, double* ws_d,
                    const LowrankPlan& plan, cudaStream_t s) {
  const dim3 g1(ceil_div(d_in, kTile), plan.splits1), g2(ceil_div(d_out, kTile), plan.splits2);
  const int64_t rows_per = int64_t(ceil_div(ceil_div(d_out, plan.splits1), kTile)) * kTile;
  const int64_t cols_per = int64_t(ceil_div(ceil_div(d_in, plan.splits2), kTile)) * kTile;
  float* t1 = plan.splits1 > 1 ? ws_f : T;
  lowrank_pass1<DT, RPT><<<g1, kThreads, 0, s>>>(wa, wu, d_out, d_in, lda, ldu, B, r, rows_per, t1, ws_d);
  if (plan.splits1 > 1)
    reduce_splits<<<ceil_div(d_in * r, kThreads), kThreads, 0, s>>>(ws_f, plan.splits1, d_in * r, T);
  reduce_doubles<<<1, kThreads, 0, s>>>(ws_d, int64_t(g1.x) * g1.y, ws_d + plan.ws_doubles - 1);
  float* p1 = plan.splits2 > 1 ? ws_f : P;
  lowrank_pass2<DT, RPT><<<g2, kThreads, 0, s>>>(wa, wu, d_out, d_in, lda, ldu, T, r, cols_per, p1);
  if (plan.splits2 > 1)
    reduce_splits<<<ceil_div(d_out * r, kThreads), kThreads, 0, s>>>(ws_f, plan.splits2, d_out * r, P);
}

template <int DT>
void dispatch_rank(const void* wa, const void* wu, int64_t d_out, int64_t d_in, int64_t lda, int64_t ldu,
                   const float* B, int r, float* T, float* P, float* ws_f, double* ws_d,
                   const LowrankPlan& plan, cudaStream_t s) {
  // ranks per thread: the smallest power of two with 8 * RPT >= r (table, not branches per dtype)
  using Fn = void (*)(const void*, const void*, int64_t, int64_t, int64_t, int64_t, const float*, int, float*,
                      float*, float*, double*, const LowrankPlan&, cudaStream_t);
  static const Fn table[] = {launch_lowrank<DT, 1>, launch_lowrank<DT, 2>, launch_lowrank<DT, 4>,
                             launch_lowrank<DT, 8>, launch_lowrank<DT, 16>, launch_lowrank<DT, 32>};
  int idx = 0;
  while ((kRankGroups << idx) < r) ++idx;
  table[idx](wa, wu, d_out, d_in, lda, ldu, B, r, T, P, ws_f, ws_d, plan, s);
}

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

// ---------------------------------------------------------------------------------------------
// Full rank: two tiled fp32 GEMMs whose operand tiles are formed from the stored weights.
constexpr int GB = 64;  // output tile (GB x GB), 256 threads with 4 x 4 outputs each
constexpr int GK = 16;  // reduction depth per shared tile

// 4 x 4 outputs per thread from As[k][m] and Bs[k][n]; shared by both GEMMs.
__device__ __forceinline__ void tile_fma(const float (&As)[GK][GB + 4], const float (&Bs)[GK][GB + 4],
                                         float (&acc)[4][4], int ty, int tx) {
#pragma unroll
  for (int k = 0; k < GK; ++k) {
    float a[4], b[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) a[q] = As[k][ty * 4 + q], b[q] = Bs[k][tx * 4 + q];
#pragma unroll
    for (int p = 0; p < 4; ++p)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[p][q] += a[p] * b[q];
  }
}

// Writes the tile (if out) and returns the sum of squares of its valid outputs (float64).
__device__ __forceinline__ double tile_store(const float (&acc)[4][4], int64_t row0, int64_t col0, int64_t rows,
                                             int64_t cols, float* out, int64_t ldo) {
  double sq = 0.0;
#pragma unroll
  for (int p = 0; p < 4; ++p)
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t r = row0 + p, c = col0 + q;
      if (r < rows && c < cols) {
        if (out) out[r * ldo + c] = acc[p][q];
        sq += double(acc[p][q]) * double(acc[p][q]);
      }
    }
  return sq;
}

// M[j, c] = sum_i V[i, j] * D[i, c0 + c] for j < d_in, c < nc (M row stride nc), fp32 accumulation;
// the tile's ||M||^2 goes to part[tile]. V and D tiles are formed in shared memory from WA, WU, D.
template <int DTW, int DTD>
__global__ void __launch_bounds__(kThreads) gemm_vtd(const void* wa, const void* wu, const void* d, int64_t d_out,
                                                     int64_t d_in, int64_t lda, int64_t ldu, int64_t ldd,
                                                     int64_t c0, int64_t nc, float* M, double* part) {
  __shared__ float As[GK][GB + 4], Bs[GK][GB + 4];
  const int t = threadIdx.x, tx = t % 16, ty = t / 16;
  const int64_t j0 = int64_t(blockIdx.y) * GB, cb = int64_t(blockIdx.x) * GB;
  float acc[4][4] = {};
  for (int64_t i0 = 0; i0 < d_out; i0 += GK) {
#pragma unroll
    for (int q = 0; q < GK * GB / kThreads; ++q) {
      const int e = t + q * kThreads, k = e / GB, m = e % GB;
      const int64_t i = i0 + k, j = j0 + m, c = cb + m;
      As[k][m] = (i < d_out && j < d_in) ? Ld<DTW>::at(wa, i * lda + j) - Ld<DTW>::at(wu, i * ldu + j) : 0.0f;
      Bs[k][m] = (i < d_out && c < nc) ? Ld<DTD>::at(d, i * ldd + c0 + c) : 0.0f;
    }
    __syncthreads();
    tile_fma(As, Bs, acc, ty, tx);
    __syncthreads();
  }
  const double sq = block_sum(tile_store(acc, j0 + ty * 4, cb + tx * 4, d_in, nc, M, nc));
  if (t == 0) part[int64_t(blockIdx.y) * gridDim.x + blockIdx.x] = sq;
}

// N[i, c] = sum_j V[i, j] * M[j, c] for i < d_out, c < nc; written to N_out[i, c0 + c] (row stride
// d_in) when N_out is not null; the tile's ||N||^2 goes to part[tile].
template <int DTW>
__global__ void __launch_bounds__(kThreads) gemm_vm(const void* wa, const void* wu, int64_t d_out, int64_t d_in,
                                                    int64_t lda, int64_t ldu, const float* M, int64_t c0,
                                                    int64_t nc, float* N_out, double* part) {
  __shared__ float As[GK][GB + 4], Bs[GK][GB + 4];
  const int t = threadIdx.x, tx = t % 16, ty = t / 16;
  const int64_t i0 = int64_t(blockIdx.y) * GB, cb = int64_t(blockIdx.x) * GB;
  float acc[4][4] = {};
  for (int64_t j0 = 0; j0 < d_in; j0 += GK) {
#pragma unroll
    for (int q = 0; q < GK * GB / kThreads; ++q) {
      const int e = t + q * kThreads;
      const int m = e / GK, k = e % GK;  // A: coalesced along j
      const int64_t i = i0 + m, j = j0 + k;
      As[k][m] = (i < d_out && j < d_in) ? Ld<DTW>::at(wa, i * lda + j) - Ld<DTW>::at(wu, i * ldu + j) : 0.0f;
      const int kb = e / GB, n = e % GB;  // B: coalesced along c
      const int64_t jb = j0 + kb, c = cb + n;
      Bs[kb][n] = (jb < d_in && c < nc) ? M[jb * nc + c] : 0.0f;
    }
    __syncthreads();
    tile_fma(As, Bs, acc, ty, tx);
    __syncthreads();
  }
  float* out = N_out ? N_out + c0 : nullptr;
  const double sq = block_sum(tile_store(acc, i0 + ty * 4, cb + tx * 4, d_out, nc, out, d_in));
  if (t == 0) part[int64_t(blockIdx.y) * gridDim.x + blockIdx.x] = sq;
}

// part[block] = sum over the block's rows of (A - U)^2 (or A^2 when U is null), float64.
template <int DT>
__global__ void __launch_bounds__(kThreads) sumsq_rows(const void* a, const void* u, int64_t rows, int64_t cols,
                                                       int64_t lda, int64_t ldu, double* part) {
  float s = 0.0f;
  double total = 0.0;
  for (int64_t i = blockIdx.x; i < rows; i += gridDim.x) {
    for (int64_t j = threadIdx.x; j < cols; j += kThreads) {
      const float v = Ld<DT>::at(a, i * lda + j) - (u ? Ld<DT>::at(u, i * ldu + j) : 0.0f);
      s += v * v;
    }
    total += double(s);
    s = 0.0f;
  }
  total = block_sum(total);
  if (threadIdx.x == 0) part[blockIdx.x] = total;
}

constexpr int kSumBlocks = 1024;

template <int DTW, int DTD>
void launch_fullrank(const void* wa, const void* wu, const void* delta, int64_t d_out, int64_t d_in, int64_t lda,
                     int64_t ldu, int64_t ldd, int64_t col_block, float* m_scratch, float* n_out, double* part,
                     double* sums, cudaStream_t s) {
  // partial layout: [||V||^2 blocks][||dW||^2 blocks][M tiles of all J][N tiles of all J]
  double* pv = part;
  double* pd = pv + kSumBlocks;
  double* pm = pd + kSumBlocks;
  const int64_t tiles_j = ceil_div(d_in, GB), tiles_i = ceil_div(d_out, GB);
  int64_t m_slots = 0, n_slots = 0;
  for (int64_t c0 = 0; c0 < d_in; c0 += col_block) {
    const int64_t nc = std::min(col_block, d_in - c0), tiles_c = ceil_div(nc, GB);
    m_slots += tiles_j * tiles_c;
    n_slots += tiles_i * tiles_c;
  }
  double* pn = pm + m_slots;
  sumsq_rows<DTW><<<kSumBlocks, kThreads, 0, s>>>(wa, wu, d_out, d_in, lda, ldu, pv);
  sumsq_rows<DTD><<<kSumBlocks, kThreads, 0, s>>>(delta, nullptr, d_out, d_in, ldd, 0, pd);
  int64_t mo = 0, no = 0;
  for (int64_t c0 = 0; c0 < d_in; c0 += col_block) {
    const int64_t nc = std::min(col_block, d_in - c0), tiles_c = ceil_div(nc, GB);
    gemm_vtd<DTW, DTD><<<dim3(unsigned(tiles_c), unsigned(tiles_j)), kThreads, 0, s>>>(
        wa, wu, delta, d_out, d_in, lda, ldu, ldd, c0, nc, m_scratch, pm + mo);
    gemm_vm<DTW><<<dim3(unsigned(tiles_c), unsigned(tiles_i)), kThreads, 0, s>>>(
        wa, wu, d_out, d_in, lda, ldu, m_scratch, c0, nc, n_out, pn + no);
    mo += tiles_j * tiles_c;
    no += tiles_i * tiles_c;
  }
  reduce_doubles<<<1, kThreads, 0, s>>>(pm, m_slots, sums + 0);
  reduce_doubles<<<1, kThreads, 0, s>>>(pn, n_slots, sums + 1);
  reduce_doubles<<<1, kThreads, 0, s>>>(pd, kSumBlocks, sums + 2);
  reduce_doubles<<<1, kThreads, 0, s>>>(pv, kSumBlocks, sums + 3);
}

}  // namespace

LowrankPlan lowrank_plan(int64_t d_out, int64_t d_in, int64_t r, int num_sms) {
  LowrankPlan p;
  const int64_t rg = std::min<int64_t>(r, kMaxRank);
  p.splits1 = choose_splits(ceil_div(d_in, kTile), d_out, num_sms);
  p.splits2 = choose_splits(ceil_div(d_out, kTile), d_in, num_sms);
  const int64_t f1 = p.splits1 > 1 ? p.splits1 * d_in * rg : 0, f2 = p.splits2 > 1 ? p.splits2 * d_out * rg : 0;
  p.ws_floats = std::max(f1, f2);
  p.ws_doubles = int64_t(ceil_div(d_in, kTile)) * p.splits1 + 1;
  return p;
}

// Makes `device` current for the launches (the extension links its own CUDA runtime, so torch's
// device guard is not relied on) and restores the previous device on the way out.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check(cudaGetDevice(&prev_), "cudaGetDevice");
    if (device != prev_) check(cudaSetDevice(device), "cudaSetDevice");
    restore_ = device != prev_;
  }
  ~DeviceGuard() {
    // (a failed switch back, e.g. to an exclusive-process GPU another process holds, must not stay
    // recorded as the runtime's last error: the next call's launch check would report it)
    if (restore_ && cudaSetDevice(prev_) != cudaSuccess) cudaGetLastError();
  }

 private:
  int prev_ = 0;
  bool restore_ = false;
};

void lowrank_passes(const void* wa, const void* wu, int64_t d_out, int64_t d_in, int64_t lda, int64_t ldu,
                    int dtype, const float* B, int64_t r, float* T, float* P, float* ws_f, int64_t ws_f_len,
                    double* ws_d, int64_t ws_d_len, const LowrankPlan& plan, int device, uintptr_t stream) {
  if (dtype < 0 || dtype > 2) throw std::invalid_argument("dtype code must be 0 (fp32), 1 (fp16) or 2 (bf16)");
  if (r < 1 || r > kMaxRank) throw std::invalid_argument("rank must be 1..256: call once per group of 256 columns of B");
  if (d_out == 0 || d_in == 0) throw std::invalid_argument("empty weight matrix");
  if (d_out > 1 && (lda < d_in || ldu < d_in)) throw std::invalid_argument("row stride below d_in");
  // the workspace this plan writes, from its own splits (a plan made for another shape is refused)
  const int64_t tiles1 = ceil_div(d_in, kTile);
  if (plan.splits1 < 1 || plan.splits2 < 1 || plan.splits1 > ceil_div(d_out, kTile) || plan.splits2 > tiles1)
    throw std::invalid_argument("lowrank plan does not fit this shape: make it with lowrank_plan(d_out, d_in, r, sms)");
  const int64_t need_f = std::max(plan.splits1 > 1 ? plan.splits1 * d_in * r : 0,
                                  plan.splits2 > 1 ? plan.splits2 * d_out * r : 0);
  if (ws_f_len < need_f || ws_d_len < tiles1 * plan.splits1 + 1 || plan.ws_doubles != tiles1 * plan.splits1 + 1)
    throw std::invalid_argument("lowrank workspace smaller than the plan needs");
  DeviceGuard on(device);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  using Fn = void (*)(const void*, const void*, int64_t, int64_t, int64_t, int64_t, const float*, int, float*,
                      float*, float*, double*, const LowrankPlan&, cudaStream_t);
  static const Fn by_dtype[] = {dispatch_rank<0>, dispatch_rank<1>, dispatch_rank<2>};
  by_dtype[dtype](wa, wu, d_out, d_in, lda, ldu, B, int(r), T, P, ws_f, ws_d, plan, s);
  check(cudaGetLastError(), "safemerge lowrank_passes launch");
}

int64_t fullrank_partials(int64_t d_out, int64_t d_in, int64_t col_block) {
  int64_t n = 2 * kSumBlocks;
  for (int64_t c0 = 0; c0 < d_in; c0 += col_block) {
    const int64_t tiles_c = ceil_div(std::min(col_block, d_in - c0), GB);
    n += (ceil_div(d_in, GB) + ceil_div(d_out, GB)) * tiles_c;
  }
  return n;
}

void fullrank(const void* wa, const void* wu, int w_dtype, const void* delta, int d_dtype, int64_t d_out,
              int64_t d_in, int64_t lda, int64_t ldu, int64_t ldd, int64_t col_block, float* m_scratch,
              float* n_out, double* partials, int64_t partials_len, double* sums, int device, uintptr_t stream) {
  if (w_dtype < 0 || w_dtype > 2 || d_dtype < 0 || d_dtype > 2)
    throw std::invalid_argument("dtype codes must be 0 (fp32), 1 (fp16) or 2 (bf16)");
  if (d_out == 0 || d_in == 0 || col_block < 1) throw std::invalid_argument("empty weight matrix or column block");
  if (d_out > 1 && (lda < d_in || ldu < d_in || ldd < d_in)) throw std::invalid_argument("row stride below d_in");
  if (partials_len < fullrank_partials(d_out, d_in, col_block))
    throw std::invalid_argument("fullrank partials smaller than fullrank_partials(d_out, d_in, col_block)");
  DeviceGuard on(device);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  using Fn = void (*)(const void*, const void*, const void*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                      float*, float*, double*, double*, cudaStream_t);
  static const Fn table[3][3] = {
      {launch_fullrank<0, 0>, launch_fullrank<0, 1>, launch_fullrank<0, 2>},
      {launch_fullrank<1, 0>, launch_fullrank<1, 1>, launch_fullrank<1, 2>},
      {launch_fullrank<2, 0>, launch_fullrank<2, 1>, launch_fullrank<2, 2>},
  };
  table[w_dtype][d_dtype](wa, wu, delta, d_out, d_in, lda, ldu, ldd, col_block, m_scratch, n_out, partials, sums, s);
  check(cudaGetLastError(), "safemerge fullrank launch");
}

std::string device_problem() {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    // With no NVIDIA driver at all the runtime says "driver version is insufficient", which reads
    // as an old driver; the driver version is then 0.
    int driver = 0;
    if (e == cudaErrorInsufficientDriver && cudaDriverGetVersion(&driver) == cudaSuccess && driver == 0)
      return std::string("no NVIDIA driver on this machine (the CUDA runtime reports: ") + cudaGetErrorString(e) + ")";
    return std::string("the CUDA runtime reports: ") + cudaGetErrorString(e);
  }
  if (n == 0) return "no CUDA device";
  // A build for other GPUs (SAFEMERGE_CUDA_ARCH, or a GPU older than the default list) loads but
  // has no kernel for this one: every launch would fail, so say so here, where the reason is read.
  // Only the codes of a missing or unusable image say that: any other failure of the probe (a
  // sticky fault, device 0 busy or out of memory while another GPU is used) is left to the launch,
  // which reports it as it did before the probe.
  int dev = 0, major = 0, minor = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) {
    cudaGetLastError();
    return "";
  }
  cudaFuncAttributes attr;
  const cudaError_t fe = cudaFuncGetAttributes(&attr, reduce_doubles);
  cudaGetLastError();  // (not sticky: cleared so the next call does not report it)
  switch (fe) {
    case cudaErrorNoKernelImageForDevice:
    case cudaErrorInvalidDeviceFunction:
    case cudaErrorInvalidPtx:
    case cudaErrorUnsupportedPtxVersion:
    case cudaErrorJitCompilerNotFound:
    case cudaErrorJitCompilationDisabled: {
      const std::string sm = std::to_string(major) + std::to_string(minor);
      return "the CUDA extension has no kernel for this GPU (sm_" + sm + "): " + cudaGetErrorString(fe) +
             "; reinstall with SAFEMERGE_CUDA_ARCH=" + sm + " set";
    }
    default:
      return "";
  }
}

int sm_count(int device) {
  int v = 0;
  check(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  return v;
}

}  // namespace safemerge_cuda
