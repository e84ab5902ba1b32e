// A CPU emulation of the parts of CUDA that csrc/cuda_ops.cu uses, so that its kernels and host
// code run (slowly) on a machine without a GPU: tests/cuda_emulator.py rewrites the launches
// (`k<<<grid, block, smem, stream>>>(args)` -> `::emu::launch(grid, block, [&] { k(args); })`),
// drops the CUDA includes and compiles the file with this header as plain C++.
//
// A block's threads are fibers on the calling OS thread: each runs until its next
// __syncthreads() or its end, then the next one runs; when all have arrived the barrier opens.
// __shared__ arrays are function statics, shared by the block's fibers (blocks run one after
// another, so a block finds the previous one's values there, as stale as a GPU's). Blocks, and a
// block's threads between barriers, run in order, or backwards with SAFEMERGE_CUDA_EMU_ORDER=reverse:
// a thread that reads shared memory another thread writes without a barrier between them reads
// another value in one of the two orders. A barrier that some threads of a block skip (they
// returned) while others wait is an error here, as it is undefined in CUDA. Not emulated: warps,
// the memory model, several threads' non-atomic updates of one address, launch failures, streams
// (launches run at once, in order, one at a time), the GPU's own bits (multiply-adds are fused
// where the CPU has FMA, as nvcc fuses them, but not necessarily the same ones).
#pragma once

#include <sys/mman.h>
#include <ucontext.h>

#include <cmath>
#include <csetjmp>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

// (CUDA's device code has min and max for every arithmetic type in the global namespace)
template <class T> inline T min(T a, T b) { return b < a ? b : a; }
template <class T> inline T max(T a, T b) { return a < b ? b : a; }

struct __half { uint16_t bits; };
struct __nv_bfloat16 { uint16_t bits; };

inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t u = uint32_t(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float __half2float(__half h) {
  const uint32_t sign = uint32_t(h.bits & 0x8000u) << 16, exp = (h.bits >> 10) & 0x1fu, man = h.bits & 0x3ffu;
  float f;
  if (exp == 0x1f) {  // inf / nan
    const uint32_t u = sign | 0x7f800000u | (man << 13);
    std::memcpy(&f, &u, 4);
    return f;
  }
  if (exp == 0) {  // zero / subnormal: man * 2^-24
    f = std::ldexp(float(man), -24);
    return sign ? -f : f;
  }
  const uint32_t u = sign | ((exp + 112u) << 23) | (man << 13);
  std::memcpy(&f, &u, 4);
  return f;
}

namespace emu {

inline dim3 g_thread, g_block, g_block_dim, g_grid_dim;

enum class State { ready, at_barrier, done };

// Fibers switch with _setjmp/_longjmp (no system call, unlike swapcontext); ucontext only gives
// each its own stack at its first start. A fiber runs the kernel body once per block, in a loop.
struct Fiber {
  ucontext_t ctx;
  jmp_buf jb;
  State state = State::done;
  bool started = false;
};

inline jmp_buf g_scheduler;
inline Fiber* g_current = nullptr;
inline const std::function<void()>* g_body = nullptr;

inline void fiber_main() {
  for (;;) {
    (*g_body)();
    g_current->state = State::done;
    if (!_setjmp(g_current->jb)) _longjmp(g_scheduler, 1);
  }
}

inline void syncthreads() {
  g_current->state = State::at_barrier;
  if (!_setjmp(g_current->jb)) _longjmp(g_scheduler, 1);
}

inline int sm_count() {
  const char* s = std::getenv("SAFEMERGE_CUDA_EMU_SMS");
  return s ? std::atoi(s) : 4;
}

inline bool reverse_order() {
  const char* s = std::getenv("SAFEMERGE_CUDA_EMU_ORDER");
  return s && std::string(s) == "reverse";
}

// Stacks of 64 KiB for up to 1024 fibers, one pool for every launch, each stack below a guard page
// (an overflow faults instead of writing into the next stack). Mapped once; pages untouched until used.
constexpr size_t kStack = 64 << 10, kGuard = 4 << 10;

inline char* stack_pool() {
  static char* pool = [] {
    void* p = mmap(nullptr, 1024 * (kStack + kGuard), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("emulated launch: no memory for the fibers' stacks");
    for (size_t t = 0; t < 1024; ++t) mprotect(static_cast<char*>(p) + t * (kStack + kGuard), kGuard, PROT_NONE);
    return static_cast<char*>(p);
  }();
  return pool;
}

// Switches to fiber f until it reaches a barrier or its end. Out of line, so the function that
// holds the _setjmp has no loop state for the _longjmp back to clobber.
[[gnu::noinline]] inline void resume(Fiber& f) {
  g_current = &f;
  if (!_setjmp(g_scheduler)) {
    if (f.started) _longjmp(f.jb, 1);
    f.started = true;
    setcontext(&f.ctx);
  }
}

// One launch at a time (the bindings release the GIL; the fibers, their stacks and the __shared__
// statics are the process's).
inline std::mutex g_launch_mutex;

// Runs body() as every thread of every block of the grid, one block after another (blocks and
// threads in reverse order with SAFEMERGE_CUDA_EMU_ORDER=reverse). Limits as CUDA's.
template <class F>
void launch(dim3 grid, dim3 block, F&& body_fn) {
  const unsigned n = block.x * block.y * block.z;
  if (n == 0 || n > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 ||
      grid.z > 65535)
    throw std::runtime_error("emulated launch: a grid or block CUDA refuses (empty, over 1024 threads a block, or "
                             "over the grid's limits)");
  const std::lock_guard<std::mutex> lock(g_launch_mutex);
  std::vector<Fiber> fibers(n);
  for (unsigned t = 0; t < n; ++t) {
    Fiber& f = fibers[t];
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = stack_pool() + t * (kStack + kGuard) + kGuard;
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = nullptr;  // (fiber_main never returns)
    makecontext(&f.ctx, fiber_main, 0);
  }
  const std::function<void()> body = body_fn;
  g_body = &body;
  g_grid_dim = grid;
  g_block_dim = block;
  const bool reverse = reverse_order();
  const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
  for (uint64_t q = 0; q < blocks; ++q) {
    const uint64_t b = reverse ? blocks - 1 - q : q;
    g_block = dim3(unsigned(b % grid.x), unsigned(b / grid.x % grid.y), unsigned(b / (uint64_t(grid.x) * grid.y)));
    for (Fiber& f : fibers) f.state = State::ready;
    for (;;) {
      for (unsigned k = 0; k < n; ++k) {
        const unsigned t = reverse ? n - 1 - k : k;
        if (fibers[t].state != State::ready) continue;
        g_thread = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
        resume(fibers[t]);
      }
      unsigned waiting = 0, done = 0;
      for (const Fiber& f : fibers) (f.state == State::done ? done : waiting) += 1;
      if (waiting == 0) break;
      if (done > 0)
        throw std::runtime_error("emulated launch: " + std::to_string(done) + " threads of block (" +
                                 std::to_string(g_block.x) + ", " + std::to_string(g_block.y) + ") returned while " +
                                 std::to_string(waiting) + " wait at __syncthreads()");
      for (Fiber& f : fibers) f.state = State::ready;
    }
  }
}

}  // namespace emu

#define threadIdx (::emu::g_thread)
#define blockIdx (::emu::g_block)
#define blockDim (::emu::g_block_dim)
#define gridDim (::emu::g_grid_dim)
#define __syncthreads() ::emu::syncthreads()

// ---- the runtime API the host code calls: one device (0) with SAFEMERGE_CUDA_EMU_SMS SMs (4),
// compute capability 9.0
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidDevice = 101,
  cudaErrorInsufficientDriver = 35,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorNoKernelImageForDevice = 209,
  cudaErrorInvalidPtx = 218,
  cudaErrorJitCompilerNotFound = 221,
  cudaErrorUnsupportedPtxVersion = 222,
  cudaErrorJitCompilationDisabled = 223,
};
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
};
struct CUstream_st;
typedef CUstream_st* cudaStream_t;
struct cudaFuncAttributes {
  int binaryVersion, ptxVersion;
};

namespace emu {
inline int g_device = 0;
}

inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : e == cudaErrorInvalidDevice ? "invalid device ordinal" : "emulated error";
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}
inline cudaError_t cudaDriverGetVersion(int* v) {
  *v = 13000;
  return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* d) {
  *d = emu::g_device;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int d) {
  if (d != 0) return cudaErrorInvalidDevice;
  emu::g_device = d;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int d) {
  if (d != 0) return cudaErrorInvalidDevice;
  *v = a == cudaDevAttrMultiProcessorCount ? emu::sm_count() : a == cudaDevAttrComputeCapabilityMajor ? 9 : 0;
  return cudaSuccess;
}
template <class F>
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* a, F) {
  a->binaryVersion = a->ptxVersion = 90;
  return cudaSuccess;
}
