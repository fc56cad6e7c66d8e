// CPU kernels of the product-key top-k (paper eqs. 4-5), built with fused_cpu.cpp by peer.ops.build:
// per (token, head) the k best sub-keys of each half, then the k best of their sums; and the
// sparse backward into the query and the selected sub-keys.
#include "fused_cpu_common.h"

namespace {
using namespace peer_cpu;

// Product-key top-k (paper eqs. 4-5) of one query row: the k best sub-keys of each half, then the
// k best of the k x k sums. A candidate (i, j) (ranks within the halves, best first) can only be in
// the top k when (i + 1)(j + 1) <= k: all pairs (i' <= i, j' <= j) score at least as high.
// Insert (x, id) into the descending list vals/ids of length count <= k; equal scores are ordered
// by id, so the result does not depend on the order in which candidates are visited.
inline bool before(float x, int64_t id, float y, int64_t idy) { return x > y || (x == y && id < idy); }

inline void topk_insert(float x, int64_t id, float* vals, int64_t* ids, int64_t k, int64_t& count) {
  int64_t pos;
  if (count < k) {
    pos = count++;
  } else {
    if (!before(x, id, vals[k - 1], ids[k - 1])) return;
    pos = k - 1;
  }
  while (pos > 0 && before(x, id, vals[pos - 1], ids[pos - 1])) {
    vals[pos] = vals[pos - 1];
    ids[pos] = ids[pos - 1];
    --pos;
  }
  vals[pos] = x;
  ids[pos] = id;
}

#if defined(__AVX512F__)
inline __mmask16 lanes_below(int64_t m) { return m <= 0 ? 0 : m >= 16 ? 0xffff : __mmask16((1u << m) - 1); }

// The k best of the candidates cv[0, nc) (nc >= k; equal scores: the lower index first, as
// topk_insert orders them when the candidates come in id order): each candidate's rank is counted
// with vector compares against all of them, with no data-dependent branch per compare (insertion
// mispredicts on about every candidate). cv needs 16 floats of slack past nc. Writes the scores
// best first to vals and the candidates' indices to which.
inline void rank_topk(const float* cv, int64_t nc, int64_t k, float* vals, int32_t* which) {
  const int64_t nv = (nc + 15) / 16;
  for (int64_t c = 0; c < nc; ++c) {
    const __m512 b = _mm512_set1_ps(cv[c]);
    int rank = 0;
    for (int64_t v = 0; v < nv; ++v) {
      const __m512 x = _mm512_loadu_ps(cv + 16 * v);
      const __mmask16 valid = lanes_below(nc - 16 * v);
      rank += __builtin_popcount(_mm512_mask_cmp_ps_mask(valid, x, b, _CMP_GT_OQ)) +
              __builtin_popcount(_mm512_mask_cmp_ps_mask(valid & lanes_below(c - 16 * v), x, b, _CMP_EQ_OQ));
    }
    if (rank < k) {
      vals[rank] = cv[c];
      which[rank] = int32_t(c);
    }
  }
}
#endif

void row_topk(const float* s, int64_t n, int64_t k, float* vals, int64_t* ids) {
  // Strided blocks: block j holds s[j], s[j + W], s[j + 2W], ... Their maxima are W-wide vertical
  // maxima (no horizontal reductions); the k-th largest block maximum, tau, bounds the k-th largest
  // score from below (k blocks each hold a score >= tau), so only scores >= tau are candidates.
  // W is the smallest of 16, 32, 64 that is >= k (and divides n, n >= 2W): ranking W maxima costs
  // ~W^2/16 compares, and with W = k = 16 tau is simply their minimum.
  int64_t W = 0;
  for (int64_t w : {16, 32, 64})
    if (!W && k <= w && n % w == 0 && n >= 2 * w) W = w;
  int64_t count = 0;
  if (W) {
    alignas(64) float bmax[64];
    for (int64_t j = 0; j < W; ++j) bmax[j] = s[j];
    for (int64_t r = W; r < n; r += W) {
#pragma omp simd
      for (int64_t j = 0; j < W; ++j) bmax[j] = std::max(bmax[j], s[r + j]);
    }
    // tau = the k-th largest block maximum: the smallest one with fewer than k maxima above it
    float tau = INFINITY;
    if (k == W) {
      for (int64_t j = 0; j < W; ++j) tau = std::min(tau, bmax[j]);
    } else {
#if defined(__AVX512F__)
      const int64_t nv = W / 16;
      __m512 m[4];
      for (int64_t v = 0; v < nv; ++v) m[v] = _mm512_load_ps(bmax + 16 * v);
      for (int64_t j = 0; j < W; ++j) {
        const __m512 bj = _mm512_set1_ps(bmax[j]);
        int above = 0;
        for (int64_t v = 0; v < nv; ++v) above += __builtin_popcount(_mm512_cmp_ps_mask(m[v], bj, _CMP_GT_OQ));
        if (above < k) tau = std::min(tau, bmax[j]);
      }
#else
      for (int64_t j = 0; j < W; ++j) {
        int above = 0;
        for (int64_t i = 0; i < W; ++i) above += bmax[i] > bmax[j];
        if (above < k) tau = std::min(tau, bmax[j]);
      }
#endif
    }
    if (tau == tau) {  // not NaN
#if defined(__AVX512F__)
      // one vectorised pass compresses the scores >= tau (typically ~2k of them) with their
      // positions; then they are ranked. No unpredictable branch per score.
      // compress in registers, then a plain store (the memory form of vcompress is microcoded
      // and ~10x slower on some cores); each store may write 16 lanes, hence the slack.
      thread_local std::vector<float> cv;
      thread_local std::vector<int32_t> ci;
      if (int64_t(cv.size()) < n + 16) {
        cv.resize(n + 16);
        ci.resize(n + 16);
      }
      float* cvp = cv.data();
      int32_t* cip = ci.data();
      const __m512 t = _mm512_set1_ps(tau);
      const __m512i step = _mm512_set1_epi32(16);
      __m512i pos = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
      int64_t nc = 0;
      for (int64_t i = 0; i < n; i += 16) {
        const __m512 v = _mm512_loadu_ps(s + i);
        const __mmask16 mk = _mm512_cmp_ps_mask(v, t, _CMP_GE_OQ);
        _mm512_storeu_ps(cvp + nc, _mm512_maskz_compress_ps(mk, v));
        _mm512_storeu_si512(cip + nc, _mm512_maskz_compress_epi32(mk, pos));
        nc += __builtin_popcount(mk);
        pos = _mm512_add_epi32(pos, step);
      }
      if (nc >= k) {
        alignas(64) int32_t which[64];
        if (k <= 64) {
          rank_topk(cvp, nc, k, vals, which);
          for (int64_t j = 0; j < k; ++j) ids[j] = cip[which[j]];
          return;
        }
      }
      for (int64_t c = 0; c < nc; ++c) topk_insert(cvp[c], cip[c], vals, ids, k, count);
#else
      for (int64_t j = 0; j < W; ++j) {
        if (!(bmax[j] >= tau)) continue;
        for (int64_t i = j; i < n; i += W)
          if (s[i] >= tau) topk_insert(s[i], i, vals, ids, k, count);
      }
#endif
    }
  } else {
    for (int64_t i = 0; i < n; ++i) topk_insert(s[i], i, vals, ids, k, count);
  }
  for (; count < k; ++count) {  // fewer than k comparable values (NaN): pad with valid ids
    vals[count] = -INFINITY;
    ids[count] = 0;
  }
}

}  // namespace

