// Quantized matrix product for XLA's CPU backend, exact in integer arithmetic: an XLA FFI
// custom call (kernels/cpu_quantized.py builds, loads and calls it).
//
//   y[t, o] = x_scale[t] * sum_g ( scale[o,g] * (S[t,o,g] - z X[t,g]) + offset[o,g] * X[t,g] )
//   S[t,o,g] = sum_{k in g} xq[t,k] * q[o,k]     (int32, exact)
//   X[t,g]   = sum_{k in g} xq[t,k]              (int32, exact; only with offsets or z)
//
// xq int16 [T, in] (|xq| <= 16383, so a group of <= 128 products cannot overflow int32);
// x_scale f32 [T]; values in the tile layout of quantization/packed.py: rows in tiles of 16,
// each 32-byte chunk holding 2 (8-bit) or 4 (4-bit) input elements of the tile's 16 rows:
//   8-bit: values[ot, c, 2r+j] = q[16ot+r, 2c+j]                       int8  [out/16, in/2, 32]
//   4-bit: values[ot, c, 2r+j] = q[16ot+r, 4c+j] | q[16ot+r, 4c+2+j] << 4  uint8 [out/16, in/4, 32]
// scales f16 or f32 [out/16, G, 16] (scales[ot, g, r] = scale[16ot+r, g]); offsets likewise
// (f16 or f32 on their own), or zero-size for none. Output f32 [T, out_padded = 16 * (out/16)].
// z: attribute zero_point (0 for none), a symmetric format's midpoint in place of offsets -z*scale
// (which are then not read); S - z X is exact in int32 (|z| <= 255).
// A second entry takes float32 x [T, in] and quantizes each row itself, as the callers do
// (quantization/product.py quantize_rows: x_scale = max|x| / levels, xq = round(x / x_scale)),
// which saves XLA's separate passes over x before the call. A third (multi) takes float32 x
// and several weights of one format, and gives each its own output, the bits of the second
// entry's for it: x quantized once, one launch and one sharing-out of the work for a layer's
// products that share their input (q/k/v, gate/up). The multi entry (and its table form)
// may also RMS-normalize x before quantizing it and add a residual to its one output
// (Surroundings): a decoder layer's norms and residual adds without XLA's passes around it.
//
// The AVX-512 VNNI path widens a chunk's 32 bytes to 32 int16 words (word 2r+j) and adds
// each dword lane r's pair products to the tile's row r with vpdpwssd against a broadcast
// int16 pair of x; one widened chunk serves up to 8 rows of T. Each group's int32 sums are
// converted and scaled with one FMA (and the offsets with another, times X). At T = 1 the
// product is bound by memory (every weight byte is read once, ~30 GB/s from L3 on one core
// here); from T = 4 on by the vpdpwssd (32 int16 products each). For T up to 4, several
// output tiles run side by side so that enough vpdpwssd chains overlap.
//
// Work items are runs of output tiles, shared out over XLA's intra-op thread pool (the FFI's
// ThreadPool context) and the calling thread as in paged_attention.cc, pool threads woken only
// for weights of a megabyte or more per thread (kBytesPerThread). Calls the pool would add at
// most one thread to (a decode step's projections; on two CPUs, all) are shared with the
// spare core instead (spare_core.h: a helper thread already spinning, no wake-up), from 64
// KiB of weights (kSpareMinBytes). Every output element
// is computed by the same operations in the same order whatever the thread count, the items
// or the rows of T it is computed with, so the output does not depend on them; the portable
// path (no VNNI) does the same operations too (integer sums, then the same FMAs).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

// XLA_INFERENCE_QMM_PORTABLE: the portable path even where VNNI or AVX2 is there (for tests);
// XLA_INFERENCE_QMM_NO_VNNI: the AVX2 path even where VNNI is there (for tests).
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && !defined(XLA_INFERENCE_QMM_PORTABLE) && \
    !defined(XLA_INFERENCE_QMM_NO_VNNI)
#include <immintrin.h>
#define XLA_INFERENCE_QMM_VNNI 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && \
    !defined(XLA_INFERENCE_QMM_PORTABLE)
#include <immintrin.h>
#define XLA_INFERENCE_QMM_AVX2 1
#endif

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "prefetch.h"
#include "spare_core.h"
#include "work_items.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kRows = 16;       // output rows per tile (one zmm of int32 / f32 lanes)
constexpr int64_t kChunkBytes = 32;  // one tile's bytes per chunk of input elements
constexpr int64_t kMaxT = 8;        // rows of T that share each widened weight chunk

struct Problem {
  const int16_t* xq;
  const float* x_scale;
  const uint8_t* values;
  const void* scales;   // f16 (half_scales) or f32
  const void* offsets;  // f16 (half_offsets) or f32; nullptr: none
  bool half_scales, half_offsets;
  const float* x_sums;   // [T, G] group sums of xq (exact in f32), with offsets
  const int32_t* zero_sums;  // [T, G] zero_point times the group sums, with a zero point
  float* out;
  int64_t T, in, out_tiles, groups, group_size, zero_point;
  int64_t per_chunk;  // input elements per chunk: 2 (8-bit) or 4 (4-bit)
  const int8_t* x_split = nullptr;  // the AVX2 path's one row of xq as bytes (split_row_x)

  int64_t tile_bytes() const { return in / per_chunk * kChunkBytes; }
  int64_t chunks_per_group() const { return group_size / per_chunk; }
};

// An IEEE half's value (the portable path's scales and offsets).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  const uint32_t exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF;
  float magnitude;
  if (exponent == 0) {
    magnitude = std::ldexp(static_cast<float>(mantissa), -24);  // zero or subnormal
  } else {
    const uint32_t bits = exponent == 0x1F ? 0x7F800000 | mantissa << 13
                                           : (exponent + 112) << 23 | mantissa << 13;
    std::memcpy(&magnitude, &bits, sizeof(magnitude));
  }
  uint32_t bits;
  std::memcpy(&bits, &magnitude, sizeof(bits));
  bits |= sign;
  std::memcpy(&magnitude, &bits, sizeof(bits));
  return magnitude;
}

// Element i of a group array (scales or offsets) stored as f16 (half) or f32.
inline float group_value(const void* a, bool half, int64_t i) {
  return half ? half_to_float(static_cast<const uint16_t*>(a)[i]) : static_cast<const float*>(a)[i];
}

// The exact group sums X[t, g], once per call (as floats: |X| <= 128 * 16383 < 2^24).
std::vector<int32_t> group_sums(const int16_t* xq, int64_t T, int64_t in, int64_t group_size) {
  const int64_t G = in / group_size;
  std::vector<int32_t> sums(T * G);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t g = 0; g < G; ++g) {
      int32_t s = 0;
      for (int64_t k = 0; k < group_size; ++k) s += xq[t * in + g * group_size + k];
      sums[t * G + g] = s;
    }
  return sums;
}

#ifdef XLA_INFERENCE_QMM_VNNI

// Each output tile's weights are a short stream (a few KiB), kTiles of them side by side in
// one contiguous block, and its scales another: the hardware prefetchers start each anew
// (and stop at page ends), so the kernel asks for the bytes itself. Every 64 bytes of a
// tile read, it asks for the same 64 bytes of that tile kPrefetchBlocks blocks ahead (the
// next block's weights and scales arrive while this block is multiplied), into L2 (T2: the
// prefetches then hold no L1 miss buffers). Measured on a 2-core AMD EPYC (Zen 4), the 30
// layers' one-row products plus the LM head, process CPU time per step at load 13-18: Q4_1
// 11.0 -> 7.6-8.2 ms, per-channel int8 14.2 -> 10.7-10.9 ms against the earlier 1 KiB ahead
// within each tile into L1 (benchmarks/quantized_one_row_builds.py; its "old" build);
// the next block into L1 gained about a third of that, and 2 blocks ahead no more than 1.
// The engine's batch-1 step there (benchmarks/batch1_step.py, load 4-6): GGUF Q4_1
// 16.1-16.5 -> 10.9-12.5 ms, online int8 17.3-18.1 -> 12.8-13.8 ms.
// Prefetching past the end of an array is harmless (a hint; it does not fault).
// -DXLA_INFERENCE_QMM_PREFETCH_BLOCKS=0 builds the earlier scheme (kPrefetchBytes ahead in
// each tile, scales kPrefetchGroups groups ahead), for benchmarks.
constexpr int64_t kLineBytes = 64;
#ifndef XLA_INFERENCE_QMM_PREFETCH_BLOCKS
#define XLA_INFERENCE_QMM_PREFETCH_BLOCKS 1
#endif
#ifndef XLA_INFERENCE_QMM_PREFETCH_HINT
#define XLA_INFERENCE_QMM_PREFETCH_HINT _MM_HINT_T2
#endif
constexpr int64_t kPrefetchBlocks = XLA_INFERENCE_QMM_PREFETCH_BLOCKS;
constexpr int64_t kPrefetchBytes = 1024;  // (blocks 0) weight bytes ahead, per tile
constexpr int64_t kPrefetchGroups = 4;    // (blocks 0) groups ahead, for scales and offsets

inline void prefetch(const void* address) {
  _mm_prefetch(static_cast<const char*>(address), XLA_INFERENCE_QMM_PREFETCH_HINT);
}

// 16 scales or offsets from element `at` on, widened from f16 (vcvtph2ps: exact) or as stored.
inline __m512 load_group(const void* a, bool half, int64_t at) {
  if (half)
    return _mm512_cvtph_ps(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(a) + at)));
  return _mm512_loadu_ps(static_cast<const float*>(a) + at);
}

inline const char* group_address(const void* a, bool half, int64_t at) {
  return static_cast<const char*>(a) + at * (half ? 2 : 4);
}

inline __m512i broadcast_pair(const int16_t* x) {
  int32_t pair;
  std::memcpy(&pair, x, sizeof(pair));
  // A vpbroadcastd from memory: one load uop, off the vector ports. (GCC does not fold it
  // into vpdpwssd's {1to16} operand; inline asm that did measured no faster.)
  return _mm512_set1_epi32(pair);
}

// kTiles output tiles from ot0 on, times kT rows of T from t0 on.
template <int kBits, int kT, int kTiles>
void block_vnni(const Problem& p, int64_t ot0, int64_t t0) {
  const int64_t chunks = p.chunks_per_group(), tile_bytes = p.tile_bytes();
  // What each tile asks for ahead of the bytes being read (prefetch.h): the same bytes of
  // the tile kPrefetchBlocks blocks of kTiles tiles on, or (blocks 0) kPrefetchBytes on.
  const int64_t prefetch_blocks = kPrefetchBlocks > 0 ? kPrefetchBlocks : 1;
  const int64_t prefetch_block_bytes = kPrefetchBlocks > 0 ? kTiles * tile_bytes : kPrefetchBytes;
  const uint8_t* w[kTiles];
  for (int i = 0; i < kTiles; ++i) w[i] = p.values + (ot0 + i) * tile_bytes;
  const int16_t* x[kT];
  for (int t = 0; t < kT; ++t) x[t] = p.xq + (t0 + t) * p.in;
  __m512 y[kTiles][kT];
  for (int i = 0; i < kTiles; ++i)
    for (int t = 0; t < kT; ++t) y[i][t] = _mm512_setzero_ps();
  const __m512i low_nibbles = _mm512_set1_epi16(0x0F);
  const __m512i high_nibbles = _mm512_set1_epi16(0xF0);
  for (int64_t g = 0; g < p.groups; ++g) {
    // (4 bits: acc_high sums the high nibbles' products times 16; see below.)
    __m512i acc[kTiles][kT], acc_high[kTiles][kT];
    for (int i = 0; i < kTiles; ++i)
      for (int t = 0; t < kT; ++t) acc[i][t] = acc_high[i][t] = _mm512_setzero_si512();
    if constexpr (kPrefetchBlocks > 0)
      for (int i = 0; i < kTiles; ++i) {
        const int64_t ahead = ((ot0 + i + kPrefetchBlocks * kTiles) * p.groups + g) * kRows;
        prefetch(group_address(p.scales, p.half_scales, ahead));
        if (p.offsets != nullptr) prefetch(group_address(p.offsets, p.half_offsets, ahead));
      }
    else if (g + kPrefetchGroups < p.groups)
      for (int i = 0; i < kTiles; ++i) {
        const int64_t ahead = ((ot0 + i) * p.groups + g + kPrefetchGroups) * kRows;
        prefetch(group_address(p.scales, p.half_scales, ahead));
        if (p.offsets != nullptr) prefetch(group_address(p.offsets, p.half_offsets, ahead));
      }
    for (int64_t c = g * chunks; c < (g + 1) * chunks; ++c) {
      const int64_t k = c * p.per_chunk;
      for (int i = 0; i < kTiles; ++i) {
        if (c % (kLineBytes / kChunkBytes) == 0)
          xla_inference::prefetch_blocks_ahead<XLA_INFERENCE_QMM_PREFETCH_HINT>(
              w[i] + c * kChunkBytes, prefetch_blocks, prefetch_block_bytes);
        const __m256i bytes =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[i] + c * kChunkBytes));
        if constexpr (kBits == 8) {
          const __m512i words = _mm512_cvtepi8_epi16(bytes);
          for (int t = 0; t < kT; ++t)
            acc[i][t] = _mm512_dpwssd_epi32(acc[i][t], words, broadcast_pair(x[t] + k));
        } else {
          // The high nibbles masked in place (16 times their value), not shifted down: a
          // vector shift and vpdpwssd both need port 0 of these cores, a mask either vector
          // port (port 0: 3 -> 2 ops a chunk; one thread from L2 on an Emerald Rapids
          // Xeon, 29.3 -> 30.7 GB/s: benchmarks/RESULTS.md). Their products go to
          // acc_high, 16 times the true sum (|16 q x| <= 240 * 16383: a group of 128 stays
          // far inside int32), which the group's end divides exactly (an arithmetic shift).
          const __m512i words = _mm512_cvtepu8_epi16(bytes);
          const __m512i low = _mm512_and_si512(words, low_nibbles);
          const __m512i high16 = _mm512_and_si512(words, high_nibbles);
          for (int t = 0; t < kT; ++t) {
            acc[i][t] = _mm512_dpwssd_epi32(acc[i][t], low, broadcast_pair(x[t] + k));
            acc_high[i][t] =
                _mm512_dpwssd_epi32(acc_high[i][t], high16, broadcast_pair(x[t] + k + 2));
          }
        }
      }
    }
    if constexpr (kBits == 4)
      for (int i = 0; i < kTiles; ++i)
        for (int t = 0; t < kT; ++t)
          acc[i][t] = _mm512_add_epi32(acc[i][t], _mm512_srai_epi32(acc_high[i][t], 4));
    for (int i = 0; i < kTiles; ++i) {
      const int64_t at = ((ot0 + i) * p.groups + g) * kRows;
      const __m512 scale = load_group(p.scales, p.half_scales, at);
      if (p.zero_sums != nullptr)
        for (int t = 0; t < kT; ++t)
          acc[i][t] = _mm512_sub_epi32(acc[i][t],
                                       _mm512_set1_epi32(p.zero_sums[(t0 + t) * p.groups + g]));
      for (int t = 0; t < kT; ++t)
        y[i][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i][t]), scale, y[i][t]);
      if (p.offsets != nullptr) {
        const __m512 offset = load_group(p.offsets, p.half_offsets, at);
        for (int t = 0; t < kT; ++t)
          y[i][t] = _mm512_fmadd_ps(offset, _mm512_set1_ps(p.x_sums[(t0 + t) * p.groups + g]),
                                    y[i][t]);
      }
    }
  }
  const int64_t width = p.out_tiles * kRows;
  for (int t = 0; t < kT; ++t) {
    const __m512 xs = _mm512_set1_ps(p.x_scale[t0 + t]);
    for (int i = 0; i < kTiles; ++i)
      _mm512_storeu_ps(p.out + (t0 + t) * width + (ot0 + i) * kRows, _mm512_mul_ps(y[i][t], xs));
  }
}

