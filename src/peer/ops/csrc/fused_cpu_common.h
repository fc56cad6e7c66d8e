// Shared pieces of the CPU kernels (fused_cpu.cpp, pk_topk_cpu.cpp, adamw_cpu.cpp): row loaders for
// fp32/bf16 tables, vector dot/axpy, non-temporal row stores, prefetch, activations and a small
// way to run work on the threads. Each .cpp includes it; peer.ops.build compiles them into one shared library.
#pragma once
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#if defined(__AVX__)
#include <immintrin.h>
#endif
#if defined(_OPENMP)
#include <omp.h>
#endif
#include <stdexcept>
#include <thread>
#include <vector>

namespace peer_cpu {

#ifndef PEER_PF_LOCALITY
#define PEER_PF_LOCALITY 1  // prefetcht2 (into L2): measured best for rows read once
#endif
#ifndef PEER_PF
#define PEER_PF 4
#endif
constexpr int PF = PEER_PF;  // prefetch distance, in rows

struct F32 {
  using T = float;
  static inline float ld(const float* p, int64_t k) { return p[k]; }
};
struct BF16 {
  using T = uint16_t;
  static inline float ld(const uint16_t* p, int64_t k) {
    uint32_t b = uint32_t(p[k]) << 16;
    float f;
    std::memcpy(&f, &b, 4);
    return f;
  }
};

inline uint16_t to_bf16(float f) {  // round to nearest even, NaN stays NaN
  uint32_t b;
  std::memcpy(&b, &f, 4);
  if ((b & 0x7fffffffu) > 0x7f800000u) return uint16_t((b >> 16) | 0x40);
  return uint16_t((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}
struct SF32 {
  using T = float;
  static inline float ld(const float* p, int64_t k) { return p[k]; }
  static inline void st(float* p, int64_t k, float f) { p[k] = f; }
};
struct SBF16 {
  using T = uint16_t;
  static inline float ld(const uint16_t* p, int64_t k) { return BF16::ld(p, k); }
  static inline void st(uint16_t* p, int64_t k, float f) { p[k] = to_bf16(f); }
};

// Run f(i) for every i in [0, nt), one call per thread (i = 0 on the calling thread when nt = 1).
// Built with OpenMP (the default), this uses the process's one libgomp, the one torch's intra-op
// pool runs on (the library links libgomp.so.1 by soname, which the loader resolves to the copy
// torch already loaded): no thread is started per call, and none competes for a core with torch's
// workers, which spin for a while after each of torch's own parallel regions (with a std::thread
// per call that made a 2-thread kernel slower than a 1-thread one between torch ops).
template <class F>
void run_threads(int nt, F f) {
  if (nt <= 1) {
    f(0);
    return;
  }
#if defined(_OPENMP)
  std::atomic<bool> failed(false);
#pragma omp parallel num_threads(nt)
  {
    try {  // an exception must not leave an OpenMP region
      for (int i = omp_get_thread_num(); i < nt; i += omp_get_num_threads()) f(i);
    } catch (...) {
      failed = true;
    }
  }
  if (failed) throw std::runtime_error("peer kernel: a worker failed");
#else
  std::vector<std::thread> pool;
  for (int i = 1; i < nt; ++i) pool.emplace_back([&f, i]() { f(i); });
  f(0);
  for (auto& th : pool) th.join();
#endif
}

// f(start, end) over [0, n) in blocks of `block`, taken from a shared counter by nthreads threads.
template <class F>
void parallel_blocks(int64_t n, int64_t block, int nthreads, F f) {
  std::atomic<int64_t> next(0);
  auto work = [&](int) {
    for (;;) {
      int64_t s = next.fetch_add(block);
      if (s >= n) break;
      f(s, std::min(n, s + block));
    }
  };
  run_threads(nthreads <= 1 || n <= block ? 1 : nthreads, work);
}

inline void prefetch_row(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, PEER_PF_LOCALITY);
}

#if defined(__AVX512F__)
inline __m512 ld16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 ld16(const uint16_t* p) {  // 16 bf16 -> 16 fp32
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
#endif

template <class L>
inline float dot(const typename L::T* row, const float* x, int64_t d) {
#if defined(__AVX512F__)
  if (d % 64 == 0) {  // four independent accumulators: loads are not serialised behind one FMA chain
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t k = 0; k < d; k += 64) {
      a0 = _mm512_fmadd_ps(ld16(row + k), _mm512_loadu_ps(x + k), a0);
      a1 = _mm512_fmadd_ps(ld16(row + k + 16), _mm512_loadu_ps(x + k + 16), a1);
      a2 = _mm512_fmadd_ps(ld16(row + k + 32), _mm512_loadu_ps(x + k + 32), a2);
      a3 = _mm512_fmadd_ps(ld16(row + k + 48), _mm512_loadu_ps(x + k + 48), a3);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
  }
#endif
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t k = 0; k < d; ++k) acc += L::ld(row, k) * x[k];
  return acc;
}

template <class L>
inline void axpy(float a, const typename L::T* row, float* y, int64_t d) {
#pragma omp simd
  for (int64_t k = 0; k < d; ++k) y[k] += a * L::ld(row, k);
}

// Write a finished row with non-temporal stores when aligned: no read-for-ownership of the
// destination line, which would double the memory traffic of writing a large gradient.
inline void store_stream(float* dst, const float* src, int64_t d) {
#if defined(__AVX512F__)
  if ((reinterpret_cast<uintptr_t>(dst) & 63) == 0 && d % 16 == 0) {
    for (int64_t k = 0; k < d; k += 16) _mm512_stream_ps(dst + k, _mm512_loadu_ps(src + k));
    return;
  }
#elif defined(__AVX__)
  if ((reinterpret_cast<uintptr_t>(dst) & 31) == 0 && d % 8 == 0) {
    for (int64_t k = 0; k < d; k += 8) _mm256_stream_ps(dst + k, _mm256_loadu_ps(src + k));
    return;
  }
#endif
  std::memcpy(dst, src, size_t(d) * sizeof(float));
}

inline void stream_fence() {
#if defined(__AVX__)
  _mm_sfence();
#endif
}

inline void axpy_f(float a, const float* row, float* y, int64_t d) {
#pragma omp simd
  for (int64_t k = 0; k < d; ++k) y[k] += a * row[k];
}

// exact (erf) GELU and its derivative, as torch computes them; or ReLU
inline float act(float h, int gelu) { return gelu ? 0.5f * h * (1.f + std::erf(h * 0.70710678118654752f)) : (h > 0.f ? h : 0.f); }
inline float dact(float h, int gelu) {
  if (!gelu) return h > 0.f ? 1.f : 0.f;
  float cdf = 0.5f * (1.f + std::erf(h * 0.70710678118654752f));
  float pdf = std::exp(-0.5f * h * h) * 0.39894228040143268f;
  return cdf + h * pdf;
}

}  // namespace peer_cpu
