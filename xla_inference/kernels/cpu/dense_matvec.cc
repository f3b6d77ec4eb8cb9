// A few rows times a dense bfloat16 weight, for XLA's CPU backend: an XLA FFI custom call
// (kernels/cpu_dense.py builds, loads and calls it).
//
//   y[t, o] = sum_k float(x[t, k]) * float(w[o, k])      x bf16 [T, in], w bf16 [out, in]
//
// summed in float32 (each bf16 x bf16 product is exact in float32, so each step is one
// rounding, as in XLA's product of the same operands; only the order of the sums differs),
// y float32 [T, out]. Meant for a batch-1 decode step, which reads every weight byte once:
// XLA's CPU backend runs that product as a scalar loop fusion (convert, transpose, dot) at
// about a quarter of the machine's read bandwidth here (benchmarks/RESULTS.md, issue 18
// batch-1); this reads the weight where it lies, 32 values (64 bytes) a load.
//
// AVX-512 path: a 64-byte load of 32 bf16 values gives the even-indexed ones as float32 by a
// 16-bit left shift of each dword and the odd ones by masking the low half off; x is split
// into its even and odd values once per call, so each load costs two FMAs. kRowsTogether
// output rows share each x load, each row its own accumulator (independent FMA chains).
// Elsewhere a portable loop computes the same sums in the same order.
//
// Work items are runs of output rows, shared out over XLA's intra-op thread pool (the FFI's
// ThreadPool context) and the calling thread; pool threads are woken only for weights of
// kBytesPerThread or more each. Calls the pool would add at most one thread to (on two CPUs,
// all from 64 KiB of weights: a decode step's projections and its LM head) are shared with
// the spare core instead (spare_core.h: a helper thread already spinning, no wake-up, and
// never a third thread on two cores). Every output is computed by one thread in a fixed
// order, so the output does not depend on the number of threads.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

// XLA_INFERENCE_DENSE_NO_AVX512: the AVX2 path even where AVX-512 is there (for tests).
#if defined(__AVX512F__) && defined(__AVX512BW__) && !defined(XLA_INFERENCE_DENSE_PORTABLE) && \
    !defined(XLA_INFERENCE_DENSE_NO_AVX512)
#include <immintrin.h>
#define XLA_INFERENCE_DENSE_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && !defined(XLA_INFERENCE_DENSE_PORTABLE)
#include <immintrin.h>
#define XLA_INFERENCE_DENSE_AVX2 1
#endif

#include "prefetch.h"
#include "spare_core.h"
#include "work_items.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kPair = 32;          // bf16 values per 64-byte load (16 even, 16 odd)
constexpr int64_t kRowsTogether = 8;   // output rows sharing each load of x
constexpr int64_t kRowsPerItem = 64;   // output rows per work item (at least)

struct Problem {
  const uint16_t* w;  // bf16 bits [out, in]
  const float* x_even;  // [T, in_pad / 2]: x[t, 2i] as float32 (0 past in)
  const float* x_odd;   // [T, in_pad / 2]: x[t, 2i + 1]
  float* y;             // [T, out]
  int64_t T, in, out, half;  // half = in_pad / 2, in_pad = in rounded up to kPair
};

inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

#if defined(XLA_INFERENCE_DENSE_AVX512) || defined(XLA_INFERENCE_DENSE_AVX2)

// Software prefetch (prefetch.h): each 64-byte load of a row also asks for the same bytes
// of that row kPrefetchBlocks blocks of kRowsTogether rows further on, into L2 (T2): the
// next block's rows (8 x 1152 bytes for SmolLM2's [*, 576] weights) arrive while this block
// is multiplied, as the quantized one-row kernel does. Numerics unchanged (hints only).
// Measured against the earlier scheme on a 2-core AMD EPYC (Zen 4) shared at load 8-12:
// a step's products chained (benchmarks/dense_step_products.py, old-multi vs multi) 1.1-1.5x
// wall, CPU time -34%, the LM head alone 1.6-2.1x; the engine's batch-1 step
// (benchmarks/batch1_step.py --variants bf16@old bf16) 0.87-1.19x wall, CPU -2..-11%.
// The next block into L1 (T0) was slower than into L2; 2 blocks ahead no faster than 1.
// The earlier scheme (-DXLA_INFERENCE_DENSE_PREFETCH_BLOCKS=0, for benchmarks): kPrefetchRows
// rows ahead into L1 (T0), 16 rows measured 1.2-1.3x on a step's products and 1.8-3x on
// the LM head alone against none (the hardware prefetchers alone left the kernel at ~6-11
// GB/s on weights streamed from memory here; benchmarks/dense_step_products.py, load 5-6).
// -DXLA_INFERENCE_DENSE_PREFETCH_BLOCKS=N, _ROWS=N and _HINT=H build other schemes.
#ifndef XLA_INFERENCE_DENSE_PREFETCH_BLOCKS
#define XLA_INFERENCE_DENSE_PREFETCH_BLOCKS 1
#endif
#ifndef XLA_INFERENCE_DENSE_PREFETCH_ROWS
#define XLA_INFERENCE_DENSE_PREFETCH_ROWS 16
#endif
#ifndef XLA_INFERENCE_DENSE_PREFETCH_HINT
#define XLA_INFERENCE_DENSE_PREFETCH_HINT _MM_HINT_T2
#endif
constexpr int64_t kPrefetchBlocks = XLA_INFERENCE_DENSE_PREFETCH_BLOCKS;
constexpr int64_t kPrefetchRows = XLA_INFERENCE_DENSE_PREFETCH_ROWS;

