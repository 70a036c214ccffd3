// Large buffers of the CPU ops (recurrent layers, LayerNorm) come from a cache of freed blocks.
//
// A freed large block goes back to the kernel (glibc munmaps it, or trims the top of its heap), and
// the next call faults its pages in again: on a virtual machine about 1 us per 4 KB page, 6-8 ms of a
// 55 ms LSTM layer forward+backward at T=100, B=32, I=H=256, and more than the whole kernel time of a
// LayerNorm at (4096, 1024). Outputs, workspaces and temporaries of 1 MiB or more therefore reuse
// freed blocks of their size class (eight classes per power of two, so at most 1/8 is wasted, and
// sequences of similar lengths share blocks).
//
// The cache holds no more than the work needs: the blocks in use plus the idle ones stay within the
// most that was in use at once over the last two windows of kWindow allocations and releases, and a
// quarter more (or the block being asked for, if more). To make room, the blocks idle the longest are given back first. So
// the cache follows the shapes in use: when they shrink, memory is returned within two windows. The
// blocks are mapped from the kernel directly and unmapped when given back, so what leaves the cache
// leaves the process (a heap would keep it, fragmented). empty() gives every idle block back;
// VGK_CPU_CACHE_MB caps the idle bytes (0 turns the cache off).
#pragma once

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <limits>
#include <list>
#include <mutex>
#include <new>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <sys/mman.h>
#define VGK_BLOCK_CACHE_MMAP 1
#endif

namespace vgk {

class BlockCache final : public c10::Allocator {
 public:
  static constexpr size_t kMinBytes = size_t(1) << 20;
  static constexpr size_t kWindow = 128;  // allocations and releases per window of the peak in use

  // Never destroyed: tensors holding its blocks may outlive static destructors.
  static BlockCache& get() {
    static BlockCache* cache = new BlockCache();
    return *cache;
  }

  bool enabled() const { return limit_ > 0; }

  // The size class of a request of n >= kMinBytes bytes: n rounded up to an eighth of its power of two.
  static size_t size_class(size_t n) {
    size_t octave = kMinBytes;
    while (octave * 2 <= n) octave *= 2;
    const size_t step = octave / 8;
    return (n + step - 1) / step * step;
  }

  struct Stats {
    size_t idle_bytes, idle_blocks, in_use_bytes, budget_bytes, limit_bytes, hits, misses;
  };
  Stats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {idle_bytes_, idle_.size(), in_use_, budget(), limit_, hits_, misses_};
  }

  c10::DataPtr allocate(size_t n) override {
    const size_t size = size_class(std::max(n, size_t(1)));
    void* p = nullptr;
    std::vector<Block> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      // The most recently freed block of this class (its pages are the likeliest still in cache).
      const auto it = std::find_if(idle_.rbegin(), idle_.rend(), [&](const Block& b) { return b.size == size; });
      if (it != idle_.rend()) {
        p = it->ptr;
        idle_.erase(std::next(it).base());
        idle_bytes_ -= size;
        ++hits_;
      } else {
        ++misses_;
        // Room for the new block within the budget: give back the blocks idle the longest.
        evict_until(std::max(budget(), in_use_ + size) - size, evicted);
      }
      in_use_ += size;
      note_in_use();
    }
    unmap(evicted);  // outside the lock
    if (p == nullptr) p = map(size);
    return {p, new Block{p, size}, &release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }

  // Gives every idle block back to the kernel; the budget restarts from the blocks in use. Returns the
  // bytes given back.
  size_t empty() {
    std::vector<Block> evicted;
    size_t freed;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      freed = idle_bytes_;
      evict_until(0, evicted);
      peak_[0] = peak_[1] = in_use_;
    }
    unmap(evicted);
    return freed;
  }

 private:
  struct Block {
    void* ptr;
    size_t size;
  };

  BlockCache() {
    const char* env = std::getenv("VGK_CPU_CACHE_MB");
    limit_ = env != nullptr ? static_cast<size_t>(std::strtoull(env, nullptr, 10)) << 20
                            : std::numeric_limits<size_t>::max();
  }

  static void* map(size_t size) {
#ifdef VGK_BLOCK_CACHE_MMAP
    void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();  // c10::Allocator's callers report it as out of memory
    return p;
#else
    return c10::alloc_cpu(size);
#endif
  }

  static void unmap(const std::vector<Block>& blocks) {
    for (const Block& b : blocks) {
#ifdef VGK_BLOCK_CACHE_MMAP
      munmap(b.ptr, b.size);
#else
      c10::free_cpu(b.ptr);
#endif
    }
  }

  static void release(void* ctx) {
    Block* block = static_cast<Block*>(ctx);
    get().put(*block);
    delete block;
  }

  // The most bytes (in use plus idle) the cache may hold: the peak in use over the last two windows,
  // and a quarter more. Without the quarter, the blocks idle at the peak were of other size classes
  // than the ones asked for there: an LSTM layer's forward+backward evicted and mapped three blocks
  // (5.6 MB, 1400 page faults) at every step of a steady loop.
  size_t budget() const {
    const size_t peak = std::max(peak_[0], peak_[1]);
    return peak + peak / 4;
  }

  void note_in_use() {
    peak_[1] = std::max(peak_[1], in_use_);
    if (++events_ % kWindow == 0) {
      peak_[0] = peak_[1];
      peak_[1] = in_use_;
    }
  }

  // Gives back the blocks idle the longest until in use plus idle is at most `target` bytes and the
  // idle ones fit the limit (into `evicted`, to unmap outside the lock).
  void evict_until(size_t target, std::vector<Block>& evicted) {
    while (!idle_.empty() && (in_use_ + idle_bytes_ > target || idle_bytes_ > limit_)) {
      evicted.push_back(idle_.front());
      idle_bytes_ -= idle_.front().size;
      idle_.pop_front();
    }
  }

  void put(Block block) {
    std::vector<Block> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      in_use_ -= block.size;
      note_in_use();
      idle_.push_back(block);
      idle_bytes_ += block.size;
      evict_until(budget(), evicted);
    }
    unmap(evicted);
  }

  std::mutex mutex_;
  std::list<Block> idle_;  // idle blocks, the longest idle first
  size_t idle_bytes_ = 0, in_use_ = 0;
  size_t peak_[2] = {0, 0};  // the most in use in the previous window and in the current one
  size_t events_ = 0;
  size_t limit_ = 0;
  size_t hits_ = 0, misses_ = 0;
};

// at::empty on the CPU; buffers of 1 MiB or more come from the block cache.
inline at::Tensor cached_empty(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  BlockCache& cache = BlockCache::get();
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * opts.dtype().itemsize();
  if (!cache.enabled() || bytes < BlockCache::kMinBytes) return at::empty(sizes, opts);
  return at::detail::empty_generic(sizes, &cache, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   opts.dtype().toScalarType(), std::nullopt);
}

// t itself when contiguous, else a contiguous copy in a cached buffer.
inline at::Tensor cached_contiguous(const at::Tensor& t) {
  if (t.is_contiguous()) return t;
  at::Tensor copy = cached_empty(t.sizes(), t.options());
  copy.copy_(t);
  return copy;
}

}  // namespace vgk