// Output tiles side by side per T-row count: independent vpdpwssd chains, and each chunk's
// loop overhead shared by more of them (measured: T = 2 and 4 about 15% faster than with
// half as many tiles; T = 1 the same with 8 tiles as with 4).
template <int kT>
constexpr int tiles_together() {
  return kT <= 2 ? 4 : kT <= 4 ? 2 : 1;
}

// Output tiles ot_begin..ot_end-1: kTiles at a time, the rest by halves.
template <int kBits, int kT, int kTiles = tiles_together<kT>()>
void rows_vnni(const Problem& p, int64_t ot_begin, int64_t ot_end, int64_t t0) {
  int64_t ot = ot_begin;
  for (; ot + kTiles <= ot_end; ot += kTiles) block_vnni<kBits, kT, kTiles>(p, ot, t0);
  if constexpr (kTiles > 1) rows_vnni<kBits, kT, kTiles / 2>(p, ot, ot_end, t0);
}

using RowsFn = void (*)(const Problem&, int64_t, int64_t, int64_t);

template <int kBits>
RowsFn rows_for(int64_t rows) {
  switch (rows) {
    case 1: return rows_vnni<kBits, 1>;
    case 2: return rows_vnni<kBits, 2>;
    case 3: return rows_vnni<kBits, 3>;
    case 4: return rows_vnni<kBits, 4>;
    case 5: return rows_vnni<kBits, 5>;
    case 6: return rows_vnni<kBits, 6>;
    case 7: return rows_vnni<kBits, 7>;
    default: return rows_vnni<kBits, 8>;
  }
}

// Output tiles ot_begin..ot_end-1 for every row of T, kMaxT rows at a time (the tiles'
// weights stay in cache from one row tile to the next).
void tiles(const Problem& p, int64_t ot_begin, int64_t ot_end) {
  for (int64_t t0 = 0; t0 < p.T; t0 += kMaxT) {
    const int64_t rows = std::min(kMaxT, p.T - t0);
    (p.per_chunk == 2 ? rows_for<8>(rows) : rows_for<4>(rows))(p, ot_begin, ot_end, t0);
  }
}

#elif defined(XLA_INFERENCE_QMM_AVX2)

// AVX2 (CPUs without AVX-512 VNNI: AMD Zen 2/3, Intel before Ice Lake): the VNNI path's
// block with each tile's 16 rows in two 8-lane halves. A chunk's low 16 bytes (rows 0-7) and
// high 16 bytes (rows 8-15) each widen to 16 int16 words (word 2r+j), and vpmaddwd against
// a broadcast int16 pair of x gives lane r's pair products summed, as vpdpwssd does (no
// saturation: |x| <= 16383, |q| <= 255), added to the lane's int32 sum. Integer sums are
// exact in any order, and the FMAs per group and the final product are the same operations,
// so the output has the VNNI and the portable paths' bits. The weights' next block is
// prefetched as there. At T = 1 two tiles side by side (four sums and four outputs in the
// 16 ymm registers), one tile for more rows of T.
constexpr int64_t kLineBytes = 64;
#ifndef XLA_INFERENCE_QMM_PREFETCH_HINT
#define XLA_INFERENCE_QMM_PREFETCH_HINT _MM_HINT_T2
#endif

inline void prefetch(const void* address) {
  _mm_prefetch(static_cast<const char*>(address), XLA_INFERENCE_QMM_PREFETCH_HINT);
}

inline const char* group_address(const void* a, bool half, int64_t at) {
  return static_cast<const char*>(a) + at * (half ? 2 : 4);
}

// 8 scales or offsets from element `at` on, widened from f16 (vcvtph2ps: exact) or as stored.
inline __m256 load_group8(const void* a, bool half, int64_t at) {
  if (half)
    return _mm256_cvtph_ps(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(a) + at)));
  return _mm256_loadu_ps(static_cast<const float*>(a) + at);
}

inline __m256i broadcast_pair8(const int16_t* x) {
  int32_t pair;
  std::memcpy(&pair, x, sizeof(pair));
  return _mm256_set1_epi32(pair);
}

// kTiles output tiles from ot0 on, times kT rows of T from t0 on; [i][t][h]: tile i, row t,
// half h (rows 8h..8h+7 of the tile).
template <int kBits, int kT, int kTiles>
void block_avx2(const Problem& p, int64_t ot0, int64_t t0) {
  const int64_t chunks = p.chunks_per_group(), tile_bytes = p.tile_bytes();
  const int64_t prefetch_block_bytes = kTiles * tile_bytes;
  const uint8_t* w[kTiles];
  for (int i = 0; i < kTiles; ++i) w[i] = p.values + (ot0 + i) * tile_bytes;
  const int16_t* x[kT];
  for (int t = 0; t < kT; ++t) x[t] = p.xq + (t0 + t) * p.in;
  __m256 y[kTiles][kT][2];
  for (int i = 0; i < kTiles; ++i)
    for (int t = 0; t < kT; ++t) y[i][t][0] = y[i][t][1] = _mm256_setzero_ps();
  const __m256i low_nibbles = _mm256_set1_epi16(0x0F);
  for (int64_t g = 0; g < p.groups; ++g) {
    __m256i acc[kTiles][kT][2];
    for (int i = 0; i < kTiles; ++i)
      for (int t = 0; t < kT; ++t) acc[i][t][0] = acc[i][t][1] = _mm256_setzero_si256();
    for (int i = 0; i < kTiles; ++i) {
      const int64_t ahead = ((ot0 + i + kTiles) * p.groups + g) * kRows;
      prefetch(group_address(p.scales, p.half_scales, ahead));
      if (p.offsets != nullptr) prefetch(group_address(p.offsets, p.half_offsets, ahead));
    }
    for (int64_t c = g * chunks; c < (g + 1) * chunks; ++c) {
      const int64_t k = c * p.per_chunk;
      for (int i = 0; i < kTiles; ++i) {
        if (c % (kLineBytes / kChunkBytes) == 0)
          xla_inference::prefetch_blocks_ahead<XLA_INFERENCE_QMM_PREFETCH_HINT>(
              w[i] + c * kChunkBytes, 1, prefetch_block_bytes);
        const __m256i bytes =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[i] + c * kChunkBytes));
        const __m128i half_bytes[2] = {_mm256_castsi256_si128(bytes),
                                       _mm256_extracti128_si256(bytes, 1)};
        for (int h = 0; h < 2; ++h) {
          if constexpr (kBits == 8) {
            const __m256i words = _mm256_cvtepi8_epi16(half_bytes[h]);
            for (int t = 0; t < kT; ++t)
              acc[i][t][h] = _mm256_add_epi32(
                  acc[i][t][h], _mm256_madd_epi16(words, broadcast_pair8(x[t] + k)));
          } else {
            const __m256i words = _mm256_cvtepu8_epi16(half_bytes[h]);
            const __m256i low = _mm256_and_si256(words, low_nibbles);
            const __m256i high = _mm256_srli_epi16(words, 4);
            for (int t = 0; t < kT; ++t)
              acc[i][t][h] = _mm256_add_epi32(
                  acc[i][t][h],
                  _mm256_add_epi32(_mm256_madd_epi16(low, broadcast_pair8(x[t] + k)),
                                   _mm256_madd_epi16(high, broadcast_pair8(x[t] + k + 2))));
          }
        }
      }
    }
    for (int i = 0; i < kTiles; ++i)
      for (int h = 0; h < 2; ++h) {
        const int64_t at = ((ot0 + i) * p.groups + g) * kRows + 8 * h;
        const __m256 scale = load_group8(p.scales, p.half_scales, at);
        if (p.zero_sums != nullptr)
          for (int t = 0; t < kT; ++t)
            acc[i][t][h] = _mm256_sub_epi32(
                acc[i][t][h], _mm256_set1_epi32(p.zero_sums[(t0 + t) * p.groups + g]));
        for (int t = 0; t < kT; ++t)
          y[i][t][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[i][t][h]), scale, y[i][t][h]);
        if (p.offsets != nullptr) {
          const __m256 offset = load_group8(p.offsets, p.half_offsets, at);
          for (int t = 0; t < kT; ++t)
            y[i][t][h] = _mm256_fmadd_ps(
                offset, _mm256_set1_ps(p.x_sums[(t0 + t) * p.groups + g]), y[i][t][h]);
        }
      }
  }
  const int64_t width = p.out_tiles * kRows;
  for (int t = 0; t < kT; ++t) {
    const __m256 xs = _mm256_set1_ps(p.x_scale[t0 + t]);
    for (int i = 0; i < kTiles; ++i)
      for (int h = 0; h < 2; ++h)
        _mm256_storeu_ps(p.out + (t0 + t) * width + (ot0 + i) * kRows + 8 * h,
                         _mm256_mul_ps(y[i][t][h], xs));
  }
}

// One row of T times 4-bit weights, without widening the weights: xq = 128 xh + xl, xh =
// xq >> 7 in [-128, 127] and xl = xq & 127 in [0, 127] each fit a signed byte, so
// vpmaddubsw (unsigned bytes times signed bytes, adjacent pairs summed into int16) takes the
// chunk's nibbles as they are, masked or shifted in place: lane r of a chunk's bytes 2r, 2r+1
// is row r's inputs 4c, 4c+1 (low nibbles) or 4c+2, 4c+3 (high nibbles). Each product pair
// is at most 2 * 15 * 128 = 3840 in magnitude, so the int16 sums of xh's and of xl's products
// over up to 4 chunks fit (30720); then vpunpck{l,h}wd pairs each row's two sums and
// vpmaddwd against (1, 128) gives xl's sum + 128 xh's in int32: lanes hold rows 0-3 and 8-11,
// 4-7 and 12-15, which vperm2i128 puts back in order at the group's end. The group's int32
// sums are then the widening path's (integer sums are exact), and the FMAs the same, so the
// output has its bits. On a Zen 3 the widening's vpmovzxbw and vextracti128 are the slow
// instructions (about one a cycle); this path has none in its inner loop (one tile at a
// time: two would spill). Measured there (benchmarks/RESULTS.md, 2026-12-04): the kernel
// alone 5-15% faster; a step's products chained through XLA 0.96x the time on one thread,
// even with the spare core (bound by the two threads' reads).
// split_row_x gives x_split: per chunk c, four dwords (xh[4c], xh[4c+1]) twice, (xl[4c],
// xl[4c+1]) twice, then the same for 4c+2, 4c+3, each broadcast by a load.
constexpr int64_t kSplitChunks = 4;  // chunks of int16 sums before they are widened

