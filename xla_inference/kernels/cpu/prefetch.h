// Software prefetch of the next block of a one-row product's weights, shared by the one-row
// kernels (dense_matvec.cc, quantized_matmul.cc). Included by each kernel's .cc, which
// kernels/native.py compiles alone (its cache key covers this header too).
//
// Both kernels read a block of weight rows (or output tiles) side by side, each row a short
// stream, the blocks one after another in one contiguous array. The hardware prefetchers
// start each short stream anew (and stop at page ends), so every 64-byte load of a row also
// asks for the same 64 bytes of that row `kBlocks` blocks further on: the next block's
// weights arrive while this block is multiplied. Into L2 (_MM_HINT_T2) by default: the
// prefetches then hold no L1 miss buffers. Prefetching past the end of an array is harmless
// (a hint; it does not fault).

#ifndef XLA_INFERENCE_KERNELS_CPU_PREFETCH_H_
#define XLA_INFERENCE_KERNELS_CPU_PREFETCH_H_

#include <cstdint>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

namespace xla_inference {

// Asks for the bytes `blocks` blocks of `block_bytes` after `read_at` (the 64 bytes being
// read) with hint kHint (a _MM_HINT_* constant).
template <int kHint>
inline void prefetch_blocks_ahead(const void* read_at, int64_t blocks, int64_t block_bytes) {
  // (GCC's hints are an enum, clang's plain ints.)
  _mm_prefetch(static_cast<const char*>(read_at) + blocks * block_bytes,
               static_cast<decltype(_MM_HINT_T0)>(kHint));
}

}  // namespace xla_inference

#endif
#endif  // XLA_INFERENCE_KERNELS_CPU_PREFETCH_H_
