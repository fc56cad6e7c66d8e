// CPU kernel of the row-wise (lazy) AdamW of peer.train.sparse_optim, built by adamw_kernel.py
// (peer.ops.build): torch.optim.AdamW's arithmetic on selected rows of fp32/bf16 tables, fp32 or bf16
// moments, optionally one second moment per row.
#include "fused_cpu_common.h"

namespace {
using namespace peer_cpu;

// Row-wise AdamW (torch.optim.AdamW's arithmetic) on rows[r] (or row r when rows is null) of a
// [N, d] parameter p with moments m (and v: [N, d], or [N] when rowwise), gradient rows g [U, d].
template <class P, class S>
void adamw_rows(void* p_, void* m_, void* v_, const float* g, const int64_t* rows, int64_t U, int64_t d, float lr,
                float b1, float b2, float eps, float wd, float bc1, float bc2, int rowwise, int nthreads) {
  using PT = typename P::T;
  using ST = typename S::T;
  PT* p = static_cast<PT*>(p_);
  ST* m = static_cast<ST*>(m_);
  const float step = lr / bc1, decay = 1.f - lr * wd, sbc2 = std::sqrt(bc2);
  parallel_blocks(U, 16, nthreads, [&](int64_t s, int64_t e) {
    for (int64_t r = s; r < e; ++r) {
      const int64_t row = rows ? rows[r] : r;
      const float* gr = g + r * d;
      PT* pr = p + row * d;
      ST* mr = m + row * d;
      float row_denom = 0.f;
      if (rowwise) {  // one second moment per row: the mean of g^2 over the row
        float* vrow = static_cast<float*>(v_) + row;
        float sq = 0.f;
#pragma omp simd reduction(+ : sq)
        for (int64_t k = 0; k < d; ++k) sq += gr[k] * gr[k];
        *vrow = b2 * *vrow + (1.f - b2) * (sq / float(d));
        row_denom = std::sqrt(*vrow) / sbc2 + eps;
      }
      if (rowwise) {
#pragma omp simd
        for (int64_t k = 0; k < d; ++k) {
          float mk = S::ld(mr, k);
          mk += (1.f - b1) * (gr[k] - mk);  // lerp, as torch
          S::st(mr, k, mk);
          P::st(pr, k, P::ld(pr, k) * decay - step * mk / row_denom);
        }
      } else {
        ST* vr = static_cast<ST*>(v_) + row * d;
#pragma omp simd
        for (int64_t k = 0; k < d; ++k) {
          const float gk = gr[k];
          float mk = S::ld(mr, k);
          mk += (1.f - b1) * (gk - mk);
          S::st(mr, k, mk);
          const float vk = b2 * S::ld(vr, k) + (1.f - b2) * gk * gk;
          S::st(vr, k, vk);
          P::st(pr, k, P::ld(pr, k) * decay - step * mk / (std::sqrt(vk) / sbc2 + eps));
        }
      }
    }
  });
}

}  // namespace

extern "C" {

int peer_adamw_rows(void* p, void* m, void* v, const float* g, const int64_t* rows, int64_t U, int64_t d, float lr,
                    float b1, float b2, float eps, float wd, float bc1, float bc2, int param_bf16, int state_bf16,
                    int rowwise, int nthreads) {
  try {
    if (param_bf16 && state_bf16)
      adamw_rows<SBF16, SBF16>(p, m, v, g, rows, U, d, lr, b1, b2, eps, wd, bc1, bc2, rowwise, nthreads);
    else if (param_bf16)
      adamw_rows<SBF16, SF32>(p, m, v, g, rows, U, d, lr, b1, b2, eps, wd, bc1, bc2, rowwise, nthreads);
    else if (state_bf16)
      adamw_rows<SF32, SBF16>(p, m, v, g, rows, U, d, lr, b1, b2, eps, wd, bc1, bc2, rowwise, nthreads);
    else
      adamw_rows<SF32, SF32>(p, m, v, g, rows, U, d, lr, b1, b2, eps, wd, bc1, bc2, rowwise, nthreads);
  } catch (...) {
    return 1;
  }
  return 0;
}

}  // extern "C"
