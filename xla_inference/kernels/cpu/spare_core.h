// The spare core: one helper thread per kernel library that shares the work of calls too
// small to wake XLA's intra-op pool (a decode step's one-row products: tens of microseconds
// each, while a pool thread asleep on an idle core of a virtual machine takes 5-40 us to
// wake, far longer at the tail). Included by the kernels' .cc files (kernels/native.py's
// cache key covers the headers beside them).
//
// Why: a batch-1 decode step's products are bound by memory, and one core of a cloud guest
// reads only part of what two read (the 2-core Sapphire Rapids guest: ~8 GB/s alone, ~16
// with two threads); the pool cannot help calls this short. The helper spins between calls
// (for kSpinMicros after its last one, then sleeps), so it starts on a call within a
// microsecond, and it runs at SCHED_IDLE: any other thread that wants its core (the engine's
// host thread preparing the next step, the pool) takes it at once. It may thus stop in the
// middle of an item; the caller then takes the item back (computes it itself) rather than
// wait, so a call never waits on a thread that is not running.
//
// The protocol: items 0..n-1; the caller takes [0, n/2) in order, the helper [n/2, n) in
// order (each a contiguous stream, which the kernels' prefetching follows); a caller done
// with its half takes the helper's untaken items from the end. Each item's state changes
// only by compare-and-swap, so each is taken once. The helper computes into the job's
// scratch, never into the outputs; the caller copies ("publishes") an item the helper
// finished, and recomputes one the helper holds past kStealAfterMicros. A helper stopped
// after the call returned finishes its item into the scratch (the job is shared-owned) and
// then finds it taken back; it reads its item's weights until then, which are the model's
// and outlive the call (only an engine torn down within that moment could free them).
// The outputs do not depend on which thread computed an item: the kernels compute each
// element by the same operations wherever they run.
//
// -DXLA_INFERENCE_SPARE_CORE=0 builds without it (benchmarks compare);
// -DXLA_INFERENCE_SPARE_CORE_IDLE=0 keeps the helper at normal priority (benchmarks);
// -DXLA_INFERENCE_SPARE_CORE_TESTING=1 too, and makes the helper pause
// SpareCore::test_delay_micros in each item it takes (tests: the caller takes items back).

#ifndef XLA_INFERENCE_KERNELS_CPU_SPARE_CORE_H_
#define XLA_INFERENCE_KERNELS_CPU_SPARE_CORE_H_

#include <pthread.h>
#include <sched.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#ifndef XLA_INFERENCE_SPARE_CORE
#define XLA_INFERENCE_SPARE_CORE 1
#endif
#ifndef XLA_INFERENCE_SPARE_CORE_TESTING
#define XLA_INFERENCE_SPARE_CORE_TESTING 0
#endif
#ifndef XLA_INFERENCE_SPARE_CORE_IDLE
#define XLA_INFERENCE_SPARE_CORE_IDLE (!XLA_INFERENCE_SPARE_CORE_TESTING)
#endif

namespace xla_inference {
// Each kernel library its own spare core, of its own build: internal linkage, for an
// inline function's static (the instance) would otherwise be one symbol across every
// library loaded (GCC's STB_GNU_UNIQUE), and its code another build's.
namespace {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#endif
}

// One call's items, as the spare core shares them. A kernel derives its job from it.
struct SpareJob {
  enum State : uint8_t { kFree, kByCaller, kByHelper, kHelperDone, kTakenBack };

  // (Only the helper's half has states: the caller alone computes items 0..helper_first-1.)
  explicit SpareJob(int64_t items)
      : num_items(items), helper_first(items / 2), state(new std::atomic<uint8_t>[items]) {
    for (int64_t i = helper_first; i < items; ++i) state[i].store(kFree, std::memory_order_relaxed);
  }
  virtual ~SpareJob() = default;

  // Item i into the outputs (the caller) or into the job's scratch (the helper).
  virtual void compute(int64_t i, bool into_scratch) = 0;
  // Item i copied from the scratch into the outputs.
  virtual void publish(int64_t i) = 0;

  bool take(int64_t i, uint8_t by) {
    uint8_t expected = kFree;
    return state[i].compare_exchange_strong(expected, by, std::memory_order_acq_rel);
  }

  const int64_t num_items;
  const int64_t helper_first;  // the helper's half: helper_first..num_items-1
  std::unique_ptr<std::atomic<uint8_t>[]> state;
};

class SpareCore {
 public:
  // Microseconds the helper spins after its last job before it sleeps: longer than the
  // gaps inside a decode step (attention, the runtime between products).
  static constexpr int64_t kSpinMicros = 2000;
  // Microseconds the caller waits on an item the helper holds before computing it itself:
  // several items' time when the helper runs (items are a few microseconds).
  static constexpr int64_t kStealAfterMicros = 30;

  // The library's spare core, started on first use; a process forked after that gets a
  // new one on its first use (pthread_atfork), the parent's helper thread not being there.
  static SpareCore& get() {
    SpareCore* core = instance().load(std::memory_order_acquire);
    if (core != nullptr) return *core;
    static std::mutex creating;
    std::lock_guard<std::mutex> lock(creating);
    static const int forks_watched = pthread_atfork(nullptr, nullptr, [] {
      instance().store(nullptr, std::memory_order_relaxed);
    });
    (void)forks_watched;
    core = instance().load(std::memory_order_acquire);
    if (core == nullptr) {
      core = new SpareCore();  // never freed: the helper thread may outlive exit
      instance().store(core, std::memory_order_release);
    }
    return *core;
  }

