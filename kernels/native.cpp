// Native CPU kernels for the TopK training step: selection, fused decode + loss gradient, and
// the transposed (per-latent) gradient products. Compiled on first use by kernels/_native.py
// with -fopenmp; inside a torch process the OpenMP runtime is torch's own libgomp (same soname),
// so these parallel loops share torch's thread pool instead of fighting it for the cores.
//
// All tensors are contiguous row-major float32 / int64, checked by the Python wrappers.
// Reductions keep a fixed order (per-row or per-latent partial results, summed by the caller),
// so results do not depend on thread scheduling.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include <omp.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

using i64 = int64_t;

namespace {

// Gathered rows (of W_dec, D, xc) sit at random addresses that the hardware prefetcher cannot
// guess; asking for them a few rows ahead roughly halves these kernels' time.
constexpr i64 AHEAD = 4;

// <a, b> with several independent partial sums: one vector accumulator would wait on the FMA
// latency at every step.
inline float dot(const float* a, const float* b, i64 d) {
  i64 c = 0;
  float total = 0.f;
#ifdef __AVX2__
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
  for (; c + 32 <= d; c += 32) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + c), _mm256_loadu_ps(b + c), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + c + 8), _mm256_loadu_ps(b + c + 8), s1);
    s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + c + 16), _mm256_loadu_ps(b + c + 16), s2);
    s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + c + 24), _mm256_loadu_ps(b + c + 24), s3);
  }
  const __m256 s = _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3));
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
  total = _mm_cvtss_f32(h);
#endif
  for (; c < d; ++c) total += a[c] * b[c];
  return total;
}

// Writes a finished gradient row past the caches (when aligned): the 2 x 21 MB of gradient rows
// would otherwise evict the gathered rows that are still to be read.
inline void store_row(float* out, const float* row, i64 d) {
  i64 c = 0;
#ifdef __AVX2__
  if ((reinterpret_cast<uintptr_t>(out) & 31) == 0 && d % 8 == 0) {
    for (; c < d; c += 8) _mm256_stream_ps(out + c, _mm256_loadu_ps(row + c));
  }
#endif
  for (; c < d; ++c) out[c] = row[c];
}

inline void prefetch_row(const float* row, i64 d) {
  for (i64 c = 0; c < d; c += 16) __builtin_prefetch(row + c);
}

// A float's order as an unsigned integer (NaN-free input).
inline uint32_t ordered(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return u & 0x80000000u ? ~u : u | 0x80000000u;
}

inline float unordered(uint32_t u) {
  u = u & 0x80000000u ? u & 0x7fffffffu : ~u;
  float v;
  std::memcpy(&v, &u, 4);
  return v;
}

// Sort key: value descending, then column ascending (columns < 2^32).
inline uint64_t key_of(float v, i64 col) { return (uint64_t)ordered(v) << 32 | (0xffffffffu - (uint32_t)col); }

// Writes the k best keys of keys[0:count], ranked, as values (clamped at 0 if relu) and columns.
void rank_top(uint64_t* keys, i64 count, i64 k, bool relu, float* vals, i64* idx) {
  std::partial_sort(keys, keys + k, keys + count, std::greater<uint64_t>());
  for (i64 j = 0; j < k; ++j) {
    const float v = unordered((uint32_t)(keys[j] >> 32));
    vals[j] = relu && v < 0.f ? 0.f : v;
    idx[j] = 0xffffffffu - (uint32_t)keys[j];
  }
}

