// Several rows times a dense bfloat16 weight on Intel's AMX tiles, for XLA's CPU backend: an
// XLA FFI custom call (kernels/cpu_dense.py builds, loads and calls it).
//
//   y[t, o] = sum_k float(x[t, k]) * float(w[o, k])      x bf16 [T, in], w bf16 [out, in]
//
// y float32 [T, out], summed in float32 by the tiles' dot products (TDPBF16PS: each pair of
// bf16 products added in float32; bf16 denormal inputs read as 0, float32 denormal sums flush
// to 0, as the instruction defines).
//
// Why: XLA's product of a few dozen rows (a batched decode step) against SmolLM2's small
// weights runs at 130-400 GFLOP/s here, a fraction of what the tiles do; the weight is read
// once per call, so the product should run near the memory's speed instead.
//
// The product is computed transposed, y^T = w x^T: the tiles' A operand (16 rows of 32 bf16
// values, 64 bytes each) is 16 weight rows loaded where they lie (stride `in` values), so the
// weight needs no packing; B is x^T in the tiles' pair-interleaved layout
// ([k/2][t][2]), packed once per call (x is small). Each work item is a block of 32 output
// columns (two A tiles) against every row of x, 32 rows (two B tiles) at a time: four
// accumulator tiles, two A, two B (all eight). A k tail (in % 32) takes its last partial
// step from a zero-padded copy of those 32 columns; an output tail (out % 32) copies its
// rows into a zero-padded block; x is zero-padded to whole tiles when packed.
//
// Work items are shared over XLA's intra-op thread pool (work_items.h); each output is
// computed by one thread in a fixed order, so the output does not depend on the number of
// threads. Without AMX (another CPU, or the kernel refused the tile permission)
// XlaInferenceDenseMatmulAmx() says 0 and callers keep XLA's product.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define XLA_INFERENCE_DENSE_AMX 1
#endif

#include "work_items.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kTile = 16;      // rows of a tile; also the t or o columns it covers
constexpr int64_t kTileK = 32;     // bf16 values in a 64-byte tile row
constexpr int64_t kBlock = 32;     // output columns (two A tiles) or x rows (two B tiles)

// Multiply-adds (weight values x padded rows of x) each woken pool thread should get.
#ifndef XLA_INFERENCE_DENSE_MATMUL_WORK_PER_THREAD
#define XLA_INFERENCE_DENSE_MATMUL_WORK_PER_THREAD (1 << 24)
#endif
constexpr int64_t kWorkPerThread = XLA_INFERENCE_DENSE_MATMUL_WORK_PER_THREAD;

#ifdef XLA_INFERENCE_DENSE_AMX

