// Large buffers of the CPU ops (recurrent layers, LayerNorm) come from a small cache of freed blocks.
//
// glibc hands large freed blocks back to the kernel (munmap, or trimming the top of the heap), and
// the next call faults the pages in again. On a virtual machine that costs about 1 us per 4 KB page:
// 6-8 ms of a 55 ms LSTM layer forward+backward at T=100, B=32, I=H=256, and more than the whole
// kernel time of a LayerNorm at (4096, 1024), whenever it happens, which is every other call in a
// training loop. Outputs, workspaces and temporaries of 1 MiB or more
// therefore reuse freed blocks of their size class (rounded up to 1 MiB). The idle blocks are capped at
// VGK_CPU_CACHE_MB (default 256; 0 turns the cache off); to make room, the blocks idle the longest are
// given back first, so that when the shapes change (variable sequence lengths) the cache follows the
// sizes in use instead of filling up with sizes no longer asked for.
#pragma once

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <list>
#include <mutex>
#include <vector>

namespace vgk {

class BlockCache final : public c10::Allocator {
 public:
  static constexpr size_t kMinBytes = size_t(1) << 20;

  // Never destroyed: tensors holding its blocks may outlive static destructors.
  static BlockCache& get() {
    static BlockCache* cache = new BlockCache();
    return *cache;
  }

  bool enabled() const { return limit_ > 0; }

  struct Stats {
    size_t idle_bytes, idle_blocks, limit_bytes, hits, misses;
  };
  Stats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {idle_bytes_, idle_.size(), limit_, hits_, misses_};
  }

  c10::DataPtr allocate(size_t n) override {
    const size_t size = (n + kMinBytes - 1) / kMinBytes * kMinBytes;
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      // The most recently freed block of this size (its pages are the likeliest still in cache); the
      // idle list holds at most VGK_CPU_CACHE_MB blocks, in practice a handful.
      const auto fits = [&](const Block& b) { return b.size == size; };
      const auto it = std::find_if(idle_.rbegin(), idle_.rend(), fits);
      if (it != idle_.rend()) {
        p = it->ptr;
        idle_.erase(std::next(it).base());
        idle_bytes_ -= size;
        ++hits_;
      } else {
        ++misses_;
      }
    }
    if (p == nullptr) p = c10::alloc_cpu(size);
    return {p, new Block{p, size}, &release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }

 private:
  struct Block {
    void* ptr;
    size_t size;
  };

  BlockCache() {
    const char* env = std::getenv("VGK_CPU_CACHE_MB");
    limit_ = (env != nullptr ? static_cast<size_t>(std::strtoull(env, nullptr, 10)) : size_t(256)) << 20;
  }

  static void release(void* ctx) {
    Block* block = static_cast<Block*>(ctx);
    get().put(block->ptr, block->size);
    delete block;
  }

  void put(void* p, size_t size) {
    std::vector<void*> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (size <= limit_) {
        while (idle_bytes_ + size > limit_) {  // give back the blocks idle the longest
          idle_bytes_ -= idle_.front().size;
          evicted.push_back(idle_.front().ptr);
          idle_.pop_front();
        }
        idle_.push_back(Block{p, size});
        idle_bytes_ += size;
        p = nullptr;
      }
    }
    for (void* block : evicted) c10::free_cpu(block);  // outside the lock
    if (p != nullptr) c10::free_cpu(p);
  }

  std::mutex mutex_;
  std::list<Block> idle_;  // idle blocks, the longest idle first
  size_t idle_bytes_ = 0;
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