extern "C" {

// scores s viewed as [T, h, 2, n] with element strides (st, sh, ss, 1); writes per (t, h) row:
// out_scores [k] (best first), out_ids [k] = a * n + b, out_ab [k, 2] = (a, b).
int peer_pk_topk(const float* s, int64_t T, int64_t h, int64_t n, int64_t st, int64_t sh, int64_t ss, int64_t k,
                 float* out_scores, int64_t* out_ids, int64_t* out_ab, int nthreads) {
  try {
    parallel_blocks(T * h, 32, nthreads, [&](int64_t b0, int64_t b1) {
      std::vector<float> v0(k), v1(k), cv(k);
      std::vector<int64_t> i0(k), i1(k), ci(k);
      for (int64_t r = b0; r < b1; ++r) {
        const int64_t t = r / h, hh = r % h;
        const float* row = s + t * st + hh * sh;
        row_topk(row, n, k, v0.data(), i0.data());
        row_topk(row + ss, n, k, v1.data(), i1.data());
        int64_t count = 0;
        for (int64_t i = 0; i < k; ++i)
          for (int64_t j = 0; j < k && (i + 1) * (j + 1) <= k; ++j)
            topk_insert(v0[i] + v1[j], i * k + j, cv.data(), ci.data(), k, count);
        for (int64_t j = 0; j < k; ++j) {
          const int64_t a = i0[ci[j] / k], b = i1[ci[j] % k];
          out_scores[r * k + j] = cv[j];
          out_ids[r * k + j] = a * n + b;
          out_ab[(r * k + j) * 2] = a;
          out_ab[(r * k + j) * 2 + 1] = b;
        }
      }
    });
  } catch (...) {
    return 1;
  }
  return 0;
}

// Backward of the product-key scores score[r, j] = q[r, 0] . K[g, 0, a] + q[r, 1] . K[g, 1, b]:
//   dq[r, s] = sum_j G[r, j] K[g, s, ab[r, j, s]]      dK[g, s, ab[r, j, s]] += G[r, j] q[r, s]
// r = t * h + head, g = head when groups == h else 0; q [R, 2, half], K [groups, 2, n, half].
int peer_pk_topk_backward(const float* G, const int64_t* ab, const float* q, const float* K, int64_t R, int64_t h,
                          int64_t groups, int64_t n, int64_t half, int64_t k, float* dq, float* dK, int nthreads) {
  try {
    const int64_t ksize = groups * 2 * n * half;
    const int nt = std::max(1, std::min<int>(nthreads, int((R + 255) / 256)));
    std::vector<std::vector<float>> priv(nt > 1 ? nt - 1 : 0, std::vector<float>(ksize, 0.f));
    std::fill(dK, dK + ksize, 0.f);
    const int64_t per = (R + nt - 1) / nt;
    auto work = [&](float* acc, int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t g = groups == 1 ? 0 : r % h;
        for (int s = 0; s < 2; ++s) {
          float* dqr = dq + (r * 2 + s) * half;
          const float* qr = q + (r * 2 + s) * half;
          std::fill(dqr, dqr + half, 0.f);
          for (int64_t j = 0; j < k; ++j) {
            const float gj = G[r * k + j];
            const int64_t row = (g * 2 + s) * n + ab[(r * k + j) * 2 + s];
            axpy_f(gj, K + row * half, dqr, half);
            axpy_f(gj, qr, acc + row * half, half);
          }
        }
      }
    };
    run_threads(nt, [&](int i) { work(i == 0 ? dK : priv[i - 1].data(), i * per, std::min(R, (i + 1) * per)); });
    for (auto& p : priv)
      for (int64_t e = 0; e < ksize; ++e) dK[e] += p[e];
  } catch (...) {
    return 1;
  }
  return 0;
}

}  // extern "C"
