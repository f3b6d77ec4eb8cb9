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
// which saves XLA's separate passes over x before the call.
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
// for weights of a megabyte or more per thread (kBytesPerThread). Every output element
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

// XLA_INFERENCE_QMM_PORTABLE: the portable path even where VNNI is there (for tests).
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && !defined(XLA_INFERENCE_QMM_PORTABLE)
#include <immintrin.h>
#define XLA_INFERENCE_QMM_VNNI 1
#endif

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

// Each output tile's weights are a short stream (a few KiB), a few side by side, and its
// scales another: asking for them ahead helps the hardware prefetcher a little (0-10%
// measured, most at T = 4). Prefetching past the end of an array is harmless.
constexpr int64_t kLineBytes = 64;
constexpr int64_t kPrefetchBytes = 1024;  // weight bytes ahead, per tile
constexpr int64_t kPrefetchGroups = 4;    // groups ahead, for scales and offsets

inline void prefetch(const void* address) {
  _mm_prefetch(static_cast<const char*>(address), _MM_HINT_T0);
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
  const uint8_t* w[kTiles];
  for (int i = 0; i < kTiles; ++i) w[i] = p.values + (ot0 + i) * tile_bytes;
  const int16_t* x[kT];
  for (int t = 0; t < kT; ++t) x[t] = p.xq + (t0 + t) * p.in;
  __m512 y[kTiles][kT];
  for (int i = 0; i < kTiles; ++i)
    for (int t = 0; t < kT; ++t) y[i][t] = _mm512_setzero_ps();
  const __m512i low_nibbles = _mm512_set1_epi16(0x0F);
  for (int64_t g = 0; g < p.groups; ++g) {
    __m512i acc[kTiles][kT];
    for (int i = 0; i < kTiles; ++i)
      for (int t = 0; t < kT; ++t) acc[i][t] = _mm512_setzero_si512();
    if (g + kPrefetchGroups < p.groups)
      for (int i = 0; i < kTiles; ++i) {
        const int64_t ahead = ((ot0 + i) * p.groups + g + kPrefetchGroups) * kRows;
        prefetch(group_address(p.scales, p.half_scales, ahead));
        if (p.offsets != nullptr) prefetch(group_address(p.offsets, p.half_offsets, ahead));
      }
    for (int64_t c = g * chunks; c < (g + 1) * chunks; ++c) {
      const int64_t k = c * p.per_chunk;
      for (int i = 0; i < kTiles; ++i) {
        if (c % (kLineBytes / kChunkBytes) == 0)
          prefetch(w[i] + c * kChunkBytes + kPrefetchBytes);
        const __m256i bytes =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[i] + c * kChunkBytes));
        if constexpr (kBits == 8) {
          const __m512i words = _mm512_cvtepi8_epi16(bytes);
          for (int t = 0; t < kT; ++t)
            acc[i][t] = _mm512_dpwssd_epi32(acc[i][t], words, broadcast_pair(x[t] + k));
        } else {
          const __m512i words = _mm512_cvtepu8_epi16(bytes);
          const __m512i low = _mm512_and_si512(words, low_nibbles);
          const __m512i high = _mm512_srli_epi16(words, 4);
          for (int t = 0; t < kT; ++t) {
            acc[i][t] = _mm512_dpwssd_epi32(acc[i][t], low, broadcast_pair(x[t] + k));
            acc[i][t] = _mm512_dpwssd_epi32(acc[i][t], high, broadcast_pair(x[t] + k + 2));
          }
        }
      }
    }
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
// (1 / x_scale)), -levels, levels).
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

// One call's work items (runs of output tiles), taken one at a time by whichever thread asks
// next; owned jointly by the call and the tasks it schedules, as in paged_attention.cc.
struct Work {
  Problem p;
  std::vector<float> x_sums;
  std::vector<int32_t> zero_sums;
  std::vector<int16_t> xq;     // the float entry's quantized x
  std::vector<float> x_scale;  // and its row scales
  int64_t tiles_per_item, num_items;
  std::atomic<int64_t> next{0};
  std::mutex mu;
  std::condition_variable all_done;
  int64_t done = 0;  // items finished (under mu)

  void drain() {
    int64_t finished = 0;
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < num_items; ++finished) {
      const int64_t begin = i * tiles_per_item;
      tiles(p, begin, std::min(begin + tiles_per_item, p.out_tiles));
    }
    if (finished == 0) return;
    // The mutex also publishes this thread's writes to out to the waiting caller.
    std::lock_guard<std::mutex> lock(mu);
    done += finished;
    if (done == num_items) all_done.notify_all();
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
// 0.175 ms with two, 0.145 with one; [12288, 576] alike with one or two.
constexpr int64_t kBytesPerThread = 1 << 20;

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

// Runs work->p (its xq and x_scale set) over the pool and the calling thread.
void run(ffi::ThreadPool& pool, const std::shared_ptr<Work>& work) {
  Problem& p = work->p;
  if (p.T == 0 || p.out_tiles == 0) return;
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
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work->drain(); });
  work->drain();
  // Every item is taken by now; wait for those that other threads are still computing.
  std::unique_lock<std::mutex> lock(work->mu);
  work->all_done.wait(lock, [&] { return work->done == work->num_items; });
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
  for (int64_t t = 0; t < T; ++t)
    quantize_row(x.typed_data() + t * in, in, levels, work->xq.data() + t * in,
                 work->x_scale.data() + t);
  work->p.xq = work->xq.data();
  work->p.x_scale = work->x_scale.data();
  run(pool, work);
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

// Whether this build took the AVX-512 VNNI path (1) or the portable one (0): for tests.
extern "C" int XlaInferenceQuantizedMatmulVnni() {
#ifdef XLA_INFERENCE_QMM_VNNI
  return 1;
#else
  return 0;
#endif
}
