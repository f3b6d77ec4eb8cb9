// Ragged paged attention for XLA's CPU backend: an XLA FFI custom call
// (kernels/cpu_attention.py builds, loads and calls it).
//
// Token t (sequence row seq_ids[t], position positions[t]) attends to the keys of its row
// at positions lo..positions[t] (lo > 0 only with a sliding window or a local attention
// chunk: Llama 4's, keys of the query's own chunk of attention_chunk positions; scores
// soft-capped as cap * tanh(score / cap) where soft_cap > 0), read from the paged
// cache through block_tables, one contiguous [K, H] row per key. Consecutive tokens of one
// row form tiles of up to 16 that share every key read (attend_tile); a lone token
// (decode) takes attend_one (attend_one_grouped for head dims of 64 or 128 where the
// CPU has AVX-512 or AVX2: attend_one_avx512, 1.3-1.45x faster alone on a float32 cache,
// benchmarks/RESULTS.md issue 18, with each KV head's rows read and widened once for all its
// query heads, benchmarks/decode_attention_builds.py). Softmax
// is two-pass, in float32. The tiles are the work items that XLA's intra-op thread pool (the
// FFI's ThreadPool context) and the calling thread share.
//
// q [T, N, H], k_cache / v_cache [num_slots, K, H] float32, bfloat16, float8_e4m3fn or
// float8_e5m2 (both the same); seq_ids, positions [T] int32; block_tables [B, max_blocks]
// int32; out [T, N, H] float32. A 16- or 8-bit cache is widened to float32 as it is read:
// the AVX-512 and AVX2 decode paths widen 16 (8) values at a time in registers, the other
// paths one key row at a time into scratch (an fp8 cache's scales are applied by the
// caller, kernels/ragged_paged_attention.py); a float32 cache is read in place.
//
// A second handler, XlaInferenceWriteCacheRows, copies a step's K or V rows (already in the
// cache's element type) into their slots in place: XLA's CPU backend scatters into a
// bfloat16 or fp8 array by converting the whole array to a wider type and back, two copies
// of the cache per write (kernels/cpu_attention.py).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <climits>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "spare_core.h"
#include "work_items.h"
#include "xla/ffi/api/ffi.h"

#if (defined(__F16C__) && defined(__SSE4_1__)) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__F16C__) && defined(__SSE4_1__)
#define XLA_INFERENCE_HALF_CONVERSIONS 1
#endif
// AVX2 without AVX-512 (AMD Zen 2/3, Intel before Ice Lake): attend_one_avx2, the AVX-512
// decode path in 8 lanes over one or two ranges of the keys, merged (key_ranges).
// XLA_INFERENCE_ATTENTION_NO_AVX512 builds it on an AVX-512 CPU too (for tests).
#if defined(__AVX512F__) && !defined(XLA_INFERENCE_ATTENTION_NO_AVX512)
#define XLA_INFERENCE_ATTENTION_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define XLA_INFERENCE_ATTENTION_AVX2 1
#endif
// XLA_INFERENCE_ATTENTION_GROUPED=0: the decode paths one query head at a time
// (attend_one_avx512, attend_one_avx2; the same bits as the grouped ones, for benchmarks).
#ifndef XLA_INFERENCE_ATTENTION_GROUPED
#define XLA_INFERENCE_ATTENTION_GROUPED 1
#endif

namespace ffi = xla::ffi;

namespace {

// exp(x) for x <= 0 (softmax arguments), written so that the compiler vectorizes a loop of
// them: 2^k * p(r), |r| <= ln2 / 2, p of degree 7 (relative error ~1e-7).
inline float fast_exp(float x) {
  x = std::max(x, -87.0f);
  const float k = std::nearbyint(x * 1.44269504088896341f);
  const float r = (x - k * 0.693145751953125f) - k * 1.42860682030941723e-6f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// A softmax's numerators in place: sc[i] = exp(sc[i] - m), m = max(sc), for n >= 1 scores;
// returns their sum, and m in *max.
inline float exponentiate_from_max(float* sc, int64_t n, float* max) {
  float m = sc[0];
  for (int64_t i = 1; i < n; ++i) m = std::max(m, sc[i]);
  float sum = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    sc[i] = fast_exp(sc[i] - m);
    sum += sc[i];
  }
  *max = m;
  return sum;
}

// The same; returns 1 / their sum, the factor that normalizes them.
inline float exponentiate_scores(float* sc, int64_t n) {
  float m;
  return 1.0f / exponentiate_from_max(sc, n, &m);
}

struct Shapes {
  int64_t num_tokens, num_heads, num_kv_heads, head_dim, max_blocks, block_size;
  int64_t sliding_window;  // 0: none
  float scale;
  float soft_cap;           // 0: none
  int64_t attention_chunk;  // 0: none
};

// Scores capped as cap * tanh(score / cap) (Gemma 2's attention logit soft cap).
inline void cap_scores(const Shapes& s, float* sc, int64_t n) {
  if (s.soft_cap <= 0.0f) return;
  const float inv_cap = 1.0f / s.soft_cap;
  for (int64_t i = 0; i < n; ++i) sc[i] = s.soft_cap * std::tanh(sc[i] * inv_cap);
}

constexpr int64_t kTile = 16;  // query tokens of one sequence that share their key reads

struct Scratch {
  std::vector<float> qs, scores, acc;
  std::vector<float> partials;  // the decode paths' key ranges' partials (RangePartials)
  std::vector<int64_t> rows;
  std::vector<float> widened;  // a bfloat16 or fp8 cache's key or value rows as float32
};

// The cache as the kernels read it: row(offset, scratch) is the [K, H] row at element
// `offset` as float32 (scratch: room for one row, used only where the cache must be
// widened), address(offset) where its bytes lie (for prefetches).
struct F32Cache {
  static constexpr int64_t kBytes = sizeof(float);
  const float* data;
  F32Cache(const void* data, int64_t /*width*/) : data(static_cast<const float*>(data)) {}
  const float* row(int64_t offset, float* /*scratch*/) const { return data + offset; }
  const void* address(int64_t offset) const { return data + offset; }
#ifdef __AVX512F__
  __m512 load16(int64_t offset) const { return _mm512_loadu_ps(data + offset); }
#endif
#ifdef XLA_INFERENCE_ATTENTION_AVX2
  __m256 load8(int64_t offset) const { return _mm256_loadu_ps(data + offset); }
#endif
};

// bfloat16 is the top half of a float32: widening is a 16-bit shift (the cache write
// rounded to nearest even, kernels/ragged_paged_attention.to_cache_dtype).
struct Bf16Cache {
  static constexpr int64_t kBytes = 2;
  const uint16_t* data;
  int64_t width;  // values per row, K * H
  Bf16Cache(const void* data, int64_t width)
      : data(static_cast<const uint16_t*>(data)), width(width) {}
  const float* row(int64_t offset, float* scratch) const {
    const uint16_t* src = data + offset;
    for (int64_t i = 0; i < width; ++i) {
      const uint32_t bits = static_cast<uint32_t>(src[i]) << 16;
      std::memcpy(scratch + i, &bits, sizeof(bits));
    }
    return scratch;
  }
  const void* address(int64_t offset) const { return data + offset; }
#ifdef __AVX512F__
  __m512 load16(int64_t offset) const {
    const __m256i halves = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(data + offset));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(halves), 16));
  }
#endif
#ifdef XLA_INFERENCE_ATTENTION_AVX2
  __m256 load8(int64_t offset) const {
    const __m128i halves = _mm_loadu_si128(reinterpret_cast<const __m128i*>(data + offset));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(halves), 16));
  }
#endif
};

// fp8 with kMantissa mantissa bits and exponent bias kBias, no infinities or NaNs read
// (the cache write saturates): e4m3fn <3, 7>, e5m2 <2, 15>. Bit operations the compiler
// vectorizes, no table: the 7 magnitude bits shifted under float32's exponent field, with
// the bias moved from kBias to 127, are the value for every normal number; a subnormal
// (exponent field 0) comes out as 2^-kBias * (1 + m / 2^kMantissa), so subtracting
// 2^-kBias and doubling gives its 2^(1 - kBias) * m / 2^kMantissa. No float32
// subnormal is ever formed, so flush-to-zero modes cannot lose fp8 subnormals.
template <int kMantissa, int kBias>
inline void widen_fp8(const uint8_t* src, float* dst, int64_t n) {
  constexpr uint32_t kExponentBits = 0x7Fu & ~((1u << kMantissa) - 1u);
  constexpr uint32_t kRebias = static_cast<uint32_t>(127 - kBias) << 23;
  float fake_zero;  // 2^-kBias
  std::memcpy(&fake_zero, &kRebias, sizeof(fake_zero));
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t b = src[i];
    const uint32_t bits = ((b & 0x7Fu) << (23 - kMantissa)) + kRebias;
    float magnitude;
    std::memcpy(&magnitude, &bits, sizeof(magnitude));
    magnitude = (b & kExponentBits) == 0 ? (magnitude - fake_zero) * 2.0f : magnitude;
    uint32_t out;
    std::memcpy(&out, &magnitude, sizeof(out));
    out |= (b & 0x80u) << 24;
    std::memcpy(dst + i, &out, sizeof(out));
  }
}