// One row's top k of p + bias: every element lies in one of L "blocks" (element c is in block
// c % L). The k-th largest block maximum t is reached by k distinct elements, so the row's top k
// are all >= t and sit in the blocks whose maximum reaches t: only those are ranked. Returns
// false if the row holds a NaN (the caller then uses torch.topk, which ranks NaN first).
bool top_k_row(const float* p, const float* bias, i64 n, i64 k, i64 L, bool relu,
               std::vector<float>& bm, std::vector<float>& small, std::vector<i64>& blocks,
               std::vector<uint64_t>& cand, float* vals, i64* idx) {
  int nan = 0;
  float* m = bm.data();
  std::fill(m, m + L, -INFINITY);
  for (i64 base = 0; base < n; base += L) {
    const i64 len = std::min(L, n - base);
    const float* q = p + base;
    if (bias) {
      const float* b = bias + base;
#pragma omp simd reduction(| : nan)
      for (i64 c = 0; c < len; ++c) {
        const float v = q[c] + b[c];
        nan |= v != v;
        m[c] = v > m[c] ? v : m[c];
      }
    } else {
#pragma omp simd reduction(| : nan)
      for (i64 c = 0; c < len; ++c) {
        const float v = q[c];
        nan |= v != v;
        m[c] = v > m[c] ? v : m[c];
      }
    }
  }
  if (nan) return false;
  // A cheap lower bound first: split the blocks into k groups (block c in group c % k); the
  // smallest group maximum t0 is reached by k distinct blocks. Then the exact k-th largest block
  // maximum among the (few) blocks reaching t0.
  float* gm = small.data();
  std::copy(m, m + k, gm);
  for (i64 base = k; base + k <= L; base += k) {
#pragma omp simd
    for (i64 g = 0; g < k; ++g) gm[g] = m[base + g] > gm[g] ? m[base + g] : gm[g];
  }
  float t0 = gm[0];
  for (i64 g = 1; g < k; ++g) t0 = gm[g] < t0 ? gm[g] : t0;
  i64 above = 0;
  for (i64 c = 0; c < L; ++c) {
    small[above] = m[c];
    above += m[c] >= t0;
  }
  std::nth_element(small.begin(), small.begin() + (k - 1), small.begin() + above, std::greater<float>());
  const float t = small[k - 1];
  i64 n_sel = 0;
  i64* sel = blocks.data();
  for (i64 c = 0; c < L; ++c) {
    sel[n_sel] = c;
    n_sel += m[c] >= t;
  }
  i64 count = 0;
  for (i64 s = 0; s < n_sel; ++s) {
    for (i64 e = sel[s]; e < n; e += L) {
      const float v = p[e] + (bias ? bias[e] : 0.f);
      cand[count] = key_of(v, e);
      count += v >= t;
    }
  }
  if (count < k) return false;
  rank_top(cand.data(), count, k, relu, vals, idx);
  return true;
}

}  // namespace

extern "C" {

// Per-row top k of pre[r, :n] + bias (bias may be null), ranked, written to vals/idx [n_rows, k]
// (values clamped at 0 if relu). Returns the number of rows holding a NaN (left unwritten).
i64 sae_topk_rows(const float* pre, i64 ld, const float* bias, i64 n_rows, i64 n, i64 k, int relu,
                  float* vals, i64* idx, int threads) {
  // about 16 elements per block, a multiple of 8 blocks (vector width), at least k blocks
  i64 L = ((n + 15) / 16 + 7) / 8 * 8;
  L = std::min(n, std::max(L, k));
  i64 bad = 0;
#pragma omp parallel num_threads(threads) reduction(+ : bad)
  {
    std::vector<float> bm(L), small(L);
    std::vector<i64> blocks(L);
    std::vector<uint64_t> cand(n);  // worst case (ties at the threshold): the whole row
    cand.reserve(4 * k);
#pragma omp for schedule(static)
    for (i64 r = 0; r < n_rows; ++r)
      if (!top_k_row(pre + r * ld, bias, n, k, L, relu, bm, small, blocks, cand, vals + r * k, idx + r * k)) ++bad;
  }
  return bad;
}

// Per-row top k of pre[r, cols] + bias[cols] over the given columns (AuxK: the dead latents),
// ranked, as latent indices. Returns the number of rows holding a NaN there.
i64 sae_topk_cols(const float* pre, i64 ld, const float* bias, const i64* cols, i64 n_cols, i64 n_rows,
                  i64 k, int relu, float* vals, i64* idx, int threads) {
  i64 bad = 0;
#pragma omp parallel num_threads(threads) reduction(+ : bad)
  {
    std::vector<uint64_t> cand(n_cols);
#pragma omp for schedule(static)
    for (i64 r = 0; r < n_rows; ++r) {
      const float* p = pre + r * ld;
      int nan = 0;
      for (i64 c = 0; c < n_cols; ++c) {
        const float v = p[cols[c]] + (bias ? bias[cols[c]] : 0.f);
        nan |= v != v;
        cand[c] = key_of(v, cols[c]);
      }
      if (nan) {
        ++bad;
        continue;
      }
      rank_top(cand.data(), n_cols, k, relu, vals + r * k, idx + r * k);
    }
  }
  return bad;
}

// Decode, loss and the gradient w.r.t. the decoder's input, per row:
//   acc_i  = bias + sum_j vals[i,j] * W[idx[i,j]]        (bias may be null)
//   r_i    = target_i - acc_i * inv_scale                 (written to resid if not null)
//   loss   = coeff * sum_i |r_i|^2                         (row_sse[i] = |r_i|^2)
//   D_i    = dloss/dacc_i = -2 * coeff * inv_scale * r_i  (written to D [N, d])
//   gsel[i,j] = <D_i, W[idx[i,j]]> where vals[i,j] > 0, else 0 (the ReLU mask)
//   dbias  = sum_i D_i (if not null; per-thread partial sums added in thread order)
void sae_decode_grad(const float* vals, const i64* idx, i64 N, i64 K, const float* W, i64 d, const float* bias,
                     const float* target, float inv_scale, float coeff, float* D, float* gsel, float* resid,
                     float* dbias, double* row_sse, int threads) {
  const float g = -2.f * coeff * inv_scale;
  std::vector<std::vector<double>> partial(threads, std::vector<double>(dbias ? d : 0, 0.0));
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> acc(d);
    double* db = partial[omp_get_thread_num()].data();
#pragma omp for schedule(static)
    for (i64 i = 0; i < N; ++i) {
      float* a = acc.data();
      if (bias)
        std::memcpy(a, bias, d * sizeof(float));
      else
        std::fill(a, a + d, 0.f);
      const float* v = vals + i * K;
      const i64* ix = idx + i * K;
      for (i64 j = 0; j < K; ++j) {
        if (i * K + j + AHEAD < N * K) prefetch_row(W + ix[j + AHEAD] * d, d);  // may be the next row's
        if (v[j] == 0.f) continue;
        const float s = v[j];
        const float* wr = W + ix[j] * d;
#pragma omp simd
        for (i64 c = 0; c < d; ++c) a[c] += s * wr[c];
      }
      const float* t = target + i * d;
      float* di = D + i * d;
      float sse = 0.f;
#pragma omp simd reduction(+ : sse)
      for (i64 c = 0; c < d; ++c) {
        const float r = t[c] - a[c] * inv_scale;
        sse += r * r;
        di[c] = g * r;
      }
      if (resid) {
        float* ri = resid + i * d;
        for (i64 c = 0; c < d; ++c) ri[c] = t[c] - a[c] * inv_scale;
      }
      row_sse[i] = sse;
      float* gs = gsel + i * K;
      for (i64 j = 0; j < K; ++j) gs[j] = v[j] > 0.f ? dot(di, W + ix[j] * d, d) : 0.f;
      if (dbias)
        for (i64 c = 0; c < d; ++c) db[c] += di[c];
    }
  }
  if (dbias) {
    std::vector<double> total(d, 0.0);
    for (auto& part : partial)
      for (i64 c = 0; c < d; ++c) total[c] += part[c];
    for (i64 c = 0; c < d; ++c) dbias[c] = (float)total[c];
  }
}

