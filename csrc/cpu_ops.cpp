// CPU kernels for SafeMERGE's two passes over V = W_aligned - W_unaligned (SPEC section 1).
//
//   pass 1:  T = V^T B   (d_in x r)  and  ||V||_F^2
//   pass 2:  P = V T     (d_out x r)
//
// V is never stored: each pass converts a small block of both weight matrices (fp32, fp16 or bf16,
// read in their stored dtype) into an fp32 scratch block that lives in L1/L2, and a register-tiled
// micro-kernel multiplies it against B or T. Accumulation is fp32 (differences of fp16/bf16
// values are exact in fp32 unless their exponents differ by more than 16 for bf16, 13 for fp16:
// then they round once, as in every backend); ||V||^2 is summed per block in fp32 and across
// blocks in float64.
//
// Determinism: pass 1 gives each row group (ranks <= 16: whole rows, a partial T per group, the
// groups fixed by the shape) or each 512-column band (higher ranks, and low ones on AMD's AVX-512
// build where a layer has a band per core: it owns those rows of T) to one thread, with its own
// ||V||^2 partial (the walk depends on the shape, the build and the machine's CPU count, never on a
// call's thread count); pass 2 gives each tile of 4 or 6 rows to one thread. Partials are
// reduced in a fixed order, so the bits depend on neither the thread count nor the schedule, and
// the schedule can be dynamic (a thread that the OS parks on a busy machine does not stall the other).
//
// No torch headers: the module takes raw data pointers, shapes, row strides and a dtype code, so
// it keeps working across torch upgrades. The hot functions are compiled five times and picked at
// import from the CPU's features: x86-64-v4-amx (Intel's AMX tiles, from Sapphire Rapids on, for
// ranks of 16 and more, the 16-float build below that; see the AMX section), x86-64-v4-512
// (AVX-512 with 16-float vectors: Intel, whose cores have two 512-bit FMA ports), x86-64-v4
// (AVX-512VL with 8-float vectors, but 32 registers for wider rank tiles: AMD's Zen 4, which splits
// a 512-bit FMA in two), x86-64-v3 (AVX2 + FMA + F16C) and the baseline ISA. The vector width (or
// the tiles) sets the order of the fp32 sums, so the bits differ between ISA builds (not between
// runs, thread counts or schedules of one build).

#include <pybind11/pybind11.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <new>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#include <unistd.h>
#endif
#if defined(__unix__) || defined(__APPLE__)
#include <cerrno>
#include <csignal>
#include <unistd.h>
#define SM_HAVE_SIGBUS 1
#else
#define SM_HAVE_SIGBUS 0
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

namespace {

#define SM_INLINE inline __attribute__((always_inline))

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define SM_HAVE_V3 1
#define SM_TARGET_V3 __attribute__((target("avx2,fma,f16c")))
#define SM_TARGET_V4 __attribute__((target("avx512f,avx512vl,avx2,fma,f16c")))
#else
#define SM_HAVE_V3 0
#define SM_TARGET_V3
#endif

// The tile unit's kernels: x86-64 Linux (where a process asks the OS for the tile state) with a
// compiler that knows the instructions (GCC 11, clang 12) and an assembler too (setup.py probes it
// and defines SM_NO_AMX where the toolchain fails).
#if SM_HAVE_V3 && defined(__linux__) && defined(__x86_64__) && !defined(SM_NO_AMX) && \
    ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11))
#define SM_HAVE_AMX 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#else
#define SM_HAVE_AMX 0
#endif

using v8f = float __attribute__((vector_size(32)));
using v16f = float __attribute__((vector_size(64)));
using v8u32 = uint32_t __attribute__((vector_size(32)));
using v16u32 = uint32_t __attribute__((vector_size(64)));