  // The CPUs this process may run on (read once: sharing pays with two or more).
  static int64_t cpus() {
    static const int64_t count = [] {
      cpu_set_t set;
      return sched_getaffinity(0, sizeof(set), &set) == 0 ? CPU_COUNT(&set) : 1;
    }();
    return count;
  }

  // Runs every item of `job`, the helper taking what it reaches; returns when each item's
  // result is in the outputs.
  void run(const std::shared_ptr<SpareJob>& job) {
    post(job);
    SpareJob& j = *job;
    for (int64_t i = 0; i < j.helper_first; ++i) j.compute(i, false);  // the helper's not
    // The helper's half: whatever it has not reached, from the end, then what it holds.
    int64_t i = j.num_items - 1;
    for (; i >= j.helper_first && j.take(i, SpareJob::kByCaller); --i) j.compute(i, false);
    for (; i >= j.helper_first; --i) settle(j, i);
  }

 private:
  static std::atomic<SpareCore*>& instance() {
    static std::atomic<SpareCore*> core{nullptr};
    return core;
  }

  SpareCore() { std::thread([this] { loop(); }).detach(); }

  void post(const std::shared_ptr<SpareJob>& job) {
    bool asleep;
    {
      std::lock_guard<std::mutex> lock(mu_);
      posted_ = job;
      generation_.fetch_add(1, std::memory_order_release);
      asleep = asleep_;
    }
    if (asleep) wake_.notify_one();
  }

  // Item i of the helper's half, which the helper took (the caller could not): published
  // if the helper finished it, computed by the caller if the helper holds it too long.
  void settle(SpareJob& j, int64_t i) {
    const auto deadline =
        std::chrono::steady_clock::now() + std::chrono::microseconds(kStealAfterMicros);
    for (;;) {
      uint8_t s = j.state[i].load(std::memory_order_acquire);
      if (s == SpareJob::kHelperDone) return j.publish(i);
      if (std::chrono::steady_clock::now() >= deadline &&
          j.state[i].compare_exchange_strong(s, SpareJob::kTakenBack,
                                             std::memory_order_acq_rel)) {
        counts_.taken_back.fetch_add(1, std::memory_order_relaxed);
        return j.compute(i, false);
      }
      cpu_relax();
    }
  }

  void loop() {
    sched_param param{};
    if (XLA_INFERENCE_SPARE_CORE_IDLE)
      pthread_setschedparam(pthread_self(), SCHED_IDLE, &param);  // best effort
    uint64_t seen = 0;
    for (;;) {
      wait_for_job(seen);
      std::shared_ptr<SpareJob> job;
      {
        std::lock_guard<std::mutex> lock(mu_);
        job = posted_;
        seen = generation_.load(std::memory_order_relaxed);
      }
      for (int64_t i = job->helper_first; i < job->num_items; ++i) {
        if (!job->take(i, SpareJob::kByHelper)) break;  // the caller took the rest
        if (XLA_INFERENCE_SPARE_CORE_TESTING && test_delay_micros.load() > 0)
          std::this_thread::sleep_for(std::chrono::microseconds(test_delay_micros.load()));
        job->compute(i, true);
        counts_.by_helper.fetch_add(1, std::memory_order_relaxed);
        uint8_t held = SpareJob::kByHelper;
        job->state[i].compare_exchange_strong(held, SpareJob::kHelperDone,
                                              std::memory_order_acq_rel);
      }
    }
  }

  // Returns once a generation after `seen` is posted: spinning for kSpinMicros, then asleep.
  void wait_for_job(uint64_t seen) {
    const auto spin_until =
        std::chrono::steady_clock::now() + std::chrono::microseconds(kSpinMicros);
    for (int64_t k = 1; generation_.load(std::memory_order_acquire) == seen; ++k) {
      cpu_relax();  // (a pause: ~40 ns on Skylake and later, so a job is seen at once)
      if (k % 256 != 0 || std::chrono::steady_clock::now() < spin_until) continue;
      std::unique_lock<std::mutex> lock(mu_);
      asleep_ = true;
      wake_.wait(lock, [&] { return generation_.load(std::memory_order_relaxed) != seen; });
      asleep_ = false;
    }
  }

  // Items the helper finished and items taken back from it, since the library was loaded
  // (tests read them; on a line of their own, which the helper alone writes as it runs).
  struct alignas(64) Counts {
    std::atomic<int64_t> by_helper{0}, taken_back{0};
  };

 public:
  std::atomic<int64_t> test_delay_micros{0};  // (XLA_INFERENCE_SPARE_CORE_TESTING builds)
  int64_t items_by_helper() const { return counts_.by_helper.load(std::memory_order_relaxed); }
  int64_t items_taken_back() const { return counts_.taken_back.load(std::memory_order_relaxed); }

 private:
  Counts counts_;
  std::mutex mu_;
  std::condition_variable wake_;
  std::shared_ptr<SpareJob> posted_;  // under mu_
  std::atomic<uint64_t> generation_{0};
  bool asleep_ = false;  // under mu_
};

}  // namespace
}  // namespace xla_inference

#endif  // XLA_INFERENCE_KERNELS_CPU_SPARE_CORE_H_