void split_row_x(const int16_t* xq, int64_t in, int8_t* out) {
  // 8 inputs (2 chunks) at a time: their xh and xl bytes side by side (packs: no
  // saturation, both fit), then each chunk's 16 bytes picked from them.
  const __m256i pick = _mm256_setr_epi8(0, 1, 0, 1, 8, 9, 8, 9, 2, 3, 2, 3, 10, 11, 10, 11,
                                        4, 5, 4, 5, 12, 13, 12, 13, 6, 7, 6, 7, 14, 15, 14, 15);
  int64_t k = 0;
  for (; k + 8 <= in; k += 8) {
    const __m128i x8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(xq + k));
    const __m128i bytes =
        _mm_packs_epi16(_mm_srai_epi16(x8, 7), _mm_and_si128(x8, _mm_set1_epi16(127)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 4 * k),
                        _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(bytes), pick));
  }
  for (; k < in; k += 2)  // (a last chunk of 4)
    for (int64_t j = 0; j < 2; ++j) {
      int8_t* at = out + 4 * k + j;
      at[0] = at[2] = static_cast<int8_t>(xq[k + j] >> 7);
      at[4] = at[6] = static_cast<int8_t>(xq[k + j] & 127);
    }
}

void tile_nibbles_split(const Problem& p, int64_t ot) {
  const int64_t chunks = p.chunks_per_group(), tile_bytes = p.tile_bytes();
  const uint8_t* w = p.values + ot * tile_bytes;
  const int32_t* xs = reinterpret_cast<const int32_t*>(p.x_split);
  const __m256i nibble = _mm256_set1_epi8(0x0F), low_plus_128_high = _mm256_set1_epi32(0x00800001);
  __m256 y[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int64_t g = 0; g < p.groups; ++g) {
    const int64_t ahead = ((ot + 1) * p.groups + g) * kRows;
    prefetch(group_address(p.scales, p.half_scales, ahead));
    if (p.offsets != nullptr) prefetch(group_address(p.offsets, p.half_offsets, ahead));
    __m256i rows_0_3_8_11 = _mm256_setzero_si256(), rows_4_7_12_15 = _mm256_setzero_si256();
    for (int64_t c0 = g * chunks; c0 < (g + 1) * chunks; c0 += kSplitChunks) {
      __m256i high_sums = _mm256_setzero_si256(), low_sums = _mm256_setzero_si256();
      for (int64_t c = c0; c < std::min(c0 + kSplitChunks, (g + 1) * chunks); ++c) {
        if (c % (kLineBytes / kChunkBytes) == 0)
          xla_inference::prefetch_blocks_ahead<XLA_INFERENCE_QMM_PREFETCH_HINT>(
              w + c * kChunkBytes, 1, tile_bytes);
        const __m256i bytes =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + c * kChunkBytes));
        const __m256i low = _mm256_and_si256(bytes, nibble);
        const __m256i high = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), nibble);
        const int32_t* x4 = xs + 4 * c;
        high_sums = _mm256_add_epi16(
            high_sums, _mm256_add_epi16(_mm256_maddubs_epi16(low, _mm256_set1_epi32(x4[0])),
                                        _mm256_maddubs_epi16(high, _mm256_set1_epi32(x4[2]))));
        low_sums = _mm256_add_epi16(
            low_sums, _mm256_add_epi16(_mm256_maddubs_epi16(low, _mm256_set1_epi32(x4[1])),
                                       _mm256_maddubs_epi16(high, _mm256_set1_epi32(x4[3]))));
      }
      rows_0_3_8_11 = _mm256_add_epi32(
          rows_0_3_8_11,
          _mm256_madd_epi16(_mm256_unpacklo_epi16(low_sums, high_sums), low_plus_128_high));
      rows_4_7_12_15 = _mm256_add_epi32(
          rows_4_7_12_15,
          _mm256_madd_epi16(_mm256_unpackhi_epi16(low_sums, high_sums), low_plus_128_high));
    }
    __m256i acc[2] = {_mm256_permute2x128_si256(rows_0_3_8_11, rows_4_7_12_15, 0x20),
                      _mm256_permute2x128_si256(rows_0_3_8_11, rows_4_7_12_15, 0x31)};
    for (int h = 0; h < 2; ++h) {
      const int64_t at = (ot * p.groups + g) * kRows + 8 * h;
      if (p.zero_sums != nullptr)
        acc[h] = _mm256_sub_epi32(acc[h], _mm256_set1_epi32(p.zero_sums[g]));
      y[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[h]), load_group8(p.scales, p.half_scales, at),
                             y[h]);
      if (p.offsets != nullptr)
        y[h] = _mm256_fmadd_ps(load_group8(p.offsets, p.half_offsets, at),
                               _mm256_set1_ps(p.x_sums[g]), y[h]);
    }
  }
  const __m256 xs8 = _mm256_set1_ps(p.x_scale[0]);
  for (int h = 0; h < 2; ++h)
    _mm256_storeu_ps(p.out + ot * kRows + 8 * h, _mm256_mul_ps(y[h], xs8));
}

// Output tiles ot_begin..ot_end-1: kTiles at a time, the rest by halves.
template <int kBits, int kT, int kTiles = (kT == 1 ? 2 : 1)>
void rows_avx2(const Problem& p, int64_t ot_begin, int64_t ot_end, int64_t t0) {
  int64_t ot = ot_begin;
  for (; ot + kTiles <= ot_end; ot += kTiles) block_avx2<kBits, kT, kTiles>(p, ot, t0);
  if constexpr (kTiles > 1) rows_avx2<kBits, kT, kTiles / 2>(p, ot, ot_end, t0);
}

using RowsFn = void (*)(const Problem&, int64_t, int64_t, int64_t);

// Up to 4 rows of T at a time (their sums and outputs fit the registers).
template <int kBits>
RowsFn rows_for(int64_t rows) {
  switch (rows) {
    case 1: return rows_avx2<kBits, 1>;
    case 2: return rows_avx2<kBits, 2>;
    case 3: return rows_avx2<kBits, 3>;
    default: return rows_avx2<kBits, 4>;
  }
}

// Output tiles ot_begin..ot_end-1 for every row of T, 4 rows at a time (one row of 4-bit
// weights with x split: tile_nibbles_split).
void tiles(const Problem& p, int64_t ot_begin, int64_t ot_end) {
  if (p.x_split != nullptr) {
    for (int64_t ot = ot_begin; ot < ot_end; ++ot) tile_nibbles_split(p, ot);
    return;
  }
  constexpr int64_t kRowsAtOnce = 4;
  for (int64_t t0 = 0; t0 < p.T; t0 += kRowsAtOnce) {
    const int64_t rows = std::min(kRowsAtOnce, p.T - t0);
    (p.per_chunk == 2 ? rows_for<8>(rows) : rows_for<4>(rows))(p, ot_begin, ot_end, t0);
  }
}

#else  // portable

// The same sums and FMAs as the VNNI path, one output tile and one row of T at a time.
void tile_row_portable(const Problem& p, int64_t ot, int64_t t) {
  const int64_t chunks = p.chunks_per_group();
  const uint8_t* w = p.values + ot * p.tile_bytes();
  const int16_t* x = p.xq + t * p.in;
  float y[kRows] = {};
  for (int64_t g = 0; g < p.groups; ++g) {
    int32_t acc[kRows] = {};
    for (int64_t c = g * chunks; c < (g + 1) * chunks; ++c) {
      const uint8_t* b = w + c * kChunkBytes;
      const int64_t k = c * p.per_chunk;
      for (int64_t r = 0; r < kRows; ++r)
        for (int64_t j = 0; j < 2; ++j) {
          const uint8_t byte = b[2 * r + j];
          if (p.per_chunk == 2) {
            acc[r] += static_cast<int32_t>(static_cast<int8_t>(byte)) * x[k + j];
          } else {
            acc[r] += static_cast<int32_t>(byte & 0x0F) * x[k + j] +
                      static_cast<int32_t>(byte >> 4) * x[k + 2 + j];
          }
        }
    }
    const int64_t at = (ot * p.groups + g) * kRows;
    for (int64_t r = 0; r < kRows; ++r) {
      if (p.zero_sums != nullptr) acc[r] -= p.zero_sums[t * p.groups + g];
      y[r] = std::fma(static_cast<float>(acc[r]), group_value(p.scales, p.half_scales, at + r),
                      y[r]);
      if (p.offsets != nullptr)
        y[r] = std::fma(group_value(p.offsets, p.half_offsets, at + r),
                        p.x_sums[t * p.groups + g], y[r]);
    }
  }
  float* out = p.out + t * p.out_tiles * kRows + ot * kRows;
  for (int64_t r = 0; r < kRows; ++r) out[r] = y[r] * p.x_scale[t];
}

void tiles(const Problem& p, int64_t ot_begin, int64_t ot_end) {
  for (int64_t t = 0; t < p.T; ++t)
    for (int64_t ot = ot_begin; ot < ot_end; ++ot) tile_row_portable(p, ot, t);
}

#endif

// Row x [in] quantized as quantization/product.py's quantize_rows is by XLA, with the same
// float operations (XLA multiplies by reciprocals), so that it gives the same integers:
// x_scale = max|x| * (1 / levels), or 1 for a zero row; xq = clip(round half to even(x *
// (1 / x_scale)), -levels, levels). Compiled without -ffast-math's reciprocal and
// reassociation rewrites, which GCC applies or not depending on where the function is inlined
// (with the wide entry's second call site, some rows' integers came out one apart from XLA's).
__attribute__((optimize("no-reciprocal-math", "no-associative-math")))
void quantize_row(const float* x, int64_t in, float levels, int16_t* xq, float* x_scale) {
  float peak = 0.0f;
  for (int64_t k = 0; k < in; ++k) peak = std::max(peak, std::fabs(x[k]));
  float scale = peak * (1.0f / levels);
  if (!(scale > 0.0f)) scale = 1.0f;
  const float inverse = 1.0f / scale;
  for (int64_t k = 0; k < in; ++k) {
    const float q = std::nearbyint(x[k] * inverse);
    xq[k] = static_cast<int16_t>(std::min(levels, std::max(-levels, q)));
  }
  *x_scale = scale;
}

// quantize_row's scale and its reciprocal for a row whose largest magnitude is `peak`, by
// the same float operations (kept from -ffast-math's rewrites, as there).
__attribute__((optimize("no-reciprocal-math", "no-associative-math")))
void row_scale_of(float peak, float levels, float* scale, float* inverse) {
  float s = peak * (1.0f / levels);
  if (!(s > 0.0f)) s = 1.0f;
  *scale = s;
  *inverse = 1.0f / s;
}

#if defined(__x86_64__)
// The pieces of quantize_row vectorized that its int16 (float entry) and bfloat16 (wide
// entry) forms share, in AVX-512 F and DQ alone: the VNNI path's CPU need not have BF16.
#define XLA_INFERENCE_AVX512 __attribute__((target("avx512f,avx512dq")))

// Row x [in]'s scale and its reciprocal, as quantize_row's: the same largest magnitude (max
// is exact in any order), taken 16 lanes at a time, then row_scale_of.
XLA_INFERENCE_AVX512 inline void row_scale_avx512(const float* x, int64_t in, float levels,
                                                  float* scale, float* inverse) {
  const __m512 sign = _mm512_set1_ps(-0.0f);
  __m512 peak16 = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= in; k += 16)
    peak16 = _mm512_max_ps(peak16, _mm512_andnot_ps(sign, _mm512_loadu_ps(x + k)));
  float peak = _mm512_reduce_max_ps(peak16);
  for (; k < in; ++k) peak = std::max(peak, std::fabs(x[k]));
  row_scale_of(peak, levels, scale, inverse);
}

// x[0..16) quantized as quantize_row does: the same products, rounded half to even
// (vrndscaleps) and clipped, so the same integers (as floats).
XLA_INFERENCE_AVX512 inline __m512 quantized16_avx512(const float* x, float inverse,
                                                      float levels) {
  const __m512 product = _mm512_mul_ps(_mm512_loadu_ps(x), _mm512_set1_ps(inverse));
  const __m512 q = _mm512_roundscale_ps(product, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm512_min_ps(_mm512_set1_ps(levels), _mm512_max_ps(_mm512_set1_ps(-levels), q));
}

// One element quantized so (the rows' tails past the last 16).
inline float quantized(float x, float inverse, float levels) {
  return std::min(levels, std::max(-levels, std::nearbyint(x * inverse)));
}
#endif

#ifdef XLA_INFERENCE_QMM_VNNI
// quantize_row vectorized (the float entry's rows; a decode step quantizes one per product),
// with the same integers.
void quantize_row_avx512(const float* x, int64_t in, float levels, int16_t* xq, float* x_scale) {
  float scale, inverse;
  row_scale_avx512(x, in, levels, &scale, &inverse);
  int64_t k = 0;
  for (; k + 16 <= in; k += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + k),
                        _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(
                            quantized16_avx512(x + k, inverse, levels))));
  for (; k < in; ++k) xq[k] = static_cast<int16_t>(quantized(x[k], inverse, levels));
  *x_scale = scale;
}
#endif

