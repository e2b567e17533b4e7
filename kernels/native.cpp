// Native CPU kernels for the TopK training step: selection, fused decode + loss gradient, and
// the transposed (per-latent) gradient products. Compiled on first use by kernels/native.py
// with -fopenmp; inside a torch process the OpenMP runtime is torch's own libgomp (same soname),
// so these parallel loops share torch's thread pool instead of fighting it for the cores.
//
// All tensors are contiguous row-major float32 / int64, checked by the Python wrappers.
// Reductions keep a fixed order (per-row or per-latent partial results, summed by the caller),
// so results do not depend on thread scheduling.
//
// Everything here but the optimizer is bound by memory, not arithmetic: the designs below are
// about how many bytes move and whether they come from DRAM, L3 or L1 (benchmarks/README.md's
// gemm_bound section lists what was measured, including what did not help).

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

#ifdef __AVX2__
// The sum of a vector's eight lanes.
inline float hsum(__m256 s) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
  return _mm_cvtss_f32(h);
}
#endif

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
  total = hsum(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
#endif
  for (; c < d; ++c) total += a[c] * b[c];
  return total;
}

// a += s * r
inline void axpy(const float* r, float s, float* a, i64 d) {
#pragma omp simd
  for (i64 c = 0; c < d; ++c) a[c] += s * r[c];
}

// a += s * r, returning <r, w>: one read of the gathered row r for both.
inline float dot_axpy(const float* r, const float* w, float s, float* a, i64 d) {
  i64 c = 0;
  float total = 0.f;
#ifdef __AVX2__
  const __m256 vs = _mm256_set1_ps(s);
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  for (; c + 16 <= d; c += 16) {
    const __m256 r0 = _mm256_loadu_ps(r + c), r1 = _mm256_loadu_ps(r + c + 8);
    s0 = _mm256_fmadd_ps(r0, _mm256_loadu_ps(w + c), s0);
    s1 = _mm256_fmadd_ps(r1, _mm256_loadu_ps(w + c + 8), s1);
    _mm256_storeu_ps(a + c, _mm256_fmadd_ps(vs, r0, _mm256_loadu_ps(a + c)));
    _mm256_storeu_ps(a + c + 8, _mm256_fmadd_ps(vs, r1, _mm256_loadu_ps(a + c + 8)));
  }
  total = hsum(_mm256_add_ps(s0, s1));
#endif
  for (; c < d; ++c) {
    total += r[c] * w[c];
    a[c] += s * r[c];
  }
  return total;
}

#ifdef __AVX2__
// dot_axpy for four rows r[0..3] at once (d % 16 == 0): a += s[j] r[j] in that order and
// dots[j] = <r[j], w>, with the same operations in the same order as four dot_axpy calls (so the
// same results, bit for bit), but a stays in registers across the four rows: half the loads and
// a quarter of the stores.
inline void dot_axpy4(const float* const* r, const float* w, const float* s, float* a, i64 d, float* dots) {
  __m256 d0[4], d1[4];
  for (int j = 0; j < 4; ++j) d0[j] = d1[j] = _mm256_setzero_ps();
  for (i64 c = 0; c < d; c += 16) {
    const __m256 w0 = _mm256_loadu_ps(w + c), w1 = _mm256_loadu_ps(w + c + 8);
    __m256 a0 = _mm256_loadu_ps(a + c), a1 = _mm256_loadu_ps(a + c + 8);
    for (int j = 0; j < 4; ++j) {
      const __m256 r0 = _mm256_loadu_ps(r[j] + c), r1 = _mm256_loadu_ps(r[j] + c + 8);
      const __m256 vs = _mm256_set1_ps(s[j]);
      d0[j] = _mm256_fmadd_ps(r0, w0, d0[j]);
      d1[j] = _mm256_fmadd_ps(r1, w1, d1[j]);
      a0 = _mm256_fmadd_ps(vs, r0, a0);
      a1 = _mm256_fmadd_ps(vs, r1, a1);
    }
    _mm256_storeu_ps(a + c, a0);
    _mm256_storeu_ps(a + c + 8, a1);
  }
  for (int j = 0; j < 4; ++j) dots[j] = hsum(_mm256_add_ps(d0[j], d1[j]));
}

// a += s[j] r[j] for j = 0..3 in that order (d % 8 == 0), a kept in registers meanwhile.
inline void axpy4(const float* const* r, const float* s, float* a, i64 d) {
  const __m256 s0 = _mm256_set1_ps(s[0]), s1 = _mm256_set1_ps(s[1]), s2 = _mm256_set1_ps(s[2]),
               s3 = _mm256_set1_ps(s[3]);
  for (i64 c = 0; c < d; c += 8) {
    __m256 v = _mm256_loadu_ps(a + c);
    v = _mm256_fmadd_ps(s0, _mm256_loadu_ps(r[0] + c), v);
    v = _mm256_fmadd_ps(s1, _mm256_loadu_ps(r[1] + c), v);
    v = _mm256_fmadd_ps(s2, _mm256_loadu_ps(r[2] + c), v);
    v = _mm256_fmadd_ps(s3, _mm256_loadu_ps(r[3] + c), v);
    _mm256_storeu_ps(a + c, v);
  }
}
#else
inline void dot_axpy4(const float* const* r, const float* w, const float* s, float* a, i64 d, float* dots) {
  for (int j = 0; j < 4; ++j) dots[j] = dot_axpy(r[j], w, s[j], a, d);
}
inline void axpy4(const float* const* r, const float* s, float* a, i64 d) {
  for (int j = 0; j < 4; ++j) axpy(r[j], s[j], a, d);
}
#endif

