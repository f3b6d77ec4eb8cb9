// Ragged paged attention for XLA's CPU backend, one query token at a time: an XLA FFI
// custom call (kernels/cpu_attention.py builds, loads and calls it).
//
// Token t (sequence row seq_ids[t], position positions[t]) attends to the keys of its row
// at positions lo..positions[t] (lo > 0 only with a sliding window), read from the paged
// cache through block_tables. Per token: every head's scores against each key (one
// contiguous [K, H] row of the cache per key), a two-pass softmax per head, then the
// weighted sum of the values. Tokens are split across threads.
//
// q [T, N, H], k_cache / v_cache [num_slots, K, H] float32; seq_ids, positions [T] int32;
// block_tables [B, max_blocks] int32; out [T, N, H] float32.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

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

struct Shapes {
  int64_t num_tokens, num_heads, num_kv_heads, head_dim, max_blocks, block_size;
  int64_t sliding_window;  // 0: none
  float scale;
};

// kHeadDim > 0: the head dim as a compile-time constant (fully unrolled products);
// 0: any head dim, s.head_dim.
template <int64_t kHeadDim>
void attend_tokens(const Shapes& s, const float* q, const float* k_cache, const float* v_cache,
                   const int32_t* seq_ids, const int32_t* positions, const int32_t* block_tables,
                   float* out, int64_t first, int64_t last) {
  const int64_t N = s.num_heads, K = s.num_kv_heads, G = N / K;
  const int64_t H = kHeadDim > 0 ? kHeadDim : s.head_dim;
  const int64_t row_width = K * H;  // floats per cache slot
  std::vector<float> qs(N * H), scores, acc(N * H);
  std::vector<int64_t> rows;
  for (int64_t t = first; t < last; ++t) {
    const int64_t pos = positions[t];
    const int32_t* table = block_tables + static_cast<int64_t>(seq_ids[t]) * s.max_blocks;
    const int64_t lo = s.sliding_window > 0 ? std::max<int64_t>(0, pos - s.sliding_window + 1) : 0;
    const int64_t n = pos + 1 - lo;
    if (n <= 0) {
      std::fill(out + t * N * H, out + (t + 1) * N * H, 0.0f);
      continue;
    }
    for (int64_t i = 0; i < N * H; ++i) qs[i] = q[t * N * H + i] * s.scale;
    scores.resize(N * n);
    rows.resize(n);  // each key's cache row (one division per page, not per key)
    for (int64_t key = lo, i = 0; key <= pos;) {
      const int64_t block = std::min(key / s.block_size, s.max_blocks - 1);
      const int64_t offset = key % s.block_size;
      const int64_t run = std::min(s.block_size - offset, pos + 1 - key);
      const int64_t first_slot = static_cast<int64_t>(table[block]) * s.block_size + offset;
      for (int64_t j = 0; j < run; ++j) rows[i + j] = (first_slot + j) * row_width;
      key += run;
      i += run;
    }
    for (int64_t i = 0; i < n; ++i) {
      const float* krow = k_cache + rows[i];
      for (int64_t h = 0; h < N; ++h) {
        const float* kv = krow + (h / G) * H;
        const float* qh = qs.data() + h * H;
        float dot = 0.0f;
        for (int64_t d = 0; d < H; ++d) dot += qh[d] * kv[d];
        scores[h * n + i] = dot;
      }
    }
    for (int64_t h = 0; h < N; ++h) {
      float* sc = scores.data() + h * n;
      float m = sc[0];
      for (int64_t i = 1; i < n; ++i) m = std::max(m, sc[i]);
      float sum = 0.0f;
      for (int64_t i = 0; i < n; ++i) {
        sc[i] = fast_exp(sc[i] - m);
        sum += sc[i];
      }
      const float inv = 1.0f / sum;
      for (int64_t i = 0; i < n; ++i) sc[i] *= inv;
    }
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t i = 0; i < n; ++i) {
      const float* vrow = v_cache + rows[i];
      for (int64_t h = 0; h < N; ++h) {
        const float w = scores[h * n + i];
        const float* vv = vrow + (h / G) * H;
        float* a = acc.data() + h * H;
        for (int64_t d = 0; d < H; ++d) a[d] += w * vv[d];
      }
    }
    std::copy(acc.begin(), acc.end(), out + t * N * H);
  }
}

ffi::Error PagedAttentionImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k_cache,
                              ffi::Buffer<ffi::F32> v_cache, ffi::Buffer<ffi::S32> seq_ids,
                              ffi::Buffer<ffi::S32> positions, ffi::Buffer<ffi::S32> block_tables,
                              ffi::ResultBuffer<ffi::F32> out, int64_t block_size, float scale,
                              int64_t sliding_window, int64_t num_threads) {
  const auto qd = q.dimensions();
  const auto kd = k_cache.dimensions();
  const auto bd = block_tables.dimensions();
  if (qd.size() != 3 || kd.size() != 3 || bd.size() != 2 || qd[1] % kd[1] != 0 ||
      qd[2] != kd[2]) {
    return ffi::Error::InvalidArgument("paged_attention: q [T, N, H], caches [S, K, H]");
  }
  Shapes s{qd[0], qd[1], kd[1], qd[2], bd[1], block_size, sliding_window, scale};
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(num_threads, s.num_tokens));
  auto attend = s.head_dim == 64    ? attend_tokens<64>
                : s.head_dim == 128 ? attend_tokens<128>
                                    : attend_tokens<0>;
  auto run = [&](int64_t i) {
    attend(s, q.typed_data(), k_cache.typed_data(), v_cache.typed_data(),
                  seq_ids.typed_data(), positions.typed_data(), block_tables.typed_data(),
                  out->typed_data(), s.num_tokens * i / threads, s.num_tokens * (i + 1) / threads);
  };
  std::vector<std::thread> workers;
  for (int64_t i = 1; i < threads; ++i) workers.emplace_back(run, i);
  run(0);
  for (auto& w : workers) w.join();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(XlaInferencePagedAttention, PagedAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("block_size")
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("sliding_window")
                                  .Attr<int64_t>("num_threads"));