#ifdef XLA_INFERENCE_QMM_AVX2
// quantize_row in AVX2, 8 lanes at a time, with the same integers: the same largest
// magnitude (max is exact in any order), row_scale_of, the same products rounded half to
// even (vroundps), clipped.
void quantize_row_avx2(const float* x, int64_t in, float levels, int16_t* xq, float* x_scale) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 peak8 = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= in; k += 8)
    peak8 = _mm256_max_ps(peak8, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + k)));
  float lanes[8];
  _mm256_storeu_ps(lanes, peak8);
  float peak = 0.0f;
  for (float lane : lanes) peak = std::max(peak, lane);
  for (; k < in; ++k) peak = std::max(peak, std::fabs(x[k]));
  float scale, inverse;
  row_scale_of(peak, levels, &scale, &inverse);
  const __m256 inverse8 = _mm256_set1_ps(inverse), high = _mm256_set1_ps(levels),
               low = _mm256_set1_ps(-levels);
  for (k = 0; k + 8 <= in; k += 8) {
    const __m256 q = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + k), inverse8),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i q32 = _mm256_cvtps_epi32(_mm256_min_ps(high, _mm256_max_ps(low, q)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + k),
                     _mm_packs_epi32(_mm256_castsi256_si128(q32), _mm256_extracti128_si256(q32, 1)));
  }
  for (; k < in; ++k)
    xq[k] = static_cast<int16_t>(std::min(levels, std::max(-levels, std::nearbyint(x[k] * inverse))));
  *x_scale = scale;
}
#endif

// -DXLA_INFERENCE_QMM_SPLIT=0: one-row 4-bit products on AVX2 widen the weights as the other
// rows do (benchmarks compare).
#ifndef XLA_INFERENCE_QMM_SPLIT
#define XLA_INFERENCE_QMM_SPLIT 1
#endif

// xq [T, in] split for the AVX2 path's one-row 4-bit products (tile_nibbles_split), kept in
// `storage`; nullptr for the other paths and shapes, which need none.
const int8_t* split_x_if_used(const int16_t* xq, int64_t T, int64_t in, int64_t per_chunk,
                              std::vector<int8_t>& storage) {
#if defined(XLA_INFERENCE_QMM_AVX2) && XLA_INFERENCE_QMM_SPLIT
  if (T != 1 || per_chunk != 4) return nullptr;
  storage.resize(4 * in);
  split_row_x(xq, in, storage.data());
  return storage.data();
#else
  (void)xq, (void)T, (void)in, (void)per_chunk, (void)storage;
  return nullptr;
#endif
}

// The T rows of x [T, in] quantized for the float entries (one scale a row), vectorized where
// the build allows: the one-weight and the multi-weight entries quantize alike.
void quantize_rows(const float* x, int64_t T, int64_t in, float levels, int16_t* xq,
                   float* x_scale) {
  for (int64_t t = 0; t < T; ++t)
#ifdef XLA_INFERENCE_QMM_VNNI
    quantize_row_avx512(x + t * in, in, levels, xq + t * in, x_scale + t);
#elif defined(XLA_INFERENCE_QMM_AVX2)
    quantize_row_avx2(x + t * in, in, levels, xq + t * in, x_scale + t);
#else
    quantize_row(x + t * in, in, levels, xq + t * in, x_scale + t);
#endif
}

// One call's work items (runs of output tiles), shared out as work_items.h says.
struct Work : xla_inference::WorkItems {
  Problem p;
  std::vector<float> x_sums;
  std::vector<int32_t> zero_sums;
  std::vector<int16_t> xq;     // the float entry's quantized x
  std::vector<float> x_scale;  // and its row scales
  std::vector<int8_t> x_split;  // (split_x_if_used)
  int64_t tiles_per_item;

  void drain() {
    drain_items([this](int64_t i) {
      const int64_t begin = i * tiles_per_item;
      tiles(p, begin, std::min(begin + tiles_per_item, p.out_tiles));
    });
  }
};

// Output tiles per work item: at least 4 items per thread when the weights allow (threads
// share a busy machine unevenly), in whole blocks of 4 tiles (the side-by-side tiles of
// T = 1); with more than kMaxT rows of T, at most about 128 KiB of weights, so that a tile
// run stays in L2 from one row tile to the next. Items never change the results.
int64_t tiles_per_item(const Problem& p, int64_t threads) {
  int64_t tiles = std::max<int64_t>(4, p.out_tiles / (4 * (threads + 1)) / 4 * 4);
  if (p.T > kMaxT) tiles = std::min(tiles, std::max<int64_t>(1, (128 << 10) / p.tile_bytes()));
  return tiles;
}

// Weight bytes (times about T / 4, for the products that reuse them) each thread should get
// for waking it to pay: a pool thread takes microseconds to wake on an idle machine and far
// longer on a busy one. Measured on a shared, busy 2-core machine (medians, T = 1, int4
// g32): [1536, 576] (0.55 MB) 0.088 ms with two helper threads, 0.026 ms alone; [6144, 576]
// 0.175 ms with two, 0.145 with one; [12288, 576] alike with one or two. Builds with
// another value: -DXLA_INFERENCE_QMM_BYTES_PER_THREAD=N (benchmarks/quantized_one_row_builds.py).
#ifndef XLA_INFERENCE_QMM_BYTES_PER_THREAD
#define XLA_INFERENCE_QMM_BYTES_PER_THREAD (1 << 20)
#endif
constexpr int64_t kBytesPerThread = XLA_INFERENCE_QMM_BYTES_PER_THREAD;

// Pool threads to wake besides the calling thread (which takes items too).
int64_t helpers_for(const Problem& p, int64_t pool_threads, int64_t items) {
  const int64_t work = p.out_tiles * p.tile_bytes() * (p.T + 3) / 4;
  return std::max<int64_t>(0, std::min({pool_threads, items - 1, work / kBytesPerThread - 1}));
}

bool is_group_type(ffi::DataType type) {
  return type == ffi::DataType::F16 || type == ffi::DataType::F32;
}

// The weight operands' problem for x [T, in], or an error naming what does not fit.
ffi::Error weight_problem(int64_t T, int64_t in, const ffi::AnyBuffer& values,
                          const ffi::AnyBuffer& scales, const ffi::AnyBuffer& offsets,
                          ffi::Result<ffi::Buffer<ffi::F32>>& out, int64_t bits,
                          int64_t group_size, int64_t zero_point, Problem& p) {
  const auto vd = values.dimensions();
  const auto sd = scales.dimensions();
  const auto od = out->dimensions();
  if (bits != 4 && bits != 8)
    return ffi::Error::InvalidArgument("quantized_matmul: bits must be 4 or 8");
  const int64_t per_chunk = bits == 8 ? 2 : 4;
  const auto want_type = bits == 8 ? ffi::DataType::S8 : ffi::DataType::U8;
  if (vd.size() != 3 || sd.size() != 3 || od.size() != 2 || values.element_type() != want_type ||
      vd[2] != kChunkBytes || group_size <= 0 || group_size % per_chunk != 0 ||
      group_size > 128 || in % group_size != 0 || vd[1] * per_chunk != in || sd[0] != vd[0] ||
      sd[1] * group_size != in || sd[2] != kRows || !is_group_type(scales.element_type()) ||
      od[0] != T || od[1] != vd[0] * kRows) {
    return ffi::Error::InvalidArgument(
        "quantized_matmul: x [T, in], values [out/16, in/kc, 32] (int8 for 8 bits, uint8 for "
        "4), scales f16 or f32 [out/16, in/group_size, 16], group_size a multiple of kc and at "
        "most 128, out [T, out/16*16]");
  }
  const bool has_offsets = offsets.element_count() != 0;
  if (has_offsets && (offsets.element_count() != scales.element_count() ||
                      !is_group_type(offsets.element_type())))
    return ffi::Error::InvalidArgument(
        "quantized_matmul: offsets f16 or f32 shaped as scales, or empty");
  if (zero_point < -255 || zero_point > 255)
    return ffi::Error::InvalidArgument("quantized_matmul: zero_point in [-255, 255]");
  p = Problem{nullptr, nullptr, static_cast<const uint8_t*>(values.untyped_data()),
              scales.untyped_data(), has_offsets ? offsets.untyped_data() : nullptr,
              scales.element_type() == ffi::DataType::F16,
              has_offsets && offsets.element_type() == ffi::DataType::F16, nullptr, nullptr,
              out->typed_data(), T, in, vd[0], sd[1], group_size, zero_point, per_chunk};
  return ffi::Error::Success();
}

// A call too small to wake the pool, shared with the spare core (spare_core.h): its units
// are output tiles, each item about kSpareItemBytes of weights in whole blocks of 4 tiles
// (the side-by-side tiles of T = 1).
struct SpareTiles {
  using Problem = ::Problem;
  static constexpr int64_t kUnitFloats = kRows;
  static int64_t units(const Problem& p) { return p.out_tiles; }
  static int64_t units_per_item(const Problem& p) {
    return std::max<int64_t>(4, xla_inference::kSpareItemBytes / p.tile_bytes() / 4 * 4);
  }
  static int64_t x_rows(const Problem& p) { return p.T; }
  static float*& output(Problem& p) { return p.out; }
  static void compute(const Problem& p, int64_t begin, int64_t end) { tiles(p, begin, end); }
};

// The spare core's job for `problems`; `owner` keeps the call's quantized x and sums alive.
std::shared_ptr<xla_inference::SpareRuns<SpareTiles>> spare_tiles(
    std::shared_ptr<void> owner, const std::vector<Problem>& problems) {
  return xla_inference::SpareRuns<SpareTiles>::make(std::move(owner), problems);
}

// Runs work->p (its xq and x_scale set) over the pool and the calling thread.
void run(ffi::ThreadPool& pool, const std::shared_ptr<Work>& work) {
  Problem& p = work->p;
  if (p.T == 0 || p.out_tiles == 0) return;
  p.x_split = split_x_if_used(p.xq, p.T, p.in, p.per_chunk, work->x_split);
  if (p.offsets != nullptr || p.zero_point != 0) {
    const std::vector<int32_t> sums = group_sums(p.xq, p.T, p.in, p.group_size);
    if (p.offsets != nullptr) {
      work->x_sums.assign(sums.begin(), sums.end());
      p.x_sums = work->x_sums.data();
    }
    if (p.zero_point != 0) {
      work->zero_sums.resize(sums.size());
      for (size_t i = 0; i < sums.size(); ++i)
        work->zero_sums[i] = static_cast<int32_t>(p.zero_point) * sums[i];
      p.zero_sums = work->zero_sums.data();
    }
  }
  work->tiles_per_item = tiles_per_item(p, pool.num_threads());
  work->num_items = (p.out_tiles + work->tiles_per_item - 1) / work->tiles_per_item;
  const int64_t helpers = helpers_for(p, pool.num_threads(), work->num_items);
  if (!xla_inference::for_spare_core(p.out_tiles * p.tile_bytes() * (p.T + 3) / 4, helpers))
    return xla_inference::run_items(pool, work, helpers);
  if (work->xq.empty()) {  // the int16 entry's x is XLA's: a late helper reads a copy
    work->xq.assign(p.xq, p.xq + p.T * p.in);
    work->x_scale.assign(p.x_scale, p.x_scale + p.T);
    p.xq = work->xq.data();
    p.x_scale = work->x_scale.data();
  }
  xla_inference::SpareCore::get().run(spare_tiles(work, {p}));
}

ffi::Error QuantizedMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S16> xq,
                               ffi::Buffer<ffi::F32> x_scale, ffi::AnyBuffer values,
                               ffi::AnyBuffer scales, ffi::AnyBuffer offsets,
                               ffi::ResultBuffer<ffi::F32> out, int64_t bits,
                               int64_t group_size, int64_t zero_point) {
  const auto xd = xq.dimensions();
  if (xd.size() != 2 || x_scale.element_count() != static_cast<size_t>(xd[0]))
    return ffi::Error::InvalidArgument("quantized_matmul: xq [T, in] int16, x_scale [T]");
  auto work = std::make_shared<Work>();
  ffi::Error error =
      weight_problem(xd[0], xd[1], values, scales, offsets, out, bits, group_size, zero_point,
                     work->p);
  if (error.failure()) return error;
  work->p.xq = xq.typed_data();
  work->p.x_scale = x_scale.typed_data();
  run(pool, work);
  return ffi::Error::Success();
}

ffi::Error QuantizedMatmulFloatImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                    ffi::AnyBuffer values, ffi::AnyBuffer scales,
                                    ffi::AnyBuffer offsets, ffi::ResultBuffer<ffi::F32> out,
                                    int64_t bits, int64_t group_size, int64_t zero_point,
                                    float levels) {
  const auto xd = x.dimensions();
  if (xd.size() != 2 || !(levels >= 1.0f && levels <= 16383.0f))
    return ffi::Error::InvalidArgument("quantized_matmul: x [T, in] f32, levels in [1, 16383]");
  auto work = std::make_shared<Work>();
  ffi::Error error =
      weight_problem(xd[0], xd[1], values, scales, offsets, out, bits, group_size, zero_point,
                     work->p);
  if (error.failure()) return error;
  const int64_t T = xd[0], in = xd[1];
  work->xq.resize(T * in);
  work->x_scale.resize(T);
  quantize_rows(x.typed_data(), T, in, levels, work->xq.data(), work->x_scale.data());
  work->p.xq = work->xq.data();
  work->p.x_scale = work->x_scale.data();
  run(pool, work);
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------
// Several weights times one x in one call (a layer's q, k and v, or its gate and up): x is
// quantized once, its group sums taken once, and the work items of every weight share one
// wake-up of the pool, sized by all the weights' bytes together (the mid-size products of a
// decode step, alone below kBytesPerThread, together reach it). Each output element is
// computed by the same tiles() as the one-weight entry, so each output has its bits.
// Weight bytes per thread woken for a multi call (benchmarks/quantized_decode_step.py
// measures builds with other values: -DXLA_INFERENCE_QMM_MULTI_BYTES_PER_THREAD=N).
#ifndef XLA_INFERENCE_QMM_MULTI_BYTES_PER_THREAD
#define XLA_INFERENCE_QMM_MULTI_BYTES_PER_THREAD (1 << 20)
#endif
constexpr int64_t kMultiBytesPerThread = XLA_INFERENCE_QMM_MULTI_BYTES_PER_THREAD;

struct MultiWork : xla_inference::WorkItems {
  std::vector<Problem> problems;  // one a weight, sharing xq, x_scale and the sums
  std::vector<int64_t> first_item;  // problems[j]'s items: first_item[j] .. first_item[j+1]-1
  std::vector<int64_t> tiles_per_item;
  std::vector<float> x_sums;
  std::vector<int32_t> zero_sums;
  std::vector<int16_t> xq;
  std::vector<float> x_scale;
  std::vector<int8_t> x_split;  // (split_x_if_used: one for every weight)
  std::vector<float> x_normed;  // x after the call's RMS norm (Surroundings), when it has one

  void drain() {
    drain_items([this](int64_t i) {
      size_t j = 0;
      while (i >= first_item[j + 1]) ++j;
      const Problem& p = problems[j];
      const int64_t begin = (i - first_item[j]) * tiles_per_item[j];
      tiles(p, begin, std::min(begin + tiles_per_item[j], p.out_tiles));
    });
  }
};

// What a multi call may do around its products, in place of XLA's separate passes (a decoder
// layer's RMS norm before its q/k/v or gate/up products is four small XLA thunks, the residual
// add after its o or down product one more; benchmarks/RESULTS.md, 2026-12-05 eighth
// session): x RMS-normalized before it is quantized, and a residual added to the one output.
struct Surroundings {
  const void* norm_weight = nullptr;  // [in], f32 or bf16: x * rsqrt(mean(x^2) + eps) * weight
  bool norm_bf16 = false;
  float norm_eps = 0.0f;
  const float* residual = nullptr;  // [T, out]: out += residual (one output only)
};

inline float norm_weight_at(const Surroundings& s, int64_t k) {
  if (!s.norm_bf16) return static_cast<const float*>(s.norm_weight)[k];
  const uint32_t bits = static_cast<uint32_t>(static_cast<const uint16_t*>(s.norm_weight)[k]) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

// The rows of x [T, in] as layers/norms.rms_norm gives them for float32 x: each row times the
// reciprocal square root of its mean square plus eps, then times the weight (the same
// operations; the sum of squares in another order).
void rms_normed_rows(const float* x, int64_t T, int64_t in, const Surroundings& s, float* out) {
  for (int64_t t = 0; t < T; ++t) {
    const float* row = x + t * in;
    float squares = 0.0f;
    for (int64_t k = 0; k < in; ++k) squares += row[k] * row[k];
    const float inverse = 1.0f / std::sqrt(squares / static_cast<float>(in) + s.norm_eps);
    for (int64_t k = 0; k < in; ++k) out[t * in + k] = norm_weight_at(s, k) * (row[k] * inverse);
  }
}

// out [T, width] += residual [T, width], once every item of the product is in out: the one
// float addition XLA's add would make.
void add_residual(const float* residual, int64_t T, int64_t width, float* out) {
  for (int64_t i = 0; i < T * width; ++i) out[i] += residual[i];
}

// x [T, in] quantized once (RMS-normalized first where `around` says) and the products of
// work->problems (their weights and outputs set) shared out over the pool or the spare core;
// then the residual added where `around` has one.
ffi::Error run_multi(ffi::ThreadPool& pool, const std::shared_ptr<MultiWork>& work,
                     const float* x, int64_t T, int64_t in, int64_t bits, int64_t group_size,
                     int64_t zero_point, float levels, const Surroundings& around = {}) {
  bool any_offsets = false;
  for (const Problem& p : work->problems) any_offsets = any_offsets || p.offsets != nullptr;
  if (T == 0) return ffi::Error::Success();
  if (around.norm_weight != nullptr) {
    work->x_normed.resize(T * in);
    rms_normed_rows(x, T, in, around, work->x_normed.data());
    x = work->x_normed.data();
  }
  work->xq.resize(T * in);
  work->x_scale.resize(T);
  quantize_rows(x, T, in, levels, work->xq.data(), work->x_scale.data());
  if (any_offsets || zero_point != 0) {
    const std::vector<int32_t> sums = group_sums(work->xq.data(), T, in, group_size);
    if (any_offsets) work->x_sums.assign(sums.begin(), sums.end());
    if (zero_point != 0)
      for (const int32_t s : sums) work->zero_sums.push_back(static_cast<int32_t>(zero_point) * s);
  }
  const int8_t* x_split =
      split_x_if_used(work->xq.data(), T, in, bits == 8 ? 2 : 4, work->x_split);
  // Items of every weight; threads woken for the bytes of all of them together.
  int64_t bytes = 0;
  work->first_item.push_back(0);
  for (Problem& p : work->problems) {
    p.xq = work->xq.data();
    p.x_scale = work->x_scale.data();
    if (p.offsets != nullptr) p.x_sums = work->x_sums.data();
    if (zero_point != 0) p.zero_sums = work->zero_sums.data();
    p.x_split = x_split;
    const int64_t tiles = tiles_per_item(p, pool.num_threads());
    work->tiles_per_item.push_back(tiles);
    work->first_item.push_back(work->first_item.back() + (p.out_tiles + tiles - 1) / tiles);
    bytes += p.out_tiles * p.tile_bytes();
  }
  work->num_items = work->first_item.back();
  if (work->num_items == 0) return ffi::Error::Success();
  const int64_t load = bytes * (T + 3) / 4;
  const int64_t helpers = std::max<int64_t>(
      0, std::min({pool.num_threads(), work->num_items - 1, load / kMultiBytesPerThread - 1}));
  if (xla_inference::for_spare_core(load, helpers))
    xla_inference::SpareCore::get().run(spare_tiles(work, work->problems));
  else
    xla_inference::run_items(pool, work, helpers);
  if (around.residual != nullptr) {
    const Problem& p = work->problems[0];
    add_residual(around.residual, T, p.out_tiles * kRows, p.out);
  }
  return ffi::Error::Success();
}

// The norm weight and residual operands of a multi call (zero-size: none) as Surroundings,
// or an error naming what does not fit x [T, in] and the call's outputs.
ffi::Error surroundings(const ffi::AnyBuffer& norm_weight, float norm_eps,
                        const ffi::Buffer<ffi::F32>& residual, int64_t T, int64_t in,
                        ffi::RemainingRets& outs, Surroundings& around) {
  if (norm_weight.element_count() != 0) {
    const auto type = norm_weight.element_type();
    if (norm_weight.element_count() != static_cast<size_t>(in) ||
        (type != ffi::DataType::F32 && type != ffi::DataType::BF16) || !(norm_eps >= 0.0f))
      return ffi::Error::InvalidArgument(
          "quantized_matmul_multi: norm_weight f32 or bf16 [in] (or empty), norm_eps >= 0");
    around.norm_weight = norm_weight.untyped_data();
    around.norm_bf16 = type == ffi::DataType::BF16;
    around.norm_eps = norm_eps;
  }
  if (residual.element_count() != 0) {
    const auto rd = residual.dimensions();
    auto out = outs.get<ffi::Buffer<ffi::F32>>(0);
    if (outs.size() != 1 || !out.has_value() || (*out)->dimensions().size() != 2 ||
        rd.size() != 2 || rd[0] != T || rd[1] != (*out)->dimensions()[1])
      return ffi::Error::InvalidArgument(
          "quantized_matmul_multi: a residual [T, out/16*16] takes exactly one output");
    around.residual = residual.typed_data();
  }
  return ffi::Error::Success();
}

ffi::Error check_multi_x(const ffi::Buffer<ffi::F32>& x, float levels, size_t outs) {
  if (x.dimensions().size() != 2 || !(levels >= 1.0f && levels <= 16383.0f))
    return ffi::Error::InvalidArgument(
        "quantized_matmul_multi: x [T, in] f32, levels in [1, 16383]");
  if (outs == 0) return ffi::Error::InvalidArgument("quantized_matmul_multi: no outputs");
  return ffi::Error::Success();
}

ffi::Error MultiMatmulFloatImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                ffi::AnyBuffer norm_weight, ffi::Buffer<ffi::F32> residual,
                                ffi::RemainingArgs weights, ffi::RemainingRets outs,
                                int64_t bits, int64_t group_size, int64_t zero_point,
                                float levels, float norm_eps) {
  const size_t n = outs.size();
  if (ffi::Error error = check_multi_x(x, levels, n); error.failure()) return error;
  if (weights.size() != 3 * n)
    return ffi::Error::InvalidArgument(
        "quantized_matmul_multi: (values, scales, offsets) for each of its outputs");
  const int64_t T = x.dimensions()[0], in = x.dimensions()[1];
  Surroundings around;
  if (ffi::Error error = surroundings(norm_weight, norm_eps, residual, T, in, outs, around);
      error.failure())
    return error;
  auto work = std::make_shared<MultiWork>();
  work->problems.resize(n);
  for (size_t j = 0; j < n; ++j) {
    auto values = weights.get<ffi::AnyBuffer>(3 * j);
    auto scales = weights.get<ffi::AnyBuffer>(3 * j + 1);
    auto offsets = weights.get<ffi::AnyBuffer>(3 * j + 2);
    auto out = outs.get<ffi::Buffer<ffi::F32>>(j);
    if (!values.has_value() || !scales.has_value() || !offsets.has_value() || !out.has_value())
      return ffi::Error::InvalidArgument("quantized_matmul_multi: operands must be buffers");
    ffi::Error error = weight_problem(T, in, *values, *scales, *offsets, *out, bits, group_size,
                                      zero_point, work->problems[j]);
    if (error.failure()) return error;
  }
  return run_multi(pool, work, x.typed_data(), T, in, bits, group_size, zero_point, levels,
                   around);
}

// ---------------------------------------------------------------------------------------
// The multi entry with its weights named by address rather than passed (a decode step's
// program then takes a handful of arrays, not three a weight: each one an XLA parameter costs
// the host's jit call ~1.5-3 us, and in a server that time comes off the spare core's;
// kernels/cpu_quantized.WeightTable, benchmarks/RESULTS.md 2026-12-04 second session).
// table uint8 [rows, 8 * kTableColumns]: one row a weight, kTableColumns int64 (native byte
// order; JAX without x64 has no int64 arrays), as TableColumn names them; `rows`
// (attribute): the table row of each output's weight. The weights are the engine's
// parameters, alive and unchanged for as long as the programs that name them.
enum TableColumn : int64_t { kValues, kOutTiles, kIn, kScales, kScalesHalf, kOffsets, kOffsetsHalf,
                 kTableColumns };

ffi::Error table_problem(int64_t T, int64_t in, const int64_t* row,
                         ffi::Result<ffi::Buffer<ffi::F32>>& out, int64_t bits,
                         int64_t group_size, int64_t zero_point, Problem& p) {
  const auto od = out->dimensions();
  if ((bits != 4 && bits != 8) || group_size <= 0 || group_size > 128 ||
      group_size % (bits == 8 ? 2 : 4) != 0 || in % group_size != 0 || row[kIn] != in ||
      row[kValues] == 0 || row[kScales] == 0 || od.size() != 2 || od[0] != T ||
      od[1] != row[kOutTiles] * kRows || zero_point < -255 || zero_point > 255)
    return ffi::Error::InvalidArgument(
        "quantized_matmul_table: a table row [values, out/16, in, scales, half, offsets, half] "
        "for x [T, in], out [T, out/16*16], bits 4 or 8, group_size a multiple of kc at most "
        "128 dividing in");
  const auto address = [](int64_t a) { return reinterpret_cast<const void*>(a); };
  p = Problem{nullptr, nullptr, static_cast<const uint8_t*>(address(row[kValues])),
              address(row[kScales]), row[kOffsets] != 0 ? address(row[kOffsets]) : nullptr,
              row[kScalesHalf] != 0, row[kOffsets] != 0 && row[kOffsetsHalf] != 0, nullptr,
              nullptr, out->typed_data(), T, in, row[kOutTiles], in / group_size, group_size,
              zero_point, bits == 8 ? 2 : 4};
  return ffi::Error::Success();
}

ffi::Error MultiMatmulTableImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                ffi::Buffer<ffi::U8> table, ffi::AnyBuffer norm_weight,
                                ffi::Buffer<ffi::F32> residual, ffi::RemainingRets outs,
                                int64_t bits, int64_t group_size, int64_t zero_point,
                                float levels, ffi::Span<const int64_t> rows, float norm_eps) {
  const size_t n = outs.size();
  if (ffi::Error error = check_multi_x(x, levels, n); error.failure()) return error;
  const auto td = table.dimensions();
  if (td.size() != 2 || td[1] != 8 * kTableColumns || rows.size() != n)
    return ffi::Error::InvalidArgument(
        "quantized_matmul_table: table uint8 [rows, 56] (7 int64 a row), a row for each output");
  const int64_t T = x.dimensions()[0], in = x.dimensions()[1];
  Surroundings around;
  if (ffi::Error error = surroundings(norm_weight, norm_eps, residual, T, in, outs, around);
      error.failure())
    return error;
  auto work = std::make_shared<MultiWork>();
  work->problems.resize(n);
  for (size_t j = 0; j < n; ++j) {
    auto out = outs.get<ffi::Buffer<ffi::F32>>(j);
    if (!out.has_value() || rows[j] < 0 || rows[j] >= td[0])
      return ffi::Error::InvalidArgument("quantized_matmul_table: a row outside the table");
    int64_t row[kTableColumns];
    std::memcpy(row, table.typed_data() + rows[j] * sizeof(row), sizeof(row));
    ffi::Error error =
        table_problem(T, in, row, *out, bits, group_size, zero_point, work->problems[j]);
    if (error.failure()) return error;
  }
  return run_multi(pool, work, x.typed_data(), T, in, bits, group_size, zero_point, levels,
                   around);
}