// The same through the CPU's half-precision conversion, 8 values at a time, where it has one
// (F16C): fp8 is a narrower half (e5m2 is exactly a half's top byte): its exponent and
// mantissa bits shifted into a half's, the half widened to float32 by the instruction (which
// widens half subnormals exactly), then times 2^(15 - kBias) to move the bias. Returns how
// many values it widened (the rest is left to widen_fp8).
template <int kMantissa, int kBias>
inline int64_t widen_fp8_by_halves(const uint8_t* src, float* dst, int64_t n) {
#ifdef XLA_INFERENCE_HALF_CONVERSIONS
  const __m128i magnitude_bits = _mm_set1_epi16(0x7F), sign_bit = _mm_set1_epi16(0x80);
  const __m256 rebias = _mm256_set1_ps(static_cast<float>(1 << (15 - kBias)));
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    int64_t bytes;
    std::memcpy(&bytes, src + i, sizeof(bytes));
    const __m128i b = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(bytes));
    const __m128i half = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(b, magnitude_bits), 10 - kMantissa),
                                      _mm_slli_epi16(_mm_and_si128(b, sign_bit), 8));
    _mm256_storeu_ps(dst + i, _mm256_mul_ps(_mm256_cvtph_ps(half), rebias));
  }
  return i;
#else
  (void)src, (void)dst, (void)n;
  return 0;
#endif
}

template <int kMantissa, int kBias>
struct Fp8Cache {
  static constexpr int64_t kBytes = 1;
  const uint8_t* data;
  int64_t width;  // values per row, K * H
  Fp8Cache(const void* data, int64_t width)
      : data(static_cast<const uint8_t*>(data)), width(width) {}
  const float* row(int64_t offset, float* scratch) const {
    const int64_t done = widen_fp8_by_halves<kMantissa, kBias>(data + offset, scratch, width);
    widen_fp8<kMantissa, kBias>(data + offset + done, scratch + done, width - done);
    return scratch;
  }
  const void* address(int64_t offset) const { return data + offset; }
#ifdef __AVX512F__
  // 16 values as widen_fp8_by_halves widens 8: each byte's bits moved into a half's, the
  // halves widened by the instruction, the bias moved by a product. No table.
  __m512 load16(int64_t offset) const {
    const __m256i b = _mm256_cvtepu8_epi16(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(data + offset)));
    const __m256i half = _mm256_or_si256(
        _mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x7F)), 10 - kMantissa),
        _mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x80)), 8));
    return _mm512_mul_ps(_mm512_cvtph_ps(half),
                         _mm512_set1_ps(static_cast<float>(1 << (15 - kBias))));
  }
#endif
#ifdef XLA_INFERENCE_ATTENTION_AVX2
  // 8 values as widen_fp8_by_halves widens them.
  __m256 load8(int64_t offset) const {
    int64_t bytes;
    std::memcpy(&bytes, data + offset, sizeof(bytes));
    const __m128i b = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(bytes));
    const __m128i half = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x7F)), 10 - kMantissa),
                                      _mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x80)), 8));
    return _mm256_mul_ps(_mm256_cvtph_ps(half),
                         _mm256_set1_ps(static_cast<float>(1 << (15 - kBias))));
  }
#endif
};
using E4m3Cache = Fp8Cache<3, 7>;
using E5m2Cache = Fp8Cache<2, 15>;

// The cache row offset of each key lo..hi of a sequence (one division per page).
void key_rows(const Shapes& s, const int32_t* table, int64_t lo, int64_t hi, int64_t row_width,
              std::vector<int64_t>& rows) {
  rows.resize(hi + 1 - lo);
  for (int64_t key = lo, i = 0; key <= hi;) {
    const int64_t block = std::min(key / s.block_size, s.max_blocks - 1);
    const int64_t offset = key % s.block_size;
    const int64_t run = std::min(s.block_size - offset, hi + 1 - key);
    const int64_t first_slot = static_cast<int64_t>(table[block]) * s.block_size + offset;
    for (int64_t j = 0; j < run; ++j) rows[i + j] = (first_slot + j) * row_width;
    key += run;
    i += run;
  }
}

// Keys' cache rows lie on pages scattered through the cache: the hardware prefetcher does
// not cross into the next page, so each loop over keys asks for the rows kPrefetchAhead
// keys on (two pages of 16 tokens) itself, into L2 (prefetcht1): a prefetch into L1 holds
// one of the core's couple of dozen L1 miss buffers until its line arrives, and a row of
// SmolLM2's 3 KV heads is 6 lines a key. Measured on the 2-core Zen 4 (benchmarks/
// RESULTS.md, 2026-12-04 seventh session; decode_attention_builds.py --calls 300: every
// cache from memory, as in a served step), a lone token at 540 keys: 36.7 -> 26.4 us a call
// with the spare core, 64.1 -> 40.5 us on one thread, against 16 keys ahead into L1; into L2,
// 16, 32 and 64 keys ahead within the noise of each other. From L3, no change (12.6 us).
constexpr int64_t kPrefetchAhead = 32;

template <class Cache>
inline void prefetch_row(const Cache& cache, int64_t offset, int64_t values) {
  const char* row = static_cast<const char*>(cache.address(offset));
  for (int64_t b = 0; b < values * Cache::kBytes; b += 64)
    __builtin_prefetch(row + b, 0, 2);  // (locality 2: prefetcht1)
}

int64_t first_key(const Shapes& s, int64_t pos) {
  int64_t lo = s.sliding_window > 0 ? std::max<int64_t>(0, pos - s.sliding_window + 1) : 0;
  if (s.attention_chunk > 0) lo = std::max(lo, pos / s.attention_chunk * s.attention_chunk);
  return lo;
}

// The keys a decode token at `pos` attends to, as every decode path starts: their number n,
// their cache rows in w.rows, and w.scores sized for the N heads' scores, each head's n
// rounded up to `lanes` (n_pad apart). No key (n 0): the token's N x H output is zero.
struct DecodeKeys {
  int64_t n, n_pad;
};
DecodeKeys decode_keys(const Shapes& s, const int32_t* table, int64_t pos, int64_t H,
                       int64_t lanes, float* out, Scratch& w) {
  const int64_t N = s.num_heads, lo = first_key(s, pos), n = pos + 1 - lo;
  if (n <= 0) {
    std::fill(out, out + N * H, 0.0f);
    return {0, 0};
  }
  const int64_t n_pad = (n + lanes - 1) / lanes * lanes;
  key_rows(s, table, lo, pos, s.num_kv_heads * H, w.rows);
  w.scores.resize(N * n_pad);
  return {n, n_pad};
}

// The N heads' q rows times the softmax scale, into qs (one rounding each, so the same
// values as the vector paths' products of q and the scale in registers).
void scale_queries(const Shapes& s, const float* q, int64_t H, std::vector<float>& qs) {
  qs.resize(s.num_heads * H);
  for (int64_t i = 0; i < s.num_heads * H; ++i) qs[i] = q[i] * s.scale;
}

// values(kG, g) for the query heads g..g+kG-1 of one KV head's G, at most 4 at a time (kG a
// std::integral_constant: the grouped paths' weighted values keep kG heads' sums in registers).
template <class Values>
void in_groups_of_up_to_4(int64_t G, Values&& values) {
  for (int64_t g = 0; g < G; g += 4) {
    switch (std::min<int64_t>(4, G - g)) {
      case 4: values(std::integral_constant<int, 4>(), g); break;
      case 3: values(std::integral_constant<int, 3>(), g); break;
      case 2: values(std::integral_constant<int, 2>(), g); break;
      default: values(std::integral_constant<int, 1>(), g);
    }
  }
}

// A decode token's n keys in one or two ranges, each range's softmax taken apart (its max
// score, its sum of exponentials, its weighted values not yet divided by that sum), then
// merged (merge_key_ranges), as flash-decoding does on GPUs. Two ranges let two threads share
// a call evenly whatever its number of KV heads (the spare core's items, SpareKeyRanges: a
// range's KV heads; on a 2-core Zen 3, two threads on halves of 540 keys took half one
// thread's time, where shares by KV head, 2 of SmolLM2's 3 against 1, gained 1.2x; on a
// 2-core Zen 4 with AVX-512, see attend_one_grouped). Every AVX-512 and AVX2 decode
// path splits the keys the same way (by n alone), so the output does not depend on which
// thread, or how many, computed it. From kSplitKeys keys on; the second range starts at a
// multiple of 8 keys (a block of key_scores_avx2).
constexpr int64_t kSplitKeys = 64;

struct KeyRanges {
  int64_t count;
  int64_t begin[2], end[2];
};

inline KeyRanges key_ranges(int64_t n) {
  if (n < kSplitKeys) return {1, {0, n}, {n, n}};
  const int64_t mid = (n / 2 + 7) / 8 * 8;
  return {2, {0, mid}, {mid, n}};
}

// The partials of a range for the N query heads: values [N, H] (each head's weighted sum of
// values, by the exponentials), then stats [N, 2] (the max score, the sum of exponentials).
struct RangePartials {
  float* values;
  float* stats;
};

// Room for `ranges` ranges' partials in `storage`.
inline void range_partials(std::vector<float>& storage, int64_t ranges, int64_t N, int64_t H,
                           RangePartials out[2]) {
  storage.resize(ranges * N * (H + 2));
  for (int64_t b = 0; b < ranges; ++b)
    out[b] = {storage.data() + b * N * (H + 2), storage.data() + b * N * (H + 2) + N * H};
}

