// A model of the 4-bit one-row kernel's inner loop (kernels/cpu/quantized_matmul.cc,
// block_vnni<4, 1, 4>) for benchmarks/product_call_sizes.py --c-model: the same
// instructions per 32-byte chunk (widen to words, split the nibbles, two vpdpwssd against
// broadcast pairs of x), four 16-row tiles side by side, the next block of tiles prefetched
// into L2; no scales, offsets, x quantization or output, and no XLA. It multiplies `count`
// separate weights of `kib` KiB each in turn (as a decode step's calls), with one thread,
// and with two threads pinned to CPUs 0 and 1 that each take half of every weight and meet
// at its end (a hand-off per call, as the spare core's), and reports GB/s. What the
// hardware gives such calls, to set the kernel's numbers against. A benchmark, not a test.
//
//   gcc -O2 -mavx512f -mavx512bw -mavx512vnni -pthread benchmarks/product_call_model.c
//   ./a.out KIB COUNT

#define _GNU_SOURCE
#include <immintrin.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { kTileBytes = 4608, kTiles = 4, kBlockBytes = kTiles * kTileBytes };  // in = 576

static double seconds(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

static __m512i sums[2][kTiles];  // per thread: stored, so the work is not optimized away

static inline __m512i chunk(__m512i sum, const char* bytes) {
  const __m512i words = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)bytes));
  const __m512i low = _mm512_and_si512(words, _mm512_set1_epi16(0x0F));
  sum = _mm512_dpwssd_epi32(sum, low, _mm512_set1_epi32(0x00030001));
  return _mm512_dpwssd_epi32(sum, _mm512_srli_epi16(words, 4), _mm512_set1_epi32(0x00020005));
}

// Whole blocks of tiles in bytes [0, n) of w.
static void multiply(int thread, const char* w, size_t n) {
  __m512i s[kTiles];
  for (int i = 0; i < kTiles; ++i) s[i] = sums[thread][i];
  for (size_t b = 0; b + kBlockBytes <= n; b += kBlockBytes) {
    const char* block = w + b;
    for (int c = 0; c < kTileBytes; c += 32) {
      if (c % 64 == 0)
        for (int i = 0; i < kTiles; ++i)
          _mm_prefetch(block + i * kTileBytes + c + kBlockBytes, _MM_HINT_T2);
      for (int i = 0; i < kTiles; ++i) s[i] = chunk(s[i], block + i * kTileBytes + c);
    }
  }
  for (int i = 0; i < kTiles; ++i) sums[thread][i] = s[i];
}

static char** weights;
static size_t weight_bytes;
static int count;
static _Atomic long posted, finished;  // generations: the call posted, the calls done

static size_t half(void) { return weight_bytes / 2 / kBlockBytes * kBlockBytes; }

static int by_value(const void* a, const void* b) {
  const double x = *(const double*)a, y = *(const double*)b;
  return (x > y) - (x < y);
}

enum { kRounds = 31 };

static double median(double* t) {
  qsort(t, kRounds, sizeof(double), by_value);
  return t[kRounds / 2];
}

static void pin(pthread_t thread, int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  pthread_setaffinity_np(thread, sizeof(set), &set);
}

static void* helper(void* unused) {
  (void)unused;
  for (long seen = 0;;) {
    long g;
    while ((g = atomic_load(&posted)) == seen) _mm_pause();
    if (g < 0) return NULL;
    seen = g;
    const char* w = weights[(g - 1) % count];
    multiply(1, w + half(), weight_bytes - half());
    atomic_fetch_add(&finished, 1);
  }
}

int main(int argc, char** argv) {
  if (argc != 3) return fprintf(stderr, "usage: %s KIB COUNT\n", argv[0]), 2;
  weight_bytes = (size_t)atol(argv[1]) * 1024 / kBlockBytes * kBlockBytes;
  count = atoi(argv[2]);
  weights = malloc(count * sizeof(char*));
  for (int i = 0; i < count; ++i) {
    weights[i] = aligned_alloc(64, weight_bytes);
    memset(weights[i], i, weight_bytes);
  }
  pthread_t thread;
  pthread_create(&thread, NULL, helper, NULL);
  pin(thread, 1);
  pin(pthread_self(), 0);
  double one[kRounds], two[kRounds];
  long generation = 0;
  for (int round = 0; round < kRounds; ++round) {  // the two ways take turns
    double t = seconds();
    for (int i = 0; i < count; ++i) multiply(0, weights[i], weight_bytes);
    one[round] = seconds() - t;
    t = seconds();
    for (int i = 0; i < count; ++i) {
      const long done = atomic_load(&finished);
      atomic_store(&posted, ++generation);
      multiply(0, weights[i], half());
      while (atomic_load(&finished) == done) _mm_pause();
    }
    two[round] = seconds() - t;
  }
  atomic_store(&posted, -1);
  const double total = (double)weight_bytes * count;
  printf("C model, %zu KiB x %d weights: one thread %.1f GB/s, two threads (a hand-off per "
         "weight) %.1f GB/s (medians of %d)\n",
         weight_bytes / 1024, count, total / median(one) / 1e9, total / median(two) / 1e9, kRounds);
  return 0;
}