inline void prefetch_row(const float* row, i64 d) {
  for (i64 c = 0; c < d; c += 16) __builtin_prefetch(row + c);
}

inline void prefetch_row_for_write(const float* row, i64 d) {
  for (i64 c = 0; c < d; c += 16) __builtin_prefetch(row + c, 1);
}

// dst[0:d] = src[0:d], bypassing the caches: a gradient row written once and read next by the
// optimizer would otherwise evict the rows the gradient passes gather (measured: those passes
// take ~15% less time).
inline void store_uncached(float* dst, const float* src, i64 d) {
  i64 c = 0;
#ifdef __AVX2__
  if (((uintptr_t)dst & 31) == 0)
    for (; c + 8 <= d; c += 8) _mm256_stream_ps(dst + c, _mm256_loadu_ps(src + c));
#endif
  for (; c < d; ++c) dst[c] = src[c];
}

#ifdef __AVX2__
// LEFT_PACK[mask]: the lanes set in an 8-bit mask, first, for _mm256_permutevar8x32_ps.
struct LeftPack {
  int32_t lanes[256][8];
  LeftPack() {
    for (int mask = 0; mask < 256; ++mask) {
      int n = 0;
      for (int lane = 0; lane < 8; ++lane)
        if (mask >> lane & 1) lanes[mask][n++] = lane;
      while (n < 8) lanes[mask][n++] = 0;
    }
  }
};
const LeftPack LEFT_PACK_TABLE;
const auto& LEFT_PACK = LEFT_PACK_TABLE.lanes;
#endif

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

// Sort key: value descending, then column ascending (columns < 2^32). -0.0 counts as 0.0, as in
// the comparisons that pick the candidates: otherwise which of two zeros tied at the k-th value
// wins would depend on whether a path added a null bias (+ 0.f turns -0.0 into 0.0).
inline uint64_t key_of(float v, i64 col) {
  return (uint64_t)ordered(v == 0.f ? 0.f : v) << 32 | (0xffffffffu - (uint32_t)col);
}

// Writes the k best keys of keys[0:count] (ranked, unless told otherwise) as values (clamped at 0
// if relu) and columns; returns the k-th best value (unclamped).
float rank_top(uint64_t* keys, i64 count, i64 k, bool relu, float* vals, i64* idx, bool ranked = true) {
  if (count > k) std::nth_element(keys, keys + (k - 1), keys + count, std::greater<uint64_t>());
  if (ranked) std::sort(keys, keys + k, std::greater<uint64_t>());
  for (i64 j = 0; j < k; ++j) {
    const float v = unordered((uint32_t)(keys[j] >> 32));
    vals[j] = relu && v < 0.f ? 0.f : v;
    idx[j] = 0xffffffffu - (uint32_t)keys[j];
  }
  return unordered((uint32_t)(keys[k - 1] >> 32));
}

// One row's top k of p + bias: every element lies in one of L "blocks" (element c is in block
// c % L). The k-th largest block maximum t is reached by k distinct elements, so the row's top k
// are all >= t and sit in the blocks whose maximum reaches t: only those are ranked. Returns
// false if the row holds a NaN (the caller then uses torch.topk, which ranks NaN first).
bool top_k_row(const float* p, const float* bias, i64 n, i64 k, i64 L, bool relu,
               std::vector<float>& bm, std::vector<float>& small, std::vector<i64>& blocks,
               std::vector<uint64_t>& cand, float* vals, i64* idx, float* kth) {
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
  i64 above = 0, c = 0;
#ifdef __AVX2__
  for (const __m256 v0 = _mm256_set1_ps(t0); c + 8 <= L; c += 8) {  // left-pack the maxima >= t0
    const __m256 v = _mm256_loadu_ps(m + c);
    const int mask = _mm256_movemask_ps(_mm256_cmp_ps(v, v0, _CMP_GE_OQ));
    _mm256_storeu_ps(small.data() + above, _mm256_permutevar8x32_ps(v, _mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(LEFT_PACK[mask]))));
    above += __builtin_popcount(mask);
  }
#endif
  for (; c < L; ++c) {
    small[above] = m[c];
    above += m[c] >= t0;
  }
  std::nth_element(small.begin(), small.begin() + (k - 1), small.begin() + above, std::greater<float>());
  const float t = small[k - 1];
  i64 count = 0;
