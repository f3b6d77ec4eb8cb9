// Each row's argmax, for XLA's CPU backend: an XLA FFI custom call (kernels/cpu_argmax.py
// builds, loads and calls it). The sampler's greedy token (sampling/sampler.row_argmax).
//
//   out[b] = the first index of row b's maximum; a NaN counts as larger than any number
//            (the row's first NaN), as jnp.argmax does.     x float32 [B, V], out int32 [B]
//
// Why: XLA's CPU backend reduces a float maximum with scalar code (its NaN rule keeps the
// reduction from vectorizing): over a 49152-token vocabulary a max alone took ~120 us, the
// argmax ~210 us, a few percent of a batch-1 decode step (benchmarks/RESULTS.md, 2026-12-05
// third session). Here a row is read twice at most, 64 bytes a load: its maximum with NaNs
// left aside and whether it holds one, then the first index of that maximum (or of the
// first NaN). NaNs are told by their bits, and the library is built without -ffast-math
// (kernels/cpu_argmax.py), which would let the compiler assume there are none.

#include <cmath>
#include <cstdint>
#include <cstring>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX512F__) && !defined(XLA_INFERENCE_ARGMAX_PORTABLE)
#include <immintrin.h>
#define XLA_INFERENCE_ARGMAX_AVX512 1
#elif defined(__AVX2__) && !defined(XLA_INFERENCE_ARGMAX_PORTABLE)
#include <immintrin.h>
#define XLA_INFERENCE_ARGMAX_AVX2 1
#endif

namespace ffi = xla::ffi;

namespace {

inline bool is_nan(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return (bits & 0x7FFFFFFFu) > 0x7F800000u;
}

// The row's maximum over its numbers (-inf where it has none), and whether it holds a NaN.
float max_of_numbers(const float* x, int64_t n, bool& has_nan) {
  float best = -INFINITY;
  int64_t i = 0;
  has_nan = false;
#if defined(XLA_INFERENCE_ARGMAX_AVX512)
  // max_ps(v, m) returns m where v is NaN; four accumulators hide the max's latency.
  __m512 m[4] = {_mm512_set1_ps(-INFINITY), _mm512_set1_ps(-INFINITY),
                 _mm512_set1_ps(-INFINITY), _mm512_set1_ps(-INFINITY)};
  __mmask16 nan = 0;
  for (; i + 64 <= n; i += 64)
    for (int j = 0; j < 4; ++j) {
      const __m512 v = _mm512_loadu_ps(x + i + 16 * j);
      nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      m[j] = _mm512_max_ps(v, m[j]);
    }
  best = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(m[0], m[1]), _mm512_max_ps(m[2], m[3])));
  has_nan = nan != 0;
#elif defined(XLA_INFERENCE_ARGMAX_AVX2)
  __m256 m[4] = {_mm256_set1_ps(-INFINITY), _mm256_set1_ps(-INFINITY),
                 _mm256_set1_ps(-INFINITY), _mm256_set1_ps(-INFINITY)};
  __m256 nan = _mm256_setzero_ps();
  for (; i + 32 <= n; i += 32)
    for (int j = 0; j < 4; ++j) {
      const __m256 v = _mm256_loadu_ps(x + i + 8 * j);
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      m[j] = _mm256_max_ps(v, m[j]);
    }
  float lanes[8];
  _mm256_storeu_ps(lanes, _mm256_max_ps(_mm256_max_ps(m[0], m[1]), _mm256_max_ps(m[2], m[3])));
  for (const float v : lanes) best = v > best ? v : best;
  has_nan = _mm256_movemask_ps(nan) != 0;
#endif
  for (; i < n; ++i) {
    if (is_nan(x[i]))
      has_nan = true;
    else if (x[i] > best)
      best = x[i];
  }
  return best;
}

int32_t first_nan(const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (is_nan(x[i])) return static_cast<int32_t>(i);
  return 0;
}

int32_t first_equal(const float* x, int64_t n, float value) {
  int64_t i = 0;
#if defined(XLA_INFERENCE_ARGMAX_AVX512)
  const __m512 target = _mm512_set1_ps(value);
  for (; i + 16 <= n; i += 16) {
    const __mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + i), target, _CMP_EQ_OQ);
    if (hit != 0) return static_cast<int32_t>(i + __builtin_ctz(hit));
  }
#elif defined(XLA_INFERENCE_ARGMAX_AVX2)
  const __m256 target = _mm256_set1_ps(value);
  for (; i + 8 <= n; i += 8) {
    const int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), target, _CMP_EQ_OQ));
    if (hit != 0) return static_cast<int32_t>(i + __builtin_ctz(hit));
  }
#endif
  for (; i < n; ++i)
    if (x[i] == value) return static_cast<int32_t>(i);
  return 0;  // (a row of NaNs only is found by first_nan)
}

int32_t argmax_row(const float* x, int64_t n) {
  bool has_nan;
  const float best = max_of_numbers(x, n, has_nan);
  return has_nan ? first_nan(x, n) : first_equal(x, n, best);
}

ffi::Error RowArgmaxImpl(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::S32> out) {
  const auto dims = x.dimensions();
  if (dims.size() != 2 || out->element_count() != static_cast<size_t>(dims[0]))
    return ffi::Error::InvalidArgument("row_argmax: x float32 [B, V], out int32 [B]");
  const int64_t B = dims[0], V = dims[1];
  for (int64_t b = 0; b < B; ++b)
    out->typed_data()[b] = V == 0 ? 0 : argmax_row(x.typed_data() + b * V, V);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(XlaInferenceRowArgmax, RowArgmaxImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

// Which path the build took: 2 AVX-512, 1 AVX2, 0 portable (tests).
extern "C" int XlaInferenceRowArgmaxPath() {
#if defined(XLA_INFERENCE_ARGMAX_AVX512)
  return 2;
#elif defined(XLA_INFERENCE_ARGMAX_AVX2)
  return 1;
#else
  return 0;
#endif
}