// The prefetch for the load at row_at_k of a block of kR rows of `in` values.
template <int kR>
inline void prefetch_ahead(const uint16_t* row_at_k, int64_t in) {
  const int64_t row_bytes = in * int64_t{sizeof(uint16_t)};
  if constexpr (kPrefetchBlocks > 0)
    xla_inference::prefetch_blocks_ahead<XLA_INFERENCE_DENSE_PREFETCH_HINT>(
        row_at_k, kPrefetchBlocks, kR * row_bytes);
  else if constexpr (kPrefetchRows > 0)
    xla_inference::prefetch_blocks_ahead<XLA_INFERENCE_DENSE_PREFETCH_HINT>(
        row_at_k, kPrefetchRows, row_bytes);
}

#endif

#ifdef XLA_INFERENCE_DENSE_AVX512

// kR rows from o0 on, times row t of x.
template <int kR>
void rows_avx512(const Problem& p, int64_t o0, int64_t t) {
  const float* xe = p.x_even + t * p.half;
  const float* xo = p.x_odd + t * p.half;
  const uint16_t* w[kR];
  for (int r = 0; r < kR; ++r) w[r] = p.w + (o0 + r) * p.in;
  __m512 acc[kR];
  for (int r = 0; r < kR; ++r) acc[r] = _mm512_setzero_ps();
  const __m512i high_half = _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  int64_t k = 0;
  for (; k + kPair <= p.in; k += kPair) {
    const __m512 e = _mm512_loadu_ps(xe + k / 2), o = _mm512_loadu_ps(xo + k / 2);
    for (int r = 0; r < kR; ++r) {
      prefetch_ahead<kR>(w[r] + k, p.in);
      const __m512i v = _mm512_loadu_si512(w[r] + k);
      acc[r] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), e, acc[r]);
      acc[r] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(v, high_half)), o, acc[r]);
    }
  }
  if (k < p.in) {  // the last, partial load: values past `in` read as 0 (x is 0 there too)
    const __mmask32 mask = (1ull << (p.in - k)) - 1;
    const __m512 e = _mm512_loadu_ps(xe + k / 2), o = _mm512_loadu_ps(xo + k / 2);
    for (int r = 0; r < kR; ++r) {
      const __m512i v = _mm512_maskz_loadu_epi16(mask, w[r] + k);
      acc[r] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), e, acc[r]);
      acc[r] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(v, high_half)), o, acc[r]);
    }
  }
  for (int r = 0; r < kR; ++r) p.y[t * p.out + o0 + r] = _mm512_reduce_add_ps(acc[r]);
}

#endif

#ifdef XLA_INFERENCE_DENSE_AVX2

// AVX2 (no AVX-512: AMD Zen 2/3, Intel before Ice Lake): the AVX-512 path's 16 lanes as two
// 8-lane halves (lanes 0-7 from a load's first 32 bytes, 8-15 from its second), the same
// FMAs per lane, and the lanes added as the portable path adds them: the same y. Four rows
// share each load of x (their 8 sums and x's 4 vectors fit the 16 ymm registers).
constexpr int64_t kRowsTogetherAvx2 = 4;

// Lanes 0-7 (lo) and 8-15 (hi) added as row_portable adds its 16: j + 8, j + 4, j + 2, j + 1.
inline float sum_lanes(__m256 lo, __m256 hi) {
  const __m256 s8 = _mm256_add_ps(lo, hi);
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
}

// One 32-byte load (16 bf16 values, 8 pairs) times x's 8 even and 8 odd values, into acc.
inline __m256 pair_products(__m256i v, __m256 e, __m256 o, __m256 acc) {
  const __m256i high_half = _mm256_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  acc = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), e, acc);
  return _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v, high_half)), o, acc);
}