#ifdef __AVX2__
  if (L % 8 == 0 && n % L == 0) {
    // for each 8 consecutive blocks holding a maximum >= t, the entries >= t in every segment
    const __m256 vt = _mm256_set1_ps(t);
    for (i64 g = 0; g < L; g += 8) {
      if (!_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(m + g), vt, _CMP_GE_OQ))) continue;
      for (i64 e = g; e < n; e += L) {
        __m256 v = _mm256_loadu_ps(p + e);
        if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + e));
        int mask = _mm256_movemask_ps(_mm256_cmp_ps(v, vt, _CMP_GE_OQ));
        while (mask) {
          const int bit = __builtin_ctz(mask);
          mask &= mask - 1;
          cand[count++] = key_of(p[e + bit] + (bias ? bias[e + bit] : 0.f), e + bit);
        }
      }
    }
    if (count < k) return false;
    *kth = rank_top(cand.data(), count, k, relu, vals, idx);
    return true;
  }
#endif
  i64 n_sel = 0;
  i64* sel = blocks.data();
  for (i64 b = 0; b < L; ++b) {
    sel[n_sel] = b;
    n_sel += m[b] >= t;
  }
  for (i64 s = 0; s < n_sel; ++s) {
    for (i64 e = sel[s]; e < n; e += L) {
      const float v = p[e] + (bias ? bias[e] : 0.f);
      cand[count] = key_of(v, e);
      count += v >= t;
    }
  }
  if (count < k) return false;
  *kth = rank_top(cand.data(), count, k, relu, vals, idx);
  return true;
}


#ifdef __AVX2__
// The single-pass top k (top_k_stream): its candidate buffer, and how many recent rows set the
// starting threshold.
constexpr i64 STREAM_CAP = 256, STREAM_HISTORY = 16;
const __m256i LANES = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
// The k-th largest of a[0:count] (NaN-free, k <= count), by quickselect with vectorised
// partitions into tmp (count + 8 floats); a is overwritten.
float kth_largest(float* a, float* tmp, i64 count, i64 k) {
  while (count > 24) {
    float x = a[0], y = a[count / 2], z = a[count - 1];  // median of three as the pivot
    if (x > y) std::swap(x, y);
    const float pivot = std::max(x, std::min(y, z));
    const __m256 vp = _mm256_set1_ps(pivot);
    i64 hi = 0, lo = 0, c = 0;
    float* lo_part = tmp;  // elements < pivot go to tmp, > pivot stay in a (packed to the front)
    for (; c + 8 <= count; c += 8) {
      const __m256 v = _mm256_loadu_ps(a + c);
      const int gt = _mm256_movemask_ps(_mm256_cmp_ps(v, vp, _CMP_GT_OQ));
      const int lt = _mm256_movemask_ps(_mm256_cmp_ps(v, vp, _CMP_LT_OQ));
      _mm256_storeu_ps(lo_part + lo, _mm256_permutevar8x32_ps(v, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(LEFT_PACK[lt]))));
      _mm256_storeu_ps(a + hi, _mm256_permutevar8x32_ps(v, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(LEFT_PACK[gt]))));
      hi += __builtin_popcount(gt);
      lo += __builtin_popcount(lt);
    }
    for (; c < count; ++c) {
      const float v = a[c];
      if (v > pivot) a[hi++] = v;
      else if (v < pivot) lo_part[lo++] = v;
    }
    const i64 eq = count - hi - lo;
    if (k <= hi) {
      count = hi;
    } else if (k <= hi + eq) {
      return pivot;
    } else {
      std::copy(lo_part, lo_part + lo, a);
      k -= hi + eq;
      count = lo;
    }
  }
  std::nth_element(a, a + (k - 1), a + count, std::greater<float>());
  return a[k - 1];
}

// Appends the elements >= *thr of the 8-element vectors at columns cols[0:count_cols] (all
// vectors if cols is null) of p + bias to bv/bc (values, columns), keeping the buffer below
// STREAM_CAP: when it fills up, *thr rises to the k-th largest value in it and the buffer keeps
// only what reaches *thr. It thus always holds every element >= *thr seen. Returns the count
// held, or -1 if ties at *thr overflow the buffer.
i64 collect(const float* p, const float* bias, i64 n, const int32_t* cols, i64 count_cols, i64 k, float* thr,
            float* bv, int32_t* bc, float* scratch_v) {
  __m256 vthr = _mm256_set1_ps(*thr);
  i64 count = 0;
  const i64 vectors = cols ? count_cols : n / 8;
  for (i64 j = 0; j < vectors; ++j) {
    const int32_t c = cols ? cols[j] : (int32_t)(8 * j);
    __m256 v = _mm256_loadu_ps(p + c);
    if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + c));
    const int mask = _mm256_movemask_ps(_mm256_cmp_ps(v, vthr, _CMP_GE_OQ));
    const __m256i perm = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(LEFT_PACK[mask]));
    _mm256_storeu_ps(bv + count, _mm256_permutevar8x32_ps(v, perm));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(bc + count),
                        _mm256_permutevar8x32_epi32(_mm256_add_epi32(_mm256_set1_epi32(c), LANES), perm));
    count += __builtin_popcount(mask);
    if (count > STREAM_CAP - 8) {
      std::copy(bv, bv + count, scratch_v);
      *thr = kth_largest(scratch_v, scratch_v + STREAM_CAP + 8, count, k);
      vthr = _mm256_set1_ps(*thr);
      i64 kept = 0;
      for (i64 e = 0; e < count; ++e) {
        bv[kept] = bv[e];
        bc[kept] = bc[e];
        kept += bv[e] >= *thr;
      }
      count = kept;
      if (count > STREAM_CAP - 8) return -1;
    }
  }
  return count;
}

