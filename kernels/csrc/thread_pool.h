// The kernels' thread pool: Pool (dynamic chunks, no barrier) and parallel_chunks(n, chunk, fn).
// Header-only, in a named namespace: every translation unit of one kernel library shares the one Pool::get().
#pragma once

#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace glm_cpu {

// A small thread pool with dynamic chunks and no barrier. Decoding makes ~260 short parallel calls per token; with
// OpenMP each call waits for every thread, so when another process holds a core (a shared machine) each call
// stalls for a scheduler time slice. Here the calling thread takes chunks itself and only waits for chunks that a
// helper has actually started: a descheduled helper costs speed, never a stall. Helpers spin briefly after a call
// (decoding calls come every few microseconds), then sleep until the next one (waking every 50 ms only to guard
// against a missed wake-up).

class Pool {
 public:
  static Pool& get() {
    static Pool pool;
    return pool;
  }

  // The next call's generation is `generation` + 2 (tests: calls across the 32-bit wrap-around).
  void restart_at(uint32_t generation) {
    std::lock_guard<std::mutex> one_job(run_mu_);
    next_.store(uint64_t(generation) << 32 | kClosed, std::memory_order_seq_cst);
  }

  // Helpers stop spinning and sleep until the next call: the caller is about to wait for something else (weight
  // offload's reads), and spinning helpers would hold the cores that work needs.
  void rest() { rest_.store(true, std::memory_order_relaxed); }

  // fn(i) for every i in [0, n), spread over the calling thread and the helpers.
  template <class Fn>
  void run(int64_t n, const Fn& fn) {
    const int want = std::max(1, at::get_num_threads());
    if (n <= 1 || want == 1 || n >= int64_t(kClosed)) {
      for (int64_t i = 0; i < n; ++i) fn(i);
      return;
    }
    std::lock_guard<std::mutex> one_job(run_mu_);  // callers from several threads take turns
    rest_.store(false, std::memory_order_relaxed);
    resize(want - 1);
    // Close the previous generation before touching the job: a helper still inside participate() for it (it read
    // next_, then was descheduled) could otherwise read the new total_ and claim an index of the old generation
    // with its CAS, running the new job's chunk twice and ending the wait below while a chunk still runs.
    // Generations are 32-bit and wrap around (a long-running server makes billions of calls).
    const uint64_t last = next_.load(std::memory_order_relaxed) >> 32;
    const uint64_t gen = (last + 2) & kClosed;
    next_.store((((last + 1) & kClosed) << 32) | kClosed, std::memory_order_seq_cst);
    job_ = [&fn](int64_t i) { fn(i); };
    done_.store(0, std::memory_order_relaxed);
    total_.store(n, std::memory_order_release);
    next_.store(gen << 32, std::memory_order_seq_cst);  // publish: generation in the high half, next index low
    if (sleeping_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> l(mu_);
      cv_.notify_all();
    }
    participate(gen);
    while (done_.load(std::memory_order_acquire) < n) _mm_pause();  // chunks a helper is still running
  }

 private:
  Pool() = default;
  ~Pool() {
    {
      std::lock_guard<std::mutex> l(mu_);
      stop_ = true;
      cv_.notify_all();
    }
    for (auto& t : workers_) t.join();
  }

  // Take chunks of generation `gen` until none is left (the CAS fails once a newer generation is published).
  void participate(uint64_t gen) {
    for (;;) {
      uint64_t v = next_.load(std::memory_order_acquire);
      for (;;) {
        if ((v >> 32) != gen || int64_t(v & kClosed) >= total_.load(std::memory_order_acquire)) return;
        if (next_.compare_exchange_weak(v, v + 1, std::memory_order_acq_rel)) break;
      }
      job_(int64_t(v & kClosed));
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  void worker() {
    uint64_t seen = next_.load(std::memory_order_acquire) >> 32;
    for (;;) {
      int spins = 0;
      uint64_t gen;
      while ((gen = next_.load(std::memory_order_acquire) >> 32) == seen) {
        if (++spins < kSpins && !rest_.load(std::memory_order_relaxed)) {
          _mm_pause();
          continue;
        }
        std::unique_lock<std::mutex> l(mu_);
        sleeping_.fetch_add(1, std::memory_order_seq_cst);
        cv_.wait_for(l, std::chrono::milliseconds(50),
                     [&] { return stop_ || (next_.load(std::memory_order_seq_cst) >> 32) != seen; });
        sleeping_.fetch_sub(1, std::memory_order_seq_cst);
        if (stop_) return;
        spins = kSpins;  // no call came: wait again without spinning (an idle server held ~28 % of a core)
      }
      seen = gen;
      participate(gen);
    }
  }

  void resize(int helpers) {
    if (int(workers_.size()) >= helpers) return;  // extra helpers just find no work
    while (int(workers_.size()) < helpers) workers_.emplace_back([this] { worker(); });
  }

#ifndef GLM_SPINS
#define GLM_SPINS 200000
#endif
  static constexpr int kSpins = GLM_SPINS;
  static constexpr uint64_t kClosed = 0xFFFFFFFFu;  // an index no job reaches (n < 2^32): a generation being set up
  std::vector<std::thread> workers_;
  std::function<void(int64_t)> job_;
  std::atomic<int64_t> total_{0};
  std::atomic<uint64_t> next_{0};
  std::atomic<int64_t> done_{0};
  std::atomic<int> sleeping_{0};
  std::atomic<bool> rest_{false};
  std::mutex mu_, run_mu_;
  std::condition_variable cv_;
  bool stop_ = false;
};

// fn(begin, end) over [0, n) in chunks of `chunk` items, on the pool.
template <class Fn>
void parallel_chunks(int64_t n, int64_t chunk, const Fn& fn) {
  chunk = std::max<int64_t>(1, chunk);
  const int64_t chunks = (n + chunk - 1) / chunk;
  Pool::get().run(chunks, [&](int64_t c) { fn(c * chunk, std::min(n, (c + 1) * chunk)); });
}

}  // namespace glm_cpu