// The kernels are written once over a vector type V (8 or 16 floats) with L lanes; a "group" is
// the 2 L columns that one conversion produces (16 or 32).
template <typename V> constexpr int kLanes = int(sizeof(V) / sizeof(float));
template <typename V> struct UBits;  // the unsigned vector of the same width
template <> struct UBits<v8f> { using type = v8u32; };
template <> struct UBits<v16f> { using type = v16u32; };

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// Scratch and operand buffers start on a cache line, so no vector load of them straddles two.
template <typename T>
struct Aligned64 {
  using value_type = T;
  Aligned64() = default;
  template <typename U>
  Aligned64(const Aligned64<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <typename U>
  bool operator==(const Aligned64<U>&) const { return true; }
  template <typename U>
  bool operator!=(const Aligned64<U>&) const { return false; }
};
using FloatBuf = std::vector<float, Aligned64<float>>;

template <typename V>
SM_INLINE V vload(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <typename V>
SM_INLINE void vstore(float* p, V v) { std::memcpy(p, &v, sizeof v); }
// Sum of a vector's lanes in a fixed order (the bits of every ISA build are then reproducible).
SM_INLINE float lane_sum(const float* a, int lanes) {
  float h[8];
  for (int l = 0; l < 8; ++l) h[l] = lanes == 16 ? a[l] + a[l + 8] : a[l];
  return ((h[0] + h[4]) + (h[2] + h[6])) + ((h[1] + h[5]) + (h[3] + h[7]));
}

// Element loads: storage type and conversion to fp32 per dtype code (one table, no branches).
// group<V>() reads the 2 L columns of one group as two vectors; pos<L>() maps a column of a group
// to its slot in the buffers, which hold every group in that order.
template <int DT> struct Elem;
template <> struct Elem<kF32> {
  using T = float;
  static SM_INLINE float one(const T* p) { return *p; }
  template <typename V>
  static SM_INLINE void group(const T* p, V& lo, V& hi) {
    lo = vload<V>(p), hi = vload<V>(p + kLanes<V>);
  }
  template <int L> static SM_INLINE int pos(int j) { return j; }
};
template <> struct Elem<kBF16> {
  using T = uint16_t;
  static SM_INLINE float one(const T* p) {
    uint32_t w = uint32_t(*p) << 16;
    float f;
    std::memcpy(&f, &w, 4);
    return f;
  }
  // 2 L bf16 read as L 32-bit pairs: the low halves (even columns) shifted up and the high halves
  // (odd columns) masked are fp32 already. A group is therefore held as [even columns, odd columns].
  template <typename V>
  static SM_INLINE void group(const T* p, V& lo, V& hi) {
    typename UBits<V>::type w;
    std::memcpy(&w, p, sizeof w);
    lo = (V)(w << 16);
    hi = (V)(w & 0xffff0000u);
  }
  template <int L> static SM_INLINE int pos(int j) { return (j & 1) * L + (j >> 1); }
};
template <> struct Elem<kF16> {
  using T = uint16_t;
#if defined(__FLT16_MAX__)
  using v8h = _Float16 __attribute__((vector_size(16)));
  using v16h = _Float16 __attribute__((vector_size(32)));
  static SM_INLINE float one(const T* p) {
    _Float16 h;
    std::memcpy(&h, p, 2);
    return float(h);
  }
  template <typename V>
  static SM_INLINE V lanes(const T* p) {
    using H = std::conditional_t<kLanes<V> == 8, v8h, v16h>;
    H h;
    std::memcpy(&h, p, sizeof h);
    return __builtin_convertvector(h, V);
  }
#else
  // IEEE binary16 -> binary32 by bit manipulation (normals, subnormals, inf, nan).
  static SM_INLINE float one(const T* p) {
    uint32_t h = *p, sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ffu, w;
    if (exp == 0x1f) {
      w = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {
      w = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
      w = sign;
    } else {
      float f = float(man) * (1.0f / 16777216.0f);  // man * 2^-24
      std::memcpy(&w, &f, 4);
      w |= sign;
    }
    float f;
    std::memcpy(&f, &w, 4);
    return f;
  }
  template <typename V>
  static SM_INLINE V lanes(const T* p) {
    V v;
    for (int l = 0; l < kLanes<V>; ++l) v[l] = one(p + l);
    return v;
  }
#endif
  template <typename V>
  static SM_INLINE void group(const T* p, V& lo, V& hi) {
    lo = lanes<V>(p), hi = lanes<V>(p + kLanes<V>);
  }
  template <int L> static SM_INLINE int pos(int j) { return j; }
};

// V[rows, 0:w) = A - U into buf (row stride ldbuf), each group of 2 L columns in Elem<DT>::pos
// order, zero-filled up to wpad (a multiple of 2 L). Returns sum V^2 (fp32 lanes over this block,
// reduced in a fixed order into a double), or 0 without SQ (pass 2, which has the sum already).
template <int DT, typename V, bool SQ = true>
SM_INLINE double form_v(const typename Elem<DT>::T* a, const typename Elem<DT>::T* u, int64_t lda,
                        int64_t ldu, int rows, int w, int wpad, int ldbuf, float* buf) {
  using E = Elem<DT>;
  constexpr int L = kLanes<V>, G = 2 * L;
  // Eight independent partial sums of V^2: with one, every FMA waits on the previous one's
  // latency (4 cycles), and that chain bounded the whole conversion (measured, 1 thread, pass 1 of
  // 4096x4096 bf16 r=8: 8.2 -> 6.0 ms).
  V sq[8];
  for (auto& s : sq) s = V{};
  const int wfull = w & ~(G - 1);
  for (int i = 0; i < rows; ++i) {
    const typename E::T* pa = a + int64_t(i) * lda;
    const typename E::T* pu = u + int64_t(i) * ldu;
    float* o = buf + int64_t(i) * ldbuf;
    int j = 0;
    for (; j + 4 * G <= wfull; j += 4 * G) {
      for (int g = 0; g < 4; ++g) {
        V alo, ahi, ulo, uhi;
        E::group(pa + j + G * g, alo, ahi);
        E::group(pu + j + G * g, ulo, uhi);
        const V lo = alo - ulo, hi = ahi - uhi;
        vstore(o + j + G * g, lo);
        vstore(o + j + G * g + L, hi);
        if constexpr (SQ) {
          sq[2 * g] += lo * lo;
          sq[2 * g + 1] += hi * hi;
        }
      }
    }
    for (; j < wfull; j += G) {
      V alo, ahi, ulo, uhi;
      E::group(pa + j, alo, ahi);
      E::group(pu + j, ulo, uhi);
      const V lo = alo - ulo, hi = ahi - uhi;
      vstore(o + j, lo);
      vstore(o + j + L, hi);
      if constexpr (SQ) {
        sq[0] += lo * lo;
        sq[1] += hi * hi;
      }
    }
    if (j < wpad) std::fill(o + j, o + wpad, 0.0f);
    for (int t = 0; t < w - j; ++t) {  // the last, partial group
      const float v = E::one(pa + j + t) - E::one(pu + j + t);
      o[j + E::template pos<L>(t)] = v;
      if constexpr (SQ) sq[0][0] += v * v;
    }
  }
  double s = 0.0;
  for (const auto& q : sq)
    for (int l = 0; l < L; ++l) s += double(q[l]);
  return s;
}

// Prefetches the next block (rows x w elements at a / u) into L2 in slices, one per call of
// step(), so its loads are in flight while the current block's FMAs run instead of all at once
// before them (measured at 4096x4096 bf16 r=8 on 2 Zen 4 cores: 10.6 -> 9.7 ms). Each row's run
// is covered from the cache line holding its first element to the one holding its last: weights
// read in place from a safetensors file start wherever the header ends (8-byte aligned), so a
// 1 KiB run usually spans 17 lines, and the one a count from the first element misses is a
// demand miss per run (measured: 4096x4096 bf16 r=8 at a 16-byte offset, 9.1 -> 12.7 ms). Rows
// and lines are walked with counters: a division per line to find them cost 20% of pass 2 at
// r = 8 (1 thread, 4096x4096: 6.6 -> 5.2 ms).
template <typename T>
struct BlockPrefetch {
  const char *a = nullptr, *u = nullptr;
  int64_t lda = 0, ldu = 0;
  int lines = 0, total = 0, per = 0, next = 0;
  int row = 0, line = 0;
  BlockPrefetch(const T* a_, const T* u_, int64_t lda_, int64_t ldu_, int rows, int w, int steps)
      : lda(lda_ * int64_t(sizeof(T))), ldu(ldu_ * int64_t(sizeof(T))) {
    if (a_) {
      // whole cache lines from the one holding the first element to the one holding the last
      const uintptr_t fa = reinterpret_cast<uintptr_t>(a_) & ~uintptr_t(63);
      const uintptr_t la = (reinterpret_cast<uintptr_t>(a_ + w) - 1) & ~uintptr_t(63);
      const uintptr_t fu = reinterpret_cast<uintptr_t>(u_) & ~uintptr_t(63);
      const uintptr_t lu = (reinterpret_cast<uintptr_t>(u_ + w) - 1) & ~uintptr_t(63);
      lines = w > 0 ? int(std::max(la - fa, lu - fu) / 64) + 1 : 0;
      a = reinterpret_cast<const char*>(fa);
      u = reinterpret_cast<const char*>(fu);
    }
    total = a ? rows * lines : 0;
    per = (total + steps - 1) / steps;
  }
  SM_INLINE void step() {
    for (const int end = std::min(total, next + per); next < end; ++next) {
      __builtin_prefetch(a + row * lda + line * 64, 0, 2);
      __builtin_prefetch(u + row * ldu + line * 64, 0, 2);
      if (++line == lines) line = 0, ++row;
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Pass 1: T = V^T B, ||V||^2. One band = P1_BAND columns of V over all rows, walked down in
// chunks of P1_KC rows, so every read is a contiguous run of P1_BAND elements of a row.
constexpr int P1_BAND = 512;  // band width: 32 groups of 16 columns (16 of 32); 1 KiB of a bf16 row
constexpr int P1_KC = 32;     // rows of V formed at once: 32 x 512 fp32 = 64 KiB
constexpr int P1_LD = P1_BAND + 16;  // row stride of the scratch blocks: see below
constexpr int P1_NR = 6;      // ranks per register tile: 2 x 6 accumulators + 3 operands = 15 ymm
constexpr int P1_NR_V4 = 8;   // with 32 registers (AVX-512VL): 2 x 8 + 3 = 19
constexpr int P1_NR_V4Z = 8;  // the same in 16-float vectors
constexpr int64_t kP1Groups = 16;               // row groups of pass 1 (by rows) at most, each with a partial T
constexpr int64_t kP1SliceCols = 8 * P1_BAND;   // columns of a pass-1 work item (by rows)
constexpr int64_t kP1MinGroupChunks = 8;         // (a group's partial is worth its rows: 256 or more)
constexpr int kP1RowsMaxRank = 16;               // pass 1 by rows up to this rank (see pass1_by_rows) ...
constexpr int64_t kP1RowsMaxPartial = 512 << 10; // ... and while a partial T fits in this much L2

// acc[k][0:2L] += sum_i X[i, 0:2L] * B[i, k] for k < NR: one group of columns of V^T against NR
// ranks. X and acc have row stride P1_LD. With a power-of-two stride (2 KiB) the 32 rows of a
// strip would share two L1 sets and evict each other on every rank tile (measured: pass 1 took
// 6.97 ms instead of 5.24 ms at 4096x4096 bf16 r=8 on 2 cores).
template <int NR, typename V>
SM_INLINE void p1_tile(const float* x, int kc, const float* b, int ldb, float* acc, int64_t ldacc) {
  constexpr int L = kLanes<V>;
  V c0[NR], c1[NR];
  for (int k = 0; k < NR; ++k) {
    c0[k] = vload<V>(acc + k * ldacc);
    c1[k] = vload<V>(acc + k * ldacc + L);
  }
  for (int i = 0; i < kc; ++i) {
    V x0 = vload<V>(x + i * P1_LD), x1 = vload<V>(x + i * P1_LD + L);
    const float* bi = b + int64_t(i) * ldb;
    for (int k = 0; k < NR; ++k) {
      float bk = bi[k];
      c0[k] += x0 * bk;
      c1[k] += x1 * bk;
    }
  }
  for (int k = 0; k < NR; ++k) {
    vstore(acc + k * ldacc, c0[k]);
    vstore(acc + k * ldacc + L, c1[k]);
  }
}

// p1_tile<n> for a remainder of n < N ranks (n known only at run time).
template <int N, typename V>
SM_INLINE void p1_rem(int n, const float* x, int kc, const float* b, int ldb, float* acc, int64_t ldacc) {
  if constexpr (N >= 1) {
    if (n == N) p1_tile<N, V>(x, kc, b, ldb, acc, ldacc);
    else p1_rem<N - 1, V>(n, x, kc, b, ldb, acc, ldacc);
  }
}

// A finished band's sums (tacc: r rows of P1_LD, each group of 2 L columns in Elem<DT>::pos<L>
// order, w columns from c0) into T (column order) and Tt (pass 2's operand, in the buffers' order).
template <int DT, int L>
SM_INLINE void write_band(const float* tacc, int w, int r, int64_t c0, float* T, float* Tt, int64_t ldt) {
  constexpr int G = 2 * L;
  for (int j = 0; j < w; ++j) {
    const int slot = (j & ~(G - 1)) + Elem<DT>::template pos<L>(j & (G - 1));
    for (int k = 0; k < r; ++k) T[(c0 + j) * r + k] = tacc[k * P1_LD + slot];
  }
  const int width = (w + G - 1) / G * G;
  for (int k = 0; k < r; ++k) std::memcpy(Tt + k * ldt + c0, tacc + k * P1_LD, sizeof(float) * width);
}

// Pass 1 by column bands, for high ranks: rows [i_begin, i_end) of one band (i_begin a multiple of
// P1_KC): tacc carries the band's sums
// from the rows before, vsq is the band's ||V||^2 so far and the sum with these rows comes back;
// T and Tt are written when i_end reaches d_out. Split at such rows, the sums run in the same order
// as in one call, so the bits do not depend on the split.
template <int DT, int NR, typename V>
SM_INLINE double pass1_band_impl(const typename Elem<DT>::T* wa, const typename Elem<DT>::T* wu,
                                 int64_t d_out, int64_t d_in, int64_t lda, int64_t ldu,
                                 const float* B, int r, int64_t c0, float* T, float* Tt,
                                 int64_t ldt, float* buf, float* tacc, int64_t i_begin, int64_t i_end, double vsq) {
  constexpr int L = kLanes<V>, G = 2 * L;
  const int w = int(std::min<int64_t>(P1_BAND, d_in - c0));
  const int strips = (w + G - 1) / G;
  if (i_begin == 0) std::fill(tacc, tacc + int64_t(r) * P1_LD, 0.0f);
  for (int64_t i0 = i_begin; i0 < i_end; i0 += P1_KC) {
    const int kc = int(std::min<int64_t>(P1_KC, i_end - i0));
    const int64_t ni = i0 + P1_KC;  // the next block: the next rows of this band
    const bool more = ni < d_out;
    vsq += form_v<DT, V>(wa + i0 * lda + c0, wu + i0 * ldu + c0, lda, ldu, kc, w, strips * G, P1_LD, buf);
    BlockPrefetch<typename Elem<DT>::T> next(more ? wa + ni * lda + c0 : nullptr, more ? wu + ni * ldu + c0 : nullptr,
                                             lda, ldu, more ? int(std::min<int64_t>(P1_KC, d_out - ni)) : 0, w, strips);
    const float* Bi = B + i0 * r;
    for (int s = 0; s < strips; ++s) {
      next.step();
      const float* x = buf + G * s;
      int k0 = 0;
      for (; k0 + NR <= r; k0 += NR) p1_tile<NR, V>(x, kc, Bi + k0, r, tacc + k0 * P1_LD + G * s, P1_LD);
      if (k0 < r) p1_rem<NR - 1, V>(r - k0, x, kc, Bi + k0, r, tacc + k0 * P1_LD + G * s, P1_LD);
    }
  }
  if (i_end == d_out) write_band<DT, L>(tacc, w, r, c0, T, Tt, ldt);
  return vsq;
}

// Pass 1 by rows, for low ranks: rows [lo, hi) of one row group (lo a multiple of P1_KC) and
// columns [cb, ce) of one column slice (cb a multiple of P1_BAND), walked chunk by chunk and, in
// each chunk, band by band across the slice: tg (r x ldg, Tt's layout) is the group's partial T
// and gains these rows' sums in these columns; vsq is the (group, slice)'s ||V||^2 so far, and the
// sum with these rows comes back. Each row is read a slice at a time, up to 8 KiB of bf16 (pass 1
// alone walking 512-column bands down every row measured 2x slower from DRAM on an Intel Xeon VM:
// 1 KiB runs 8 KiB apart). Split at chunk boundaries, the sums run in the same order as in one
// call, so the bits do not depend on the split.
template <int DT, int NR, typename V>
SM_INLINE double pass1_rows_impl(const typename Elem<DT>::T* wa, const typename Elem<DT>::T* wu,
                                 int64_t d_out, int64_t d_in, int64_t lda, int64_t ldu, const float* B, int r,
                                 float* tg, int64_t ldg, float* buf, int64_t lo, int64_t hi, int64_t cb, int64_t ce,
                                 double vsq) {
  constexpr int L = kLanes<V>, G = 2 * L;
  for (int64_t i0 = lo; i0 < hi; i0 += P1_KC) {
    const int kc = int(std::min<int64_t>(P1_KC, hi - i0));
    const float* Bi = B + i0 * r;
    for (int64_t c0 = cb; c0 < ce; c0 += P1_BAND) {
      const int w = int(std::min<int64_t>(P1_BAND, ce - c0));
      const int strips = (w + G - 1) / G;
      vsq += form_v<DT, V>(wa + i0 * lda + c0, wu + i0 * ldu + c0, lda, ldu, kc, w, strips * G, P1_LD, buf);
      // the next block: the next band of these rows, or the first band of the next chunk
      const bool last = c0 + P1_BAND >= ce;
      const int64_t ni = last ? i0 + P1_KC : i0, nc = last ? cb : c0 + P1_BAND;
      const bool more = ni < d_out;
      BlockPrefetch<typename Elem<DT>::T> next(
          more ? wa + ni * lda + nc : nullptr, more ? wu + ni * ldu + nc : nullptr, lda, ldu,
          more ? int(std::min<int64_t>(P1_KC, d_out - ni)) : 0, more ? int(std::min<int64_t>(P1_BAND, ce - nc)) : 0,
          strips);
      for (int s = 0; s < strips; ++s) {
        next.step();
        const float* x = buf + G * s;
        float* acc = tg + c0 + G * s;
        int k0 = 0;
        for (; k0 + NR <= r; k0 += NR) p1_tile<NR, V>(x, kc, Bi + k0, r, acc + k0 * ldg, ldg);
        if (k0 < r) p1_rem<NR - 1, V>(r - k0, x, kc, Bi + k0, r, acc + k0 * ldg, ldg);
      }
    }
  }
  return vsq;
}

// T (d_in x r, column order) from Tt (r x ldt, each group of columns in the buffers' order).
template <int DT, typename V>
SM_INLINE void untangle_impl(const float* Tt, int64_t ldt, int r, int64_t c_begin, int64_t c_end, float* T) {
  constexpr int L = kLanes<V>, G = 2 * L;
  for (int64_t c = c_begin; c < c_end; ++c) {
    const int64_t slot = (c & ~int64_t(G - 1)) + Elem<DT>::template pos<L>(int(c & (G - 1)));
    for (int k = 0; k < r; ++k) T[c * r + k] = Tt[k * ldt + slot];
  }
}

// ---------------------------------------------------------------------------------------------
// Pass 2: P = V T. One tile = MR rows of V over all columns, in chunks of P2_KC columns.
constexpr int P2_MR = 4;     // rows per register tile
constexpr int P2_NR = 3;     // ranks per register tile: 4 x 3 accumulators + 4 operands = 16 ymm
constexpr int P2_NR_V4 = 4;  // with 32 registers (AVX-512VL): 4 x 4 + 5 = 21
// 16-float vectors: 6 rows x 4 ranks, 24 accumulators + 5 operands, so each load of T (from the
// L2 at high ranks) feeds 6 FMAs instead of 4 (interleaved against 4 x 4 on the Intel VM, 2
// threads: 4096x4096 r = 64 0.87-0.89x the time, 14336x4096 r = 64 0.85x, 1024x4096 r = 16
// 0.93x, r = 8 unchanged). 4 ranks divide the usual ranks (a tile of 3 leaves a 1-rank remainder
// at r = 64, measured slower with 8 rows); 7 x 4 would not fit the 32 registers.
constexpr int P2_MR_V4Z = 6;
constexpr int P2_NR_V4Z = 4;
constexpr int kP2MaxMR = std::max(P2_MR, P2_MR_V4Z);  // (buffers sized for the tallest tile)
constexpr int P2_KC = 512;   // columns of V formed at once: 4 or 6 x 512 fp32 = 8 or 12 KiB
constexpr int kMaxLanes = 16;

// acc[k][m][0:L] += lanes of sum_j X[m, j] * Tt[k, j] for m < MR, k < NR (L partial sums each).
template <int MR, int NR, typename V>
SM_INLINE void p2_tile(const float* x, int nvec, const float* tt, int64_t ldt, float* acc, bool first) {
  constexpr int L = kLanes<V>;
  V c[MR][NR];
  for (int k = 0; k < NR; ++k)
    for (int m = 0; m < MR; ++m) c[m][k] = first ? V{} : vload<V>(acc + (k * MR + m) * L);
  for (int v = 0; v < nvec; ++v) {
    V t[NR];
    for (int k = 0; k < NR; ++k) t[k] = vload<V>(tt + k * ldt + L * v);
    for (int m = 0; m < MR; ++m) {
      V xm = vload<V>(x + m * P2_KC + L * v);
      for (int k = 0; k < NR; ++k) c[m][k] += xm * t[k];
    }
  }
  for (int k = 0; k < NR; ++k)
    for (int m = 0; m < MR; ++m) vstore(acc + (k * MR + m) * L, c[m][k]);
}

// p2_tile<MR, n> for a remainder of n < N ranks (n known only at run time).
template <int MR, int N, typename V>
SM_INLINE void p2_rem(int n, const float* x, int nvec, const float* tt, int64_t ldt, float* acc, bool first) {
  if constexpr (N >= 1) {
    if (n == N) p2_tile<MR, N, V>(x, nvec, tt, ldt, acc, first);
    else p2_rem<MR, N - 1, V>(n, x, nvec, tt, ldt, acc, first);
  }
}

// Rows [i0, min(i0 + MR, i_end)) of P. A row's sums run in the same order whichever tile holds
// it, so the bits do not depend on where the tiles start.
template <int DT, int MR, int NR, typename V>
SM_INLINE void pass2_tile_impl(const typename Elem<DT>::T* wa, const typename Elem<DT>::T* wu,
                               int64_t i_end, int64_t d_in, int64_t lda, int64_t ldu, const float* Tt,
                               int64_t ldt, int r, int64_t i0, float* P, float* buf, float* acc) {
  constexpr int L = kLanes<V>, G = 2 * L;
  const int rows = int(std::min<int64_t>(MR, i_end - i0));
  for (int m = rows; m < MR; ++m) std::fill(buf + m * P2_KC, buf + (m + 1) * P2_KC, 0.0f);
  for (int64_t c0 = 0; c0 < d_in; c0 += P2_KC) {
    const int kc = int(std::min<int64_t>(P2_KC, d_in - c0));
    const int kcp = (kc + G - 1) & ~(G - 1);
    const int64_t nc = c0 + P2_KC < d_in ? c0 + P2_KC : 0, ni = nc ? i0 : i0 + MR;  // next block
    const bool more = ni < i_end;
    form_v<DT, V, false>(wa + i0 * lda + c0, wu + i0 * ldu + c0, lda, ldu, rows, kc, kcp, P2_KC, buf);
    BlockPrefetch<typename Elem<DT>::T> next(more ? wa + ni * lda + nc : nullptr, more ? wu + ni * ldu + nc : nullptr,
                                             lda, ldu, more ? int(std::min<int64_t>(MR, i_end - ni)) : 0,
                                             more ? int(std::min<int64_t>(P2_KC, d_in - nc)) : 0, (r + NR - 1) / NR);
    const bool first = c0 == 0;
    int k0 = 0;
    for (; k0 + NR <= r; k0 += NR) {
      next.step();
      p2_tile<MR, NR, V>(buf, kcp / L, Tt + k0 * ldt + c0, ldt, acc + k0 * MR * L, first);
    }
    next.step();
    if (k0 < r) p2_rem<MR, NR - 1, V>(r - k0, buf, kcp / L, Tt + k0 * ldt + c0, ldt, acc + k0 * MR * L, first);
  }
  for (int m = 0; m < rows; ++m)
    for (int k = 0; k < r; ++k) P[(i0 + m) * r + k] = lane_sum(acc + (k * MR + m) * L, L);
}

// ---------------------------------------------------------------------------------------------
// The r x r remainder of a score (SPEC section 1): with G = A A^T, the three sums a score needs are
// <T^T T, G>, <P^T P, G> and <B^T B, G>. Each Gram is a float64 sum of products of fp32 (or
// fp16/bf16) values, exact in float64, formed a chunk of rows at a time from a float64 copy of
// the chunk padded to GR_L columns; only tiles on or above the diagonal are formed. One call in
// place of a dozen small torch ops per layer (and their float64 copies of whole matrices).
constexpr int GR_K = 4;  // Gram tile: 4 x 8 entries, 8 accumulators of 4 doubles
constexpr int GR_L = 8;

using v4d = double __attribute__((vector_size(32)));

// Upper tiles of S = X^T X for one chunk of rows: S[k][l] = sum_j X[j][k] X[j][l] for every 4 x 8
// tile with l0 + 8 > k0 (so every l >= k); X is rows x ld float64 (ld a multiple of 8), S ld x ld.
// A chunk is small enough to stay in L2 while every tile walks it.
SM_INLINE void gram_chunk_impl(const double* X, int64_t rows, int ld, double* S) {
  for (int k0 = 0; k0 < ld; k0 += GR_K)
    for (int l0 = k0 / GR_L * GR_L; l0 < ld; l0 += GR_L) {
      v4d c[GR_K][2];
      for (auto& ck : c) ck[0] = ck[1] = v4d{0, 0, 0, 0};
      for (int64_t j = 0; j < rows; ++j) {
        const double* x = X + j * ld;
        v4d lo, hi;
        std::memcpy(&lo, x + l0, sizeof lo);
        std::memcpy(&hi, x + l0 + 4, sizeof hi);
        for (int k = 0; k < GR_K; ++k) {
          const double xk = x[k0 + k];
          c[k][0] += xk * lo;
          c[k][1] += xk * hi;
        }
      }
      for (int k = 0; k < GR_K; ++k) {
        std::memcpy(S + int64_t(k0 + k) * ld + l0, &c[k][0], sizeof(v4d));
        std::memcpy(S + int64_t(k0 + k) * ld + l0 + 4, &c[k][1], sizeof(v4d));
      }
    }
}

// Rows [j0, j1) of an n x r matrix X into dst (row stride ld, columns r..ld left as they are, zero)
// as float64, whose products are exact. X is src (row-major, in dtype DT), or with `transposed` the
// transpose of src (r x n, row-major).
template <int DT>
SM_INLINE void pad_rows_impl(const void* src, int64_t n, int64_t r, bool transposed, int64_t j0, int64_t j1, int ld,
                             double* dst) {
  using E = Elem<DT>;
  const auto* s = static_cast<const typename E::T*>(src);
  if (transposed) {
    for (int64_t k = 0; k < r; ++k)
      for (int64_t j = j0; j < j1; ++j) dst[(j - j0) * ld + k] = E::one(s + k * n + j);
  } else {
    for (int64_t j = j0; j < j1; ++j)
      for (int64_t k = 0; k < r; ++k) dst[(j - j0) * ld + k] = E::one(s + j * r + k);
  }
}

// The AMX kernels' operands beyond the other builds' (their last argument, unused by the others).
struct AmxOperands {
  const uint16_t* bpk;  // pass 1's B tiles (amx_pack_b)
  const uint16_t* tpk;  // pass 2's T tiles (amx_pack_t)
  int qt, nbp, ntp;     // rank tiles, parts of B, parts of T
};

// ---------------------------------------------------------------------------------------------
// AMX (Intel Xeon from Sapphire Rapids on): both passes on the tile unit's bf16 dot products with
// fp32 accumulation. On the Intel VM of benchmarks/RESULTS.md one TDPBF16PS (16 x 16 x 32) took
// about 16 ns, about 10x the multiply-adds of the core's 512-bit FMAs in that time, and a tile load
// about 10 ns. Exact fp32 products take several bf16 ones: a value x is split into parts
// x = h + m + l, and x y is summed from the part products h h', h m', m h', h l', m m', l h', leaving
// out only terms under fp32's own rounding. V is split by truncation (h = x cut to bf16, m = the
// rest cut, l = the rest of that; each rest exact in fp32): a bf16 difference in two parts, exact
// while the two weights' exponents are within 7 of each other (else within 2^-15 of V), fp16 and
// fp32 differences in three, exact. B and T are split by rounding, once per call: B in as many parts
// as its values need (one for a bf16 adapter's factors), T in three. Every tile is 16 rows of 64 bytes:
//   pass 1:  C[16 ranks x 16 columns] += Bt[16 ranks x 32 rows] * V[32 rows x 16 columns] (V in
//            pairs of rows, the tile unit's B layout), C in the same partial sums as the other builds;
//   pass 2:  C[16 rows x 16 ranks] += V[16 rows x 32 columns] * T[32 columns x 16 ranks].
// Ranks, rows and columns are zero-padded to the tiles; the tile unit treats subnormal bf16 parts
// as zero (parts of values under about 1e-36). Its sums run in a fixed order, so the bits depend
// on neither the thread count nor the schedule.
#if SM_HAVE_AMX
// (GCC 12 warns of the intrinsics' own undefined-vector arguments in functions with a target attribute)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define SM_TARGET_AMX __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,f16c,fma,amx-tile,amx-bf16")))

constexpr int kAmxLdw = P1_BAND + 16;  // pass 1: 32-bit words (row pairs) per row of a V part
constexpr int kAmxLd2 = P2_KC + 32;    // pass 2: bf16 per row of a V part (both off a power of two)
constexpr int kTile = 512;             // bf16 per operand tile (16 rows x 64 bytes)

// The tile loads' inline assembly (GCC's headers) names no memory it reads, and ldtilecfg names 8
// of the configuration's 64 bytes: stores before them must not be moved past them.
SM_INLINE void compiler_fence() { __asm__ volatile("" ::: "memory"); }

struct TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
} __attribute__((packed));

// Every tile 16 x 64 bytes. Loaded by each call on its own thread (the configuration is per
// thread) and released at its end, so an idle thread carries no tile state.
SM_TARGET_AMX SM_INLINE void amx_begin() {
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof cfg);
  cfg.palette = 1;
  for (int t = 0; t < 8; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;
  compiler_fence();
  _tile_loadconfig(&cfg);
}

// 16 consecutive elements (those of mask m, the rest 0) as fp32
template <int DT>
SM_TARGET_AMX SM_INLINE __m512 amx_load16(const typename Elem<DT>::T* p, __mmask16 m) {
  if constexpr (DT == kF32) {
    return _mm512_maskz_loadu_ps(m, p);
  } else if constexpr (DT == kBF16) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
  } else {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
  }
}
SM_INLINE __mmask16 mask16(int n) { return n >= 16 ? __mmask16(0xffff) : n <= 0 ? 0 : __mmask16((1u << n) - 1u); }
SM_INLINE __mmask32 mask32(int n) { return n >= 32 ? ~__mmask32(0) : n <= 0 ? 0 : __mmask32((1u << n) - 1u); }

// Columns [0, n) of a 32-column group (the rest 0) as two fp32 vectors in the buffers' slot
// order (Elem<DT>::pos<16>): bf16 as [even columns, odd columns], fp16 and fp32 as they lie.
template <int DT>
SM_TARGET_AMX SM_INLINE void amx_group(const typename Elem<DT>::T* p, int n, __m512& s0, __m512& s1) {
  if constexpr (DT == kBF16) {
    const __m512i w = n >= 32 ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi16(mask32(n), p);
    s0 = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
    s1 = _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32(int(0xffff0000u))));
  } else {
    s0 = amx_load16<DT>(p, mask16(n));
    s1 = amx_load16<DT>(p + 16, mask16(n - 16));
  }
}

// 16 words from two vectors of bf16 parts (fp32 bits with zero low halves): lo's in the low halves,
// hi's in the high ones (the tile unit's pairs).
SM_TARGET_AMX SM_INLINE __m512i amx_pair_words(__m512i lo, __m512i hi) {
  return _mm512_ternarylogic_epi32(hi, _mm512_srli_epi32(lo, 16), _mm512_set1_epi32(int(0xffff0000u)), 0xEC);
}

// The NV bf16 parts of lanes lo and hi, truncated (x = h + m + l with h = x cut to bf16, m the
// rest cut, l the rest of that, each difference exact; bf16 differences need two parts, fp32
// values three), paired: word l of part k holds part k of lo[l] in its low half and of hi[l] in its high.
template <int NV>
SM_TARGET_AMX SM_INLINE void amx_pair_parts(__m512 lo, __m512 hi, __m512i (&w)[NV]) {
  const __m512i top = _mm512_set1_epi32(int(0xffff0000u));
  for (int k = 0; k < NV; ++k) {
    const __m512i bl = _mm512_castps_si512(lo), bh = _mm512_castps_si512(hi);
    w[k] = amx_pair_words(bl, bh);
    if (k + 1 < NV) {
      lo = _mm512_sub_ps(lo, _mm512_castsi512_ps(_mm512_and_si512(bl, top)));
      hi = _mm512_sub_ps(hi, _mm512_castsi512_ps(_mm512_and_si512(bh, top)));
    }
  }
}

// V's parts: a difference of two bf16 values has at most 16 significant bits while their exponents
// are within 7 of each other (else the second part leaves out bits under 2^-15 of V); fp16 and
// fp32 differences take three, exact.
template <int DT> constexpr int kAmxVParts = DT == kBF16 ? 2 : 3;

// B's and T's split, by rounding to nearest even, on 16 lanes: the next bf16 part of each (as fp32
// bits with zero low halves), x left as the rest. A NaN stays a NaN (so the results are NaN, as
// the other builds' are) and an infinity infinite, with a rest of 0; a finite value that would
// round to infinity is cut instead.
SM_TARGET_AMX SM_INLINE __m512i bf16_part16(__m512& x) {
  const __m512i b = _mm512_castps_si512(x);
  const __m512i expo = _mm512_set1_epi32(0x7f800000), top = _mm512_set1_epi32(int(0xffff0000u));
  const __mmask16 nonfinite = _mm512_cmpeq_epi32_mask(_mm512_and_si512(b, expo), expo);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  __m512i h = _mm512_and_si512(_mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7fff)), odd), top);
  const __mmask16 over = _mm512_cmpeq_epi32_mask(_mm512_and_si512(h, expo), expo);
  h = _mm512_mask_and_epi32(h, over | nonfinite, b, top);  // (cut where rounding would overflow)
  const __mmask16 nan = nonfinite & _mm512_test_epi32_mask(b, _mm512_set1_epi32(0x007fffff));
  h = _mm512_mask_or_epi32(h, nan, h, _mm512_set1_epi32(0x00400000));
  x = _mm512_mask_sub_ps(_mm512_setzero_ps(), _knot_mask16(nonfinite), x, _mm512_castsi512_ps(h));
  return h;
}

