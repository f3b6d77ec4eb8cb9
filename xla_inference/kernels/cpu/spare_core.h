// The spare core: one helper thread per kernel library, so one in the process
// (kernels/native.py links the kernels that use it into one library, SPARE_CORE_KERNELS:
// the one-row bfloat16 and quantized products, decode attention), that shares the work of
// calls too small to wake XLA's intra-op pool (a decode step's one-row products and its
// attention: tens of microseconds each, while a pool thread asleep on an idle core of a
// virtual machine takes 5-40 us to wake, far longer at the tail). Included by the kernels'
// .cc files (kernels/native.py's cache key covers the headers beside them).
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
// then finds it taken back; it reads its item's weights (or KV cache) until then, which are
// the model's and outlive the call (only an engine torn down within that moment could free
// them); a job copies whatever else of the call's it reads (x, q, a page table).
// The outputs do not depend on which thread computed an item: the kernels compute each
// element by the same operations wherever they run.
//
// Linux places a thread that wakes on a CPU that runs only SCHED_IDLE threads as if that CPU
// were idle, so the thread running XLA's program often lands on the helper's CPU, and the
// helper, preempted there, waits for the kernel's periodic balancing (milliseconds) while the
// other CPU may sit idle: calls then run on one thread. So the helper says on which CPU it
// runs (at each job, and every 256 spins), and a caller that finds itself on that CPU
// moves the helper off it (steer_helper: the helper's CPUs become the process's others),
// where it runs at once if that CPU is idle, or as soon as what runs there sleeps. Measured
// (benchmarks/RESULTS.md, 2026-12-05 seventh session): a served GGUF token 4.80 -> 4.56 ms.
//
// -DXLA_INFERENCE_SPARE_CORE=0 builds without it (benchmarks compare);
// -DXLA_INFERENCE_SPARE_CORE_IDLE=0 keeps the helper at normal priority (benchmarks);
// -DXLA_INFERENCE_SPARE_CORE_TESTING=1 too, and makes the helper pause
// SpareCore::test_delay_micros in each item it takes (tests: the caller takes items back).

#ifndef XLA_INFERENCE_KERNELS_CPU_SPARE_CORE_H_
#define XLA_INFERENCE_KERNELS_CPU_SPARE_CORE_H_

#include <pthread.h>
#include <sched.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

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

// One spare core a library, shared by the kernels linked into it (kernels/native.py's
// SPARE_CORE_KERNELS: one helper thread in the process), and each build its own: hidden
// visibility, for an inline function's static (the instance) of default visibility would be
// one symbol across every library loaded (GCC's STB_GNU_UNIQUE), and its code another
// build's. The functions Python calls are spare_core.cc's, which each such library links.
namespace xla_inference __attribute__((visibility("hidden"))) {

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
    steer_helper();
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

  // (pthread_create, not std::thread: a std::thread of a lambda instantiates std's
  // templates as weak symbols of default visibility, which a library could share.)
  // No thread (pthread_create failed): every call's caller takes all its items itself.
  SpareCore() {
    pthread_t thread;
    const int failed = pthread_create(&thread, nullptr, [](void* core) -> void* {
      static_cast<SpareCore*>(core)->loop();
      return nullptr;
    }, this);
    if (!failed) pthread_detach(thread);
  }

  // The helper moved off the caller's CPU when it last ran there (the header's comment): its
  // CPUs become those the process was allowed when the helper started, less the caller's.
  // A helper that has moved since without saying so yet only loses a CPU it was not on.
  void steer_helper() {
#if defined(__linux__)
    const int cpu = sched_getcpu();
    if (cpu < 0 || cpu >= CPU_SETSIZE || cpu != helper_cpu_.load(std::memory_order_relaxed))
      return;
    const pid_t helper = helper_tid_.load(std::memory_order_acquire);
    if (helper <= 0) return;
    cpu_set_t others = helper_cpus_;
    CPU_CLR(cpu, &others);
    if (CPU_COUNT(&others) == 0) return;
    helper_cpu_.store(-1, std::memory_order_relaxed);  // until the helper says again
    sched_setaffinity(helper, sizeof(others), &others);  // best effort
#endif
  }

  // The helper's CPU for steer_helper (sched_getcpu: a vDSO call of a few nanoseconds).
  void say_where_helper_runs() {
#if defined(__linux__)
    helper_cpu_.store(sched_getcpu(), std::memory_order_relaxed);
#endif
  }

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
    pthread_setname_np(pthread_self(), "xla-spare-core");  // (seen in top -H, and by tests)
#if defined(__linux__)
    CPU_ZERO(&helper_cpus_);
    sched_getaffinity(0, sizeof(helper_cpus_), &helper_cpus_);
    helper_tid_.store(static_cast<pid_t>(syscall(SYS_gettid)), std::memory_order_release);
#endif
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
      say_where_helper_runs();
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
      if (k % 256 != 0) continue;
      say_where_helper_runs();
      if (std::chrono::steady_clock::now() < spin_until) continue;
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
  std::atomic<int> helper_cpu_{-1};  // where the helper last said it runs (-1: unknown)
#if defined(__linux__)
  std::atomic<pid_t> helper_tid_{0};  // its thread id, once it runs (0 before)
  cpu_set_t helper_cpus_;  // the CPUs it was allowed at its start (written before helper_tid_)
#endif
};