// kR rows from o0 on, times row t of x.
template <int kR>
void rows_avx2(const Problem& p, int64_t o0, int64_t t) {
  const float* xe = p.x_even + t * p.half;
  const float* xo = p.x_odd + t * p.half;
  const uint16_t* w[kR];
  for (int r = 0; r < kR; ++r) w[r] = p.w + (o0 + r) * p.in;
  __m256 lo[kR], hi[kR];
  for (int r = 0; r < kR; ++r) lo[r] = hi[r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + kPair <= p.in; k += kPair) {
    const __m256 e0 = _mm256_loadu_ps(xe + k / 2), o0v = _mm256_loadu_ps(xo + k / 2);
    const __m256 e1 = _mm256_loadu_ps(xe + k / 2 + 8), o1v = _mm256_loadu_ps(xo + k / 2 + 8);
    for (int r = 0; r < kR; ++r) {
      prefetch_ahead<kR>(w[r] + k, p.in);
      const __m256i* at = reinterpret_cast<const __m256i*>(w[r] + k);
      lo[r] = pair_products(_mm256_loadu_si256(at), e0, o0v, lo[r]);
      hi[r] = pair_products(_mm256_loadu_si256(at + 1), e1, o1v, hi[r]);
    }
  }
  if (k < p.in) {  // the last, partial load: values past `in` as 0 (x is 0 there too)
    const __m256 e0 = _mm256_loadu_ps(xe + k / 2), o0v = _mm256_loadu_ps(xo + k / 2);
    const __m256 e1 = _mm256_loadu_ps(xe + k / 2 + 8), o1v = _mm256_loadu_ps(xo + k / 2 + 8);
    for (int r = 0; r < kR; ++r) {
      alignas(32) uint16_t tail[kPair] = {};
      std::memcpy(tail, w[r] + k, (p.in - k) * sizeof(uint16_t));
      const __m256i* at = reinterpret_cast<const __m256i*>(tail);
      lo[r] = pair_products(_mm256_load_si256(at), e0, o0v, lo[r]);
      hi[r] = pair_products(_mm256_load_si256(at + 1), e1, o1v, hi[r]);
    }
  }
  for (int r = 0; r < kR; ++r) p.y[t * p.out + o0 + r] = sum_lanes(lo[r], hi[r]);
}

#endif

// The portable path: lane j of the AVX-512 accumulator is the running sum of the products
// at positions k = 32 i + 2 j (then 2 j + 1); the lanes are then added as
// _mm512_reduce_add_ps does (halves, pairwise), so both paths give the same y.
void row_portable(const Problem& p, int64_t o, int64_t t) {
  const float* xe = p.x_even + t * p.half;
  const float* xo = p.x_odd + t * p.half;
  const uint16_t* w = p.w + o * p.in;
  float lane[16] = {};
  for (int64_t k = 0; k < p.in; k += kPair)
    for (int j = 0; j < 16; ++j) {
      const int64_t at = k + 2 * j;
      const float we = at < p.in ? bf16_to_float(w[at]) : 0.0f;
      const float wo = at + 1 < p.in ? bf16_to_float(w[at + 1]) : 0.0f;
      lane[j] = __builtin_fmaf(we, xe[k / 2 + j], lane[j]);
      lane[j] = __builtin_fmaf(wo, xo[k / 2 + j], lane[j]);
    }
  for (int width = 8; width >= 1; width /= 2)
    for (int j = 0; j < width; ++j) lane[j] += lane[j + width];
  p.y[t * p.out + o] = lane[0];
}

// Output rows o_begin..o_end-1 for every row of x.
void rows(const Problem& p, int64_t o_begin, int64_t o_end) {
  for (int64_t t = 0; t < p.T; ++t) {
    int64_t o = o_begin;
#ifdef XLA_INFERENCE_DENSE_AVX512
    for (; o + kRowsTogether <= o_end; o += kRowsTogether) rows_avx512<kRowsTogether>(p, o, t);
    for (; o < o_end; ++o) rows_avx512<1>(p, o, t);
#elif defined(XLA_INFERENCE_DENSE_AVX2)
    for (; o + kRowsTogetherAvx2 <= o_end; o += kRowsTogetherAvx2)
      rows_avx2<kRowsTogetherAvx2>(p, o, t);
    for (; o < o_end; ++o) rows_avx2<1>(p, o, t);
#else
    for (; o < o_end; ++o) row_portable(p, o, t);
#endif
  }
}