// out [N, H] for the heads h_first..h_last-1 from the ranges' partials: each range's values
// weighted by exp(its max - the max of all), over the sum of its exponentials so weighted.
inline void merge_key_ranges(int64_t ranges, const RangePartials part[2], int64_t H,
                             int64_t h_first, int64_t h_last, float* out) {
  for (int64_t h = h_first; h < h_last; ++h) {
    float* o = out + h * H;
    const float* v0 = part[0].values + h * H;
    const float m0 = part[0].stats[2 * h], s0 = part[0].stats[2 * h + 1];
    if (ranges == 1) {
      const float inv = 1.0f / s0;
      for (int64_t d = 0; d < H; ++d) o[d] = v0[d] * inv;
      continue;
    }
    const float* v1 = part[1].values + h * H;
    const float m1 = part[1].stats[2 * h], s1 = part[1].stats[2 * h + 1];
    const float m = std::max(m0, m1), c0 = fast_exp(m0 - m), c1 = fast_exp(m1 - m);
    const float inv = 1.0f / (s0 * c0 + s1 * c1);
    for (int64_t d = 0; d < H; ++d) o[d] = (v0[d] * c0 + v1[d] * c1) * inv;
  }
}

// Each head's n scores (rows n_pad apart) capped and exponentiated, not normalized: its max
// and the sum into stats [N, 2], heads h_first..h_last-1.
void exponentiate_range(const Shapes& s, int64_t n, int64_t n_pad, float* scores, float* stats,
                        int64_t h_first, int64_t h_last) {
  for (int64_t h = h_first; h < h_last; ++h) {
    float* sc = scores + h * n_pad;
    cap_scores(s, sc, n);
    stats[2 * h + 1] = exponentiate_from_max(sc, n, &stats[2 * h]);
  }
}

// One query token: each head's scores are dot products over the head dim.
// kHeadDim > 0: the head dim as a compile-time constant (fully unrolled products); 0: any.
template <int64_t kHeadDim, class Cache>
void attend_one(const Shapes& s, const float* q, const Cache& k_cache, const Cache& v_cache,
                const int32_t* table, int64_t pos, float* out, Scratch& w) {
  const int64_t N = s.num_heads, K = s.num_kv_heads, G = N / K;
  const int64_t H = kHeadDim > 0 ? kHeadDim : s.head_dim;
  const int64_t n = decode_keys(s, table, pos, H, 1, out, w).n;
  if (n == 0) return;
  scale_queries(s, q, H, w.qs);
  w.widened.resize(K * H);
  for (int64_t i = 0; i < n; ++i) {
    const float* krow = k_cache.row(w.rows[i], w.widened.data());
    if (i + kPrefetchAhead < n) prefetch_row(k_cache, w.rows[i + kPrefetchAhead], K * H);
    for (int64_t h = 0; h < N; ++h) {
      const float* kv = krow + (h / G) * H;
      const float* qh = w.qs.data() + h * H;
      float dot = 0.0f;
      for (int64_t d = 0; d < H; ++d) dot += qh[d] * kv[d];
      w.scores[h * n + i] = dot;
    }
  }
  for (int64_t h = 0; h < N; ++h) {
    float* sc = w.scores.data() + h * n;
    cap_scores(s, sc, n);
    const float inv = exponentiate_scores(sc, n);
    for (int64_t i = 0; i < n; ++i) sc[i] *= inv;
  }
  w.acc.assign(N * H, 0.0f);
  for (int64_t i = 0; i < n; ++i) {
    const float* vrow = v_cache.row(w.rows[i], w.widened.data());
    if (i + kPrefetchAhead < n) prefetch_row(v_cache, w.rows[i + kPrefetchAhead], K * H);
    for (int64_t h = 0; h < N; ++h) {
      const float p = w.scores[h * n + i];
      const float* vv = vrow + (h / G) * H;
      float* a = w.acc.data() + h * H;
      for (int64_t d = 0; d < H; ++d) a[d] += p * vv[d];
    }
  }
  std::copy(w.acc.begin(), w.acc.end(), out);
}

#ifdef __AVX512F__
// out lane k = the sum of v[k]'s 16 lanes: halves, quarters, pairs and lanes of the 16
// vectors added pairwise across them (46 instructions, not 16 full reductions).
inline __m512 sum_each_of_16(const __m512 v[16]) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)  // a[i]: v[2i]'s 8 partial sums, then v[2i+1]'s
    a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)  // b[i]: quarter q holds v[4i+q]'s 4 partial sums
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)  // c[i]: quarter q holds v[8i+q]'s 2, then v[8i+4+q]'s 2
    c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0x44),
                         _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0xEE));
  // lane 4q + j: v[4j + q]'s sum; put it in lane 4j + q
  const __m512 d = _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], 0x88),
                                 _mm512_shuffle_ps(c[0], c[1], 0xDD));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, d);
}

// attend_one for a head dim of kHeadDim (a multiple of 16), with AVX-512, any cache (its
// load16 widens 16 values in registers): the keys' scores 16 at a time, each key's dot product kept as a vector of
// partial sums and the 16 reduced together (sum_each_of_16); each head's weighted sum of
// values in registers over all keys. Heads sharing a KV head read its rows one after
// another (the second from cache).
template <int64_t kHeadDim, class Cache>
void attend_one_avx512(const Shapes& s, const float* q, const Cache& k_cache,
                       const Cache& v_cache, const int32_t* table, int64_t pos, float* out,
                       Scratch& w) {
  constexpr int64_t C = kHeadDim / 16;
  const int64_t N = s.num_heads, K = s.num_kv_heads, G = N / K, H = kHeadDim;
  const DecodeKeys keys = decode_keys(s, table, pos, H, 16, out, w);
  const int64_t n = keys.n, n_pad = keys.n_pad;
  if (n == 0) return;
  const KeyRanges ranges = key_ranges(n);
  RangePartials part[2];
  range_partials(w.partials, ranges.count, N, H, part);
  const __m512 scale = _mm512_set1_ps(s.scale);
  for (int64_t h = 0; h < N; ++h) {
    const int64_t kv = (h / G) * H;
    __m512 qh[C];
    for (int64_t c = 0; c < C; ++c) qh[c] = _mm512_mul_ps(_mm512_loadu_ps(q + h * H + 16 * c), scale);
    float* sc = w.scores.data() + h * n_pad;  // the range's scores, from its first key
    for (int64_t b = 0; b < ranges.count; ++b) {
      const int64_t begin = ranges.begin[b], end = ranges.end[b];
      for (int64_t i0 = begin; i0 < end; i0 += 16) {
        __m512 dots[16];
        for (int64_t j = 0; j < 16; ++j) {
          if (i0 + j >= end) {
            dots[j] = _mm512_setzero_ps();
            continue;
          }
          if (h % G == 0 && i0 + j + kPrefetchAhead < end)
            prefetch_row(k_cache, w.rows[i0 + j + kPrefetchAhead] + kv, H);
          const int64_t krow = w.rows[i0 + j] + kv;
          __m512 dot = _mm512_mul_ps(qh[0], k_cache.load16(krow));
          for (int64_t c = 1; c < C; ++c)
            dot = _mm512_fmadd_ps(qh[c], k_cache.load16(krow + 16 * c), dot);
          dots[j] = dot;
        }
        _mm512_storeu_ps(sc + (i0 - begin), sum_each_of_16(dots));
      }
      exponentiate_range(s, end - begin, n_pad, w.scores.data(), part[b].stats, h, h + 1);
      __m512 acc[C];
      for (int64_t c = 0; c < C; ++c) acc[c] = _mm512_setzero_ps();
      for (int64_t i = begin; i < end; ++i) {
        if (h % G == 0 && i + kPrefetchAhead < end)
          prefetch_row(v_cache, w.rows[i + kPrefetchAhead] + kv, H);
        const int64_t vrow = w.rows[i] + kv;
        const __m512 p = _mm512_set1_ps(sc[i - begin]);
        for (int64_t c = 0; c < C; ++c) acc[c] = _mm512_fmadd_ps(p, v_cache.load16(vrow + 16 * c), acc[c]);
      }
      for (int64_t c = 0; c < C; ++c) _mm512_storeu_ps(part[b].values + h * H + 16 * c, acc[c]);
    }
  }
  merge_key_ranges(ranges.count, part, H, 0, N, out);
}

// The weighted sums of values of kG query heads sharing one KV head (p: their weights, the
// exponentials of a key range's scores, rows n_pad apart; rows: the range's keys' cache
// rows), kD chunks of 16 dims per pass over the keys: each value
// chunk widened once for all kG heads, their kG x kD sums in registers. Per head and dim
// the same FMAs in the same key order as attend_one_avx512's one head alone.
template <int64_t kHeadDim, int kG, class Cache>
void weighted_values_avx512(const Cache& v_cache, const int64_t* rows, int64_t kv,
                            const float* p, int64_t n, int64_t n_pad, float* out,
                            int64_t row_width) {
  constexpr int64_t C = kHeadDim / 16;
  constexpr int64_t kD = std::min<int64_t>(C, kG <= 2 ? 8 : 4);  // sums + p + v in 32 zmm
  static_assert(C % kD == 0, "the head dim's chunks in whole passes");
  for (int64_t c0 = 0; c0 < C; c0 += kD) {
    __m512 acc[kG][kD];
    for (int g = 0; g < kG; ++g)
      for (int64_t c = 0; c < kD; ++c) acc[g][c] = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; ++i) {
      // The first KV head's first pass asks for whole rows (the other heads then find
      // theirs in cache), the others' first passes for their own values.
      if (c0 == 0 && i + kPrefetchAhead < n)
        prefetch_row(v_cache, rows[i + kPrefetchAhead] + kv, kv == 0 ? row_width : kHeadDim);
      const int64_t vrow = rows[i] + kv + 16 * c0;
      __m512 pg[kG];
      for (int g = 0; g < kG; ++g) pg[g] = _mm512_set1_ps(p[g * n_pad + i]);
      for (int64_t c = 0; c < kD; ++c) {
        const __m512 v = v_cache.load16(vrow + 16 * c);
        for (int g = 0; g < kG; ++g) acc[g][c] = _mm512_fmadd_ps(pg[g], v, acc[g][c]);
      }
    }
    for (int g = 0; g < kG; ++g)
      for (int64_t c = 0; c < kD; ++c)
        _mm512_storeu_ps(out + g * kHeadDim + 16 * (c0 + c), acc[g][c]);
  }
}