// ---------------------------------------------------------------------------------------
// What the kernels share: when a call goes to the spare core, and its job over runs of
// output units (a kernel's output rows, or tiles of them).

// envs.spare_core_enabled() (XlaInferenceUseSpareCore, when the library is loaded).
inline std::atomic<bool> spare_core_wanted{XLA_INFERENCE_SPARE_CORE != 0};

// Bytes a call reads (weights, times about T / 4 for the quantized kernel; keys and values
// for attention) from which a call the pool does not take is shared with the spare core:
// below it, an item or two, not worth the hand-over.
#ifndef XLA_INFERENCE_SPARE_MIN_BYTES
#define XLA_INFERENCE_SPARE_MIN_BYTES (64 << 10)
#endif
constexpr int64_t kSpareMinBytes = XLA_INFERENCE_SPARE_MIN_BYTES;

// Weight bytes of a spare-core item: a few microseconds' reading, so that the caller's
// patience with the helper (SpareCore::kStealAfterMicros) is several items' time, and the
// two threads finish together.
constexpr int64_t kSpareItemBytes = 32 << 10;

// Whether a call reading `load` bytes, for which `pool_helpers` pool threads would be
// woken, goes to the spare core instead: when the pool would add at most one thread on the
// CPUs there are (the spare core adds one without a wake-up; on two cores the pool's two
// threads and the caller would be three).
inline bool for_spare_core(int64_t load, int64_t pool_helpers) {
  return spare_core_wanted.load(std::memory_order_relaxed) && load >= kSpareMinBytes &&
         std::min(pool_helpers, SpareCore::cpus() - 1) <= 1 && SpareCore::cpus() >= 2;
}

// A spare-core job over one or more problems (weights times the same x), each a run of
// Kernel::units(p) output units: item i is units [begin, end) of one problem. The helper's
// items go to a scratch copy of that problem's outputs, which publish() copies into them.
// `owner` keeps the call's own buffers (x as the kernel reads it) alive for a helper that
// finishes late. Kernel gives, for its Problem:
//   units(p), units_per_item(p), x_rows(p) (rows of x), kUnitFloats (floats per unit and row:
//   the outputs are [rows, units * kUnitFloats]), output(p) (a reference to its output
//   pointer), compute(p, begin, end) (units [begin, end) into output(p)).
template <class Kernel>
struct SpareRuns : SpareJob {
  using Problem = typename Kernel::Problem;

  struct Part {
    Problem p, in_scratch;  // the same problem, writing into the outputs or the scratch
    std::unique_ptr<float[]> scratch;
    int64_t first_item, units_per_item;
  };

  SpareRuns(std::shared_ptr<void> owner, std::vector<Part> parts, int64_t items)
      : SpareJob(items), owner(std::move(owner)), parts(std::move(parts)) {}

  static std::shared_ptr<SpareRuns> make(std::shared_ptr<void> owner,
                                         const std::vector<Problem>& problems) {
    std::vector<Part> parts;
    int64_t items = 0;
    for (const Problem& p : problems) {
      const int64_t per_item = Kernel::units_per_item(p);
      parts.push_back(Part{p, p, std::unique_ptr<float[]>(new float[width(p) * Kernel::x_rows(p)]),
                           items, per_item});
      Kernel::output(parts.back().in_scratch) = parts.back().scratch.get();
      items += (Kernel::units(p) + per_item - 1) / per_item;
    }
    return std::make_shared<SpareRuns>(std::move(owner), std::move(parts), items);
  }

  void compute(int64_t i, bool into_scratch) override {
    int64_t begin, end;
    const Part& part = locate(i, begin, end);
    Kernel::compute(into_scratch ? part.in_scratch : part.p, begin, end);
  }

  void publish(int64_t i) override {
    int64_t begin, end;
    Part& part = locate(i, begin, end);
    const int64_t row = width(part.p), at = begin * Kernel::kUnitFloats;
    for (int64_t t = 0; t < Kernel::x_rows(part.p); ++t)
      std::memcpy(Kernel::output(part.p) + t * row + at, part.scratch.get() + t * row + at,
                  (end - begin) * Kernel::kUnitFloats * sizeof(float));
  }

  static int64_t width(const Problem& p) { return Kernel::units(p) * Kernel::kUnitFloats; }

  // Item i's problem and its units [begin, end).
  Part& locate(int64_t i, int64_t& begin, int64_t& end) {
    size_t j = 0;
    while (j + 1 < parts.size() && i >= parts[j + 1].first_item) ++j;
    Part& part = parts[j];
    begin = (i - part.first_item) * part.units_per_item;
    end = std::min(begin + part.units_per_item, Kernel::units(part.p));
    return part;
  }

  std::shared_ptr<void> owner;
  std::vector<Part> parts;
};

}  // namespace xla_inference

#endif  // XLA_INFERENCE_KERNELS_CPU_SPARE_CORE_H_