// How many bf16 parts the n fp32 values at x need (1..3), for the packers below: one when all are
// bf16 already (a bf16 adapter's), else as many as the first value that needs the most.
SM_TARGET_AMX int bf16_parts_needed(const float* x, int64_t n) {
  __m512i low = _mm512_setzero_si512();
  for (int64_t i = 0; i < n; i += 16)
    low = _mm512_or_si512(low, _mm512_maskz_loadu_epi32(mask16(int(std::min<int64_t>(16, n - i))), x + i));
  if (_mm512_test_epi32_mask(low, _mm512_set1_epi32(0xffff)) == 0) return 1;
  int need = 1;
  for (int64_t i = 0; i < n && need < 3; i += 16) {
    __m512 v = _mm512_maskz_loadu_ps(mask16(int(std::min<int64_t>(16, n - i))), x + i);
    bf16_part16(v);
    if (_mm512_test_epi32_mask(_mm512_castps_si512(v), _mm512_set1_epi32(0x7fffffff))) need = 2;
    bf16_part16(v);
    if (_mm512_test_epi32_mask(_mm512_castps_si512(v), _mm512_set1_epi32(0x7fffffff))) need = 3;
  }
  return need;
}

// Pass 1's A operands: for row step s (rows 32 s ..), rank tile q and part p, the tile
// [16 ranks][32 rows] of B's parts at bpk + ((s * qt + q) * np + p) * kTile; a 32-bit word holds
// rows 2 j and 2 j + 1 of one rank, scattered to the rank's tile row.
SM_TARGET_AMX void amx_pack_b(const float* B, int64_t d_out, int r, int qt, int np, int64_t s, uint16_t* bpk) {
  const __m512i rows = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                          _mm512_set1_epi32(16));
  for (int q = 0; q < qt; ++q) {
    auto* t = reinterpret_cast<uint32_t*>(bpk + (size_t(s) * qt + q) * np * kTile);
    const __mmask16 m = mask16(r - 16 * q);
    for (int j = 0; j < 16; ++j) {
      const int64_t i0 = 32 * s + 2 * j, i1 = i0 + 1;
      __m512 x0 = i0 < d_out ? _mm512_maskz_loadu_ps(m, B + i0 * r + 16 * q) : _mm512_setzero_ps();
      __m512 x1 = i1 < d_out ? _mm512_maskz_loadu_ps(m, B + i1 * r + 16 * q) : _mm512_setzero_ps();
      for (int p = 0; p < np; ++p) {
        const __m512i h0 = bf16_part16(x0), h1 = bf16_part16(x1);
        _mm512_i32scatter_epi32(t + p * (kTile / 2) + j, rows, amx_pair_words(h0, h1), 4);
      }
    }
  }
}