// The encoder's input, xc = x * scale - b_dec, and the total variance sum_i |x_i - mean(x)|^2
// (the FVU's denominator, returned).
double sae_prepare(const float* x, i64 N, i64 d, float scale, const float* b_dec, float* xc, int threads) {
  std::vector<std::vector<double>> sums(threads, std::vector<double>(d, 0.0));
  std::vector<double> mean(d, 0.0), var(threads, 0.0);
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num();
    double* s = sums[t].data();
#pragma omp for schedule(static)
    for (i64 i = 0; i < N; ++i) {
      const float* xi = x + i * d;
      float* out = xc + i * d;
#pragma omp simd
      for (i64 c = 0; c < d; ++c) {
        s[c] += xi[c];
        out[c] = xi[c] * scale - b_dec[c];
      }
    }
#pragma omp barrier
#pragma omp single
    {
      for (auto& part : sums)
        for (i64 c = 0; c < d; ++c) mean[c] += part[c];
      for (i64 c = 0; c < d; ++c) mean[c] /= (double)N;
    }
    double v = 0.0;
#pragma omp for schedule(static)
    for (i64 i = 0; i < N; ++i) {
      const float* xi = x + i * d;
      float row = 0.f;
#pragma omp simd reduction(+ : row)
      for (i64 c = 0; c < d; ++c) {
        const float dev = xi[c] - (float)mean[c];
        row += dev * dev;
      }
      v += row;
    }
    var[t] = v;
  }
  double total = 0.0;
  for (double v : var) total += v;
  return total;
}