// ---------------------------------------------------------------------------------------
// Wide steps (prefill, large batches): y[t, o] = sum_k x[t, k] * w[o, k] in bfloat16
// products summed in float32, as XLA's product on a bfloat16-dequantized weight would do,
// but dequantizing each weight once per call into a small scratch that stays in cache:
//
//   weight-only formats (levels = 0): x rounded to bfloat16, w[o, k] = bf16((q - z) *
//     scale + offset), y = sum x w;
//   int8 activations (levels > 0, at most 256, with scale_after: per-channel scales, no
//     offsets): xq as quantize_row gives them (integers, exact in bfloat16), the weight's
//     integers q - z (exact too), y = x_scale[t] * scale[o] * sum xq (q - z).
//
// Int8 activations of at most 127 levels times 8-bit weights without a zero point (W8A8)
// take the integer path instead where the CPU has AVX-512 VNNI but no AMX: vpdpbusd
// multiplies 64 byte pairs at once, twice vdpbf16ps's 32, and sums them in int32, exact.
// It wants unsigned activations: each row is stored as xq + 128 (1..255), and 128 times
// the weight row's sum comes off after (sum (xq + 128) q - 128 sum q = sum xq q). Its
// scratch holds a tile's bytes four inputs to a lane (lane r of quad k4: q[16ot + r, 4k4
// .. 4k4 + 3], the tile layout's pairs of chunks interleaved by words) and the rows' sums.
//
// The scratch of an output tile holds its weights as bfloat16 pairs, the operand layout of
// both AMX's TDPBF16PS (a B tile: row k2 = 16 pairs (w[o, 2k2], w[o, 2k2+1]), o = 0..15)
// and AVX-512's vdpbf16ps (one zmm per row k2): scratch[k2][2r + j] = bf16(w[16ot + r,
// 2k2 + j]) -- the tile layout's chunks widened, two bytes per value. Paths, chosen at run
// time (cpuid, and for AMX the kernel's permission, asked once per process): AMX bf16 tiles,
// AVX-512 bf16, or portable C++ (slow: for tests and machines without either; the callers
// use XLA's product there). The isa attribute caps the path (tests force each one).

enum WideIsa : int64_t { kWidePortable = 0, kWideAvx512Bf16 = 1, kWideAmx = 2 };

constexpr int64_t kWideK = 32;  // input elements per AMX bf16 tile row (64 bytes)

struct WideProblem {
  const uint16_t* x;         // bf16 [T_full, K_pad]: the whole row tiles (zero-padded past in)
  const uint16_t* x_tail;    // bf16 [16, K_pad]: rows T_full..T-1, zero-padded (T_full < T)
  const float* row_scale;    // [T] or nullptr (1)
  const uint8_t* values;
  const void* scales;
  const void* offsets;       // nullptr: none
  bool half_scales, half_offsets, scale_after;
  float* out;                // f32 [T, out_tiles * 16]
  int64_t T, T_pad, in, K_pad, out_tiles, groups, group_size, zero_point, per_chunk;

  int64_t tile_bytes() const { return in / per_chunk * kChunkBytes; }
  int64_t scratch_words() const { return K_pad * kRows; }  // bf16 values of one output tile
  int64_t T_full() const { return T / kRows * kRows; }
  // Row t of x (t < T_pad; rows of a row tile are K_pad apart).
  const uint16_t* row(int64_t t) const {
    return t < T_full() ? x + t * K_pad : x_tail + (t - T_full()) * K_pad;
  }
};

inline uint16_t float_to_bf16(float f) {  // round to nearest even (no NaNs here)
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  bits += 0x7FFF + ((bits >> 16) & 1);
  return static_cast<uint16_t>(bits >> 16);
}

inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// The weight value of element e (= 2r + j) of chunk row k2's pair as dequantized (scalar).
inline float wide_weight(const WideProblem& p, int64_t ot, int64_t r, int64_t k) {
  const uint8_t* w = p.values + ot * p.tile_bytes();
  int32_t q;
  if (p.per_chunk == 2) {
    q = static_cast<int8_t>(w[(k / 2) * kChunkBytes + 2 * r + (k % 2)]);
  } else {
    const uint8_t byte = w[(k / 4) * kChunkBytes + 2 * r + (k % 2)];
    q = (k % 4) < 2 ? byte & 0x0F : byte >> 4;
  }
  q -= static_cast<int32_t>(p.zero_point);
  if (p.scale_after) return static_cast<float>(q);
  const int64_t at = (ot * p.groups + k / p.group_size) * kRows + r;
  const float scale = group_value(p.scales, p.half_scales, at);
  const float offset = p.offsets != nullptr ? group_value(p.offsets, p.half_offsets, at) : 0.0f;
  return std::fma(static_cast<float>(q), scale, offset);
}

void dequantize_tile_portable(const WideProblem& p, int64_t ot, uint16_t* scratch) {
  for (int64_t k = 0; k < p.in; ++k)
    for (int64_t r = 0; r < kRows; ++r)
      scratch[(k / 2) * 2 * kRows + 2 * r + (k % 2)] = float_to_bf16(wide_weight(p, ot, r, k));
}

// The per-column factor of an output element: scale[o] (scale_after) times x_scale[t].
inline float wide_factor(const WideProblem& p, int64_t ot, int64_t r, int64_t t) {
  float f = p.row_scale != nullptr ? p.row_scale[t] : 1.0f;
  if (p.scale_after) f *= group_value(p.scales, p.half_scales, ot * p.groups * kRows + r);
  return f;
}

// Output tiles ot0..ot0+n-1 (scratch holds them, one after another) for rows t_begin..t_end-1
// of T (t_begin a multiple of 16).
void product_portable(const WideProblem& p, int64_t ot0, int64_t n, const uint16_t* scratch,
                      int64_t t_begin, int64_t t_end) {
  const int64_t width = p.out_tiles * kRows;
  for (int64_t i = 0; i < n; ++i) {
    const uint16_t* b = scratch + i * p.scratch_words();
    for (int64_t t = t_begin; t < t_end; ++t) {
      const uint16_t* x = p.row(t);
      for (int64_t r = 0; r < kRows; ++r) {
        float acc = 0.0f;
        for (int64_t k = 0; k < p.in; ++k)
          acc += bf16_to_float(x[k]) * bf16_to_float(b[(k / 2) * 2 * kRows + 2 * r + (k % 2)]);
        p.out[t * width + (ot0 + i) * kRows + r] = acc * wide_factor(p, ot0 + i, r, t);
      }
    }
  }
}

#if defined(__x86_64__)

#define XLA_INFERENCE_AVX512BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c")))
#define XLA_INFERENCE_AMX \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c,amx-tile,amx-bf16")))

XLA_INFERENCE_AVX512BF16 inline __m512 wide_group_vector(const void* a, bool half, int64_t at) {
  if (half)
    return _mm512_cvtph_ps(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(a) + at)));
  return _mm512_loadu_ps(static_cast<const float*>(a) + at);
}

// One chunk row's 32 values (value 2r + j: lo holds 0..15, hi 16..31, as int32) as
// dequantized bfloat16 pairs into `row`: bfloat16((q - z) * scale + offset) (z only when
// kZero: without a zero point the subtraction is skipped).
template <bool kZero>
XLA_INFERENCE_AVX512BF16 inline void store_wide_row(__m512i lo, __m512i hi, __m512i zero,
                                                    __m512 scale_lo, __m512 scale_hi,
                                                    __m512 offset_lo, __m512 offset_hi,
                                                    uint16_t* row) {
  if constexpr (kZero) {
    lo = _mm512_sub_epi32(lo, zero);
    hi = _mm512_sub_epi32(hi, zero);
  }
  const __m512 flo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), scale_lo, offset_lo);
  const __m512 fhi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), scale_hi, offset_hi);
  _mm512_storeu_si512(row, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(fhi, flo)));
}

inline __m128i load_half_chunk(const uint8_t* at) {
  return _mm_loadu_si128(reinterpret_cast<const __m128i*>(at));
}

// Each chunk's bytes widened straight to int32 lanes (one vpmovzxbd / vpmovsxbd per 16
// bytes, from memory): fewer shuffles than widening to words first, the shuffle port being
// what dequantizing is bound by.
template <int kBits, bool kZero>
XLA_INFERENCE_AVX512BF16 void dequantize_tile_body(const WideProblem& p, int64_t ot,
                                                   uint16_t* scratch) {
  const uint8_t* w = p.values + ot * p.tile_bytes();
  const int64_t chunks = p.group_size / p.per_chunk;
  // Lane i of a row's lower (upper) 16 values is row r = i / 2 (8 + i / 2) of the tile.
  const __m512i pick_lo = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
  const __m512i pick_hi = _mm512_add_epi32(pick_lo, _mm512_set1_epi32(8));
  const __m512i zero = _mm512_set1_epi32(static_cast<int32_t>(p.zero_point));
  const __m512i low_nibbles = _mm512_set1_epi32(0x0F);
  __m512 scale_lo = _mm512_set1_ps(1.0f), scale_hi = scale_lo;
  __m512 offset_lo = _mm512_setzero_ps(), offset_hi = offset_lo;
  for (int64_t g = 0; g < p.groups; ++g) {
    const int64_t at = (ot * p.groups + g) * kRows;
    if (!p.scale_after) {
      const __m512 s = wide_group_vector(p.scales, p.half_scales, at);
      scale_lo = _mm512_permutexvar_ps(pick_lo, s);
      scale_hi = _mm512_permutexvar_ps(pick_hi, s);
      if (p.offsets != nullptr) {
        const __m512 o = wide_group_vector(p.offsets, p.half_offsets, at);
        offset_lo = _mm512_permutexvar_ps(pick_lo, o);
        offset_hi = _mm512_permutexvar_ps(pick_hi, o);
      }
    }
    for (int64_t c = g * chunks; c < (g + 1) * chunks; ++c) {
      const uint8_t* bytes = w + c * kChunkBytes;
      if constexpr (kBits == 8) {
        store_wide_row<kZero>(_mm512_cvtepi8_epi32(load_half_chunk(bytes)),
                              _mm512_cvtepi8_epi32(load_half_chunk(bytes + 16)), zero, scale_lo,
                              scale_hi, offset_lo, offset_hi, scratch + c * 2 * kRows);
      } else {
        const __m512i lo = _mm512_cvtepu8_epi32(load_half_chunk(bytes));
        const __m512i hi = _mm512_cvtepu8_epi32(load_half_chunk(bytes + 16));
        store_wide_row<kZero>(_mm512_and_si512(lo, low_nibbles), _mm512_and_si512(hi, low_nibbles),
                              zero, scale_lo, scale_hi, offset_lo, offset_hi,
                              scratch + (2 * c) * 2 * kRows);
        store_wide_row<kZero>(_mm512_srli_epi32(lo, 4), _mm512_srli_epi32(hi, 4), zero, scale_lo,
                              scale_hi, offset_lo, offset_hi, scratch + (2 * c + 1) * 2 * kRows);
      }
    }
  }
}

XLA_INFERENCE_AVX512BF16 void dequantize_tile_avx512(const WideProblem& p, int64_t ot,
                                                     uint16_t* scratch) {
  if (p.per_chunk == 2) {
    if (p.zero_point != 0) return dequantize_tile_body<8, true>(p, ot, scratch);
    return dequantize_tile_body<8, false>(p, ot, scratch);
  }
  if (p.zero_point != 0) return dequantize_tile_body<4, true>(p, ot, scratch);
  return dequantize_tile_body<4, false>(p, ot, scratch);
}

// y tile [rows, 16] (row stride 16) times the factors into out.
XLA_INFERENCE_AVX512BF16 inline void store_wide_tile(const WideProblem& p, int64_t ot,
                                                     int64_t t0, int64_t rows, const float* y) {
  const int64_t width = p.out_tiles * kRows;
  __m512 column = _mm512_set1_ps(1.0f);
  if (p.scale_after) column = wide_group_vector(p.scales, p.half_scales, ot * p.groups * kRows);
  for (int64_t m = 0; m < rows; ++m) {
    const int64_t t = t0 + m;
    __m512 v = _mm512_mul_ps(_mm512_loadu_ps(y + m * kRows), column);
    if (p.row_scale != nullptr) v = _mm512_mul_ps(v, _mm512_set1_ps(p.row_scale[t]));
    _mm512_storeu_ps(p.out + t * width + ot * kRows, v);
  }
}