// Pass 2's B operands: for column step s (columns 32 s ..), rank tile q and part p, the tile
// [16 column pairs][16 ranks][2] of T's parts (T: d_in x r, column order; zero past d_in and r) at
// tpk + ((s * qt + q) * np + p) * kTile, the columns paired as pass 2 pairs V's (see pass2_amx).
template <int DT>
SM_TARGET_AMX void amx_pack_t(const float* T, int64_t d_in, int r, int qt, int np, int64_t s, uint16_t* tpk) {
  for (int q = 0; q < qt; ++q) {
    auto* t = reinterpret_cast<uint32_t*>(tpk + (size_t(s) * qt + q) * np * kTile);
    const __mmask16 m = mask16(r - 16 * q);
    for (int pr = 0; pr < 16; ++pr) {
      const int64_t c0 = 32 * s + (DT == kBF16 ? 2 * pr : pr), c1 = c0 + (DT == kBF16 ? 1 : 16);
      __m512 x0 = c0 < d_in ? _mm512_maskz_loadu_ps(m, T + c0 * r + 16 * q) : _mm512_setzero_ps();
      __m512 x1 = c1 < d_in ? _mm512_maskz_loadu_ps(m, T + c1 * r + 16 * q) : _mm512_setzero_ps();
      for (int p = 0; p < np; ++p) {
        const __m512i h0 = bf16_part16(x0), h1 = bf16_part16(x1);
        _mm512_storeu_si512(t + p * (kTile / 2) + pr * 16, amx_pair_words(h0, h1));
      }
    }
  }
}

