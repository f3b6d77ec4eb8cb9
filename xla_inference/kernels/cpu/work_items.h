// Work items of one FFI call shared out over XLA's intra-op thread pool (the FFI's ThreadPool
// context) and the calling thread: the queue and the wait that dense_matvec.cc,
// quantized_matmul.cc and paged_attention.cc share. Included by each kernel's .cc, which
// kernels/native.py compiles alone (its cache key covers this header too).

#ifndef XLA_INFERENCE_KERNELS_CPU_WORK_ITEMS_H_
#define XLA_INFERENCE_KERNELS_CPU_WORK_ITEMS_H_

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace xla_inference {

// Items 0..num_items-1, taken one at a time by whichever thread asks next. A kernel's work
// derives from it and is owned jointly by the call and the tasks it schedules (a shared_ptr):
// a task that starts after the call returned (the pool was busy and the calling thread did
// the work) finds no item left and touches nothing else.
struct WorkItems {
  int64_t num_items = 0;
  std::atomic<int64_t> next{0};  // the next item nobody has taken
  std::mutex mu;
  std::condition_variable all_done;
  int64_t done = 0;  // items finished (under mu)

  // Runs do_item(i) for each item this thread takes, until none is left.
  template <class DoItem>
  void drain_items(DoItem&& do_item) {
    int64_t finished = 0;
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < num_items; ++finished)
      do_item(i);
    if (finished == 0) return;
    // The mutex also publishes this thread's writes to the outputs to the waiting caller.
    std::lock_guard<std::mutex> lock(mu);
    done += finished;
    if (done == num_items) all_done.notify_all();
  }
};

// Runs work->drain() on `helpers` pool threads and on the calling thread, and returns once
// every item is finished.
template <class Work>
void run_items(xla::ffi::ThreadPool& pool, const std::shared_ptr<Work>& work, int64_t helpers) {
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work->drain(); });
  work->drain();
  // Every item is taken by now; wait for those that other threads are still computing.
  std::unique_lock<std::mutex> lock(work->mu);
  work->all_done.wait(lock, [&] { return work->done == work->num_items; });
}

}  // namespace xla_inference

#endif  // XLA_INFERENCE_KERNELS_CPU_WORK_ITEMS_H_
