// CPU kernels of the fused PEER expert mix (paper eqs. 3, 6, 7), built by peer.ops.build with g++ and
// called through ctypes. Plain C ABI, raw pointers, fp32 compute; tables are fp32 or bf16.
//
//   forward : y[t] = sum_j g[t,j] a[t,j] v[i_tj],  a = act(u_i . x_t)  or  act(w_i . x_t) (u_i . x_t)
//   backward: dA = dy_t . v_i;  dg = dA a;  coef_u = d loss/d(u_i . x_t);  coef_w = d loss/d(w_i . x_t)
//             dx_t = sum_j coef_u u_i + coef_w w_i
//   grads   : rows of u/v/w grads, one bag per distinct expert: sum over its (t, j) pairs of
//             coef * x_t (u, w) or g a * dy_t (v)
//
// Each retrieved row is read straight from the table (no [T, m, d] copy) and the next rows are
// prefetched. Work is split over the threads (run_threads: torch's OpenMP pool) in small blocks taken
// from an atomic counter, which keeps going when another process holds one of the cores.
#include "fused_cpu_common.h"

namespace {
using namespace peer_cpu;

template <class L>
void forward(const float* x, const float* g, const int64_t* idx, const void* u_, const void* v_, const void* w_,
             float* y, float* h, float* hg, int64_t T, int64_t d, int64_t m, int gelu, int nthreads) {
  using E = typename L::T;
  const E* u = static_cast<const E*>(u_);
  const E* v = static_cast<const E*>(v_);
  const E* w = static_cast<const E*>(w_);
  const int64_t rb = d * int64_t(sizeof(E));
  parallel_blocks(T, 4, nthreads, [&](int64_t s, int64_t e) {
    std::vector<float> coef(m);
    for (int64_t t = s; t < e; ++t) {
      const float* xt = x + t * d;
      const int64_t* it = idx + t * m;
      for (int64_t j = 0; j < m; ++j) {
        if (j + PF < m) {
          prefetch_row(u + it[j + PF] * d, rb);
          if (w) prefetch_row(w + it[j + PF] * d, rb);
        }
        float hu = dot<L>(u + it[j] * d, xt, d);
        float a;
        if (w) {
          float hw = dot<L>(w + it[j] * d, xt, d);
          hg[t * m + j] = hw;
          a = act(hw, gelu) * hu;
        } else {
          a = act(hu, gelu);
        }
        h[t * m + j] = hu;
        coef[j] = g[t * m + j] * a;
      }
      float* yt = y + t * d;
      std::fill(yt, yt + d, 0.f);
      for (int64_t j = 0; j < m; ++j) {
        if (j + PF < m) prefetch_row(v + it[j + PF] * d, rb);
        axpy<L>(coef[j], v + it[j] * d, yt, d);
      }
    }
  });
}

template <class L>
void backward(const float* x, const float* dy, const float* g, const int64_t* idx, const void* u_, const void* v_,
              const void* w_, const float* h, const float* hg, float* dx, float* dg, float* cu, float* cv, float* cw,
              int64_t T, int64_t d, int64_t m, int gelu, int nthreads) {
  using E = typename L::T;
  const E* u = static_cast<const E*>(u_);
  const E* v = static_cast<const E*>(v_);
  const E* w = static_cast<const E*>(w_);
  const int64_t rb = d * int64_t(sizeof(E));
  parallel_blocks(T, 4, nthreads, [&](int64_t s, int64_t e) {
    for (int64_t t = s; t < e; ++t) {
      const float* dyt = dy + t * d;
      const int64_t* it = idx + t * m;
      // pass 1: dA = dy . v_i, then the coefficients of every pair of this token
      for (int64_t j = 0; j < m; ++j) {
        if (j + PF < m) prefetch_row(v + it[j + PF] * d, rb);
        const int64_t tj = t * m + j;
        float dA = dot<L>(v + it[j] * d, dyt, d);
        float hu = h[tj], gt = g[tj], a;
        if (w) {
          float ag = act(hg[tj], gelu);
          a = ag * hu;
          cu[tj] = dA * gt * ag;
          cw[tj] = dA * gt * hu * dact(hg[tj], gelu);
        } else {
          a = act(hu, gelu);
          cu[tj] = dA * gt * dact(hu, gelu);
        }
        dg[tj] = dA * a;
        cv[tj] = gt * a;
      }
      // pass 2: dx = sum_j cu u_i (+ cw w_i)
      if (!dx) continue;
      float* dxt = dx + t * d;
      std::fill(dxt, dxt + d, 0.f);
      for (int64_t j = 0; j < m; ++j) {
        if (j + PF < m) {
          prefetch_row(u + it[j + PF] * d, rb);
          if (w) prefetch_row(w + it[j + PF] * d, rb);
        }
        axpy<L>(cu[t * m + j], u + it[j] * d, dxt, d);
        if (w) axpy<L>(cw[t * m + j], w + it[j] * d, dxt, d);
      }
    }
  });
}

// LSD radix sort of the pairs by expert id: key = id * P + pair, so equal ids keep pair order.
// Writes perm [P] (pair ids in expert order), rows [U] and offsets [U + 1]; returns U.
int64_t sort_pairs(const int64_t* idx, int64_t P, int64_t N, int64_t* perm, int64_t* rows, int64_t* offsets) {
  std::vector<uint64_t> a(P), b(P);
  for (int64_t p = 0; p < P; ++p) a[p] = uint64_t(idx[p]) * uint64_t(P) + uint64_t(p);
  int bits = 0;
  while (bits < 64 && (uint64_t(N) * uint64_t(P) - 1) >> bits) ++bits;
  constexpr int R = 11;
  std::vector<int64_t> cnt(1 << R);
  for (int shift = 0; shift < bits; shift += R) {
    std::fill(cnt.begin(), cnt.end(), 0);
    for (int64_t p = 0; p < P; ++p) ++cnt[(a[p] >> shift) & ((1 << R) - 1)];
    int64_t sum = 0;
    for (auto& c : cnt) { int64_t t = c; c = sum; sum += t; }
    for (int64_t p = 0; p < P; ++p) b[cnt[(a[p] >> shift) & ((1 << R) - 1)]++] = a[p];
    a.swap(b);
  }
  int64_t U = 0;
  for (int64_t p = 0; p < P; ++p) {
    const int64_t id = int64_t(a[p] / uint64_t(P));
    perm[p] = int64_t(a[p] % uint64_t(P));
    if (U == 0 || rows[U - 1] != id) {
      rows[U] = id;
      offsets[U] = p;
      ++U;
    }
  }
  offsets[U] = P;
  return U;
}

}  // namespace