// V[0:kc, 0:w) = A - U (kc <= 32 rows) into NV parts at buf, each [16 row pairs][kAmxLdw words]
// in slot order, a word holding rows 2 p and 2 p + 1 of one column; rows past kc and columns past
// w (to the end of its group of 32) are zero. Returns sum V^2 (fp32 lanes over the block, reduced
// in a fixed order).
template <int DT>
SM_TARGET_AMX SM_INLINE double amx_form_v1(const typename Elem<DT>::T* a, const typename Elem<DT>::T* u, int64_t lda,
                                           int64_t ldu, int kc, int w, uint32_t* buf) {
  constexpr int NV = kAmxVParts<DT>;
  __m512 sq[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  const int groups = (w + 31) / 32;
  for (int p = 0; p < 16; ++p) {
    const int i0 = 2 * p, i1 = 2 * p + 1;
    uint32_t* o = buf + p * kAmxLdw;
    for (int g = 0; g < groups; ++g) {
      const int j = 32 * g, n = w - j;
      __m512 v00 = _mm512_setzero_ps(), v01 = v00, v10 = v00, v11 = v00, x0, x1;
      if (i0 < kc) {
        amx_group<DT>(a + i0 * lda + j, n, v00, v01);
        amx_group<DT>(u + i0 * ldu + j, n, x0, x1);
        v00 = _mm512_sub_ps(v00, x0), v01 = _mm512_sub_ps(v01, x1);
      }
      if (i1 < kc) {
        amx_group<DT>(a + i1 * lda + j, n, v10, v11);
        amx_group<DT>(u + i1 * ldu + j, n, x0, x1);
        v10 = _mm512_sub_ps(v10, x0), v11 = _mm512_sub_ps(v11, x1);
      }
      sq[0] = _mm512_fmadd_ps(v00, v00, sq[0]);
      sq[1] = _mm512_fmadd_ps(v01, v01, sq[1]);
      sq[2] = _mm512_fmadd_ps(v10, v10, sq[2]);
      sq[3] = _mm512_fmadd_ps(v11, v11, sq[3]);
      __m512i w0[NV], w1[NV];
      amx_pair_parts<NV>(v00, v10, w0);
      amx_pair_parts<NV>(v01, v11, w1);
      for (int k = 0; k < NV; ++k) {
        _mm512_store_si512(o + k * 16 * kAmxLdw + j, w0[k]);
        _mm512_store_si512(o + k * 16 * kAmxLdw + j + 16, w1[k]);
      }
    }
  }
  double s = 0.0;
  alignas(64) float lanes[16];
  for (const auto& q : sq) {
    _mm512_store_ps(lanes, q);
    for (int l = 0; l < 16; ++l) s += double(lanes[l]);
  }
  return s;
}

// acc[16 q + m][16 s + n] += the chunk's rows of V^T B for every rank tile q and strip s (acc's
// row stride ldacc floats, QT * 16 rows); bks: this row step's B tiles. `next` prefetches the next
// block a step per strip.
template <int NV, typename Pf>
SM_TARGET_AMX SM_INLINE void amx_p1_chunk(const uint32_t* vbuf, int strips, const uint16_t* bks, int qt, int nbp,
                                          float* acc, int64_t ldacc, Pf& next) {
  const int64_t lda_b = int64_t(ldacc) * 4, ldv_b = kAmxLdw * 4;
  for (int q = 0; q < qt; ++q) {
    const uint16_t* bq = bks + size_t(q) * nbp * kTile;
    _tile_loadd(4, bq, 64);
    if (nbp > 1) _tile_loadd(5, bq + kTile, 64);
    if (nbp > 2) _tile_loadd(6, bq + 2 * kTile, 64);
    float* aq = acc + int64_t(16 * q) * ldacc;
    for (int s = 0; s < strips; ++s) {
      if (q == 0) next.step();
      _tile_loadd(0, aq + 16 * s, lda_b);
      _tile_loadd(1, vbuf + 16 * s, ldv_b);
      _tile_loadd(2, vbuf + 16 * kAmxLdw + 16 * s, ldv_b);
      if constexpr (NV > 2) _tile_loadd(3, vbuf + 32 * kAmxLdw + 16 * s, ldv_b);
      _tile_dpbf16ps(0, 4, 1);
      _tile_dpbf16ps(0, 4, 2);
      if constexpr (NV > 2) _tile_dpbf16ps(0, 4, 3);
      if (nbp > 1) {
        _tile_dpbf16ps(0, 5, 1);
        _tile_dpbf16ps(0, 5, 2);
      }
      if (nbp > 2) _tile_dpbf16ps(0, 6, 1);
      _tile_stored(0, aq + 16 * s, lda_b);
    }
  }
  compiler_fence();  // (the tile loads above, of V, before the next block's V is stored)
}

// pass1_rows_impl on the tile unit: tg has qt * 16 rows.
template <int DT>
SM_TARGET_AMX double pass1_rows_amx(const void* wa_, const void* wu_, int64_t d_out, int64_t, int64_t lda,
                                    int64_t ldu, const float*, int, float* tg, int64_t ldg, float* buf, int64_t lo,
                                    int64_t hi, int64_t cb, int64_t ce, double vsq, const void* ex) {
  using T = typename Elem<DT>::T;
  const auto* wa = static_cast<const T*>(wa_);
  const auto* wu = static_cast<const T*>(wu_);
  const auto& op = *static_cast<const AmxOperands*>(ex);
  uint32_t* vbuf = reinterpret_cast<uint32_t*>(buf);
  amx_begin();
  for (int64_t i0 = lo; i0 < hi; i0 += P1_KC) {
    const int kc = int(std::min<int64_t>(P1_KC, hi - i0));
    const uint16_t* bks = op.bpk + size_t(i0 / 32) * op.qt * op.nbp * kTile;
    for (int64_t c0 = cb; c0 < ce; c0 += P1_BAND) {
      const int w = int(std::min<int64_t>(P1_BAND, ce - c0));
      const int strips = 2 * ((w + 31) / 32);
      vsq += amx_form_v1<DT>(wa + i0 * lda + c0, wu + i0 * ldu + c0, lda, ldu, kc, w, vbuf);
      compiler_fence();
      const bool last = c0 + P1_BAND >= ce;
      const int64_t ni = last ? i0 + P1_KC : i0, nc = last ? cb : c0 + P1_BAND;
      const bool more = ni < d_out;
      BlockPrefetch<T> next(more ? wa + ni * lda + nc : nullptr, more ? wu + ni * ldu + nc : nullptr, lda, ldu,
                            more ? int(std::min<int64_t>(P1_KC, d_out - ni)) : 0,
                            more ? int(std::min<int64_t>(P1_BAND, ce - nc)) : 0, strips);
      amx_p1_chunk<kAmxVParts<DT>>(vbuf, strips, bks, op.qt, op.nbp, tg + c0, ldg, next);
    }
  }
  _tile_release();
  return vsq;
}

// pass1_band_impl on the tile unit: tacc has qt * 16 rows of P1_LD.
template <int DT>
SM_TARGET_AMX double pass1_band_amx(const void* wa_, const void* wu_, int64_t d_out, int64_t d_in, int64_t lda,
                                    int64_t ldu, const float*, int r, int64_t c0, float* T, float* Tt, int64_t ldt,
                                    float* buf, float* tacc, int64_t i_begin, int64_t i_end, double vsq,
                                    const void* ex) {
  using ET = typename Elem<DT>::T;
  const auto* wa = static_cast<const ET*>(wa_);
  const auto* wu = static_cast<const ET*>(wu_);
  const auto& op = *static_cast<const AmxOperands*>(ex);
  uint32_t* vbuf = reinterpret_cast<uint32_t*>(buf);
  const int w = int(std::min<int64_t>(P1_BAND, d_in - c0));
  const int strips = 2 * ((w + 31) / 32);
  if (i_begin == 0) std::fill(tacc, tacc + int64_t(op.qt) * 16 * P1_LD, 0.0f);
  amx_begin();
  for (int64_t i0 = i_begin; i0 < i_end; i0 += P1_KC) {
    const int kc = int(std::min<int64_t>(P1_KC, i_end - i0));
    const int64_t ni = i0 + P1_KC;
    const bool more = ni < d_out;
    vsq += amx_form_v1<DT>(wa + i0 * lda + c0, wu + i0 * ldu + c0, lda, ldu, kc, w, vbuf);
    compiler_fence();
    BlockPrefetch<ET> next(more ? wa + ni * lda + c0 : nullptr, more ? wu + ni * ldu + c0 : nullptr, lda, ldu,
                           more ? int(std::min<int64_t>(P1_KC, d_out - ni)) : 0, w, strips);
    const uint16_t* bks = op.bpk + size_t(i0 / 32) * op.qt * op.nbp * kTile;
    amx_p1_chunk<kAmxVParts<DT>>(vbuf, strips, bks, op.qt, op.nbp, tacc, P1_LD, next);
  }
  _tile_release();
  if (i_end == d_out) write_band<DT, 16>(tacc, w, r, c0, T, Tt, ldt);
  return vsq;
}

// Rank tile Q of pass 2's C (tile Q: a literal, the instructions name it) += V's parts (tiles 4..)
// times T's parts at tq, one part at a time in tile 7.
#define SM_AMX_P2_RANK_TILE(Q, NV, tq, ntp)             \
  for (int p_ = 0; p_ < (ntp); ++p_) {                  \
    _tile_loadd(7, (tq) + p_ * kTile, 64);              \
    _tile_dpbf16ps(Q, 4, 7);                            \
    if (p_ < 2) _tile_dpbf16ps(Q, 5, 7);                \
    if ((NV) > 2 && p_ == 0) _tile_dpbf16ps(Q, 6, 7);   \
  }

// pass2_tile_impl on the tile unit: 16 rows of P, up to 4 rank tiles at a time in tiles 0..3;
// acc holds qt tiles of 16 x 16 floats.
template <int DT>
SM_TARGET_AMX void pass2_amx(const void* wa_, const void* wu_, int64_t i_end, int64_t d_in, int64_t lda, int64_t ldu,
                             const float*, int64_t, int r, int64_t i0, float* P, float* buf, float* acc,
                             const void* ex) {
  using ET = typename Elem<DT>::T;
  constexpr int NV = kAmxVParts<DT>;
  const auto* wa = static_cast<const ET*>(wa_);
  const auto* wu = static_cast<const ET*>(wu_);
  const auto& op = *static_cast<const AmxOperands*>(ex);
  uint16_t* vb = reinterpret_cast<uint16_t*>(buf);
  const int rows = int(std::min<int64_t>(16, i_end - i0));
  for (int k = 0; k < NV; ++k)  // (the rows below the last one; every other word is written before it is read)
    std::memset(vb + (k * 16 + rows) * kAmxLd2, 0, sizeof(uint16_t) * (16 - rows) * kAmxLd2);
  const int64_t ldv_b = kAmxLd2 * 2;
  amx_begin();
  for (int64_t c0 = 0; c0 < d_in; c0 += P2_KC) {
    const int kc = int(std::min<int64_t>(P2_KC, d_in - c0));
    const int steps = (kc + 31) / 32;
    const int64_t nc = c0 + P2_KC < d_in ? c0 + P2_KC : 0, ni = nc ? i0 : i0 + 16;
    const bool more = ni < i_end;
    BlockPrefetch<ET> next(more ? wa + ni * lda + nc : nullptr, more ? wu + ni * ldu + nc : nullptr, lda, ldu,
                           more ? int(std::min<int64_t>(16, i_end - ni)) : 0,
                           more ? int(std::min<int64_t>(P2_KC, d_in - nc)) : 0, steps);
    // a row of a V part: 32-column groups of 16 words, a word pairing two columns (bf16: 2 j and
    // 2 j + 1, the columns in order; fp16 and fp32: j and 16 + j), the order amx_pack_t packs T in
    for (int m = 0; m < rows; ++m) {
      const ET* pa = wa + (i0 + m) * lda + c0;
      const ET* pu = wu + (i0 + m) * ldu + c0;
      uint16_t* o = vb + m * kAmxLd2;
      for (int j = 0; j < steps * 32; j += 32) {
        __m512 v0, v1, x0, x1;
        amx_group<DT>(pa + j, kc - j, v0, v1);
        amx_group<DT>(pu + j, kc - j, x0, x1);
        __m512i h[NV];
        amx_pair_parts<NV>(_mm512_sub_ps(v0, x0), _mm512_sub_ps(v1, x1), h);
        for (int k = 0; k < NV; ++k) _mm512_store_si512(o + k * 16 * kAmxLd2 + j, h[k]);
      }
    }
    compiler_fence();
    for (int g = 0; g < op.qt; g += 4) {
      const int nq = std::min(4, op.qt - g);
      float* ag = acc + g * 256;
      if (c0 == 0) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
      } else {
        _tile_loadd(0, ag, 64);
        if (nq > 1) _tile_loadd(1, ag + 256, 64);
        if (nq > 2) _tile_loadd(2, ag + 512, 64);
        if (nq > 3) _tile_loadd(3, ag + 768, 64);
      }
      for (int s = 0; s < steps; ++s) {
        if (g == 0) next.step();
        _tile_loadd(4, vb + 32 * s, ldv_b);
        _tile_loadd(5, vb + 16 * kAmxLd2 + 32 * s, ldv_b);
        if constexpr (NV > 2) _tile_loadd(6, vb + 32 * kAmxLd2 + 32 * s, ldv_b);
        const uint16_t* ts = op.tpk + ((size_t(c0 / 32 + s) * op.qt + g) * op.ntp) * kTile;
        SM_AMX_P2_RANK_TILE(0, NV, ts, op.ntp)
        if (nq > 1) SM_AMX_P2_RANK_TILE(1, NV, ts + op.ntp * kTile, op.ntp)
        if (nq > 2) SM_AMX_P2_RANK_TILE(2, NV, ts + 2 * op.ntp * kTile, op.ntp)
        if (nq > 3) SM_AMX_P2_RANK_TILE(3, NV, ts + 3 * op.ntp * kTile, op.ntp)
      }
      _tile_stored(0, ag, 64);
      if (nq > 1) _tile_stored(1, ag + 256, 64);
      if (nq > 2) _tile_stored(2, ag + 512, 64);
      if (nq > 3) _tile_stored(3, ag + 768, 64);
    }
    compiler_fence();  // (the tile loads above, of V, before the next chunk's V is stored)
  }
  _tile_release();
  for (int m = 0; m < rows; ++m)
    for (int k = 0; k < r; ++k) P[(i0 + m) * r + k] = acc[(k / 16) * 256 + m * 16 + (k % 16)];
}

// Whether this CPU has the tile unit's bf16 dot products and the OS lets this process use them.
bool amx_usable() {
#if defined(__linux__)
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  const bool tile = edx & (1u << 24), bf16 = edx & (1u << 22);
  const bool avx512bw = ebx & (1u << 30), avx512vl = ebx & (1u << 31), avx512dq = ebx & (1u << 17);
  if (!(tile && bf16 && avx512bw && avx512vl && avx512dq)) return false;
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx512f")) return false;  // (and the OS saves AVX-512 state)
  constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;  // arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
#else
  return false;
#endif
}
#pragma GCC diagnostic pop
#endif  // SM_HAVE_AMX

// ---------------------------------------------------------------------------------------------
// ISA variants: the same inlined bodies compiled for x86-64-v4 (16- and 8-float vectors),
// x86-64-v3 and the baseline.
#define SM_PASS1_ARGS                                                                             \
  const void *wa, const void *wu, int64_t d_out, int64_t d_in, int64_t lda, int64_t ldu,         \
      const float *B, int r, float *tg, int64_t ldg, float *buf, int64_t lo, int64_t hi, int64_t cb, int64_t ce, \
      double vsq, const void *ex
#define SM_PASS1B_ARGS                                                                            \
  const void *wa, const void *wu, int64_t d_out, int64_t d_in, int64_t lda, int64_t ldu,         \
      const float *B, int r, int64_t c0, float *T, float *Tt, int64_t ldt, float *buf, float *tacc, \
      int64_t i_begin, int64_t i_end, double vsq, const void *ex
#define SM_PASS1B_CALL(DT, NR, V)                                                                 \
  pass1_band_impl<DT, NR, V>(static_cast<const typename Elem<DT>::T*>(wa), static_cast<const typename Elem<DT>::T*>(wu), \
                             d_out, d_in, lda, ldu, B, r, c0, T, Tt, ldt, buf, tacc, i_begin, i_end, vsq)
#define SM_PASS2_ARGS                                                                             \
  const void *wa, const void *wu, int64_t i_end, int64_t d_in, int64_t lda, int64_t ldu,         \
      const float *Tt, int64_t ldt, int r, int64_t i0, float *P, float *buf, float *acc, const void *ex
#define SM_PASS1_CALL(DT, NR, V)                                                                  \
  pass1_rows_impl<DT, NR, V>(static_cast<const typename Elem<DT>::T*>(wa), static_cast<const typename Elem<DT>::T*>(wu), \
                             d_out, d_in, lda, ldu, B, r, tg, ldg, buf, lo, hi, cb, ce, vsq)
#define SM_PASS2_CALL(DT, MR, NR, V)                                                              \
  pass2_tile_impl<DT, MR, NR, V>(static_cast<const typename Elem<DT>::T*>(wa), static_cast<const typename Elem<DT>::T*>(wu),  \
                      i_end, d_in, lda, ldu, Tt, ldt, r, i0, P, buf, acc)

using Pass1Fn = double (*)(SM_PASS1_ARGS);
using Pass1BandFn = double (*)(SM_PASS1B_ARGS);
using Pass2Fn = void (*)(SM_PASS2_ARGS);
using GramFn = void (*)(const double* X, int64_t rows, int ld, double* S);
using PadFn = void (*)(const void* src, int64_t n, int64_t r, bool transposed, int64_t j0, int64_t j1, int ld,
                      double* dst);