// The per-latent gradient products over the selected entries of one or two selections
// (main: idx/vals/gsel [N,K] with decoder-input gradients D [N,d]; aux: the same with K2
// columns and D2, K2 may be 0). Each latent l, on one thread, gets
//   dW_dec[l] = sum vals * D[row]      (minus its component along W_dec[l] if W_dec is not null)
//   dW_enc[l] = sum gsel * xc[row],    db_enc[l] = sum gsel
//   fired[l]  = number of main entries with vals > 0,  sumsq[l] = |dW_dec[l]|^2 + |dW_enc[l]|^2 + db_enc[l]^2
// Every row of the outputs is written (zeros for latents no entry selected). Entries are bucketed
// by latent with a stable counting sort, so each sum runs in a fixed order. The decoder rows and
// the encoder rows are two passes: each then gathers from one 9 MB matrix, not two (measured
// 17 vs 19 ms, with the two rows of a token side by side in one matrix).
void sae_latent_grads(i64 n, i64 d, i64 N, const i64* idx, const float* vals, const float* gsel, i64 K,
                      const float* D, const i64* idx2, const float* vals2, const float* gsel2, i64 K2,
                      const float* D2, const float* xc, const float* W_dec, float* dW_dec, float* dW_enc,
                      float* db_enc, i64* fired, double* sumsq, int threads) {
  const i64 total = N * (K + K2);
  std::vector<i64> starts(n + 1, 0);
  for (i64 e = 0; e < N * K; ++e) ++starts[idx[e] + 1];
  for (i64 e = 0; e < N * K2; ++e) ++starts[idx2[e] + 1];
  for (i64 l = 0; l < n; ++l) starts[l + 1] += starts[l];
  // per entry: its token, value, gradient, and whether it is an aux entry (its D row is in D2)
  std::vector<int32_t> erow(total);
  std::vector<float> eval(total), egrad(total);
  std::vector<uint8_t> eaux(total);
  {
    std::vector<i64> fill(starts.begin(), starts.end() - 1);
    for (i64 i = 0; i < N; ++i) {
      for (i64 j = 0; j < K; ++j) {
        const i64 at = fill[idx[i * K + j]]++;
        erow[at] = (int32_t)i;
        eval[at] = vals[i * K + j];
        egrad[at] = gsel[i * K + j];
        eaux[at] = 0;
      }
      for (i64 j = 0; j < K2; ++j) {
        const i64 at = fill[idx2[i * K2 + j]]++;
        erow[at] = (int32_t)i;
        eval[at] = vals2[i * K2 + j];
        egrad[at] = gsel2[i * K2 + j];
        eaux[at] = 1;
      }
    }
  }
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> acc(d);
    // decoder rows: sum vals * D[row], minus the part along W_dec[l]
#pragma omp for schedule(dynamic, 64)
    for (i64 l = 0; l < n; ++l) {
      float* a = acc.data();
      std::fill(a, a + d, 0.f);
      i64 count = 0;
      for (i64 e = starts[l]; e < starts[l + 1]; ++e) {
        if (e + AHEAD < total) prefetch_row((eaux[e + AHEAD] ? D2 : D) + erow[e + AHEAD] * d, d);
        const float v = eval[e];
        count += !eaux[e] && v > 0.f;
        if (v == 0.f) continue;
        const float* r = (eaux[e] ? D2 : D) + erow[e] * d;
#pragma omp simd
        for (i64 c = 0; c < d; ++c) a[c] += v * r[c];
      }
      if (W_dec) {
        const float* wr = W_dec + l * d;
        const float norm = std::max(std::sqrt(dot(wr, wr, d)), 1e-8f);
        const float coef = dot(a, wr, d) / (norm * norm);
#pragma omp simd
        for (i64 c = 0; c < d; ++c) a[c] -= coef * wr[c];
      }
      std::memcpy(dW_dec + l * d, a, d * sizeof(float));
      fired[l] = count;
      sumsq[l] = dot(a, a, d);
    }
    // encoder rows: sum gsel * xc[row]
#pragma omp for schedule(dynamic, 64)
    for (i64 l = 0; l < n; ++l) {
      float* a = acc.data();
      std::fill(a, a + d, 0.f);
      float gb = 0.f;
      for (i64 e = starts[l]; e < starts[l + 1]; ++e) {
        if (e + AHEAD < total) prefetch_row(xc + erow[e + AHEAD] * d, d);
        const float g = egrad[e];
        gb += g;
        if (g == 0.f) continue;
        const float* r = xc + erow[e] * d;
#pragma omp simd
        for (i64 c = 0; c < d; ++c) a[c] += g * r[c];
      }
      std::memcpy(dW_enc + l * d, a, d * sizeof(float));
      db_enc[l] = gb;
      sumsq[l] += (double)gb * gb + dot(a, a, d);
    }
  }
}

}  // extern "C"