// Weight bytes each woken pool thread should get for waking it to pay (microseconds on an
// idle machine, far more on a busy one). 512 KiB: SmolLM2's [1536, 576] MLP weights (1.7
// MB) are shared over two threads, as XLA's own product splits them; its [576, 576] ones
// stay on one. Not tuned on an idle machine (the load average stayed at 10-16 while this
// was written); XLA_INFERENCE_DENSE_BYTES_PER_THREAD builds another threshold (benchmarks).
#ifndef XLA_INFERENCE_DENSE_BYTES_PER_THREAD
#define XLA_INFERENCE_DENSE_BYTES_PER_THREAD (1 << 19)
#endif
constexpr int64_t kBytesPerThread = XLA_INFERENCE_DENSE_BYTES_PER_THREAD;

// A call shared with the spare core (spare_core.h): its units are output rows, each item
// about kSpareItemBytes of weights in whole runs of kRowsTogether.
struct SpareRows {
  using Problem = ::Problem;
  static constexpr int64_t kUnitFloats = 1;
  static int64_t units(const Problem& p) { return p.out; }
  static int64_t units_per_item(const Problem& p) {
    const int64_t rows = xla_inference::kSpareItemBytes / (p.in * 2) / kRowsTogether;
    return std::max<int64_t>(1, rows) * kRowsTogether;
  }
  static int64_t x_rows(const Problem& p) { return p.T; }
  static float*& output(Problem& p) { return p.y; }
  static void compute(const Problem& p, int64_t begin, int64_t end) { rows(p, begin, end); }
};

// Runs `problems` (one x, split into work's x_split, which the job keeps for a helper that
// finishes late) on the pool's `helpers` threads and the calling thread, or on the calling
// thread and the spare core where for_spare_core says so.
template <class Work>
void run_problems(ffi::ThreadPool& pool, const std::shared_ptr<Work>& work,
                  const std::vector<Problem>& problems, int64_t bytes, int64_t helpers) {
  if (xla_inference::for_spare_core(bytes, helpers))
    xla_inference::SpareCore::get().run(xla_inference::SpareRuns<SpareRows>::make(work, problems));
  else
    xla_inference::run_items(pool, work, helpers);
}

// One call's work items (runs of output rows), shared out as work_items.h says.
struct Work : xla_inference::WorkItems {
  Problem p;
  std::vector<float> x_split;  // x_even then x_odd
  int64_t rows_per_item = kRowsPerItem;

  void drain() {
    drain_items([this](int64_t i) {
      const int64_t begin = i * rows_per_item;
      rows(p, begin, std::min(begin + rows_per_item, p.out));
    });
  }
};

// x's rows split into even- and odd-indexed values as float32, zero-padded to whole loads.
void split_x(const uint16_t* x, Work& work) {
  Problem& p = work.p;
  work.x_split.assign(2 * p.T * p.half, 0.0f);
  float* even = work.x_split.data();
  float* odd = even + p.T * p.half;
  for (int64_t t = 0; t < p.T; ++t)
    for (int64_t k = 0; k < p.in; ++k)
      (k % 2 ? odd : even)[t * p.half + k / 2] = bf16_to_float(x[t * p.in + k]);
  p.x_even = even;
  p.x_odd = odd;
}

ffi::Error DenseMatvecImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x,
                           ffi::Buffer<ffi::BF16> w, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 2 || yd.size() != 2 || xd[1] != wd[1] ||
      yd[0] != xd[0] || yd[1] != wd[0])
    return ffi::Error::InvalidArgument("dense_matvec: x [T, in], w [out, in], y [T, out]");
  auto work = std::make_shared<Work>();
  Problem& p = work->p;
  p.T = xd[0];
  p.in = xd[1];
  p.out = wd[0];
  p.half = (p.in + kPair - 1) / kPair * kPair / 2;
  p.w = reinterpret_cast<const uint16_t*>(w.untyped_data());
  p.y = y->typed_data();
  if (p.T == 0 || p.out == 0) return ffi::Error::Success();
  split_x(reinterpret_cast<const uint16_t*>(x.untyped_data()), *work);
  const int64_t threads = pool.num_threads() + 1;
  // At least 4 items per thread where the rows allow (threads share a busy machine
  // unevenly), in whole runs of kRowsTogether.
  work->rows_per_item = std::max<int64_t>(
      kRowsPerItem, p.out / (4 * threads) / kRowsTogether * kRowsTogether);
  work->num_items = (p.out + work->rows_per_item - 1) / work->rows_per_item;
  const int64_t bytes = p.out * p.in * 2 * p.T;
  const int64_t helpers = std::max<int64_t>(
      0, std::min({pool.num_threads(), work->num_items - 1, bytes / kBytesPerThread - 1}));
  run_problems(pool, work, {p}, bytes, helpers);
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------
// Several weights times one x in one call (a layer's q, k and v, or its gate and up): x is
// split once, and the work items of every weight share one wake-up of the pool, sized by
// all the weights' bytes together. Each output row is computed by the same rows() as the
// one-weight entry, so each output has its bits.
struct MultiWork : xla_inference::WorkItems {
  std::vector<Problem> problems;    // one a weight, sharing x_even and x_odd
  std::vector<int64_t> first_item;  // problems[j]'s items: first_item[j] .. first_item[j+1]-1
  std::vector<int64_t> rows_per_item;
  Work x;  // only its x_split and p (T, in, half) are used