using UntangleFn = void (*)(const float* Tt, int64_t ldt, int r, int64_t c_begin, int64_t c_end, float* T);
template <int DT, typename V> void untangle(const float* Tt, int64_t ldt, int r, int64_t c0, int64_t c1, float* T) {
  untangle_impl<DT, V>(Tt, ldt, r, c0, c1, T);  // (no vector code: only the lane count matters)
}

template <int DT> double pass1_base(SM_PASS1_ARGS) { return SM_PASS1_CALL(DT, P1_NR, v8f); }
template <int DT> double pass1b_base(SM_PASS1B_ARGS) { return SM_PASS1B_CALL(DT, P1_NR, v8f); }
template <int DT> void pass2_base(SM_PASS2_ARGS) { SM_PASS2_CALL(DT, P2_MR, P2_NR, v8f); }
void gram_base(const double* X, int64_t rows, int ld, double* S) { gram_chunk_impl(X, rows, ld, S); }
template <int DT> void pad_base(const void* src, int64_t n, int64_t r, bool tr, int64_t j0, int64_t j1, int ld, double* dst) {
  pad_rows_impl<DT>(src, n, r, tr, j0, j1, ld, dst);
}
#if SM_HAVE_V3
template <int DT> SM_TARGET_V3 double pass1_v3(SM_PASS1_ARGS) { return SM_PASS1_CALL(DT, P1_NR, v8f); }
template <int DT> SM_TARGET_V3 double pass1b_v3(SM_PASS1B_ARGS) { return SM_PASS1B_CALL(DT, P1_NR, v8f); }
template <int DT> SM_TARGET_V3 void pass2_v3(SM_PASS2_ARGS) { SM_PASS2_CALL(DT, P2_MR, P2_NR, v8f); }
template <int DT> SM_TARGET_V4 double pass1_v4(SM_PASS1_ARGS) { return SM_PASS1_CALL(DT, P1_NR_V4, v8f); }
template <int DT> SM_TARGET_V4 double pass1b_v4(SM_PASS1B_ARGS) { return SM_PASS1B_CALL(DT, P1_NR_V4, v8f); }
template <int DT> SM_TARGET_V4 void pass2_v4(SM_PASS2_ARGS) { SM_PASS2_CALL(DT, P2_MR, P2_NR_V4, v8f); }
template <int DT> SM_TARGET_V4 double pass1_v4z(SM_PASS1_ARGS) { return SM_PASS1_CALL(DT, P1_NR_V4Z, v16f); }
template <int DT> SM_TARGET_V4 double pass1b_v4z(SM_PASS1B_ARGS) { return SM_PASS1B_CALL(DT, P1_NR_V4Z, v16f); }
template <int DT> SM_TARGET_V4 void pass2_v4z(SM_PASS2_ARGS) { SM_PASS2_CALL(DT, P2_MR_V4Z, P2_NR_V4Z, v16f); }
// (the 4 x 8 Gram tile uses 8 accumulators; the v4 build runs these too)
SM_TARGET_V3 void gram_v3(const double* X, int64_t rows, int ld, double* S) { gram_chunk_impl(X, rows, ld, S); }
template <int DT> SM_TARGET_V3 void pad_v3(const void* src, int64_t n, int64_t r, bool tr, int64_t j0, int64_t j1, int ld,
                                           double* dst) {
  pad_rows_impl<DT>(src, n, r, tr, j0, j1, ld, dst);
}
#endif

struct Isa {
  const char* name;
  Pass1Fn pass1[3];  // indexed by DType: pass 1 by row groups (low ranks) ...
  Pass1BandFn pass1_band[3];  // ... and by column bands (high ranks, and see p1_bands_first)
  bool p1_bands_first;  // low ranks by bands too, unless the row walk shares out better (pass1_by_rows)
  Pass2Fn pass2[3];
  int p2_rows;  // rows of a pass-2 tile
  GramFn gram;
  PadFn pad[3];
  UntangleFn untangle[3];
  bool amx = false;  // the passes take AmxOperands (packed B and T tiles), and partials of whole rank tiles
};

const Isa kBase = {"baseline",
                   {pass1_base<kF32>, pass1_base<kF16>, pass1_base<kBF16>},
                   {pass1b_base<kF32>, pass1b_base<kF16>, pass1b_base<kBF16>},
                   false,
                   {pass2_base<kF32>, pass2_base<kF16>, pass2_base<kBF16>},
                   P2_MR,
                   gram_base,
                   {pad_base<kF32>, pad_base<kF16>, pad_base<kBF16>},
                   {untangle<kF32, v8f>, untangle<kF16, v8f>, untangle<kBF16, v8f>}};
#if SM_HAVE_V3
const Isa kV3 = {"x86-64-v3",
                 {pass1_v3<kF32>, pass1_v3<kF16>, pass1_v3<kBF16>},
                 {pass1b_v3<kF32>, pass1b_v3<kF16>, pass1b_v3<kBF16>},
                 false,
                 {pass2_v3<kF32>, pass2_v3<kF16>, pass2_v3<kBF16>},
                 P2_MR,
                 gram_v3,
                 {pad_v3<kF32>, pad_v3<kF16>, pad_v3<kBF16>},
                 {untangle<kF32, v8f>, untangle<kF16, v8f>, untangle<kBF16, v8f>}};
// AMD's AVX-512 cores walk pass 1 by column bands at every rank where a layer has a band for each of
// the machine's logical CPUs (pass1_by_rows): on a Zen 4 VM (2 threads, bf16,
// weights in 2 MiB pages, median of 9 calls, builds alternating, 2-3 rounds over six shapes from
// 512x2048 to 14336x4096) bands took 0.72-0.86x the time of row groups at r = 16 (4096x4096
// 7.5-7.8 vs 8.8-9.9 ms, 14336x4096 26.3-26.5 vs 30.8-31.5) and 0.81-0.97x at r = 8 in all but one
// of 15 pairs (4096x4096 5.2-5.5 vs 5.6-6.1 ms, once 6.3 vs 5.8); row groups were chosen on an
// Intel Xeon VM, whose memory served bands' 1 KiB runs 8 KiB apart at half the rate of whole rows
// (see pass1_rows_impl). On the Zen 4, row groups in slices of one band measured as slow as whole
// rows (r = 16: 9.3-9.4 vs 7.4-7.8 ms at 4096x4096). A layer has one band per 512 columns (8 at
// d_in = 4096); with fewer bands than CPUs, some would sit out pass 1, so such layers keep
// the row walk where it has more work items (up to 16 row groups per 4096 columns; not measured:
// this VM has 2 cores).
const Isa kV4 = {"x86-64-v4",
                 {pass1_v4<kF32>, pass1_v4<kF16>, pass1_v4<kBF16>},
                 {pass1b_v4<kF32>, pass1b_v4<kF16>, pass1b_v4<kBF16>},
                 true,
                 {pass2_v4<kF32>, pass2_v4<kF16>, pass2_v4<kBF16>},
                 P2_MR,
                 gram_v3,
                 {pad_v3<kF32>, pad_v3<kF16>, pad_v3<kBF16>},
                 {untangle<kF32, v8f>, untangle<kF16, v8f>, untangle<kBF16, v8f>}};
const Isa kV4z = {"x86-64-v4-512",
                  {pass1_v4z<kF32>, pass1_v4z<kF16>, pass1_v4z<kBF16>},
                  {pass1b_v4z<kF32>, pass1b_v4z<kF16>, pass1b_v4z<kBF16>},
                  false,
                  {pass2_v4z<kF32>, pass2_v4z<kF16>, pass2_v4z<kBF16>},
                  P2_MR_V4Z,
                  gram_v3,
                  {pad_v3<kF32>, pad_v3<kF16>, pad_v3<kBF16>},
                  {untangle<kF32, v16f>, untangle<kF16, v16f>, untangle<kBF16, v16f>}};
#endif
#if SM_HAVE_AMX
const Isa kAmx = {"x86-64-v4-amx",
                  {pass1_rows_amx<kF32>, pass1_rows_amx<kF16>, pass1_rows_amx<kBF16>},
                  {pass1_band_amx<kF32>, pass1_band_amx<kF16>, pass1_band_amx<kBF16>},
                  false,
                  {pass2_amx<kF32>, pass2_amx<kF16>, pass2_amx<kBF16>},
                  16,
                  gram_v3,
                  {pad_v3<kF32>, pad_v3<kF16>, pad_v3<kBF16>},
                  {untangle<kF32, v16f>, untangle<kF16, v16f>, untangle<kBF16, v16f>},
                  true};
const bool g_amx_usable = amx_usable();
// Below this rank the 16-float build runs instead: the tile unit's work is that of 16 ranks from
// r = 1 on, while the vector FMAs' grows with r (Intel Xeon VM, 2 threads, bf16, fp32 B, run by
// run against the 16-float build: 1.10-1.35x the time at r = 9, 0.98-1.17x at r = 12, 0.74-1.03x at
// r = 16, 0.55-0.95x at r = 64).
constexpr int64_t kAmxMinRank = 16;
#endif

// The machine's logical CPUs (online), read once: a property of the machine, like the ISA build,
// so pass 1's walk (and the bits) depend neither on a call's thread count nor on the CPUs a process
// is confined to (taskset, cpusets: omp_get_num_procs would follow those). set_procs overrides it,
// for tests of both walks on any machine.
int machine_procs() { return std::max(1, int(std::thread::hardware_concurrency())); }
std::atomic<int> g_procs{machine_procs()};

// Pass 1's row groups for d_out rows: fixed by the shape alone, at most kP1Groups, each a whole
// number of P1_KC-row chunks and at least kP1MinGroupChunks of them.
int64_t pass1_group_rows(int64_t d_out) {
  const int64_t chunks = (d_out + P1_KC - 1) / P1_KC;
  return P1_KC * std::max(kP1MinGroupChunks, (chunks + kP1Groups - 1) / kP1Groups);
}

// Whether pass 1 walks row groups (else column bands) for a d_out x d_in layer at rank r with
// `isa`. A build that prefers bands (p1_bands_first) keeps rows only where the layer has fewer
// bands than the machine has logical CPUs and the row walk has more work items (groups x slices).
bool pass1_by_rows(const Isa* isa, int64_t d_out, int64_t d_in, int r) {
  const int64_t ldg = ((d_in + 31) & ~int64_t(31)) + 16;
  if (r > kP1RowsMaxRank || int64_t(r) * ldg * int64_t(sizeof(float)) > kP1RowsMaxPartial) return false;
  if (!isa->p1_bands_first) return true;
  const int64_t bands = (d_in + P1_BAND - 1) / P1_BAND, group_rows = pass1_group_rows(d_out);
  const int64_t items = (d_out + group_rows - 1) / group_rows * ((d_in + kP1SliceCols - 1) / kP1SliceCols);
  return bands < g_procs.load() && items > bands;
}

const Isa* best_isa() {
#if SM_HAVE_V3
  __builtin_cpu_init();
  // (libgcc reports AVX-512 features only when the OS saves their register state)
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl")) {
    // AMD's Zen 4 runs a 512-bit FMA at the 256-bit rate, and its 8-float build measured faster;
    // Intel's AVX-512 cores have two 512-bit FMA ports, so 16-float vectors double the work per op,
    // and from Sapphire Rapids on a tile unit whose bf16 dot products run the higher ranks faster.
#if SM_HAVE_AMX
    if (g_amx_usable) return &kAmx;
#endif
    return __builtin_cpu_is("amd") ? &kV4 : &kV4z;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    // F16C ships with every AVX2 + FMA CPU; __builtin_cpu_supports has no name for it on older GCC.
    return &kV3;
  }
#endif
  return &kBase;
}

// (atomic: set_isa may run in another Python thread while a call, GIL released, reads it; each
// call reads it once, so both passes of a call use one build and agree on the buffers' layout)
std::atomic<const Isa*> g_isa{best_isa()};

// The kernels a call of rank r runs: the selected build, or on the AMX build below its minimum rank
// the 16-float build. Read once per call.
const Isa* kernels_for(int64_t r) {
  const Isa* isa = g_isa.load();
#if SM_HAVE_AMX
  if (isa->amx && r < kAmxMinRank) isa = &kV4z;
#endif
  return isa;
}

int resolve_threads(int requested) {
#ifdef _OPENMP
  return requested > 0 ? requested : omp_get_max_threads();
#else
  (void)requested;
  return 1;
#endif
}