// vdpbf16ps: 2 output tiles x 8 rows of T per block, one zmm accumulator each. Rows of T
// outermost: each block of 8 rows is read once per item while the item's dequantized tiles
// (the scratch) pass under it from L1/L2.
constexpr int64_t kWideRowsAvx = 8;

XLA_INFERENCE_AVX512BF16 void product_avx512(const WideProblem& p, int64_t ot0, int64_t n,
                                             const uint16_t* scratch, int64_t t_begin,
                                             int64_t t_end) {
  const int64_t pairs = p.K_pad / 2;
  alignas(64) float y[kWideRowsAvx * kRows];
  for (int64_t t0 = t_begin; t0 < t_end; t0 += kWideRowsAvx) {  // T_pad rows exist
    const uint16_t* x = p.row(t0);  // rows t0..t0+7: one row tile
    const int64_t rows = std::min(kWideRowsAvx, t_end - t0);
    for (int64_t i = 0; i < n; i += 2) {
      const bool two = i + 1 < n;
      const uint16_t* b0 = scratch + i * p.scratch_words();
      const uint16_t* b1 = two ? b0 + p.scratch_words() : b0;
      __m512 acc0[kWideRowsAvx], acc1[kWideRowsAvx];
      for (int m = 0; m < kWideRowsAvx; ++m) acc0[m] = acc1[m] = _mm512_setzero_ps();
      for (int64_t k2 = 0; k2 < pairs; ++k2) {
        const __m512bh w0 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(b0 + k2 * 2 * kRows));
        const __m512bh w1 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(b1 + k2 * 2 * kRows));
        for (int m = 0; m < kWideRowsAvx; ++m) {
          int32_t pair;
          std::memcpy(&pair, x + m * p.K_pad + 2 * k2, sizeof(pair));
          const __m512bh a = reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair));
          acc0[m] = _mm512_dpbf16_ps(acc0[m], a, w0);
          acc1[m] = _mm512_dpbf16_ps(acc1[m], a, w1);
        }
      }
      for (int m = 0; m < kWideRowsAvx; ++m) _mm512_store_ps(y + m * kRows, acc0[m]);
      store_wide_tile(p, ot0 + i, t0, rows, y);
      if (two) {
        for (int m = 0; m < kWideRowsAvx; ++m) _mm512_store_ps(y + m * kRows, acc1[m]);
        store_wide_tile(p, ot0 + i + 1, t0, rows, y);
      }
    }
  }
}

#define XLA_INFERENCE_AVX512VNNI \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c")))

// Bytes of a tile's scratch before its rows' int32 sums: quads of 64 bytes over K_pad.
inline int64_t int8_tile_bytes(const WideProblem& p) { return p.K_pad / 4 * 64; }

// Tile ot's 8-bit weights into the scratch as vpdpbusd takes them, and each row's sum.
// Two chunks (64 bytes) hold a quad of inputs: word r of the first is (q[r, 4k4], q[r,
// 4k4+1]), word 16 + r of the second (q[r, 4k4+2], q[r, 4k4+3]); lane r takes the two.
XLA_INFERENCE_AVX512VNNI void repack_tile_int8(const WideProblem& p, int64_t ot,
                                               uint16_t* scratch) {
  const uint8_t* w = p.values + ot * p.tile_bytes();
  auto* out = reinterpret_cast<uint8_t*>(scratch);
  const __m512i words = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25,
                                         9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2,
                                         17, 1, 16, 0);
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i sums = _mm512_setzero_si512();
  const int64_t bytes = p.tile_bytes();  // an odd number of chunks ends in half a quad
  for (int64_t at = 0; at < bytes; at += 64) {
    const __mmask64 keep = bytes - at >= 64 ? ~__mmask64{0} : (__mmask64{1} << (bytes - at)) - 1;
    const __m512i quad = _mm512_permutexvar_epi16(words, _mm512_maskz_loadu_epi8(keep, w + at));
    _mm512_storeu_si512(out + at, quad);
    sums = _mm512_dpbusd_epi32(sums, ones, quad);
  }
  _mm512_storeu_si512(out + int8_tile_bytes(p), sums);
}

// quantize_row's integers plus 128, as bytes (vpdpbusd's unsigned operand; levels <= 127).
XLA_INFERENCE_AVX512VNNI void quantize_row_u8_avx512(const float* x, int64_t in, float levels,
                                                     uint8_t* row, float* row_scale) {
  float scale, inverse;
  row_scale_avx512(x, in, levels, &scale, &inverse);
  const __m512i bias = _mm512_set1_epi32(128);
  int64_t k = 0;
  for (; k + 16 <= in; k += 16)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(row + k),
                     _mm512_cvtepi32_epi8(_mm512_add_epi32(
                         _mm512_cvtps_epi32(quantized16_avx512(x + k, inverse, levels)), bias)));
  for (; k < in; ++k) row[k] = static_cast<uint8_t>(quantized(x[k], inverse, levels) + 128.0f);
  *row_scale = scale;
}

// As product_avx512, in integers: 2 output tiles x 8 rows of T per block, one int32
// accumulator each, a row's 4 bytes broadcast against a quad of the tile.
XLA_INFERENCE_AVX512VNNI void product_int8_avx512(const WideProblem& p, int64_t ot0, int64_t n,
                                                  const uint16_t* scratch, int64_t t_begin,
                                                  int64_t t_end) {
  const int64_t quads = p.K_pad / 4, stride = p.K_pad * 2;  // operand rows' bytes apart
  const int64_t tile = p.scratch_words() * 2;
  alignas(64) float y[kWideRowsAvx * kRows];
  for (int64_t t0 = t_begin; t0 < t_end; t0 += kWideRowsAvx) {
    const auto* x = reinterpret_cast<const uint8_t*>(p.row(t0));
    const int64_t rows = std::min(kWideRowsAvx, t_end - t0);
    for (int64_t i = 0; i < n; i += 2) {
      const bool two = i + 1 < n;
      const auto* b0 = reinterpret_cast<const uint8_t*>(scratch) + i * tile;
      const uint8_t* b1 = two ? b0 + tile : b0;
      __m512i acc0[kWideRowsAvx], acc1[kWideRowsAvx];
      for (int m = 0; m < kWideRowsAvx; ++m) acc0[m] = acc1[m] = _mm512_setzero_si512();
      for (int64_t k4 = 0; k4 < quads; ++k4) {
        const __m512i w0 = _mm512_loadu_si512(b0 + k4 * 64);
        const __m512i w1 = _mm512_loadu_si512(b1 + k4 * 64);
        for (int m = 0; m < kWideRowsAvx; ++m) {
          int32_t quad;
          std::memcpy(&quad, x + m * stride + 4 * k4, sizeof(quad));
          const __m512i a = _mm512_set1_epi32(quad);
          acc0[m] = _mm512_dpbusd_epi32(acc0[m], a, w0);
          acc1[m] = _mm512_dpbusd_epi32(acc1[m], a, w1);
        }
      }
      for (int h = 0; h < (two ? 2 : 1); ++h) {
        const __m512i* acc = h == 0 ? acc0 : acc1;
        const __m512i bias = _mm512_slli_epi32(
            _mm512_loadu_si512((h == 0 ? b0 : b1) + int8_tile_bytes(p)), 7);  // 128 sum q
        for (int m = 0; m < kWideRowsAvx; ++m)
          _mm512_store_ps(y + m * kRows, _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[m], bias)));
        store_wide_tile(p, ot0 + i + h, t0, rows, y);
      }
    }
  }
}

bool int8_wide_supported() {  // AVX-512 VNNI (with the AVX-512 bfloat16 path's flags)
  static const bool vnni = [] {
    unsigned eax, ebx, ecx, edx;
    return __get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) && (ecx >> 11 & 1);
  }();
  return vnni;
}

// AMX: tiles 0-3 accumulate a 2 x 2 block (2 x 16 rows of T, 2 output tiles), 4-5 hold x,
// 6-7 the weights; every tile is 16 rows of 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

XLA_INFERENCE_AMX void configure_tiles() {
  TileConfig config;
  for (int i = 0; i < 8; ++i) {
    config.colsb[i] = 64;
    config.rows[i] = 16;
  }
  _tile_loadconfig(&config);
}

XLA_INFERENCE_AMX void release_tiles() { _tile_release(); }

// Output tiles ot0..ot0+n-1 (dequantized one after another in the scratch) for every row
// of T: two row tiles of x at a time (outermost, so that x is read once per item, not once
// per pair of output tiles), under which every pair of the item's output tiles passes.
XLA_INFERENCE_AMX void product_amx(const WideProblem& p, int64_t ot0, int64_t n,
                                   const uint16_t* scratch, int64_t t_begin, int64_t t_end) {
  const int64_t blocks = p.K_pad / kWideK, x_stride = p.K_pad * 2;
  const int64_t t_tiles = (t_end + kRows - 1) / kRows;
  alignas(64) float y[4][kRows * kRows];
  asm volatile("" ::: "memory");  // the scratch is written before the tile loads read it
  for (int64_t tt = t_begin / kRows; tt < t_tiles; tt += 2) {
    const bool two_t = tt + 1 < t_tiles;
    const uint16_t* x0 = p.row(tt * kRows);
    const uint16_t* x1 = two_t ? p.row((tt + 1) * kRows) : x0;
    for (int64_t i = 0; i < n; i += 2) {
      const bool two_o = i + 1 < n;
      const uint16_t* b0 = scratch + i * p.scratch_words();
      const uint16_t* b1 = two_o ? b0 + p.scratch_words() : b0;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t kb = 0; kb < blocks; ++kb) {
        _tile_loadd(4, x0 + kb * kWideK, x_stride);
        _tile_loadd(6, b0 + kb * kWideK * kRows, 64);
        _tile_loadd(7, b1 + kb * kWideK * kRows, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        if (two_t) {
          _tile_loadd(5, x1 + kb * kWideK, x_stride);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
      }
      _tile_stored(0, y[0], 64);
      _tile_stored(1, y[1], 64);
      _tile_stored(2, y[2], 64);
      _tile_stored(3, y[3], 64);
      for (int64_t h = 0; h < (two_t ? 2 : 1); ++h) {
        const int64_t t0 = (tt + h) * kRows;
        if (t0 >= t_end) break;
        const int64_t rows = std::min(kRows, t_end - t0);
        store_wide_tile(p, ot0 + i, t0, rows, y[2 * h]);
        if (two_o) store_wide_tile(p, ot0 + i + 1, t0, rows, y[2 * h + 1]);
      }
    }
  }
}

XLA_INFERENCE_AVX512BF16 void convert_rows_avx512(const float* x, int64_t T, int64_t in,
                                                  int64_t K_pad, uint16_t* xb) {
  for (int64_t t = 0; t < T; ++t) {
    int64_t k = 0;
    for (; k + 16 <= in; k += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xb + t * K_pad + k),
                          reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_loadu_ps(x + t * in + k))));
    for (; k < in; ++k) xb[t * K_pad + k] = float_to_bf16(x[t * in + k]);
  }
}

// quantize_row vectorized, its integers (|q| <= 256: exact) written as bfloat16.
XLA_INFERENCE_AVX512BF16 void quantize_row_bf16_avx512(const float* x, int64_t in, float levels,
                                                       uint16_t* row, float* row_scale) {
  float scale, inverse;
  row_scale_avx512(x, in, levels, &scale, &inverse);
  int64_t k = 0;
  for (; k + 16 <= in; k += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(row + k),
                        reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(
                            quantized16_avx512(x + k, inverse, levels))));
  for (; k < in; ++k) row[k] = float_to_bf16(quantized(x[k], inverse, levels));
  *row_scale = scale;
}

// The best path this CPU and kernel allow (AMX needs the tile data permission, asked once).
int64_t detect_wide_isa() {
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return kWidePortable;
  const bool avx512 = (ebx >> 16 & 1) && (ebx >> 30 & 1) && (ebx >> 31 & 1) && (ebx >> 17 & 1);
  const bool amx = (edx >> 22 & 1) && (edx >> 24 & 1);
  unsigned eax1 = 0, ebx1, ecx1, edx1;
  __get_cpuid_count(7, 1, &eax1, &ebx1, &ecx1, &edx1);
  const bool bf16 = eax1 >> 5 & 1;
  // The OS must save the AVX-512 state (XCR0 bits 1, 2, 5, 6, 7).
  unsigned xcr0_lo = 0, xcr0_hi = 0;
  __get_cpuid(1, &eax, &ebx, &ecx, &edx);
  if (ecx >> 27 & 1) asm volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  if (!(avx512 && bf16 && (xcr0_lo & 0xE6) == 0xE6)) return kWidePortable;
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  if (amx && syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0)
    return kWideAmx;
  return kWideAvx512Bf16;
}

#else  // not x86-64

int64_t detect_wide_isa() { return kWidePortable; }

#endif

int64_t wide_isa() {
  static const int64_t isa = detect_wide_isa();
  return isa;
}