// Linux hands out the tiles' 8 KiB register state only to a process that asks for it.
bool request_tile_permission() {
  constexpr int kArchReqXcompPerm = 0x1023;
  constexpr int kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

bool tiles_usable() {
  static const bool usable = request_tile_permission();
  return usable;
}

struct TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Every tile 16 rows x 64 bytes; loaded on each thread that runs items (a thread's config
// lives until it is released; XLA's own AMX kernels load theirs before each use).
void configure_tiles() {
  TileConfig config;
  for (int i = 0; i < 8; ++i) {
    config.colsb[i] = 64;
    config.rows[i] = kTile;
  }
  _tile_loadconfig(&config);
}

struct Problem {
  const uint16_t* w;   // bf16 bits [out, in]
  const uint16_t* xp;  // x^T packed: [t_blocks][k_steps][16 pairs][kBlock t][2]
  float* y;            // [T, out]
  int64_t T, in, out, k_steps, full_k_steps, t_blocks;
};

// x [T, in] as the B operand: for x-row block b (32 rows) and k step s (32 values), two
// tiles, each [16 k pairs][16 t][2], t 0..15 then 16..31. Zeros past T and in.
std::vector<uint16_t> pack_x(const uint16_t* x, const Problem& p) {
  std::vector<uint16_t> packed(p.t_blocks * p.k_steps * kBlock * kTileK, 0);
  const int64_t tile_values = kTile * kTileK;
  for (int64_t t = 0; t < p.T; ++t) {
    const int64_t block = t / kBlock, half = (t % kBlock) / kTile, column = t % kTile;
    const uint16_t* row = x + t * p.in;
    // Tile (block, step, half) holds row t's values 32 s.. as pairs down column `column`.
    uint16_t* first = packed.data() + (block * p.k_steps * 2 + half) * tile_values + column * 2;
    int64_t k = 0;
    for (int64_t s = 0; s < p.full_k_steps; ++s, k += kTileK) {
      uint32_t pairs[kTileK / 2];
      std::memcpy(pairs, row + k, sizeof(pairs));
      uint16_t* tile = first + s * 2 * tile_values;
      for (int64_t pair = 0; pair < kTileK / 2; ++pair)
        std::memcpy(tile + pair * kTileK, &pairs[pair], sizeof(uint32_t));
    }
    for (; k < p.in; ++k)
      first[(k / kTileK) * 2 * tile_values + ((k % kTileK) / 2) * kTileK + k % 2] = row[k];
  }
  return packed;
}

// r[i][k] -> r[k][i] for 16 rows of 16 floats. Stage h swaps the top-right and bottom-left
// h x h blocks of every 2h x 2h block (rows i and i + h exchange the lanes whose bit h
// differs from the row's); the four stages (h = 8, 4, 2, 1) together swap every bit of the
// row index with the column's: the transpose.
inline void transpose_16x16(__m512 r[kTile]) {
  for (int h = 8; h >= 1; h /= 2) {
    alignas(64) int32_t low[16], high[16];
    for (int k = 0; k < 16; ++k) {
      low[k] = (k & h) ? 16 + k - h : k;   // row i keeps its lanes without bit h, takes j's
      high[k] = (k & h) ? 16 + k : k + h;  // row j takes i's lanes with bit h, keeps its own
    }
    const __m512i low_index = _mm512_load_si512(low), high_index = _mm512_load_si512(high);
    for (int i = 0; i < 16; ++i) {
      if (i & h) continue;
      const __m512 a = r[i], b = r[i + h];
      r[i] = _mm512_permutex2var_ps(a, low_index, b);
      r[i + h] = _mm512_permutex2var_ps(a, high_index, b);
    }
  }
}

// The 32 output columns o0.. (a block) against every row of x. `a` is where the block's
// weight rows lie, `a_stride` their stride in values; `tail` the block's last, partial k step
// (32 rows x 32 values, zero-padded) when in % 32 != 0.
// `next`: the following block's weight rows (whole, stride `in`), or null: while the first
// rows of x pass, each k step also prefetches that step's 64 bytes of each of them, so the
// next block's weight is in cache when it starts (32 interleaved rows are more streams than
// the hardware prefetchers follow).
void block_amx(const Problem& p, const uint16_t* a, int64_t a_stride, const uint16_t* tail,
               int64_t o0, const uint16_t* next) {
  alignas(64) float c[4][kTile * kTile];
  const int64_t a_bytes = a_stride * 2;
  for (int64_t b = 0; b < p.t_blocks; ++b) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    const uint16_t* xb = p.xp + b * p.k_steps * kBlock * kTileK;
    for (int64_t s = 0; s < p.k_steps; ++s) {
      const uint16_t* b_tiles = xb + s * kBlock * kTileK;
      if (s < p.full_k_steps) {
        _tile_loadd(4, a + s * kTileK, a_bytes);
        _tile_loadd(5, a + kTile * a_stride + s * kTileK, a_bytes);
      } else {
        _tile_loadd(4, tail, kTileK * 2);
        _tile_loadd(5, tail + kTile * kTileK, kTileK * 2);
      }
      if (b == 0 && next != nullptr && s < p.full_k_steps)
        for (int64_t r = 0; r < kBlock; ++r)
          _mm_prefetch(reinterpret_cast<const char*>(next + r * p.in + s * kTileK), _MM_HINT_T0);
      _tile_loadd(6, b_tiles, 64);
      _tile_loadd(7, b_tiles + kTile * kTileK, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, c[0], 64);
    _tile_stored(1, c[1], 64);
    _tile_stored(2, c[2], 64);
    _tile_stored(3, c[3], 64);
    // c[2 * oh + th][i][j] = y^T[o0 + 16 oh + i][32 b + 16 th + j]: each tile transposed
    // in registers, then its rows stored as 16 consecutive outputs of one row of y.
    for (int th = 0; th < 2; ++th) {
      const int64_t t0 = b * kBlock + th * kTile;
      const int64_t valid_t = std::min<int64_t>(kTile, p.T - t0);
      if (valid_t <= 0) break;
      for (int oh = 0; oh < 2; ++oh) {
        const int64_t first_o = o0 + oh * kTile;
        const int64_t valid_o = std::min<int64_t>(kTile, p.out - first_o);
        if (valid_o <= 0) break;
        __m512 r[kTile];
        for (int i = 0; i < kTile; ++i) r[i] = _mm512_load_ps(c[2 * oh + th] + i * kTile);
        transpose_16x16(r);
        const __mmask16 mask = static_cast<__mmask16>((1u << valid_o) - 1);
        for (int64_t j = 0; j < valid_t; ++j)
          _mm512_mask_storeu_ps(p.y + (t0 + j) * p.out + first_o, mask, r[j]);
      }
    }
  }
}

void block(const Problem& p, int64_t o0) {
  const int64_t rows = std::min(kBlock, p.out - o0);
  const bool k_tail = p.full_k_steps < p.k_steps;
  const uint16_t* next = o0 + 2 * kBlock <= p.out ? p.w + (o0 + kBlock) * p.in : nullptr;
  if (rows == kBlock && !k_tail) return block_amx(p, p.w + o0 * p.in, p.in, nullptr, o0, next);
  // A partial block, or a k tail: zero-padded copies (the whole block only when partial).
  const int64_t padded_in = p.k_steps * kTileK;
  std::vector<uint16_t> tail(kBlock * kTileK, 0);
  const int64_t k_last = p.full_k_steps * kTileK;
  for (int64_t r = 0; r < rows; ++r)
    std::memcpy(tail.data() + r * kTileK, p.w + (o0 + r) * p.in + k_last,
                (p.in - k_last) * 2);
  if (rows == kBlock) return block_amx(p, p.w + o0 * p.in, p.in, tail.data(), o0, next);
  std::vector<uint16_t> whole(kBlock * padded_in, 0);
  for (int64_t r = 0; r < rows; ++r)
    std::memcpy(whole.data() + r * padded_in, p.w + (o0 + r) * p.in, p.in * 2);
  block_amx(p, whole.data(), padded_in, tail.data(), o0, nullptr);
}

struct Work : xla_inference::WorkItems {
  Problem p;
  std::vector<uint16_t> packed_x;
  int64_t blocks_per_item = 1;

  void drain() {
    bool configured = false;
    drain_items([&](int64_t i) {
      if (!configured) {
        configure_tiles();
        configured = true;
      }
      const int64_t first = i * blocks_per_item;
      const int64_t last = std::min(first + blocks_per_item, (p.out + kBlock - 1) / kBlock);
      for (int64_t b = first; b < last; ++b) block(p, b * kBlock);
    });
    if (configured) _tile_release();
  }
};

#endif  // XLA_INFERENCE_DENSE_AMX

ffi::Error DenseMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x,
                           ffi::Buffer<ffi::BF16> w, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 2 || yd.size() != 2 || xd[1] != wd[1] ||
      yd[0] != xd[0] || yd[1] != wd[0])
    return ffi::Error::InvalidArgument("dense_matmul: x [T, in], w [out, in], y [T, out]");
#ifdef XLA_INFERENCE_DENSE_AMX
  if (!tiles_usable())
    return ffi::Error::Internal("dense_matmul: the kernel has no AMX tile permission");
  auto work = std::make_shared<Work>();
  Problem& p = work->p;
  p.T = xd[0];
  p.in = xd[1];
  p.out = wd[0];
  p.w = reinterpret_cast<const uint16_t*>(w.untyped_data());
  p.y = y->typed_data();
  if (p.T == 0 || p.out == 0) return ffi::Error::Success();
  if (p.in == 0) {
    std::fill(p.y, p.y + p.T * p.out, 0.0f);
    return ffi::Error::Success();
  }
  p.k_steps = (p.in + kTileK - 1) / kTileK;
  p.full_k_steps = p.in / kTileK;
  p.t_blocks = (p.T + kBlock - 1) / kBlock;
  work->packed_x = pack_x(reinterpret_cast<const uint16_t*>(x.untyped_data()), p);
  p.xp = work->packed_x.data();
  const int64_t blocks = (p.out + kBlock - 1) / kBlock;
  const int64_t threads = pool.num_threads() + 1;
  // About 4 items per thread (threads share a busy machine unevenly).
  work->blocks_per_item = std::max<int64_t>(1, blocks / (4 * threads));
  work->num_items = (blocks + work->blocks_per_item - 1) / work->blocks_per_item;
  // Pool threads are woken only for a share of kWorkPerThread or more each (waking one costs
  // tens of microseconds on a busy machine, as long as a small product takes).
  const int64_t work_units = p.out * p.in * (p.t_blocks * kBlock);
  const int64_t helpers = std::max<int64_t>(
      0, std::min({pool.num_threads(), work->num_items - 1, work_units / kWorkPerThread - 1}));
  xla_inference::run_items(pool, work, helpers);
  return ffi::Error::Success();
#else
  (void)pool;
  return ffi::Error::Internal("dense_matmul: built without AMX");
#endif
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(XlaInferenceDenseMatmul, DenseMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// Whether this build has the AMX path and the process got the tiles' permission (1), else 0
// (the product then refuses; callers keep XLA's).
extern "C" int XlaInferenceDenseMatmulAmx() {
#ifdef XLA_INFERENCE_DENSE_AMX
  return tiles_usable() ? 1 : 0;
#else
  return 0;
#endif
}