// Drop-behind for weights that are private mappings of files (ModelReader.map): the pages of rows a
// pass is done with leave this process's resident set (MADV_DONTNEED) and come back from the page
// cache if touched again, so a pair of large matrices never has to be resident whole. Inside a
// matrix only 2 MiB-aligned stretches are dropped, so no huge-page mapping is split there; at its
// two ends, whole pages (splitting the mapping of each end's huge page once: keeping those pages
// until the unmap instead measured 5-13 MB more peak RSS on a 7B q/v run).
struct Release {
  uintptr_t base[2], end[2];  // each matrix's first byte, and the end of its last whole page
  int64_t row_bytes[2];
  uintptr_t done[2];          // pass 1: everything below this is dropped already

  static constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  static uintptr_t down(uintptr_t x, uintptr_t a) { return x - x % a; }
  static uintptr_t up(uintptr_t x, uintptr_t a) { return down(x + a - 1, a); }

  static void drop(uintptr_t lo, uintptr_t hi) {
#ifdef __linux__
    if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_DONTNEED);  // advice: failure is harmless
#else
    (void)lo, (void)hi;
#endif
  }
  uintptr_t row(int m, int64_t i) const { return base[m] + uintptr_t(i * row_bytes[m]); }
  // pass 1 finished every row below `next`: drop up to the 2 MiB boundary at or below it
  void after_pass1(int64_t next) {
    for (int m = 0; m < 2; ++m) {
      const uintptr_t hi = down(row(m, next), kHuge);
      if (hi > done[m]) drop(done[m], hi), done[m] = hi;
    }
  }
  // pass 2 (walking up from the last rows) finished every row from `first` on: drop them
  void after_pass2(int64_t first) {
    for (int m = 0; m < 2; ++m) drop(up(row(m, first), kHuge), end[m]);
  }
};

// Both passes; writes T (d_in x r), P (d_out x r), returns ||V||^2. With release_rows > 0 (a
// multiple of P1_KC), wa and wu must be private file mappings: the rows are walked in blocks of
// release_rows, pass 2 from the last block back, and each block's pages are dropped when done.
double lowrank_passes(uintptr_t wa, uintptr_t wu, int64_t d_out, int64_t d_in, int64_t lda, int64_t ldu,
                      int dtype, uintptr_t b, int64_t r, uintptr_t t_out, uintptr_t p_out, int threads,
                      int64_t release_rows) {
  if (dtype < 0 || dtype > 2) throw std::invalid_argument("dtype code must be 0 (fp32), 1 (fp16) or 2 (bf16)");
  if (d_out < 0 || d_in < 0 || r < 1 || lda < d_in || ldu < d_in)
    throw std::invalid_argument("bad shapes: need d_out, d_in >= 0, r >= 1 and row strides >= d_in");
  // (an empty tensor's data pointer may be null: only those of non-empty operands must be set)
  if ((d_out > 0 && d_in > 0 && (!wa || !wu)) || (d_out > 0 && (!b || !p_out)) || (d_in > 0 && !t_out))
    throw std::invalid_argument("null data pointer");
  if (release_rows < 0 || release_rows % P1_KC)
    throw std::invalid_argument("release_rows must be 0 or a positive multiple of " + std::to_string(P1_KC));
  // (dropping a block's pages would also drop the bytes between rows, which are not the matrix's)
  if (release_rows > 0 && (lda != d_in || ldu != d_in))
    throw std::invalid_argument("release_rows needs rows that lie back to back (row strides == d_in)");
  const uintptr_t es = dtype == 0 ? 4 : 2;  // (element loads assume aligned operands)
  if (wa % es || wu % es || b % 4 || t_out % 4 || p_out % 4)
    throw std::invalid_argument("data pointers must be aligned to their element size");
  const int nt = resolve_threads(threads);
  const Isa* isa = kernels_for(r);
  const Pass1Fn p1 = isa->pass1[dtype];
  const Pass2Fn p2 = isa->pass2[dtype];
  const void* A = reinterpret_cast<const void*>(wa);
  const void* U = reinterpret_cast<const void*>(wu);
  const float* B = reinterpret_cast<const float*>(b);
  float* T = reinterpret_cast<float*>(t_out);
  float* P = reinterpret_cast<float*>(p_out);
  if (d_out == 0 || d_in == 0) {  // V is empty: T = 0, P = 0, ||V||^2 = 0, said here (the band walk
    std::fill(T, T + d_in * r, 0.0f);  // below writes no T without rows)
    std::fill(P, P + d_out * r, 0.0f);
    return 0.0;
  }
  const int R = int(r);
  const int64_t ldt = (d_in + 31) & ~int64_t(31);
  FloatBuf Tt(size_t(R) * size_t(ldt), 0.0f);  // T transposed, zero-padded to whole 32-column groups
  // Pass 1 by rows (low ranks; see pass1_by_rows): the rows split into groups fixed by the shape
  // alone (never by the thread count or the blocks below), each summed into a partial T of its own
  // that stays in the L2 while whole rows stream past, the partials added in group order. By column
  // bands (high ranks, whose partial T would not stay in the L2, and low ones on AMD's AVX-512
  // build where a layer has a band per logical CPU): each band's T summed by one thread.
  const int64_t ldg = ldt + 16;  // (off a power of two, as P1_LD)
  // the tile unit's partials and accumulators hold whole tiles of 16 ranks
  const int qt = (R + 15) / 16;
  const int Rp = isa->amx ? 16 * qt : R;
  const bool by_rows = pass1_by_rows(isa, d_out, d_in, R);
  if (by_rows && !p1) throw std::logic_error(std::string("the ") + isa->name + " kernels have no pass 1 by rows");
  const int64_t group_rows = pass1_group_rows(d_out);  // (partials: at most 16 x 512 KiB)
  const int64_t groups = by_rows ? (d_out + group_rows - 1) / group_rows : 0;
  FloatBuf Tg(size_t(groups) * size_t(Rp) * size_t(ldg), 0.0f);
  // column slices: more work items than groups alone when a drop-behind block holds one or two
  // groups (a block is about 8 MiB of rows, a group at least 256 rows)
  const int64_t slices = by_rows ? (d_in + kP1SliceCols - 1) / kP1SliceCols : 0;
  const int64_t bands = by_rows ? 0 : (d_in + P1_BAND - 1) / P1_BAND;
  // ||V||^2 per work item, (group, slice) or band, summed in that order at the end
  std::vector<double> vsq_part(size_t(by_rows ? groups * slices : bands), 0.0);
  const int64_t block = release_rows > 0 && release_rows < d_out ? release_rows : d_out;
  const int64_t blocks = (d_out + block - 1) / block;
  std::optional<Release> rel;
  if (blocks > 1) {
    const int64_t es = dtype == 0 ? 4 : 2;
#ifdef __linux__
    const long page = sysconf(_SC_PAGESIZE) > 0 ? sysconf(_SC_PAGESIZE) : 4096;
#else
    const long page = 4096;  // (nothing is dropped here: see Release::drop)
#endif
    rel.emplace();
    const uintptr_t start[2] = {wa, wu};
    const int64_t ld[2] = {lda, ldu};
    for (int m = 0; m < 2; ++m) {
      rel->row_bytes[m] = ld[m] * es;
      rel->base[m] = start[m];
      // only whole pages inside the matrix: a page it shares with other bytes of the mapping keeps them
      rel->done[m] = Release::up(start[m], uintptr_t(page));
      rel->end[m] = Release::down(start[m] + uintptr_t(((d_out - 1) * ld[m] + d_in) * es), uintptr_t(page));
    }
  }
  constexpr int64_t kUntangleCols = 1024;  // columns per work item of T's final sums
  // with several row blocks, each band keeps its sums from one block to the next
  FloatBuf tacc_band(bands > 0 && blocks > 1 ? size_t(bands) * size_t(Rp) * P1_LD : 0);
  const Pass1BandFn p1b = isa->pass1_band[dtype];
  // the tile unit's operands: B's and T's bf16 parts, packed in tiles (see amx_pack_b / amx_pack_t)
  std::vector<uint16_t, Aligned64<uint16_t>> bpk, tpk;
  [[maybe_unused]] const int64_t row_steps = (d_out + 31) / 32, col_steps = ldt / 32;
  [[maybe_unused]] AmxOperands amx_ops{nullptr, nullptr, qt, 0, 0};
  const void* ex = nullptr;
  size_t p1_buf = size_t(P1_KC) * P1_LD, p2_buf = size_t(kP2MaxMR) * P2_KC, p2_acc = size_t(R) * kP2MaxMR * kMaxLanes;
#if SM_HAVE_AMX
  using PackT = void (*)(const float*, int64_t, int, int, int, int64_t, uint16_t*);
  const PackT amx_pack_t_fn[3] = {amx_pack_t<kF32>, amx_pack_t<kF16>, amx_pack_t<kBF16>};
  if (isa->amx) {
    amx_ops.nbp = bf16_parts_needed(B, d_out * r);
    amx_ops.ntp = 3;
    bpk.resize(size_t(row_steps) * qt * amx_ops.nbp * kTile);
    tpk.resize(size_t(col_steps) * qt * amx_ops.ntp * kTile);
    amx_ops.bpk = bpk.data(), amx_ops.tpk = tpk.data();
    ex = &amx_ops;
    p1_buf = std::max(p1_buf, size_t(3) * 16 * kAmxLdw);
    p2_buf = std::max(p2_buf, size_t(3) * 16 * kAmxLd2 / 2);
    p2_acc = std::max(p2_acc, size_t(qt) * 256);
  }
#endif

#pragma omp parallel num_threads(nt)
  {
    FloatBuf buf(p1_buf);
    FloatBuf tacc(bands > 0 && blocks == 1 ? size_t(Rp) * P1_LD : 0);
#if SM_HAVE_AMX
    if (isa->amx) {
#pragma omp for schedule(static)
      for (int64_t q = 0; q < row_steps; ++q) amx_pack_b(B, d_out, R, qt, amx_ops.nbp, q, bpk.data());
    }
#endif
    for (int64_t s = 0; s < blocks; ++s) {
      const int64_t i0 = s * block, i1 = std::min(d_out, i0 + block);
      if (by_rows) {
        const int64_t g0 = i0 / group_rows, g1 = (i1 - 1) / group_rows + 1;  // the groups these rows touch
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = g0 * slices; item < g1 * slices; ++item) {
          const int64_t g = item / slices, q = item % slices;
          vsq_part[size_t(item)] = p1(A, U, d_out, d_in, lda, ldu, B, R, Tg.data() + size_t(g) * Rp * ldg, ldg,
                                       buf.data(), std::max(i0, g * group_rows), std::min(i1, (g + 1) * group_rows),
                                       q * kP1SliceCols, std::min(d_in, (q + 1) * kP1SliceCols),
                                       vsq_part[size_t(item)], ex);
        }
      } else {
#pragma omp for schedule(dynamic, 1)
        for (int64_t p = 0; p < bands; ++p)
          vsq_part[size_t(p)] = p1b(A, U, d_out, d_in, lda, ldu, B, R, p * P1_BAND, T, Tt.data(), ldt, buf.data(),
                                    blocks > 1 ? tacc_band.data() + size_t(p) * Rp * P1_LD : tacc.data(), i0, i1,
                                    vsq_part[size_t(p)], ex);
      }
      // (the implicit barrier of `omp for`: every group or band is done with these rows)
      if (rel && s + 1 < blocks) {
#pragma omp single nowait
        rel->after_pass1(i1);
      }
    }
    // by rows: Tt = the groups' partials summed in order, then T from it, a stretch of columns at a time
    const int64_t stretches = by_rows ? (ldt + kUntangleCols - 1) / kUntangleCols : 0;
#pragma omp for schedule(static)
    for (int64_t q = 0; q < stretches; ++q) {
      const int64_t c0 = q * kUntangleCols, c1 = std::min(ldt, c0 + kUntangleCols);
      for (int k = 0; k < R; ++k) {
        float* out = Tt.data() + k * ldt;
        for (int64_t g = 0; g < groups; ++g) {
          const float* part = Tg.data() + (size_t(g) * Rp + k) * ldg;
          for (int64_t c = c0; c < c1; ++c) out[c] += part[c];
        }
      }
      isa->untangle[dtype](Tt.data(), ldt, R, c0, std::min(d_in, c1), T);
    }
    // T is complete here; pass 2 starts from the last rows, the ones pass 1 left mapped
#if SM_HAVE_AMX
    if (isa->amx) {
#pragma omp for schedule(static)
      for (int64_t q = 0; q < col_steps; ++q) amx_pack_t_fn[dtype](T, d_in, R, qt, amx_ops.ntp, q, tpk.data());
    }
#endif
    FloatBuf buf2(p2_buf);
    FloatBuf acc(p2_acc);
    const int mr = isa->p2_rows;
    for (int64_t s = blocks - 1; s >= 0; --s) {
      // this block's rows in tiles of mr (the last one shorter), so no tile straddles two blocks
      const int64_t b0 = s * block, b1 = std::min(d_out, b0 + block);
#pragma omp for schedule(dynamic, 16)
      for (int64_t t = 0; t < (b1 - b0 + mr - 1) / mr; ++t)
        p2(A, U, b1, d_in, lda, ldu, Tt.data(), ldt, R, b0 + t * mr, P, buf2.data(), acc.data(), ex);
      if (rel && s > 0) {
#pragma omp single nowait
        rel->after_pass2(s * block);
      }
    }
  }
  double vsq = 0.0;
  for (double s : vsq_part) vsq += s;
  return vsq;
}