// The dot products of keys rows[0..m-1] (their KV head's values at kv) with the group's
// query heads (scaled q rows qg, kHeadDim apart), as attend_one_avx512 forms them (a vector
// of 16 partial sums per key), into dots[head][key][16]: each key's chunks widened once for
// all the heads. kG > 0: kG heads, their q held in registers; 0: g heads, q read from L1.
// The first `ahead` keys ask for prefetch_values values of the row kPrefetchAhead keys on,
// from prefetch_at (the whole row: 0 and the row's width).
template <int64_t kHeadDim, int kG, class Cache>
inline void key_block_dots_avx512(const Cache& k_cache, const int64_t* rows, int64_t m,
                                  int64_t ahead, int64_t kv, int64_t prefetch_at,
                                  int64_t prefetch_values, const float* qg, float* dots,
                                  int64_t g = kG) {
  constexpr int64_t C = kHeadDim / 16;
  __m512 q[kG > 0 ? kG : 1][C];
  if constexpr (kG > 0)
    for (int h = 0; h < kG; ++h)
      for (int64_t c = 0; c < C; ++c) q[h][c] = _mm512_loadu_ps(qg + h * kHeadDim + 16 * c);
  for (int64_t j = 0; j < m; ++j) {
    if (j < ahead) prefetch_row(k_cache, rows[j + kPrefetchAhead] + prefetch_at, prefetch_values);
    const int64_t krow = rows[j] + kv;
    __m512 kk[C];
    for (int64_t c = 0; c < C; ++c) kk[c] = k_cache.load16(krow + 16 * c);
    if constexpr (kG > 0) {
      for (int h = 0; h < kG; ++h) {
        __m512 dot = _mm512_mul_ps(q[h][0], kk[0]);
        for (int64_t c = 1; c < C; ++c) dot = _mm512_fmadd_ps(q[h][c], kk[c], dot);
        _mm512_storeu_ps(dots + (h * 16 + j) * 16, dot);
      }
    } else {
      for (int64_t h = 0; h < g; ++h) {
        const float* qh = qg + h * kHeadDim;
        __m512 dot = _mm512_mul_ps(_mm512_loadu_ps(qh), kk[0]);
        for (int64_t c = 1; c < C; ++c)
          dot = _mm512_fmadd_ps(_mm512_loadu_ps(qh + 16 * c), kk[c], dot);
        _mm512_storeu_ps(dots + (h * 16 + j) * 16, dot);
      }
    }
  }
}

// attend_one_avx512 by KV head, one key range [begin, end) of a decode token's keys (rows:
// all of them; qs: the scaled q rows) into the range's partials: for each block of 16 keys
// and each KV head, every key's chunks widened once (load16) for all G query heads sharing
// it (their scaled q rows read from L1), each head's 16 partial-sum vectors kept in scratch
// and reduced together (sum_each_of_16); the block's rows (one page of keys when aligned)
// stay in L1 from the first KV head to the last. Then the exponentials and
// weighted_values_avx512 per KV head. Per head the same operations in the same order as
// attend_one_avx512's, so the same partials bit for bit. KV heads kv_first..kv_last-1 only,
// with their query heads (the spare core's items, SpareKeyRanges): each then prefetches only
// its own part of the rows.
template <int64_t kHeadDim, class Cache>
void range_partials_grouped_avx512(const Shapes& s, const float* qs, const Cache& k_cache,
                                   const Cache& v_cache, const int64_t* rows, int64_t begin,
                                   int64_t end, RangePartials part, Scratch& w, int64_t kv_first,
                                   int64_t kv_last) {
  constexpr int64_t C = kHeadDim / 16;
  const int64_t K = s.num_kv_heads, G = s.num_heads / K, H = kHeadDim;
  const int64_t n = end - begin, n_pad = (n + 15) / 16 * 16;
  const bool all = kv_first == 0 && kv_last == K;
  w.scores.resize(s.num_heads * n_pad);
  w.acc.resize(G * 256);  // [G][16 keys][16 lanes]: one KV head's heads' partial sums
  float* const dots = w.acc.data();
  // The range's first kPrefetchAhead keys and values asked for at once: the passes below
  // prefetch kPrefetchAhead keys on from there, and a range's values are read after its
  // scores (one thread taking both ranges otherwise starts four streams cold, not two).
  {
    const int64_t at = all ? 0 : kv_first * H, values = (kv_last - kv_first) * H;
    for (int64_t i = begin; i < std::min(end, begin + kPrefetchAhead); ++i) {
      prefetch_row(k_cache, rows[i] + at, values);
      prefetch_row(v_cache, rows[i] + at, values);
    }
  }
  for (int64_t i0 = begin; i0 < end; i0 += 16) {
    const int64_t m = std::min<int64_t>(16, end - i0);  // keys in this block
    for (int64_t kvh = kv_first; kvh < kv_last; ++kvh) {
      const int64_t kv = kvh * H;
      const float* qg = qs + kvh * G * H;
      // The first KV head asks for whole rows, which the others then find in L1 (a part of
      // the KV heads: the first of them for their part of the rows).
      const int64_t ahead = kvh == kv_first ? std::min<int64_t>(m, end - i0 - kPrefetchAhead) : 0;
      const int64_t at = all ? 0 : kv, values = all ? K * H : (kv_last - kv_first) * H;
      // The group's q rows in registers where they fit beside the key's chunks (G * C <= 16).
      constexpr int kG2 = 2 * C <= 16 ? 2 : 0, kG3 = 3 * C <= 16 ? 3 : 0;
      constexpr int kG4 = 4 * C <= 16 ? 4 : 0;
      const int64_t* block = rows + i0;
      if (G == 1) {
        key_block_dots_avx512<kHeadDim, 1>(k_cache, block, m, ahead, kv, at, values, qg, dots);
      } else if (G == 2 && kG2 > 0) {
        key_block_dots_avx512<kHeadDim, kG2>(k_cache, block, m, ahead, kv, at, values, qg, dots, G);
      } else if (G == 3 && kG3 > 0) {
        key_block_dots_avx512<kHeadDim, kG3>(k_cache, block, m, ahead, kv, at, values, qg, dots, G);
      } else if (G == 4 && kG4 > 0) {
        key_block_dots_avx512<kHeadDim, kG4>(k_cache, block, m, ahead, kv, at, values, qg, dots, G);
      } else {
        key_block_dots_avx512<kHeadDim, 0>(k_cache, block, m, ahead, kv, at, values, qg, dots, G);
      }
      for (int64_t g = 0; g < G; ++g) {
        __m512 d16[16];
        for (int64_t j = 0; j < 16; ++j)
          d16[j] = j < m ? _mm512_loadu_ps(dots + (g * 16 + j) * 16) : _mm512_setzero_ps();
        _mm512_storeu_ps(w.scores.data() + (kvh * G + g) * n_pad + (i0 - begin),
                         sum_each_of_16(d16));
      }
    }
  }
  exponentiate_range(s, n, n_pad, w.scores.data(), part.stats, kv_first * G, kv_last * G);
  for (int64_t kvh = kv_first; kvh < kv_last; ++kvh) {
    const int64_t kv = kvh * H, h0 = kvh * G;
    const float* p = w.scores.data() + h0 * n_pad;
    in_groups_of_up_to_4(G, [&](auto kG, int64_t g) {
      weighted_values_avx512<kHeadDim, decltype(kG)::value>(
          v_cache, rows + begin, kv, p + g * n_pad, n, n_pad, part.values + (h0 + g) * H,
          all ? K * H : H);
    });
  }
}

#endif