// One row's top k of p + bias, for rows that resemble the ones before them: thr, the lowest k-th
// value of recent rows, is usually below this row's k-th value and above all but a few elements;
// thr_hi, their median k-th value, is below it for about half the rows and reached by fewer
// elements still. One streaming pass over the row notes which vectors hold an element >= thr and
// which >= thr_hi (no branch, little work per vector: the pass runs at memory speed). The
// elements >= thr_hi are then collected from cache; if fewer than k, those >= thr; if still fewer
// than k, the whole row. Returns false, leaving the row to top_k_row, if it holds a NaN or an
// infinity or if ties overflow the buffer; true once done, with *kth = the row's k-th value.
bool top_k_stream(const float* p, const float* bias, i64 n, i64 k, float thr, float thr_hi, bool relu, bool ranked,
                 int32_t* pos, int32_t* pos_hi, float* bv, int32_t* bc, float* scratch_v, uint64_t* keys, float* vals,
                 i64* idx, float* kth) {
  const __m256 vthr = _mm256_set1_ps(thr), vthr_hi = _mm256_set1_ps(thr_hi);
  __m256 sum = _mm256_setzero_ps();
  i64 hits = 0, hits_hi = 0;
  for (i64 c = 0; c < n; c += 8) {
    // the row streams from memory: ask for it 1 KB ahead (measured ~5% faster than the hardware
    // prefetcher alone, which stops at each 4 KB page)
    if ((c & 15) == 0) _mm_prefetch(reinterpret_cast<const char*>(p + c + 256), _MM_HINT_T0);
    __m256 v = _mm256_loadu_ps(p + c);
    if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + c));
    sum = _mm256_add_ps(sum, v);  // NaN or inf anywhere leaves the sum non-finite
    pos[hits] = (int32_t)c;
    hits += _mm256_movemask_ps(_mm256_cmp_ps(v, vthr, _CMP_GE_OQ)) != 0;
    pos_hi[hits_hi] = (int32_t)c;
    hits_hi += _mm256_movemask_ps(_mm256_cmp_ps(v, vthr_hi, _CMP_GE_OQ)) != 0;
  }
  const __m256 zero = _mm256_setzero_ps();
  if (_mm256_movemask_ps(_mm256_cmp_ps(_mm256_mul_ps(sum, zero), zero, _CMP_NEQ_UQ))) return false;
  float t = thr_hi;
  i64 count = collect(p, bias, n, pos_hi, hits_hi, k, &t, bv, bc, scratch_v);
  if (count >= 0 && count < k) {
    t = thr;
    count = collect(p, bias, n, pos, hits, k, &t, bv, bc, scratch_v);
  }
  if (count >= 0 && count < k) {
    t = -INFINITY;
    count = collect(p, bias, n, nullptr, 0, k, &t, bv, bc, scratch_v);
  }
  if (count < k) return false;
  std::copy(bv, bv + count, scratch_v);
  t = kth_largest(scratch_v, scratch_v + STREAM_CAP + 8, count, k);
  i64 m = 0;
  if (!ranked) {  // usually exactly k elements reach t (no tie at the k-th value): those are the pick
    for (i64 e = 0; e < count && m <= k; ++e) m += bv[e] >= t;
    if (m == k) {
      for (i64 e = 0, j = 0; e < count; ++e)
        if (bv[e] >= t) {
          vals[j] = relu && bv[e] < 0.f ? 0.f : bv[e];
          idx[j++] = bc[e];
        }
      *kth = t;
      return true;
    }
    m = 0;
  }
  for (i64 e = 0; e < count; ++e) {
    keys[m] = key_of(bv[e], bc[e]);
    m += bv[e] >= t;
  }
  *kth = rank_top(keys, m, k, relu, vals, idx, ranked);
  return true;
}
#endif
}  // namespace