// Above this many multiply-adds (about a millisecond on one core) the Grams run on every thread,
// without the GIL; below it, fork/join and handing the GIL to another Python thread cost more.
constexpr double kGramParallelWork = double(1 << 22);
constexpr int64_t kGramMinChunk = 256;  // rows per chunk: at least this, and at most 8 chunks

// (<T^T T, G>, <P^T P, G>, <B^T B, G>) with G = A A^T, in float64. T: d_in x r fp32, P: d_out x r
// fp32, B: d_out x r and A: r x d_in in their dtype codes, all row-major and contiguous. Each Gram
// is summed per chunk of rows, then over the chunks in order: the bits do not depend on threads.
std::tuple<double, double, double> lowrank_traces(uintptr_t t, uintptr_t p, uintptr_t b, int b_dtype, uintptr_t a,
                                                  int a_dtype, int64_t d_out, int64_t d_in, int64_t r, int threads) {
  if (d_out < 1 || d_in < 1 || r < 1) throw std::invalid_argument("bad shapes: need d_out, d_in, r >= 1");
  if (!t || !p || !b || !a) throw std::invalid_argument("null data pointer");
  if (b_dtype < 0 || b_dtype > 2 || a_dtype < 0 || a_dtype > 2)
    throw std::invalid_argument("dtype code must be 0 (fp32), 1 (fp16) or 2 (bf16)");
  if (t % 4 || p % 4 || b % (b_dtype ? 2 : 4) || a % (a_dtype ? 2 : 4))
    throw std::invalid_argument("data pointers must be aligned to their element size");
  const int ld = int((r + GR_L - 1) / GR_L * GR_L);
  const double work = double(ld) * ld * double(d_in + d_out);  // the four upper triangles
  const bool parallel = work > kGramParallelWork;
  std::optional<py::gil_scoped_release> nogil;
  if (parallel) nogil.emplace();
  const Isa& isa = *g_isa.load();
  const int64_t n[4] = {d_in, d_in, d_out, d_out};  // A^T, T, P, B
  const void* src[4] = {reinterpret_cast<const void*>(a), reinterpret_cast<const void*>(t),
                        reinterpret_cast<const void*>(p), reinterpret_cast<const void*>(b)};
  const int code[4] = {a_dtype, kF32, kF32, b_dtype};
  int64_t chunk[4], first[5] = {0};
  for (int m = 0; m < 4; ++m) {
    chunk[m] = std::max(kGramMinChunk, (n[m] + 7) / 8);
    first[m + 1] = first[m] + (n[m] + chunk[m] - 1) / chunk[m];
  }
  const int64_t max_chunk = *std::max_element(chunk, chunk + 4);
  std::vector<double> part(size_t(first[4]) * size_t(ld) * size_t(ld));
#pragma omp parallel num_threads(resolve_threads(threads)) if (parallel)
  {
    std::vector<double> X(size_t(std::min(max_chunk, std::max(d_in, d_out))) * size_t(ld), 0.0);
#pragma omp for schedule(dynamic, 1)
    for (int64_t q = 0; q < first[4]; ++q) {
      const int m = int(std::upper_bound(first, first + 5, q) - first) - 1;
      const int64_t j0 = (q - first[m]) * chunk[m], j1 = std::min(n[m], j0 + chunk[m]);
      isa.pad[code[m]](src[m], n[m], r, m == 0, j0, j1, ld, X.data());
      isa.gram(X.data(), j1 - j0, ld, part.data() + q * ld * ld);
    }
  }
  // each Gram's upper triangle, over its chunks in order, then <S, G> from the upper triangles
  auto gram = [&](int m, int64_t k, int64_t l) {
    double s = 0.0;
    for (int64_t q = first[m]; q < first[m + 1]; ++q) s += part[size_t(q * ld * ld + k * ld + l)];
    return s;
  };
  double out[3] = {0.0, 0.0, 0.0};
  for (int64_t k = 0; k < r; ++k)
    for (int64_t l = k; l < r; ++l) {
      const double g = (l == k ? 1.0 : 2.0) * gram(0, k, l);
      for (int m = 1; m < 4; ++m) out[m - 1] += gram(m, k, l) * g;
    }
  return {out[0], out[1], out[2]};
}

bool set_isa(const std::string& name) {
  if (name == "baseline") {
    g_isa = &kBase;
    return true;
  }
  if (name == "best") {
    g_isa = best_isa();
    return true;
  }
#if SM_HAVE_V3
  const Isa* best = best_isa();
  const bool avx512 = best == &kV4 || best == &kV4z
#if SM_HAVE_AMX
                      || best == &kAmx
#endif
      ;
  if (name == "x86-64-v4-512" && avx512) {
    g_isa = &kV4z;
    return true;
  }
  if (name == "x86-64-v4" && avx512) {
    g_isa = &kV4;
    return true;
  }
#if SM_HAVE_AMX
  if (name == "x86-64-v4-amx" && g_amx_usable) {
    g_isa = &kAmx;
    return true;
  }
#endif
  if (name == "x86-64-v3" && (avx512 || best == &kV3)) {  // every AVX-512 CPU has AVX2 + FMA
    g_isa = &kV3;
    return true;
  }
#endif
  return false;
}

// A line for people when the process dies of SIGBUS: a page of a memory-mapped file that cannot be
// read (the file was truncated or replaced under the mapping, or the disk gave an I/O error). Python
// cannot catch a fault inside a running instruction, here or in torch. The handler writes the
// caller's line to stderr once (the first of the threads that fault at the same time), puts back
// the handler it replaced (the default, which ends the process, or faulthandler's) and returns:
// the access faults again and that handler gets it, with the fault's own siginfo. A SIGBUS that
// is no such fault (sent with kill(), or an alignment fault) gets no line and is raised again.
#if SM_HAVE_SIGBUS
char g_fault_line[2048];
std::atomic<int> g_fault_len{0};
std::atomic<int> g_fault_said{0};
static_assert(std::atomic<int>::is_always_lock_free, "the signal handler needs lock-free atomics");
struct sigaction g_prev_bus;
std::atomic<bool> g_bus_installed{false};

void on_bus(int sig, siginfo_t* info, void*) {
  const int saved = errno;
  // (write, sigaction and raise are async-signal-safe; so are lock-free atomics)
  const bool mapped_file = info != nullptr && (info->si_code == BUS_ADRERR || info->si_code == BUS_OBJERR);
  const int n = g_fault_len.load(std::memory_order_acquire);
  if (mapped_file && n > 0 && g_fault_said.exchange(1) == 0) {
    const ssize_t w = write(2, g_fault_line, size_t(n));
    (void)w;
  }
  sigaction(SIGBUS, &g_prev_bus, nullptr);
  errno = saved;
  if (!mapped_file) raise(sig);  // (nothing would repeat it; delivered once this handler returns)
}
#endif

bool set_fault_message(const std::string& line) {
#if SM_HAVE_SIGBUS
  g_fault_len.store(0, std::memory_order_release);  // (never a half-copied line, should a fault come meanwhile)
  const size_t n = std::min(line.size(), sizeof g_fault_line);
  std::memcpy(g_fault_line, line.data(), n);
  g_fault_len.store(int(n), std::memory_order_release);
  if (!g_bus_installed.exchange(true)) {
    struct sigaction sa;
    std::memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_bus;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGBUS, &sa, &g_prev_bus) != 0) {
      g_bus_installed = false;
      return false;
    }
  }
  return true;
#else
  (void)line;
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "SafeMERGE CPU kernels (pointer-based; no torch C++ ABI).";
  m.def("lowrank_passes", &lowrank_passes, py::call_guard<py::gil_scoped_release>(),
        py::arg("wa"), py::arg("wu"), py::arg("d_out"), py::arg("d_in"), py::arg("lda"), py::arg("ldu"),
        py::arg("dtype"), py::arg("b"), py::arg("r"), py::arg("t_out"), py::arg("p_out"), py::arg("threads") = 0,
        py::arg("release_rows") = 0,
        "T = V^T B (d_in x r fp32) into t_out, P = V T (d_out x r fp32) into p_out, V = wa - wu never stored;\n"
        "returns ||V||_F^2 (float64). wa/wu: row-major with row strides lda/ldu (elements), dtype code\n"
        "0=fp32 1=fp16 2=bf16; b: contiguous fp32 d_out x r. Deterministic for any thread count.\n"
        "release_rows > 0 (a multiple of 32), ONLY for private file mappings with rows back to back (lda = ldu =\n"
        "d_in): walk blocks of that many rows and drop each block's whole pages from the resident set when done\n"
        "(same bits as release_rows = 0).");
  m.def("lowrank_traces", &lowrank_traces, py::arg("t"), py::arg("p"), py::arg("b"), py::arg("b_dtype"), py::arg("a"),
        py::arg("a_dtype"), py::arg("d_out"), py::arg("d_in"), py::arg("r"), py::arg("threads") = 0,
        "(<T^T T, G>, <P^T P, G>, <B^T B, G>) with G = A A^T, float64 sums of exact fp32 products.\n"
        "t: d_in x r fp32, p: d_out x r fp32, b: d_out x r and a: r x d_in in dtype codes b_dtype/a_dtype\n"
        "(0=fp32 1=fp16 2=bf16); all row-major, contiguous. Deterministic for any thread count.");
  m.def("isa", []() { return std::string(g_isa.load()->name); }, "The instruction set the kernels run with.");
  m.def("pass1_walk", [](int64_t d_out, int64_t d_in, int64_t r) {
          if (d_out < 0 || d_in < 0 || r < 1) throw std::invalid_argument("want d_out, d_in >= 0 and r >= 1");
          return std::string(pass1_by_rows(kernels_for(r), d_out, d_in, int(r)) ? "rows" : "bands");
        }, py::arg("d_out"), py::arg("d_in"), py::arg("r"),
        "How the selected kernels walk pass 1 for a d_out x d_in layer at rank r: 'rows' or 'bands'.");
  m.def("procs", []() { return g_procs.load(); },
        "The logical CPUs pass 1's walk rule counts: the machine's online ones, whatever the process's affinity.");
  m.def("set_procs", [](int n) { g_procs.store(n > 0 ? n : machine_procs()); }, py::arg("n"),
        "For tests: the CPU count pass 1's walk rule uses (n <= 0: the machine's again). Changes the bits.");
#if SM_HAVE_AMX
  m.attr("AMX_MIN_RANK") = kAmxMinRank;  // (below it the 'x86-64-v4-amx' build runs the 'x86-64-v4-512' kernels)
#endif
  m.def("set_isa", &set_isa, py::arg("name"),
        "Select 'best', 'x86-64-v4-amx', 'x86-64-v4-512', 'x86-64-v4', 'x86-64-v3' or 'baseline' kernels; returns\n"
        "False if this CPU cannot run them (the selection is then unchanged). 'x86-64-v4-amx' runs\n"
        "ranks below 16 with the 'x86-64-v4-512' kernels.");
  m.def("openmp", []() {
#ifdef _OPENMP
    return true;
#else
    return false;
#endif
  }, "Whether the extension was built with OpenMP.");
  m.def("max_threads", []() { return resolve_threads(0); }, "OpenMP's default thread count (1 without OpenMP).");
  m.def("set_fault_message", &set_fault_message, py::arg("line"),
        "Write `line` to stderr if the process gets SIGBUS (a memory-mapped file that cannot be read), then let the\n"
        "signal end it as before (the handler it replaced runs: the default, or faulthandler's). An empty line\n"
        "writes nothing. False where this system has no SIGBUS handlers (the line is then never written).");
}