#ifdef XLA_INFERENCE_ATTENTION_AVX2
// out lane k = the sum of v[k]'s 8 lanes (pairwise horizontal adds across the 8 vectors).
inline __m256 sum_each_of_8(const __m256 v[8]) {
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  // u0 low half: v0..v3's sums of lanes 0-3, high half: of lanes 4-7 (u1 likewise v4..v7)
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// attend_one_avx512 in 8 lanes, for a head dim of kHeadDim (a multiple of 8), one query head
// at a time over each key range: the keys' scores 8 at a time, each key's dot product kept
// as a vector of partial sums and the 8 reduced together (sum_each_of_8); each head's
// weighted sum of values in registers over the range's keys. Every key row of a KV head is
// prefetched once, by its first query head; the other heads of its group read it from
// cache. The head dim's q and the sums stay in the 16 ymm registers up to a head dim of 64;
// larger ones spill to L1.
template <int64_t kHeadDim, class Cache>
void attend_one_avx2(const Shapes& s, const float* q, const Cache& k_cache, const Cache& v_cache,
                     const int32_t* table, int64_t pos, float* out, Scratch& w) {
  constexpr int64_t C = kHeadDim / 8;
  const int64_t N = s.num_heads, K = s.num_kv_heads, G = N / K, H = kHeadDim;
  const DecodeKeys keys = decode_keys(s, table, pos, H, 8, out, w);
  if (keys.n == 0) return;
  const KeyRanges ranges = key_ranges(keys.n);
  RangePartials part[2];
  range_partials(w.partials, ranges.count, N, H, part);
  const __m256 scale = _mm256_set1_ps(s.scale);
  for (int64_t b = 0; b < ranges.count; ++b) {
    const int64_t* rows = w.rows.data() + ranges.begin[b];
    const int64_t n = ranges.end[b] - ranges.begin[b], n_pad = (n + 7) / 8 * 8;
    for (int64_t h = 0; h < N; ++h) {
      const int64_t kv = (h / G) * H;
      __m256 qh[C];
      for (int64_t c = 0; c < C; ++c) qh[c] = _mm256_mul_ps(_mm256_loadu_ps(q + h * H + 8 * c), scale);
      float* sc = w.scores.data() + h * n_pad;
      for (int64_t i0 = 0; i0 < n; i0 += 8) {
        __m256 dots[8];
        for (int64_t j = 0; j < 8; ++j) {
          if (i0 + j >= n) {
            dots[j] = _mm256_setzero_ps();
            continue;
          }
          if (h % G == 0 && i0 + j + kPrefetchAhead < n)
            prefetch_row(k_cache, rows[i0 + j + kPrefetchAhead] + kv, H);
          const int64_t krow = rows[i0 + j] + kv;
          __m256 dot = _mm256_mul_ps(qh[0], k_cache.load8(krow));
          for (int64_t c = 1; c < C; ++c) dot = _mm256_fmadd_ps(qh[c], k_cache.load8(krow + 8 * c), dot);
          dots[j] = dot;
        }
        _mm256_storeu_ps(sc + i0, sum_each_of_8(dots));
      }
      exponentiate_range(s, n, n_pad, w.scores.data(), part[b].stats, h, h + 1);
      __m256 acc[C];
      for (int64_t c = 0; c < C; ++c) acc[c] = _mm256_setzero_ps();
      for (int64_t i = 0; i < n; ++i) {
        if (h % G == 0 && i + kPrefetchAhead < n)
          prefetch_row(v_cache, rows[i + kPrefetchAhead] + kv, H);
        const int64_t vrow = rows[i] + kv;
        const __m256 p = _mm256_set1_ps(sc[i]);
        for (int64_t c = 0; c < C; ++c) acc[c] = _mm256_fmadd_ps(p, v_cache.load8(vrow + 8 * c), acc[c]);
      }
      for (int64_t c = 0; c < C; ++c) _mm256_storeu_ps(part[b].values + h * H + 8 * c, acc[c]);
    }
  }
  merge_key_ranges(ranges.count, part, H, 0, N, out);
}

// The weighted sums of values of kG query heads sharing one KV head (p: their weights, the
// exponentials of a key range's scores, rows n_pad apart), kD chunks of 8 dims per pass over
// the keys: each value chunk widened once for all kG heads, their kG x kD sums in registers
// (32 dims a pass for up to 3 heads: 12 sums, 4 chunks; 16 for 4). Per head and dim the same FMAs in the same key
// order as one head alone. Fewer passes, fewer re-reads of the rows: 32 dims a pass took
// 0.8x the time of 16 with the cache in L3 and 0.92-0.95x from memory (SmolLM2's 3 query
// heads a KV head, 2048 keys; benchmarks/RESULTS.md, 2026-12-04 second session).
// XLA_INFERENCE_ATTENTION_VALUE_CHUNKS=2: the earlier 16 dims a pass (benchmarks).
#ifndef XLA_INFERENCE_ATTENTION_VALUE_CHUNKS
#define XLA_INFERENCE_ATTENTION_VALUE_CHUNKS 4
#endif
template <int64_t kHeadDim, int kG, class Cache>
void weighted_values_avx2(const Cache& v_cache, const int64_t* rows, int64_t kv, const float* p,
                          int64_t n, int64_t n_pad, float* out, int64_t H, int64_t row_width) {
  constexpr int64_t C = kHeadDim / 8;
  constexpr int64_t kD = std::min<int64_t>(C, kG <= 3 ? XLA_INFERENCE_ATTENTION_VALUE_CHUNKS : 2);
  static_assert(C % kD == 0, "the head dim's chunks in whole passes");
  for (int64_t c0 = 0; c0 < C; c0 += kD) {
    __m256 acc[kG][kD];
    for (int g = 0; g < kG; ++g)
      for (int64_t c = 0; c < kD; ++c) acc[g][c] = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; ++i) {
      // The first KV head's first pass asks for whole rows (the other heads then find
      // theirs in cache), the others' first passes for their own values.
      if (c0 == 0 && i + kPrefetchAhead < n)
        prefetch_row(v_cache, rows[i + kPrefetchAhead] + kv, kv == 0 ? row_width : H);
      const int64_t vrow = rows[i] + kv + 8 * c0;
      __m256 v[kD];
      for (int64_t c = 0; c < kD; ++c) v[c] = v_cache.load8(vrow + 8 * c);
      for (int g = 0; g < kG; ++g) {
        const __m256 pg = _mm256_broadcast_ss(p + g * n_pad + i);
        for (int64_t c = 0; c < kD; ++c) acc[g][c] = _mm256_fmadd_ps(pg, v[c], acc[g][c]);
      }
    }
    for (int g = 0; g < kG; ++g)
      for (int64_t c = 0; c < kD; ++c) _mm256_storeu_ps(out + g * H + 8 * (c0 + c), acc[g][c]);
  }
}

// The n keys' scores (zero up to n_pad) for the heads of KV heads kv_first..kv_last-1
// (kv_last -1: all) into `scores` (rows n_pad apart): each key's
// row (those KV heads) at once, the keys in order (one pass through the K pages, where the
// hardware prefetcher follows it); a KV head's key chunks widened once for its G query heads
// (their scaled q rows qs, read from L1); the dot products of 8 keys reduced together per
// head (sum_each_of_8). `acc`: room for N x 64 floats.
template <int64_t kHeadDim, class Cache>
void key_scores_avx2(const Shapes& s, const float* qs, const Cache& k_cache, const int64_t* rows,
                     int64_t n, int64_t n_pad, float* scores, float* acc, int64_t kv_first = 0,
                     int64_t kv_last = -1) {
  constexpr int64_t C = kHeadDim / 8;
  const int64_t K = s.num_kv_heads, G = s.num_heads / K, H = kHeadDim;
  if (kv_last < 0) kv_last = K;
  const int64_t h_first = kv_first * G, h_last = kv_last * G;
  for (int64_t i0 = 0; i0 < n; i0 += 8) {
    for (int64_t j = 0; j < 8; ++j) {
      if (i0 + j >= n) {
        for (int64_t h = h_first; h < h_last; ++h)
          _mm256_storeu_ps(acc + (h * 8 + j) * 8, _mm256_setzero_ps());
        continue;
      }
      if (i0 + j + kPrefetchAhead < n)
        prefetch_row(k_cache, rows[i0 + j + kPrefetchAhead] + kv_first * H,
                     (kv_last - kv_first) * H);
      for (int64_t kvh = kv_first; kvh < kv_last; ++kvh) {
        const int64_t krow = rows[i0 + j] + kvh * H;
        __m256 kk[C];
        for (int64_t c = 0; c < C; ++c) kk[c] = k_cache.load8(krow + 8 * c);
        for (int64_t h = kvh * G; h < (kvh + 1) * G; ++h) {
          const float* qh = qs + h * H;
          __m256 dot = _mm256_mul_ps(_mm256_loadu_ps(qh), kk[0]);
          for (int64_t c = 1; c < C; ++c) dot = _mm256_fmadd_ps(_mm256_loadu_ps(qh + 8 * c), kk[c], dot);
          _mm256_storeu_ps(acc + (h * 8 + j) * 8, dot);
        }
      }
    }
    for (int64_t h = h_first; h < h_last; ++h) {
      __m256 d8[8];
      for (int j = 0; j < 8; ++j) d8[j] = _mm256_loadu_ps(acc + (h * 8 + j) * 8);
      _mm256_storeu_ps(scores + h * n_pad + i0, sum_each_of_8(d8));
    }
  }
}

// The weighted values of the heads of KV heads kv_first..kv_last-1 (p: their weights, rows
// n_pad apart; out [N, H]). All of them: the first KV head's pass asks for
// whole rows (the other heads then find theirs in cache); a part: each KV head for its own.
template <int64_t kHeadDim, class Cache>
void values_avx2(const Shapes& s, const Cache& v_cache, const int64_t* rows, const float* p,
                 int64_t n, int64_t n_pad, float* out, int64_t kv_first, int64_t kv_last) {
  const int64_t K = s.num_kv_heads, G = s.num_heads / K, H = kHeadDim;
  const bool all = kv_first == 0 && kv_last == K;
  for (int64_t kvh = kv_first; kvh < kv_last; ++kvh) {
    const int64_t kv = kvh * H, h0 = kvh * G;
    in_groups_of_up_to_4(G, [&](auto kG, int64_t g) {
      weighted_values_avx2<kHeadDim, decltype(kG)::value>(v_cache, rows, kv, p + (h0 + g) * n_pad,
                                                          n, n_pad, out + (h0 + g) * H, H,
                                                          all ? K * H : H);
    });
  }
}