extern "C" {

// Per-row top k of pre[r, :n] + bias (bias may be null), written to vals/idx [n_rows, k] (values
// clamped at 0 if relu), ranked unless told otherwise. Returns the number of rows holding a NaN
// (left unwritten). With AVX2, n % 8 == 0 and k <= 64, rows go through top_k_stream, starting
// from the thread's recent rows (rows are split between threads in fixed ranges).
i64 sae_topk_rows(const float* pre, i64 ld, const float* bias, i64 n_rows, i64 n, i64 k, int relu, int ranked,
                  float* vals, i64* idx, int threads) {
  // about 16 elements per block, a multiple of 8 blocks (vector width), at least k blocks
  i64 L = ((n + 15) / 16 + 7) / 8 * 8;
  L = std::min(n, std::max(L, k));
  i64 bad = 0;
#pragma omp parallel num_threads(threads) reduction(+ : bad)
  {
    std::vector<float> bm(L), small(L + 8);  // + 8: room for a vector store past the last entry
    std::vector<i64> blocks(L);
    std::vector<uint64_t> cand(n);  // worst case (ties at the threshold): the whole row
#ifdef __AVX2__
    const bool stream = n % 8 == 0 && k <= STREAM_CAP / 4;
    std::vector<float> bv(STREAM_CAP + 8), scratch_v(2 * (STREAM_CAP + 8));
    std::vector<int32_t> bc(STREAM_CAP + 8), pos(n / 8 + 1), pos_hi(n / 8 + 1);
    float recent[STREAM_HISTORY];  // the k-th values of this thread's last rows
    i64 seen = 0;
#endif
#pragma omp for schedule(static)
    for (i64 r = 0; r < n_rows; ++r) {
      float* v = vals + r * k;
      i64* ix = idx + r * k;
#ifdef __AVX2__
      if (stream) {
        float thr = -INFINITY, thr_hi = -INFINITY, kth;
        if (seen >= STREAM_HISTORY) {
          float sorted[STREAM_HISTORY];
          std::copy(recent, recent + STREAM_HISTORY, sorted);
          std::nth_element(sorted, sorted + STREAM_HISTORY / 2, sorted + STREAM_HISTORY);
          thr_hi = sorted[STREAM_HISTORY / 2];
          thr = *std::min_element(sorted, sorted + STREAM_HISTORY);
        }
        if (top_k_stream(pre + r * ld, bias, n, k, thr, thr_hi, relu, ranked, pos.data(), pos_hi.data(), bv.data(),
                         bc.data(), scratch_v.data(), cand.data(), v, ix, &kth)) {
          recent[seen++ % STREAM_HISTORY] = kth;
          continue;
        }
      }
#endif
      float kth;
      if (!top_k_row(pre + r * ld, bias, n, k, L, relu, bm, small, blocks, cand, v, ix, &kth)) {
        ++bad;
        continue;
      }
#ifdef __AVX2__
      if (stream) recent[seen++ % STREAM_HISTORY] = kth;
#endif
    }
  }
  return bad;
}

// Per-row top k of pre[r, cols] + bias[cols] over the given columns (AuxK: the dead latents), as
// latent indices, ranked unless told otherwise. Returns the number of rows holding a NaN there.
i64 sae_topk_cols(const float* pre, i64 ld, const float* bias, const i64* cols, i64 n_cols, i64 n_rows,
                  i64 k, int relu, int ranked, float* vals, i64* idx, int threads) {
  i64 bad = 0;
#pragma omp parallel num_threads(threads) reduction(+ : bad)
  {
    // the gathered values, a copy for the selection and room for its partitions, sort keys
    std::vector<float> gathered(n_cols), work(2 * (n_cols + 8));
    std::vector<uint64_t> cand(n_cols);
#pragma omp for schedule(static)
    for (i64 r = 0; r < n_rows; ++r) {
      const float* p = pre + r * ld;
      int nan = 0;
      for (i64 c = 0; c < n_cols; ++c) {
        const float v = p[cols[c]] + (bias ? bias[cols[c]] : 0.f);
        nan |= v != v;
        gathered[c] = v;
      }
      if (nan) {
        ++bad;
        continue;
      }
      // sort keys only for the values reaching the k-th largest (k of them, or more on ties)
      float t = -INFINITY;
#ifdef __AVX2__
      std::copy(gathered.begin(), gathered.end(), work.begin());
      t = kth_largest(work.data(), work.data() + n_cols + 8, n_cols, k);
#endif
      i64 m = 0;
      for (i64 c = 0; c < n_cols; ++c) {
        cand[m] = key_of(gathered[c], cols[c]);
        m += gathered[c] >= t;
      }
      rank_top(cand.data(), m, k, relu, vals + r * k, idx + r * k, ranked);
    }
  }
  return bad;
}

// The encoder's input, xc = x * scale - b_dec, and the total variance sum_i |x_i - mean(x)|^2
// (the FVU's denominator, returned).
double sae_prepare(const float* x, i64 N, i64 d, float scale, const float* b_dec, float* xc, int threads) {
  // one pass: per column sum x and sum x^2 (in double: the variance is their difference)
  std::vector<std::vector<double>> sums(threads, std::vector<double>(2 * d, 0.0));
#pragma omp parallel num_threads(threads)
  {
    double* s = sums[omp_get_thread_num()].data();
    double* s2 = s + d;
#pragma omp for schedule(static)
    for (i64 i = 0; i < N; ++i) {
      const float* xi = x + i * d;
      float* out = xc + i * d;
#pragma omp simd
      for (i64 c = 0; c < d; ++c) {
        const double v = xi[c];
        s[c] += v;
        s2[c] += v * v;
        out[c] = xi[c] * scale - b_dec[c];
      }
    }
  }
  double total = 0.0;
  for (i64 c = 0; c < d; ++c) {
    double sum = 0.0, sum2 = 0.0;
    for (auto& part : sums) {
      sum += part[c];
      sum2 += part[d + c];
    }
    total += std::max(sum2 - sum * sum / (double)N, 0.0);
  }
  return total;
}

// Everything a TopK SAE's training step computes after the selection: loss and gradients.
//
// Inputs: x [N,d] (the batch, raw units), xc [N,d] (the encoder's input, xc = x * scale - b_dec), the main codes
// vals/idx [N,K] and the AuxK codes vals2/idx2 [N,K2] (K2 may be 0), W_enc, W_dec [n,d], b_dec [d],
// inv_scale (1 / input_scale), total (sum_i |x_i - mean(x)|^2), aux_coeff, project (remove
// each decoder gradient row's part along its decoder row).
//
// The model: x_hat_i = (b_dec + sum_j vals[i,j] W_dec[idx[i,j]]) * inv_scale, e_i = x_i - x_hat_i,
// fvu = sum_i |e_i|^2 / total; err_i = (sum_j vals2[i,j] W_dec[idx2[i,j]]) * inv_scale,
// auxk = sum_i |e_i - err_i|^2 / sum_i |e_i - mean(e)|^2 (e detached); loss = fvu + aux_coeff auxk.
// Selected values <= 0 get no gradient (the ReLU mask).
//
// Outputs: dW_dec, dW_enc [n,d], db_enc [n], db_dec [d], fired [n] (main entries with a value > 0
// per latent), sumsq [n] (each latent's squared gradient norm, b_dec's left out), and
// stats[3] = {sum |e|^2, sum |e - err|^2, sum |e - mean(e)|^2}.
// Scratch: acc [N,d] and, if K2 > 0, acc2, resid [N,d].
//
// Memory layout drives the design: the step is bound by gathering 2.3 KB rows at random. Entries
// are bucketed by latent (a stable counting sort), and every product runs latent by latent:
//   1. decode: acc[row] += v W_dec[l], each thread owning half of the tokens (a 5 MB half stays
//      in cache; measured 25% faster than gathering 32 rows of the 21 MB W_dec per token), the
//      rows to update requested a few entries ahead;
//   2. per token: residual, loss, D = dloss/dacc (in place of acc);
//   3. per latent: gather D rows: dvals = <D[row], W_dec[l]> and dW_dec[l] = sum v D[row];
//   4. per latent: gather xc rows: dW_enc[l] = sum dpre xc[row], db_enc[l] = sum dpre;
//   5. b_dec's gradient through xc, -W_enc^T db_enc, streaming W_enc once.
// Passes 3 and 4 take four entries at a time with the gradient row in registers (dot_axpy4,
// axpy4) and write the finished rows past the caches (store_uncached), which would otherwise
// evict the rows they gather. Each sum runs in a fixed order, whatever the thread scheduling.
void sae_topk_grads(i64 N, i64 d, i64 n, const float* x, const float* xc, const float* vals, const i64* idx,
                    i64 K, const float* vals2, const i64* idx2, i64 K2, const float* W_enc, const float* W_dec,
                    const float* b_dec, float inv_scale, double total, float aux_coeff, int project, float* dW_dec,
                    float* dW_enc, float* db_enc, float* db_dec, i64* fired, double* sumsq, double* stats,
                    float* acc, float* acc2, float* resid, int threads) {
  const i64 n_entries = N * (K + K2);
  // Entries bucketed by latent, and within a latent by the thread owning the token (tokens
  // [t*N/T, (t+1)*N/T) belong to thread t), tokens ascending: sub[l*T + t] is where thread t's
  // part of latent l starts; starts[l] = sub[l*T] and starts[n] = n_entries.
  const i64 T = threads;
  std::vector<i64> sub(n * T + 1, 0), starts(n + 1, 0);
  std::vector<std::vector<i64>> counts(T);
  std::vector<int32_t> erow(n_entries);  // token of each entry
  std::vector<float> eval(n_entries), egrad(n_entries);
  std::vector<uint8_t> eaux(n_entries);
  const float g = (float)(-2.0 / total) * inv_scale;  // dfvu/dacc = g * e
  std::vector<std::vector<double>> db_part(threads, std::vector<double>(d, 0.0)),
      e_sum(threads, std::vector<double>(K2 ? d : 0, 0.0));
  std::vector<double> sse(N, 0.0), sse2(N, 0.0), var2(N, 0.0), mean_e(d, 0.0);
  float g2 = 0.f;
#pragma omp parallel num_threads(threads)
  {
    const i64 t = omp_get_thread_num(), nt = omp_get_num_threads();
    const i64 lo = t * N / nt, hi = (t + 1) * N / nt;  // this thread's tokens
    std::vector<float> row(d), mv(d, 0.f);  // a gradient row being summed; this thread's part of W_enc^T db_enc
    // up to four entries' rows and coefficients, applied together (dot_axpy4, axpy4)
    const float* rows[4];
    float coefs[4];
    i64 live[4];
    const bool blocked = d % 16 == 0;
    i64 m = 0;  // entries held
    // the held entries' share of a decoder gradient row, and their value gradients
    // dvals = <D[row], W_dec[l]> (where the ReLU passed the value)
    auto flush_dec = [&](const float* w, float* a) {
      float dots[4];
      if (m == 4 && blocked) {
        dot_axpy4(rows, w, coefs, a, d, dots);
      } else {
        for (i64 j = 0; j < m; ++j) dots[j] = dot_axpy(rows[j], w, coefs[j], a, d);
      }
      for (i64 j = 0; j < m; ++j)
        if (eval[live[j]] > 0.f) egrad[live[j]] = (eaux[live[j]] ? g2 : 1.f) * dots[j];
      m = 0;
    };
    // the held entries' share of an encoder gradient row
    auto flush_enc = [&](float* a) {
      if (m == 4 && blocked) {
        axpy4(rows, coefs, a, d);
      } else {
        for (i64 j = 0; j < m; ++j) axpy(rows[j], coefs[j], a, d);
      }
      m = 0;
    };
    // 0. bucket the entries (a stable counting sort, each thread counting its own tokens into
    // its own array: counting into one shared array would bounce its cache lines between cores)
    {
      std::vector<i64>& count = counts[t];
      count.assign(n, 0);
      for (i64 i = lo; i < hi; ++i) {
        for (i64 j = 0; j < K; ++j) ++count[idx[i * K + j]];
        for (i64 j = 0; j < K2; ++j) ++count[idx2[i * K2 + j]];
      }
    }
#pragma omp barrier
#pragma omp single
    {
      i64 at = 0;
      for (i64 l = 0; l < n; ++l) {
        starts[l] = at;
        for (i64 u = 0; u < T; ++u) {
          sub[l * T + u] = at;
          at += u < nt ? counts[u][l] : 0;
        }
      }
      starts[n] = sub[n * T] = at;
    }
    {
      std::vector<i64>& fill = counts[t];
      for (i64 l = 0; l < n; ++l) fill[l] = sub[l * T + t];
      for (i64 i = lo; i < hi; ++i) {
        for (i64 j = 0; j < K; ++j) {
          const i64 at = fill[idx[i * K + j]]++;
          erow[at] = (int32_t)i;
          eval[at] = vals[i * K + j];
          eaux[at] = 0;
        }
        for (i64 j = 0; j < K2; ++j) {
          const i64 at = fill[idx2[i * K2 + j]]++;
          erow[at] = (int32_t)i;
          eval[at] = vals2[i * K2 + j];
          eaux[at] = 1;
        }
      }
    }
    // 1. decode, latent-major, over this thread's tokens (no barrier needed: its own entries)
    std::fill(acc + lo * d, acc + hi * d, 0.f);
    if (K2) std::fill(acc2 + lo * d, acc2 + hi * d, 0.f);
    std::vector<int32_t> mine;  // this thread's entries in latent order, to request rows ahead
    mine.reserve(sub[n * T] / T + 64);
    for (i64 l = 0; l < n; ++l)
      for (i64 e = sub[l * T + t]; e < sub[l * T + t + 1]; ++e) mine.push_back((int32_t)e);
    const i64 n_mine = (i64)mine.size();
    i64 j = 0;
    for (i64 l = 0; l < n; ++l) {
      const float* w = W_dec + l * d;
      for (i64 e = sub[l * T + t]; e < sub[l * T + t + 1]; ++e, ++j) {
        if (j + AHEAD < n_mine) {
          const i64 f = mine[j + AHEAD];
          prefetch_row_for_write((eaux[f] ? acc2 : acc) + erow[f] * d, d);
        }
        if (eval[e] == 0.f) continue;
        float* a = (eaux[e] ? acc2 : acc) + erow[e] * d;
        const float v = eval[e];
#pragma omp simd
        for (i64 c = 0; c < d; ++c) a[c] += v * w[c];
      }
    }
#pragma omp barrier
    // 2. per token: residual and loss; D = g * e replaces acc
    double* db = db_part[t].data();
    double* es = K2 ? e_sum[t].data() : nullptr;
#pragma omp for schedule(static)
    for (i64 i = 0; i < N; ++i) {
      float* a = acc + i * d;
      const float* xi = x + i * d;
      float* ri = K2 ? resid + i * d : nullptr;
      float s = 0.f;
      if (ri) {
#pragma omp simd
        for (i64 c = 0; c < d; ++c) {
          ri[c] = xi[c] - (a[c] + b_dec[c]) * inv_scale;
          es[c] += ri[c];
        }
      }
#pragma omp simd reduction(+ : s)
      for (i64 c = 0; c < d; ++c) {
        const float e = xi[c] - (a[c] + b_dec[c]) * inv_scale;
        s += e * e;
        a[c] = g * e;
        db[c] += a[c];
      }
      sse[i] = s;
    }
    if (K2) {
#pragma omp single
      {
        for (auto& part : e_sum)
          for (i64 c = 0; c < d; ++c) mean_e[c] += part[c];
        for (i64 c = 0; c < d; ++c) mean_e[c] /= (double)N;
      }
      // the aux residual e - err (acc2 holds it, unscaled: its scale needs the variance of e)
#pragma omp for schedule(static)
      for (i64 i = 0; i < N; ++i) {
        float* a = acc2 + i * d;
        const float* ri = resid + i * d;
        float s = 0.f, v = 0.f;
#pragma omp simd reduction(+ : s, v)
        for (i64 c = 0; c < d; ++c) {
          const float dev = ri[c] - (float)mean_e[c];
          v += dev * dev;
          const float r2 = ri[c] - a[c] * inv_scale;
          s += r2 * r2;
          a[c] = r2;
        }
        sse2[i] = s;
        var2[i] = v;
      }
#pragma omp single
      {
        double v = 0.0;
        for (i64 i = 0; i < N; ++i) v += var2[i];
        g2 = (float)(-2.0 * aux_coeff / std::max(v, 1.17549435e-38)) * inv_scale;  // dloss/dacc2 = g2 * (e - err)
      }
    }
    // 3. per latent: value gradients, decoder gradient rows
#pragma omp for schedule(dynamic, 64)
    for (i64 l = 0; l < n; ++l) {
      float* a = row.data();
      std::fill(a, a + d, 0.f);
      const float* w = W_dec + l * d;
      i64 count = 0;
      for (i64 e = starts[l]; e < starts[l + 1]; ++e) {
        if (e + AHEAD < n_entries) prefetch_row((eaux[e + AHEAD] ? acc2 : acc) + erow[e + AHEAD] * d, d);
        const float v = eval[e];
        count += !eaux[e] && v > 0.f;
        egrad[e] = 0.f;
        if (v == 0.f) continue;
        live[m] = e;
        rows[m] = (eaux[e] ? acc2 : acc) + erow[e] * d;
        coefs[m] = v * (eaux[e] ? g2 : 1.f);
        if (++m == 4) flush_dec(w, a);
      }
      flush_dec(w, a);
      if (project) {  // drop the part along the (unit-norm-kept) decoder row
        const float norm = std::max(std::sqrt(dot(w, w, d)), 1e-8f);
        const float proj = dot(a, w, d) / (norm * norm);
#pragma omp simd
        for (i64 c = 0; c < d; ++c) a[c] -= proj * w[c];
      }
      store_uncached(dW_dec + l * d, a, d);
      fired[l] = count;
      sumsq[l] = dot(a, a, d);
    }
    // 4. per latent: encoder gradient rows
#pragma omp for schedule(dynamic, 64)
    for (i64 l = 0; l < n; ++l) {
      float* a = row.data();
      std::fill(a, a + d, 0.f);
      float gb = 0.f;
      for (i64 e = starts[l]; e < starts[l + 1]; ++e) {
        if (e + AHEAD < n_entries) prefetch_row(xc + erow[e + AHEAD] * d, d);
        const float gp = egrad[e];
        gb += gp;
        if (gp == 0.f) continue;
        rows[m] = xc + erow[e] * d;
        coefs[m] = gp;
        if (++m == 4) flush_enc(a);
      }
      flush_enc(a);
      store_uncached(dW_enc + l * d, a, d);
      db_enc[l] = gb;
      sumsq[l] += (double)gb * gb + dot(a, a, d);
    }
    // b_dec's gradient through the encoder's input xc = x * scale - b_dec: -W_enc^T db_enc, in a
    // pass of its own (static: each thread's partial sum runs over fixed rows in a fixed order):
    // streaming W_enc while the gathers above run would cost 2.5x as much
#pragma omp for schedule(static)
    for (i64 l = 0; l < n; ++l) axpy(W_enc + l * d, -db_enc[l], mv.data(), d);
    for (i64 c = 0; c < d; ++c) db[c] += mv[c];
#ifdef __AVX2__
    _mm_sfence();  // the uncached gradient stores, visible before the optimizer reads them
#endif
  }
  for (i64 c = 0; c < d; ++c) {
    double v = 0.0;
    for (auto& part : db_part) v += part[c];
    db_dec[c] = (float)v;
  }
  double s1 = 0.0, s2 = 0.0, v2 = 0.0;
  for (i64 i = 0; i < N; ++i) {
    s1 += sse[i];
    s2 += sse2[i];
    v2 += var2[i];
  }
  stats[0] = s1;
  stats[1] = s2;
  stats[2] = v2;
}

// One Adam step (torch.optim.Adam's update: no weight decay, no amsgrad) on an [rows, d] parameter,
// with its gradient multiplied by grad_scale (gradient clipping) first; with renorm, each row is
// then scaled to unit norm (a decoder kept at unit norm), in the same pass over the row.
// bias_correction1/2 = 1 - beta^step. Rows are split between threads.
void sae_adam(float* p, const float* g, float* m, float* v, i64 rows, i64 d, float lr, float beta1, float beta2,
              float eps, double bias_correction1, double bias_correction2, float grad_scale, int renorm, int threads) {
  const float step_size = (float)(lr / bias_correction1);
  const float bc2_sqrt = (float)std::sqrt(bias_correction2);
  const float one_minus_b1 = 1.f - beta1, one_minus_b2 = 1.f - beta2;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (i64 r = 0; r < rows; ++r) {
    float* pr = p + r * d;
    const float* gr = g + r * d;
    float* mr = m + r * d;
    float* vr = v + r * d;
    float sq = 0.f;
#pragma omp simd reduction(+ : sq)
    for (i64 c = 0; c < d; ++c) {
      const float grad = gr[c] * grad_scale;
      const float mc = mr[c] + one_minus_b1 * (grad - mr[c]);
      const float vc = beta2 * vr[c] + one_minus_b2 * grad * grad;
      mr[c] = mc;
      vr[c] = vc;
      const float pc = pr[c] - step_size * mc / (std::sqrt(vc) / bc2_sqrt + eps);
      pr[c] = pc;
      sq += pc * pc;
    }
    if (renorm) {
      const float inv = 1.f / std::max(std::sqrt(sq), 1e-8f);
#pragma omp simd
      for (i64 c = 0; c < d; ++c) pr[c] *= inv;
    }
  }
}

}  // extern "C"