// Row x [in] float32 as its bfloat16 operand row [in]: rounded to bfloat16 (levels = 0), or
// quantized as quantize_row does and its integers (exact in bfloat16) taken (levels > 0).
void prepare_row(int64_t isa, const float* x, int64_t in, float levels, uint16_t* row,
                 float* row_scale) {
#if defined(__x86_64__)
  if (isa != kWidePortable) {
    if (levels > 0.0f)
      quantize_row_bf16_avx512(x, in, levels, row, row_scale);
    else
      convert_rows_avx512(x, 1, in, in, row);
    return;
  }
#endif
  if (levels > 0.0f) {
    std::vector<int16_t> xq(in);
    quantize_row(x, in, levels, xq.data(), row_scale);
    for (int64_t k = 0; k < in; ++k)  // integers of at most 256: exact in bfloat16
      row[k] = float_to_bf16(static_cast<float>(xq[k]));
  } else {
    for (int64_t k = 0; k < in; ++k) row[k] = float_to_bf16(x[k]);
  }
}

// One wide call: first its rows of x made bfloat16 operand rows (in chunks of rows, shared
// out like the tiles; none where XLA hands x over in bfloat16, the width a multiple of 32
// and the rows whole row tiles), then its work items (runs of output tiles), as Work above.
struct WideWork : xla_inference::WorkItems {
  WideProblem p;
  int64_t isa;
  const float* x_f32 = nullptr;     // the call's x, when float32
  const uint16_t* x_bf16 = nullptr;  // or bfloat16
  float levels = 0.0f;
  bool int8 = false;  // the integer path (W8A8 on AVX-512 VNNI): rows as bytes, xq + 128
  std::unique_ptr<uint16_t[]> x;  // operand rows [T_full, K_pad] unless x_bf16 is used as is
  std::vector<uint16_t> tail;     // [16, K_pad]: the rows past T_full, zero-padded
  std::vector<float> row_scale;
  int64_t rows_per_prep = 64, num_preps = 0, prep_begin = 0;
  std::atomic<int64_t> next_prep{0};
  // Items: runs of tiles_per_item output tiles times chunks of rows_per_item rows of T
  // (row chunk major: the threads share one chunk of x at a time).
  // (num_items of them, in WorkItems).
  int64_t tiles_per_item, rows_per_item, tile_runs;
  std::condition_variable rows_ready;
  int64_t prepared = 0;  // row chunks finished (under mu)

  uint16_t* operand_row(int64_t t) {
    return t < p.T_full() ? x.get() + t * p.K_pad : tail.data() + (t - p.T_full()) * p.K_pad;
  }

  // Rows prep_begin + c * rows_per_prep on (up to rows_per_prep of them).
  void prepare(int64_t c) {
    const int64_t begin = prep_begin + c * rows_per_prep;
    const int64_t end = std::min(p.T, begin + rows_per_prep);
    for (int64_t t = begin; t < end; ++t) {
      uint16_t* row = operand_row(t);
      if (x_bf16 != nullptr) {
        std::memcpy(row, x_bf16 + t * p.in, p.in * sizeof(uint16_t));
#if defined(__x86_64__)
      } else if (int8) {
        auto* bytes = reinterpret_cast<uint8_t*>(row);
        quantize_row_u8_avx512(x_f32 + t * p.in, p.in, levels, bytes, &row_scale[t]);
        std::fill(bytes + p.in, bytes + p.K_pad, uint8_t{128});  // xq = 0 past `in`
        continue;
#endif
      } else {
        prepare_row(isa, x_f32 + t * p.in, p.in, levels, row,
                    row_scale.empty() ? nullptr : &row_scale[t]);
      }
      std::fill(row + p.in, row + p.K_pad, uint16_t{0});
    }
  }

  // Item i: its tiles dequantized first, then each of its rows passes over all of them.
  void item(int64_t i, uint16_t* scratch) {
    const int64_t ot0 = i % tile_runs * tiles_per_item, t_begin = i / tile_runs * rows_per_item;
    const int64_t n = std::min(tiles_per_item, p.out_tiles - ot0);
    const int64_t t_end = std::min(p.T, t_begin + rows_per_item);
#if defined(__x86_64__)
    if (int8) {
      for (int64_t j = 0; j < n; ++j)
        repack_tile_int8(p, ot0 + j, scratch + j * p.scratch_words());
      product_int8_avx512(p, ot0, n, scratch, t_begin, t_end);
      return;
    }
    if (isa != kWidePortable) {
      for (int64_t j = 0; j < n; ++j)
        dequantize_tile_avx512(p, ot0 + j, scratch + j * p.scratch_words());
      if (isa == kWideAmx)
        product_amx(p, ot0, n, scratch, t_begin, t_end);
      else
        product_avx512(p, ot0, n, scratch, t_begin, t_end);
      return;
    }
#endif
    for (int64_t j = 0; j < n; ++j)
      dequantize_tile_portable(p, ot0 + j, scratch + j * p.scratch_words());
    product_portable(p, ot0, n, scratch, t_begin, t_end);
  }

  void prepare_rows() {
    if (num_preps == 0) return;
    int64_t finished = 0;
    for (int64_t c; (c = next_prep.fetch_add(1, std::memory_order_relaxed)) < num_preps;
         ++finished)
      prepare(c);
    // Every thread waits for every row (the mutex publishes them); a thread that took no
    // chunk only waits for those still being prepared, so this cannot deadlock.
    std::unique_lock<std::mutex> lock(mu);
    prepared += finished;
    if (prepared == num_preps) rows_ready.notify_all();
    rows_ready.wait(lock, [&] { return prepared == num_preps; });
  }

  void drain() {
    prepare_rows();
    // Zeros past `in` stay zero: only the first `in` values of each tile are written.
    std::vector<uint16_t> scratch(std::max<int64_t>(2, tiles_per_item) * p.scratch_words(), 0);
#if defined(__x86_64__)
    if (isa == kWideAmx) configure_tiles();
#endif
    drain_items([&](int64_t i) { item(i, scratch.data()); });
#if defined(__x86_64__)
    if (isa == kWideAmx) release_tiles();
#endif
  }
};

// The items of a call. Up to kWideItemRows rows, one chunk of rows and runs of at least 2
// and at most 8 output tiles, at least 4 runs a thread where the weight allows. More rows
// (a prefill): chunks of kWideItemRows rows, each item's tiles dequantized once per chunk
// (about 5% of its products' time) and as many as fit in kWideScratchBytes, so that x is
// read from memory once per tile run of a chunk, not once per pair of tiles.
constexpr int64_t kWideItemRows = 512;
constexpr int64_t kWideScratchBytes = 384 << 10;  // the item's dequantized tiles, in L2

void plan_items(WideWork& work, int64_t threads) {
  const WideProblem& p = work.p;
  if (p.T <= kWideItemRows) {
    work.rows_per_item = p.T;
    work.tiles_per_item =
        std::min<int64_t>(8, std::max<int64_t>(2, p.out_tiles / (4 * (threads + 1)) / 2 * 2));
  } else {
    work.rows_per_item = kWideItemRows;
    const int64_t fit = kWideScratchBytes / (p.scratch_words() * int64_t{sizeof(uint16_t)});
    work.tiles_per_item = std::min(p.out_tiles, std::max<int64_t>(2, fit / 2 * 2));
  }
  work.tile_runs = (p.out_tiles + work.tiles_per_item - 1) / work.tiles_per_item;
  work.num_items = work.tile_runs * ((p.T + work.rows_per_item - 1) / work.rows_per_item);
}

// x's operand rows for the call: XLA's bfloat16 x itself where it has the layout (width a
// multiple of kWideK), with the rows past the last whole row tile copied to a padded tail;
// otherwise all rows prepared (converted, quantized or copied) into a buffer.
void plan_rows(WideWork& work, int64_t T, int64_t in, int64_t K_pad) {
  const WideProblem& p = work.p;
  work.tail.assign(p.T_full() < T ? kRows * K_pad : 0, 0);
  if (work.x_bf16 != nullptr && K_pad == in) {
    work.p.x = work.x_bf16;
    work.prep_begin = p.T_full();
  } else {
    work.x.reset(new uint16_t[std::max<int64_t>(1, p.T_full() * K_pad)]);
    work.p.x = work.x.get();
  }
  work.p.x_tail = work.tail.data();
  work.rows_per_prep = std::max<int64_t>(1, (int64_t{1} << 16) / K_pad);  // ~128 KiB of rows
  work.num_preps = (T - work.prep_begin + work.rows_per_prep - 1) / work.rows_per_prep;
}

ffi::Error WideMatmulImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer values,
                          ffi::AnyBuffer scales, ffi::AnyBuffer offsets,
                          ffi::ResultBuffer<ffi::F32> out, int64_t bits, int64_t group_size,
                          int64_t zero_point, float levels, int64_t scale_after, int64_t isa) {
  const auto xd = x.dimensions();
  const bool bf16_x = x.element_type() == ffi::DataType::BF16;
  if (xd.size() != 2 || !(bf16_x || x.element_type() == ffi::DataType::F32) ||
      !(levels == 0.0f || (levels >= 1.0f && levels <= 256.0f && !bf16_x)))
    return ffi::Error::InvalidArgument(
        "quantized_matmul_wide: x [T, in] f32 or bf16, levels 0 (bfloat16 x) or in [1, 256] "
        "(f32 x)");
  Problem q;
  ffi::Error error =
      weight_problem(xd[0], xd[1], values, scales, offsets, out, bits, group_size, zero_point, q);
  if (error.failure()) return error;
  if (scale_after && q.offsets != nullptr)
    return ffi::Error::InvalidArgument("quantized_matmul_wide: scale_after takes no offsets");
  auto work = std::make_shared<WideWork>();
  const int64_t T = xd[0], in = xd[1];
  const int64_t T_pad = (T + kRows - 1) / kRows * kRows;
  const int64_t K_pad = (in + kWideK - 1) / kWideK * kWideK;
  work->isa = std::min(isa, wide_isa());
  work->levels = levels;
#if defined(__x86_64__)
  work->int8 = work->isa == kWideAvx512Bf16 && levels > 0.0f && levels <= 127.0f &&
               bits == 8 && zero_point == 0 && scale_after && int8_wide_supported();
#endif
  if (bf16_x)
    work->x_bf16 = static_cast<const uint16_t*>(x.untyped_data());
  else
    work->x_f32 = static_cast<const float*>(x.untyped_data());
  if (levels > 0.0f) work->row_scale.resize(T);
  work->p = WideProblem{nullptr, nullptr, levels > 0.0f ? work->row_scale.data() : nullptr,
                        q.values, q.scales, q.offsets, q.half_scales, q.half_offsets,
                        scale_after != 0, q.out, T, T_pad, in, K_pad, q.out_tiles, q.groups,
                        group_size, zero_point, q.per_chunk};
  if (T == 0 || q.out_tiles == 0) return ffi::Error::Success();
  plan_rows(*work, T, in, K_pad);
  plan_items(*work, pool.num_threads());
  // Wide steps are compute-heavy: every pool thread pays for its wake-up.
  const int64_t macs = T * q.out_tiles * kRows * in;
  const int64_t helpers =
      macs < (int64_t{1} << 22) ? 0 : std::min<int64_t>(pool.num_threads(), work->num_items - 1);
  xla_inference::run_items(pool, work, helpers);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(XlaInferenceQuantizedMatmul, QuantizedMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S16>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("bits")
                                  .Attr<int64_t>("group_size")
                                  .Attr<int64_t>("zero_point"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(XlaInferenceQuantizedMatmulFloat, QuantizedMatmulFloatImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("bits")
                                  .Attr<int64_t>("group_size")
                                  .Attr<int64_t>("zero_point")
                                  .Attr<float>("levels"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(XlaInferenceQuantizedMatmulMulti, MultiMatmulFloatImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<int64_t>("bits")
                                  .Attr<int64_t>("group_size")
                                  .Attr<int64_t>("zero_point")
                                  .Attr<float>("levels")
                                  .Attr<float>("norm_eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(XlaInferenceQuantizedMatmulTable, MultiMatmulTableImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingRets()
                                  .Attr<int64_t>("bits")
                                  .Attr<int64_t>("group_size")
                                  .Attr<int64_t>("zero_point")
                                  .Attr<float>("levels")
                                  .Attr<ffi::Span<const int64_t>>("rows")
                                  .Attr<float>("norm_eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(XlaInferenceQuantizedMatmulWide, WideMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("bits")
                                  .Attr<int64_t>("group_size")
                                  .Attr<int64_t>("zero_point")
                                  .Attr<float>("levels")
                                  .Attr<int64_t>("scale_after")
                                  .Attr<int64_t>("isa"));

// Whether the wide entry's W8A8 calls on the AVX-512 bfloat16 path multiply in int8 (1).
extern "C" int XlaInferenceQuantizedMatmulWideInt8() {
#if defined(__x86_64__)
  return wide_isa() >= kWideAvx512Bf16 && int8_wide_supported() ? 1 : 0;
#else
  return 0;
#endif
}

// The wide entry's best path on this CPU: 2 AMX, 1 AVX-512 bf16, 0 portable.
extern "C" int XlaInferenceQuantizedMatmulWideIsa() { return static_cast<int>(wide_isa()); }

// Whether this build took the AVX2 path (1) for its one-row products (0: VNNI or portable).
extern "C" int XlaInferenceQuantizedMatmulAvx2() {
#ifdef XLA_INFERENCE_QMM_AVX2
  return 1;
#else
  return 0;
#endif
}

// Whether this build took the AVX-512 VNNI path (1) or another (0): for tests.
extern "C" int XlaInferenceQuantizedMatmulVnni() {
#ifdef XLA_INFERENCE_QMM_VNNI
  return 1;
#else
  return 0;
#endif
}