// One key range [begin, end) of a decode token's keys (rows: all of them; qs: the scaled q
// rows) for KV heads kv_first..kv_last-1 and their query heads: key_scores_avx2, the
// exponentials, values_avx2, into the range's partials (those heads' rows). The same
// operations per head as attend_one_avx2's, so the same partials.
template <int64_t kHeadDim, class Cache>
void range_partials_grouped_avx2(const Shapes& s, const float* qs, const Cache& k_cache,
                                 const Cache& v_cache, const int64_t* rows, int64_t begin,
                                 int64_t end, RangePartials part, Scratch& w, int64_t kv_first,
                                 int64_t kv_last) {
  const int64_t G = s.num_heads / s.num_kv_heads, n = end - begin, n_pad = (n + 7) / 8 * 8;
  w.scores.resize(s.num_heads * n_pad);
  w.acc.resize(s.num_heads * 64);  // [N][8 keys][8 lanes]: the dot products of 8 keys
  key_scores_avx2<kHeadDim>(s, qs, k_cache, rows + begin, n, n_pad, w.scores.data(),
                            w.acc.data(), kv_first, kv_last);
  exponentiate_range(s, n, n_pad, w.scores.data(), part.stats, kv_first * G, kv_last * G);
  values_avx2<kHeadDim>(s, v_cache, rows + begin, w.scores.data(), n, n_pad, part.values,
                        kv_first, kv_last);
}

#endif

#if defined(XLA_INFERENCE_ATTENTION_AVX512) || defined(XLA_INFERENCE_ATTENTION_AVX2)
// range_partials_grouped_avx512 or _avx2, the build's grouped decode path.
template <int64_t kHeadDim, class Cache>
void range_partials_grouped(const Shapes& s, const float* qs, const Cache& k_cache,
                            const Cache& v_cache, const int64_t* rows, int64_t begin, int64_t end,
                            RangePartials part, Scratch& w, int64_t kv_first, int64_t kv_last) {
#ifdef XLA_INFERENCE_ATTENTION_AVX512
  range_partials_grouped_avx512<kHeadDim>(s, qs, k_cache, v_cache, rows, begin, end, part, w,
                                          kv_first, kv_last);
#else
  range_partials_grouped_avx2<kHeadDim>(s, qs, k_cache, v_cache, rows, begin, end, part, w,
                                        kv_first, kv_last);
#endif
}

// attend_one_avx512 / attend_one_avx2 by KV head: each key range's partials
// (range_partials_grouped), then merged. The same output as the per-head path, bit for bit.
// Key ranges rather than KV heads are what the spare core shares (SpareKeyRanges): by KV
// head, SmolLM2's 3 went 2 to the caller and 1 to the helper (on a 2-core Zen 3 and Zen 4;
// benchmarks/RESULTS.md, 2026-12-04 third and sixth sessions).
template <int64_t kHeadDim, class Cache>
void attend_one_grouped(const Shapes& s, const float* q, const Cache& k_cache,
                        const Cache& v_cache, const int32_t* table, int64_t pos, float* out,
                        Scratch& w) {
#ifdef XLA_INFERENCE_ATTENTION_AVX512
  constexpr int64_t kLanes = 16;
#else
  constexpr int64_t kLanes = 8;
#endif
  const DecodeKeys keys = decode_keys(s, table, pos, kHeadDim, kLanes, out, w);
  if (keys.n == 0) return;
  scale_queries(s, q, kHeadDim, w.qs);
  const KeyRanges ranges = key_ranges(keys.n);
  RangePartials part[2];
  range_partials(w.partials, ranges.count, s.num_heads, kHeadDim, part);
  for (int64_t b = 0; b < ranges.count; ++b)
    range_partials_grouped<kHeadDim>(s, w.qs.data(), k_cache, v_cache, w.rows.data(),
                                     ranges.begin[b], ranges.end[b], part[b], w, 0,
                                     s.num_kv_heads);
  merge_key_ranges(ranges.count, part, kHeadDim, 0, s.num_heads, out);
}
#endif

// kTile lanes, one per query token of a tile (GCC/Clang vector extensions: AVX-512 registers
// where the CPU has them, pairs of narrower ones elsewhere).
typedef float Lanes __attribute__((vector_size(kTile * sizeof(float))));
typedef int32_t IntLanes __attribute__((vector_size(kTile * sizeof(int32_t))));

// fast_exp on every lane (x <= 0).
inline Lanes exp_lanes(Lanes x) {
  const Lanes floor = Lanes{} - 87.0f;
  x = x < floor ? floor : x;
  // k = round(x / ln2): x <= 0, so truncating x / ln2 - 0.5 towards zero rounds it
  const IntLanes k_int = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, IntLanes);
  const Lanes k = __builtin_convertvector(k_int, Lanes);
  const Lanes r = (x - k * 0.693145751953125f) - k * 1.42860682030941723e-6f;
  Lanes p = Lanes{} + 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const IntLanes bits = (k_int + 127) << 23;
  return p * reinterpret_cast<const Lanes&>(bits);
}

// Up to kTile query tokens of one sequence (any positions): every key is read once for all
// of them, and the products run across the tokens (one lane each), with no reductions
// across a vector: scores[h][key] = sum_d q[h][d] * k[key][d] as lanes, then
// acc[h][d] += p[h][key] * v[key][d].
template <int64_t kHeadDim, class Cache>
void attend_tile(const Shapes& s, const float* q, const Cache& k_cache, const Cache& v_cache,
                 const int32_t* table, const int32_t* positions, int64_t count, float* out,
                 std::vector<Lanes>& qs, std::vector<Lanes>& scores, std::vector<Lanes>& acc,
                 std::vector<int64_t>& rows, std::vector<float>& widened) {
  const int64_t N = s.num_heads, K = s.num_kv_heads, G = N / K;
  const int64_t H = kHeadDim > 0 ? kHeadDim : s.head_dim;
  IntLanes pos, chunk_start{};  // chunk_start: the first key of each token's local chunk
  int64_t lo = INT64_MAX, hi = -1;
  for (int64_t j = 0; j < kTile; ++j) {
    pos[j] = j < count ? positions[j] : -1;  // missing tokens see no key
    if (j < count && s.attention_chunk > 0)
      chunk_start[j] = static_cast<int32_t>(positions[j] / s.attention_chunk * s.attention_chunk);
    if (j < count) {
      lo = std::min(lo, first_key(s, positions[j]));
      hi = std::max<int64_t>(hi, positions[j]);
    }
  }
  const int64_t n = hi + 1 - lo;
  qs.assign(N * H, Lanes{});  // [h][d], scaled
  for (int64_t j = 0; j < count; ++j)
    for (int64_t h = 0; h < N; ++h)
      for (int64_t d = 0; d < H; ++d) qs[h * H + d][j] = q[(j * N + h) * H + d] * s.scale;
  scores.resize(N * n);  // [h][key]
  key_rows(s, table, lo, hi, K * H, rows);
  const int64_t width = K * H;
  widened.resize(4 * width);  // four rows of an fp8 cache, widened
  float* const buf = widened.data();
  // Four keys at a time: four independent accumulator chains per head (one chain would
  // wait on each multiply-add's latency), and each q vector loaded once for the four.
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    for (int64_t j = i + kPrefetchAhead; j < std::min(i + kPrefetchAhead + 4, n); ++j)
      prefetch_row(k_cache, rows[j], K * H);
    const float *r0 = k_cache.row(rows[i], buf), *r1 = k_cache.row(rows[i + 1], buf + width),
                *r2 = k_cache.row(rows[i + 2], buf + 2 * width),
                *r3 = k_cache.row(rows[i + 3], buf + 3 * width);
    for (int64_t h = 0; h < N; ++h) {
      const int64_t head = (h / G) * H;
      const float *k0 = r0 + head, *k1 = r1 + head, *k2 = r2 + head, *k3 = r3 + head;
      const Lanes* qh = qs.data() + h * H;
      Lanes d0{}, d1{}, d2{}, d3{};
      for (int64_t d = 0; d < H; ++d) {
        const Lanes qv = qh[d];
        d0 += qv * k0[d];
        d1 += qv * k1[d];
        d2 += qv * k2[d];
        d3 += qv * k3[d];
      }
      Lanes* sc = scores.data() + h * n + i;
      sc[0] = d0, sc[1] = d1, sc[2] = d2, sc[3] = d3;
    }
  }
  for (; i < n; ++i) {
    const float* krow = k_cache.row(rows[i], buf);
    for (int64_t h = 0; h < N; ++h) {
      const float* kv = krow + (h / G) * H;
      const Lanes* qh = qs.data() + h * H;
      Lanes dot{};
      for (int64_t d = 0; d < H; ++d) dot += qh[d] * kv[d];
      scores[h * n + i] = dot;
    }
  }
  // Only positions of the window and chunk get through: key <= pos, key > pos - window,
  // key >= the start of the query's chunk.
  const int32_t window = s.sliding_window > 0 ? static_cast<int32_t>(s.sliding_window) : INT32_MAX / 2;
  const IntLanes oldest = pos - window;
  for (int64_t h = 0; h < N; ++h) {
    Lanes* sc = scores.data() + h * n;
    if (s.soft_cap > 0.0f) {
      const float inv_cap = 1.0f / s.soft_cap;
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < kTile; ++j) sc[i][j] = s.soft_cap * std::tanh(sc[i][j] * inv_cap);
    }
    Lanes m = Lanes{} - 3.0e38f, sum{};
    for (int64_t i = 0; i < n; ++i) {
      const IntLanes key = IntLanes{} + static_cast<int32_t>(lo + i);
      const IntLanes valid = (key <= pos) & (key > oldest) & (key >= chunk_start);
      m = valid ? (sc[i] > m ? sc[i] : m) : m;
    }
    for (int64_t i = 0; i < n; ++i) {
      const IntLanes key = IntLanes{} + static_cast<int32_t>(lo + i);
      const IntLanes valid = (key <= pos) & (key > oldest) & (key >= chunk_start);
      const Lanes shifted = sc[i] - m;
      const Lanes e = exp_lanes(shifted < 0.0f ? shifted : Lanes{});
      sc[i] = valid ? e : Lanes{};
      sum += sc[i];
    }
    const Lanes inv = sum > 0.0f ? 1.0f / sum : Lanes{};
    for (int64_t i = 0; i < n; ++i) sc[i] *= inv;
  }
  acc.assign(N * H, Lanes{});  // [h][d]
  // Four keys at a time, so that each accumulator is loaded and stored once for four.
  for (i = 0; i + 4 <= n; i += 4) {
    for (int64_t j = i + kPrefetchAhead; j < std::min(i + kPrefetchAhead + 4, n); ++j)
      prefetch_row(v_cache, rows[j], K * H);
    const float *r0 = v_cache.row(rows[i], buf), *r1 = v_cache.row(rows[i + 1], buf + width),
                *r2 = v_cache.row(rows[i + 2], buf + 2 * width),
                *r3 = v_cache.row(rows[i + 3], buf + 3 * width);
    for (int64_t h = 0; h < N; ++h) {
      const int64_t head = (h / G) * H;
      const float *v0 = r0 + head, *v1 = r1 + head, *v2 = r2 + head, *v3 = r3 + head;
      const Lanes* p = scores.data() + h * n + i;
      const Lanes p0 = p[0], p1 = p[1], p2 = p[2], p3 = p[3];
      Lanes* a = acc.data() + h * H;
      for (int64_t d = 0; d < H; ++d) a[d] += (p0 * v0[d] + p1 * v1[d]) + (p2 * v2[d] + p3 * v3[d]);
    }
  }
  for (; i < n; ++i) {
    const float* vrow = v_cache.row(rows[i], buf);
    for (int64_t h = 0; h < N; ++h) {
      const float* vv = vrow + (h / G) * H;
      const Lanes p = scores[h * n + i];
      Lanes* a = acc.data() + h * H;
      for (int64_t d = 0; d < H; ++d) a[d] += p * vv[d];
    }
  }
  for (int64_t j = 0; j < count; ++j)
    for (int64_t h = 0; h < N; ++h)
      for (int64_t d = 0; d < H; ++d) out[(j * N + h) * H + d] = acc[h * H + d][j];
}

