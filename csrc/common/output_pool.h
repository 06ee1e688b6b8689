// A small cache of large CPU output buffers (not included by .cu files).
//
// Why: the density op returns one fresh map per image, 1-3 MiB each. glibc hands a freed map's pages back
// to the OS (heap trimming) and the next map faults them in again, one 4 KiB page at a time; on the VMs
// we run on a fault costs ~2 us, about 1 ms per ShanghaiTech-A map, as much as computing it. Buffers from
// this pool go back to the pool when their tensor dies and are reused by the next output of a similar
// size, already mapped. Like torch's CUDA caching allocator, but only for our CPU outputs >= 1 MiB, and
// bounded: at most `limit` bytes are kept (CROWDKERNELS_CPU_CACHE_MB, default 256; 0 turns it off), and
// crowdkernels.empty_cache() releases them.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace ck {

// An uninitialized CPU tensor (contiguous), from the pool when it is large enough to be worth it.
at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options);

// ck::new_output's pooled twin, for floating outputs: NaN-filled when tests poison outputs.
at::Tensor new_pooled_output(at::IntArrayRef sizes, const at::TensorOptions& options);

// What the pool holds: {cached bytes, limit, hits, misses}.
std::vector<int64_t> pool_info();
void pool_set_limit(int64_t bytes);  // also frees down to the new limit
void pool_empty();                   // frees every cached buffer

}  // namespace ck