  void drain() {
    drain_items([this](int64_t i) {
      size_t j = 0;
      while (i >= first_item[j + 1]) ++j;
      const int64_t begin = (i - first_item[j]) * rows_per_item[j];
      rows(problems[j], begin, std::min(begin + rows_per_item[j], problems[j].out));
    });
  }
};

ffi::Error DenseMatvecMultiImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x,
                                ffi::RemainingArgs weights, ffi::RemainingRets outs) {
  const auto xd = x.dimensions();
  const size_t n = outs.size();
  if (xd.size() != 2 || n == 0 || weights.size() != n)
    return ffi::Error::InvalidArgument(
        "dense_matvec_multi: x [T, in] and one weight [out, in] for each output [T, out]");
  auto work = std::make_shared<MultiWork>();
  Problem& shared = work->x.p;
  shared.T = xd[0];
  shared.in = xd[1];
  shared.half = (shared.in + kPair - 1) / kPair * kPair / 2;
  const int64_t threads = pool.num_threads() + 1;
  int64_t bytes = 0;
  work->first_item.push_back(0);
  for (size_t j = 0; j < n; ++j) {
    auto w = weights.get<ffi::Buffer<ffi::BF16>>(j);
    auto y = outs.get<ffi::Buffer<ffi::F32>>(j);
    if (!w.has_value() || !y.has_value())
      return ffi::Error::InvalidArgument("dense_matvec_multi: bf16 weights, f32 outputs");
    const auto wd = w->dimensions(), yd = (*y)->dimensions();
    if (wd.size() != 2 || yd.size() != 2 || wd[1] != shared.in || yd[0] != shared.T ||
        yd[1] != wd[0])
      return ffi::Error::InvalidArgument(
          "dense_matvec_multi: x [T, in], each w [out, in], each y [T, out]");
    Problem p = shared;
    p.out = wd[0];
    p.w = reinterpret_cast<const uint16_t*>(w->untyped_data());
    p.y = (*y)->typed_data();
    work->problems.push_back(p);
    const int64_t rows_per_item = std::max<int64_t>(
        kRowsPerItem, p.out / (4 * threads) / kRowsTogether * kRowsTogether);
    work->rows_per_item.push_back(rows_per_item);
    work->first_item.push_back(work->first_item.back() +
                               (p.out + rows_per_item - 1) / rows_per_item);
    bytes += p.out * p.in * 2 * p.T;
  }
  work->num_items = work->first_item.back();
  if (shared.T == 0 || work->num_items == 0) return ffi::Error::Success();
  split_x(reinterpret_cast<const uint16_t*>(x.untyped_data()), work->x);
  for (Problem& p : work->problems) {
    p.x_even = work->x.p.x_even;
    p.x_odd = work->x.p.x_odd;
  }
  const int64_t helpers = std::max<int64_t>(
      0, std::min({pool.num_threads(), work->num_items - 1, bytes / kBytesPerThread - 1}));
  run_problems(pool, work, work->problems, bytes, helpers);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(XlaInferenceDenseMatvecMulti, DenseMatvecMultiImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .RemainingArgs()
                                  .RemainingRets());

XLA_FFI_DEFINE_HANDLER_SYMBOL(XlaInferenceDenseMatvec, DenseMatvecImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// Whether this build took the AVX-512 path (1) or the portable one (0): for tests.
extern "C" int XlaInferenceDenseMatvecAvx512() {
#ifdef XLA_INFERENCE_DENSE_AVX512
  return 1;
#else
  return 0;
#endif
}

// Whether this build took the AVX2 path (1) or another (0): for tests.
extern "C" int XlaInferenceDenseMatvecAvx2() {
#ifdef XLA_INFERENCE_DENSE_AVX2
  return 1;
#else
  return 0;
#endif
}