// Per-thread buffers, reused across the tiles a thread takes.
struct Workspace {
  Scratch one;
  std::vector<Lanes> qs, scores, acc;
};

// The tiles of a step: runs of equal seq_id cut into up to kTile tokens, from token 0 on.
// They depend on the step alone, never on how many threads share it, so the output is the
// same bit for bit under any CPU affinity.
std::vector<int64_t> tile_starts(const int32_t* seq_ids, int64_t num_tokens) {
  std::vector<int64_t> starts;
  for (int64_t t = 0; t < num_tokens;) {
    starts.push_back(t);
    int64_t end = t + 1;
    while (end < num_tokens && end - t < kTile && seq_ids[end] == seq_ids[t]) ++end;
    t = end;
  }
  starts.push_back(num_tokens);
  return starts;
}

// Tokens first..last-1 (one tile): a lone token takes attend_one.
template <int64_t kHeadDim, class Cache>
void attend_range(const Shapes& s, const float* q, const void* k_data, const void* v_data,
                  const int32_t* seq_ids, const int32_t* positions, const int32_t* block_tables,
                  float* out, int64_t first, int64_t last, Workspace& w) {
  const Cache k_cache(k_data, s.num_kv_heads * s.head_dim);
  const Cache v_cache(v_data, s.num_kv_heads * s.head_dim);
  const int64_t width = s.num_heads * s.head_dim;  // floats per token of q and out
  const int32_t* table = block_tables + static_cast<int64_t>(seq_ids[first]) * s.max_blocks;
#ifdef XLA_INFERENCE_ATTENTION_AVX512
  if constexpr (kHeadDim > 0 && kHeadDim % 16 == 0) {
    if (last - first == 1) {
#if XLA_INFERENCE_ATTENTION_GROUPED
      attend_one_grouped<kHeadDim, Cache>(s, q + first * width, k_cache, v_cache, table,
                                          positions[first], out + first * width, w.one);
#else
      attend_one_avx512<kHeadDim, Cache>(s, q + first * width, k_cache, v_cache, table,
                                  positions[first], out + first * width, w.one);
#endif
      return;
    }
  }
#elif defined(XLA_INFERENCE_ATTENTION_AVX2)
  if constexpr (kHeadDim > 0 && kHeadDim % 8 == 0) {
    if (last - first == 1) {
#if XLA_INFERENCE_ATTENTION_GROUPED
      attend_one_grouped<kHeadDim, Cache>(s, q + first * width, k_cache, v_cache, table,
                                          positions[first], out + first * width, w.one);
#else
      attend_one_avx2<kHeadDim, Cache>(s, q + first * width, k_cache, v_cache, table,
                                       positions[first], out + first * width, w.one);
#endif
      return;
    }
  }
#endif
  if (last - first == 1) {
    attend_one<kHeadDim, Cache>(s, q + first * width, k_cache, v_cache, table, positions[first],
                         out + first * width, w.one);
  } else {
    attend_tile<kHeadDim, Cache>(s, q + first * width, k_cache, v_cache, table,
                                 positions + first, last - first, out + first * width, w.qs,
                                 w.scores, w.acc, w.one.rows, w.one.widened);
  }
}

// One call's tiles, its work items, taken one at a time by whichever thread asks next
// (contexts differ in length, so equal shares of tokens would not be equal shares of work);
// shared out as work_items.h says.
struct Work : xla_inference::WorkItems {
  Shapes s;
  const float* q;
  const void *k_cache, *v_cache;  // float32, bfloat16 or fp8, as `attend` reads them
  const int32_t *seq_ids, *positions, *block_tables;
  float* out;
  void (*attend)(const Shapes&, const float*, const void*, const void*, const int32_t*,
                 const int32_t*, const int32_t*, float*, int64_t, int64_t, Workspace&);
  std::vector<int64_t> starts;  // tile i: tokens starts[i]..starts[i+1]-1

  void drain() {
    Workspace w;
    drain_items([&](int64_t i) {
      attend(s, q, k_cache, v_cache, seq_ids, positions, block_tables, out, starts[i],
             starts[i + 1], w);
    });
  }
};

using AttendFn = decltype(Work::attend);

// per_cache((Cache*)nullptr) for the Cache type that reads `cache_type`; nullptr for an
// element type the kernel does not read.
template <class Fn, class PerCache>
Fn by_cache_type(ffi::DataType cache_type, PerCache&& per_cache) {
  switch (cache_type) {
    case ffi::DataType::F32:
      return per_cache(static_cast<F32Cache*>(nullptr));
    case ffi::DataType::BF16:
      return per_cache(static_cast<Bf16Cache*>(nullptr));
    case ffi::DataType::F8E4M3FN:
      return per_cache(static_cast<E4m3Cache*>(nullptr));
    case ffi::DataType::F8E5M2:
      return per_cache(static_cast<E5m2Cache*>(nullptr));
    default:
      return nullptr;
  }
}

// A lone decode token's attention shared with the spare core (spare_core.h: a call of tens
// of microseconds, which the pool cannot start on in time), on the build's grouped decode
// path. Its items are key ranges' KV heads (SpareKeyRanges: key_ranges' partials, merged by
// the caller once all are in; per head the same operations as the whole call's, so the
// same bits). The helper
// writes into a scratch copy of the item's results, which publish() copies. The job keeps
// its own copies of what a helper that finishes late may still read (q, the token's page
// table or its keys' cache rows); the caches it reads outlive the call (the engine donates
// them to each step), but for an engine torn down in that moment, as the weights of the
// one-row products (spare_core.h).
// (Measured on a 2-core Zen 3 at SmolLM2's shapes, 3 KV heads, 540 keys: by KV head 1.1-1.4x
// the call alone; splitting instead the keys' scores by key blocks and the weighted values
// by dims, with the softmax between on the caller, measured the same; key ranges:
// benchmarks/RESULTS.md, 2026-12-04 third session.)
struct SpareAttention : xla_inference::SpareJob {
  using SpareJob::SpareJob;
  // The call's output from the items' results (after SpareCore::run).
  virtual void finish() {}
};

#if (defined(XLA_INFERENCE_ATTENTION_AVX512) || defined(XLA_INFERENCE_ATTENTION_AVX2)) && \
    XLA_INFERENCE_ATTENTION_GROUPED
#define XLA_INFERENCE_ATTENTION_SPARE 1
// The spare core's items of a lone token's call with n keys.
int64_t spare_items(const Shapes& s, int64_t n) { return key_ranges(n).count * s.num_kv_heads; }

// Item i: key range i / K's partials for KV head i % K's query heads. The caller takes the
// first range, the helper the second (each a stream through its half of the pages).
template <int64_t kHeadDim, class Cache>
struct SpareKeyRanges : SpareAttention {
  SpareKeyRanges(const Shapes& s, const float* q, const void* k, const void* v,
                 const int32_t* table, int64_t pos, float* out)
      : SpareAttention(spare_items(s, pos + 1 - first_key(s, pos))),
        s(s),
        ranges(key_ranges(pos + 1 - first_key(s, pos))),
        k_cache(k, s.num_kv_heads * s.head_dim),
        v_cache(v, s.num_kv_heads * s.head_dim),
        out(out) {
    key_rows(s, table, first_key(s, pos), pos, s.num_kv_heads * kHeadDim, rows);
    scale_queries(s, q, kHeadDim, qs);
    range_partials(storage, ranges.count, s.num_heads, kHeadDim, part);
    range_partials(scratch_storage, ranges.count, s.num_heads, kHeadDim, scratch);
  }