extern "C" {

int peer_forward(const float* x, const float* g, const int64_t* idx, const void* u, const void* v, const void* w,
                 float* y, float* h, float* hg, int64_t T, int64_t d, int64_t m, int gelu, int bf16, int nthreads) {
  try {
    if (bf16)
      forward<BF16>(x, g, idx, u, v, w, y, h, hg, T, d, m, gelu, nthreads);
    else
      forward<F32>(x, g, idx, u, v, w, y, h, hg, T, d, m, gelu, nthreads);
  } catch (...) {
    return 1;
  }
  return 0;
}

int peer_backward(const float* x, const float* dy, const float* g, const int64_t* idx, const void* u, const void* v,
                  const void* w, const float* h, const float* hg, float* dx, float* dg, float* cu, float* cv, float* cw,
                  int64_t T, int64_t d, int64_t m, int gelu, int bf16, int nthreads) {
  try {
    if (bf16)
      backward<BF16>(x, dy, g, idx, u, v, w, h, hg, dx, dg, cu, cv, cw, T, d, m, gelu, nthreads);
    else
      backward<F32>(x, dy, g, idx, u, v, w, h, hg, dx, dg, cu, cv, cw, T, d, m, gelu, nthreads);
  } catch (...) {
    return 1;
  }
  return 0;
}

int64_t peer_sort_pairs(const int64_t* idx, int64_t P, int64_t N, int64_t* perm, int64_t* rows, int64_t* offsets) {
  try {
    return sort_pairs(idx, P, N, perm, rows, offsets);
  } catch (...) {
    return -1;
  }
}

// One bag per distinct expert r (pairs offsets[r] .. offsets[r+1] of the expert-sorted order perm):
//   out[row r] = sum_p coef[perm[p]] * src[perm[p] / m]
// for up to three (src, coef, out) triples sharing the bags (u, v, gate grads in one pass). Row r is
// written at out + r * d (a compact block), or at out + out_rows[r] * d (straight into a dense grad).
int peer_table_grads(const int64_t* perm, const int64_t* offsets, const int64_t* out_rows, int64_t U, int64_t m, int64_t d,
                     const float* src0, const float* coef0, float* out0, const float* src1, const float* coef1,
                     float* out1, const float* src2, const float* coef2, float* out2, int nthreads) {
  try {
    const float* src[3] = {src0, src1, src2};
    const float* coef[3] = {coef0, coef1, coef2};
    float* out[3] = {out0, out1, out2};
    parallel_blocks(U, 64, nthreads, [&](int64_t s, int64_t e) {
      std::vector<float> acc(d);  // the row is summed in L1, then streamed out once
      for (int64_t r = s; r < e; ++r) {
        for (int k = 0; k < 3; ++k) {
          if (!out[k]) continue;
          std::fill(acc.begin(), acc.end(), 0.f);
          for (int64_t p = offsets[r]; p < offsets[r + 1]; ++p) {
            const int64_t pair = perm[p];
            axpy_f(coef[k][pair], src[k] + (pair / m) * d, acc.data(), d);
          }
          store_stream(out[k] + (out_rows ? out_rows[r] : r) * d, acc.data(), d);
        }
      }
      stream_fence();
    });
  } catch (...) {
    return 1;
  }
  return 0;
}

}  // extern "C"