  void compute(int64_t i, bool into_scratch) override {
    thread_local Scratch w;
    const int64_t b = i / s.num_kv_heads, kv = i % s.num_kv_heads;
    range_partials_grouped<kHeadDim>(s, qs.data(), k_cache, v_cache, rows.data(),
                                     ranges.begin[b], ranges.end[b],
                                     (into_scratch ? scratch : part)[b], w, kv, kv + 1);
  }

  void publish(int64_t i) override {
    const int64_t b = i / s.num_kv_heads, G = s.num_heads / s.num_kv_heads;
    const int64_t h0 = (i % s.num_kv_heads) * G;
    std::memcpy(part[b].values + h0 * kHeadDim, scratch[b].values + h0 * kHeadDim,
                G * kHeadDim * sizeof(float));
    std::memcpy(part[b].stats + 2 * h0, scratch[b].stats + 2 * h0, 2 * G * sizeof(float));
  }

  void finish() override { merge_key_ranges(ranges.count, part, kHeadDim, 0, s.num_heads, out); }

  const Shapes s;
  const KeyRanges ranges;
  const Cache k_cache, v_cache;
  float* const out;
  std::vector<int64_t> rows;  // the token's keys' cache rows
  std::vector<float> qs;      // q times the softmax scale
  std::vector<float> storage, scratch_storage;
  RangePartials part[2], scratch[2];  // the caller's (the results), the helper's
};

template <int64_t kHeadDim, class Cache>
std::shared_ptr<SpareAttention> spare_job(const Shapes& s, const float* q, const void* k,
                                          const void* v, const int32_t* table, int64_t pos,
                                          float* out) {
  return std::make_shared<SpareKeyRanges<kHeadDim, Cache>>(s, q, k, v, table, pos, out);
}
#endif

using SpareJobFn = std::shared_ptr<SpareAttention> (*)(
    const Shapes&, const float*, const void*, const void*, const int32_t*, int64_t, float*);

// The spare core's job maker for a lone token, where the grouped AVX-512 or AVX2 decode path
// takes the cache's element type and the head dim (64 or 128); nullptr elsewhere.
template <class Cache>
SpareJobFn spare_for_head_dim(int64_t head_dim) {
#ifdef XLA_INFERENCE_ATTENTION_SPARE
  return head_dim == 64 ? spare_job<64, Cache> : head_dim == 128 ? spare_job<128, Cache> : nullptr;
#else
  (void)head_dim;
  return nullptr;
#endif
}

SpareJobFn spare_for(ffi::DataType cache_type, int64_t head_dim) {
  return by_cache_type<SpareJobFn>(cache_type, [&](auto* cache) {
    return spare_for_head_dim<std::remove_pointer_t<decltype(cache)>>(head_dim);
  });
}

// Whether the call (one decode token, its keys' bytes) went to the spare core.
bool attend_with_spare_core(const Work& work, ffi::DataType cache_type, int64_t cache_bytes) {
  const Shapes& s = work.s;
  if (s.num_tokens != 1) return false;
  const SpareJobFn spare = spare_for(cache_type, s.head_dim);
  if (spare == nullptr) return false;
  const int64_t pos = work.positions[0], keys = pos + 1 - first_key(s, pos);
#ifdef XLA_INFERENCE_ATTENTION_SPARE
  if (keys <= 0 || spare_items(s, keys) < 2) return false;
#endif
  if (!xla_inference::for_spare_core(2 * keys * s.num_kv_heads * s.head_dim * cache_bytes, 0))
    return false;
  const int32_t* table = work.block_tables + static_cast<int64_t>(work.seq_ids[0]) * s.max_blocks;
  const std::shared_ptr<SpareAttention> job =
      spare(s, work.q, work.k_cache, work.v_cache, table, pos, work.out);
  xla_inference::SpareCore::get().run(job);
  job->finish();
  return true;
}

// attend_range for the cache's element type and the head dim (64 and 128 compiled with it
// as a constant); nullptr for an element type the kernel does not read.
template <class Cache>
AttendFn attend_for_head_dim(int64_t head_dim) {
  return head_dim == 64    ? attend_range<64, Cache>
         : head_dim == 128 ? attend_range<128, Cache>
                           : attend_range<0, Cache>;
}

AttendFn attend_for(ffi::DataType cache_type, int64_t head_dim) {
  return by_cache_type<AttendFn>(cache_type, [&](auto* cache) {
    return attend_for_head_dim<std::remove_pointer_t<decltype(cache)>>(head_dim);
  });
}

ffi::Error PagedAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                              ffi::AnyBuffer k_cache, ffi::AnyBuffer v_cache,
                              ffi::Buffer<ffi::S32> seq_ids, ffi::Buffer<ffi::S32> positions,
                              ffi::Buffer<ffi::S32> block_tables,
                              ffi::ResultBuffer<ffi::F32> out, int64_t block_size, float scale,
                              int64_t sliding_window, float soft_cap,
                              int64_t attention_chunk) {
  const auto qd = q.dimensions();
  const auto kd = k_cache.dimensions();
  const auto bd = block_tables.dimensions();
  if (qd.size() != 3 || kd.size() != 3 || bd.size() != 2 || qd[1] % kd[1] != 0 ||
      qd[2] != kd[2]) {
    return ffi::Error::InvalidArgument("paged_attention: q [T, N, H], caches [S, K, H]");
  }
  const AttendFn attend = attend_for(k_cache.element_type(), qd[2]);
  if (attend == nullptr || v_cache.element_type() != k_cache.element_type()) {
    return ffi::Error::InvalidArgument(
        "paged_attention: K and V caches both float32, bfloat16, float8_e4m3fn or float8_e5m2");
  }
  auto work = std::make_shared<Work>();
  work->s = Shapes{qd[0], qd[1], kd[1], qd[2], bd[1], block_size, sliding_window, scale,
                   soft_cap, attention_chunk};
  work->q = q.typed_data();
  work->k_cache = k_cache.untyped_data();
  work->v_cache = v_cache.untyped_data();
  work->seq_ids = seq_ids.typed_data();
  work->positions = positions.typed_data();
  work->block_tables = block_tables.typed_data();
  work->out = out->typed_data();
  work->attend = attend;
  work->starts = tile_starts(work->seq_ids, work->s.num_tokens);
  work->num_items = static_cast<int64_t>(work->starts.size()) - 1;
  const int64_t cache_bytes =
      k_cache.element_count() == 0 ? 0 : k_cache.size_bytes() / k_cache.element_count();
  if (attend_with_spare_core(*work, k_cache.element_type(), cache_bytes))
    return ffi::Error::Success();
  // XLA sizes its pool to the CPUs this process may run on (or to its virtual CPU devices,
  // if more); 0 threads (no pool): the calling thread does it all.
  // The calling thread takes tiles too, so one fewer task than tiles is ever useful.
  xla_inference::run_items(pool, work, std::min(pool.num_threads(), work->num_items - 1));
  return ffi::Error::Success();
}

// rows [T, K, H] into slots[t] of cache [num_slots, K, H] (the same element type); a slot
// outside the cache is skipped (as a scatter's mode="drop"). `out` is the cache's buffer
// where XLA aliases them (kernels/cpu_attention.write_cache_rows), else a copy is made first.
// Repeated slots (padding tokens all write to the null page) keep the last row.
ffi::Error WriteCacheRowsImpl(ffi::AnyBuffer cache, ffi::AnyBuffer rows,
                              ffi::Buffer<ffi::S32> slots, ffi::Result<ffi::AnyBuffer> out) {
  const auto cd = cache.dimensions();
  const auto rd = rows.dimensions();
  const auto sd = slots.dimensions();
  if (cd.size() != 3 || rd.size() != 3 || sd.size() != 1 || rd[0] != sd[0] || rd[1] != cd[1] ||
      rd[2] != cd[2] || rows.element_type() != cache.element_type() ||
      out->element_type() != cache.element_type() || out->size_bytes() != cache.size_bytes()) {
    return ffi::Error::InvalidArgument(
        "write_cache_rows: cache [S, K, H], rows [T, K, H] of its type, slots [T]");
  }
  char* dst = static_cast<char*>(out->untyped_data());
  if (dst != cache.untyped_data()) std::memcpy(dst, cache.untyped_data(), cache.size_bytes());
  const int64_t num_slots = cd[0];
  const size_t row_bytes = rows.size_bytes() / std::max<int64_t>(rd[0], 1);
  const char* src = static_cast<const char*>(rows.untyped_data());
  const int32_t* slot = slots.typed_data();
  for (int64_t t = 0; t < rd[0]; ++t) {
    if (slot[t] < 0 || slot[t] >= num_slots) continue;
    std::memcpy(dst + static_cast<size_t>(slot[t]) * row_bytes, src + t * row_bytes, row_bytes);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(XlaInferenceWriteCacheRows, WriteCacheRowsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(XlaInferencePagedAttention, PagedAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("block_size")
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("sliding_window")
                                  .Attr<float>("soft_cap")
                                  .Attr<int64_t>("attention_chunk"));

// The number of threads in the pool XLA hands this library's handlers (0: none, and the
// kernel runs on the calling thread alone), written to a scalar: for tests and diagnostics.
XLA_FFI_DEFINE_HANDLER_SYMBOL(XlaInferenceThreadPoolSize,
                              [](ffi::ThreadPool pool, ffi::ResultBuffer<ffi::S32> out) {
                                *out->typed_data() = static_cast<int32_t>(pool.num_threads());
                                return ffi::Error::Success();
                              },
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Ret<ffi::Buffer<ffi::S32>>());
