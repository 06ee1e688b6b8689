// The scheduler behind csrc/common/cuda_emulation.h: runs a CUDA launch on the CPU, block after block in a
// seeded random order, each block's threads as cooperative fibers with real barriers. Part of the test-only
// emulation build (python_tests/cuda_emulation.py), never of the installed package.
//
// Fibers: each thread of a block runs on its own stack (mmap'd, with a guard page below, so an overflow
// faults instead of corrupting a neighbour). On x86-64 a fiber switch is six register pushes and a stack
// swap (swapcontext's signal-mask system call made a switch ~1 us, the whole cost of a launch); elsewhere
// ucontext. Under AddressSanitizer the switches are announced to it (__sanitizer_*_switch_fiber), and a
// stack is unpoisoned before it is reused, so that the fibers' frames are checked like any other.
//
// Shared memory: the __shared__ objects (static, tagged by cuda_emulation.h) are found once in the library's
// symbol table and filled with 0xFF bytes before every block, as a GPU's shared memory starts undefined.
//
// A block runs in phases: every ready thread, in a shuffled order, runs until it reaches __syncthreads()
// or returns. When none is ready, either all returned (the block is done), or all that did not return
// wait at the same barrier (the next phase starts), or the launch fails: a barrier reached by part of the
// block while the rest returned, or threads waiting at different barriers. A GPU would hang or silently
// misbehave there.
#include <dlfcn.h>
#include <elf.h>
#include <link.h>
#include <sys/mman.h>
#include <unistd.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <cxxabi.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "common/cuda_emulation.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define CK_EMU_ASAN 1
#else
#define CK_EMU_ASAN 0
#endif

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace ck_emu {

uint3 g_thread_idx{0, 0, 0};
uint3 g_block_idx{0, 0, 0};
dim3 g_block_dim;
dim3 g_grid_dim;

namespace {

// What tests may change (crowdkernels_cuda_emulated::_configure).
struct Config {
  int64_t seed = 0;       // of the shuffles; launch i after _configure uses seed and i
  int64_t max_grid = 0;   // > 0: at most this many blocks on gridDim.x (the kernels' grid-stride loops wrap)
  int64_t max_block = 0;  // > 0: at most this many threads on blockDim.x (a power of two)
};

struct Counts {
  int64_t launches = 0, blocks = 0, threads = 0, barriers = 0;
};

std::mutex g_mutex;  // one launch at a time: the coordinates, the fibers and __shared__ objects are global
thread_local bool t_launching = false;  // this OS thread is running a launch (its kernel threads are)
// The block order is shuffled in a vector of this many indices at most (32 MiB); the sources clamp their
// grids to 65535 * 32 blocks.
constexpr long long kMaxBlocks = 1LL << 22;
Config g_config;
int64_t g_launch_index = 0;  // launches since the last _configure
Counts g_counts;
std::map<std::pair<std::string, std::string>, int64_t> g_per_kernel;  // (name, signature) -> launches

#if CK_EMU_ASAN
constexpr size_t kStackBytes = size_t(512) << 10;  // ASan's redzones make frames several times larger
#else
constexpr size_t kStackBytes = size_t(128) << 10;
#endif

enum class State { kReady, kBarrier, kDone };

struct Fiber {
  char* stack = nullptr;  // lowest usable byte; a PROT_NONE guard page lies below it
  void* sp = nullptr;     // x86-64: the saved stack pointer while suspended
#if !defined(__x86_64__)
  ucontext_t ctx;
#endif
  State state = State::kReady;
  const char* bar_file = nullptr;
  int bar_line = 0;
  void* fake_stack = nullptr;  // ASan's, while suspended
};

std::vector<std::unique_ptr<Fiber>> g_fibers;
Fiber* g_current = nullptr;
void (*g_body)(void*) = nullptr;
void* g_arg = nullptr;
std::string g_error;  // set by a fiber (an exception) or the scheduler: abandons the block
#if defined(__x86_64__)
void* g_main_sp = nullptr;
#else
ucontext_t g_main_ctx;
#endif
const void* g_main_stack_bottom = nullptr;  // ASan: the launching thread's stack
size_t g_main_stack_size = 0;

// ---------------------------------------------------------------------------------------- switching

#if CK_EMU_ASAN
inline void asan_start(void** fake, const void* bottom, size_t size) { __sanitizer_start_switch_fiber(fake, bottom, size); }
inline void asan_finish(void* fake, const void** bottom, size_t* size) { __sanitizer_finish_switch_fiber(fake, bottom, size); }
#else
inline void asan_start(void**, const void*, size_t) {}
inline void asan_finish(void*, const void**, size_t*) {}
#endif

#if defined(__x86_64__)
// ck_emu_switch(save, load): pushes the callee-saved registers, stores the stack pointer in *save, loads
// `load` as the stack pointer and pops the registers saved there. A fresh stack is laid out as if
// ck_emu_switch had been called from fiber_entry's caller (init_stack).
extern "C" void ck_emu_switch(void** save, void* load);
asm(R"(
.text
.globl ck_emu_switch
.hidden ck_emu_switch
.type ck_emu_switch,@function
ck_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size ck_emu_switch, .-ck_emu_switch
)");
#endif

[[noreturn]] void fiber_entry();

void init_fiber(Fiber& f) {
  if (f.stack == nullptr) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    void* mem = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                     -1, 0);
    TORCH_CHECK(mem != MAP_FAILED, "CUDA emulation: cannot map a fiber stack of ", kStackBytes, " bytes");
    TORCH_CHECK(mprotect(mem, page, PROT_NONE) == 0, "CUDA emulation: cannot protect a fiber stack's guard page");
    f.stack = static_cast<char*>(mem) + page;
  }
#if CK_EMU_ASAN
  // an abandoned fiber (a failed launch) leaves its frames' redzones poisoned
  __asan_unpoison_memory_region(f.stack, kStackBytes);
#endif
  f.state = State::kReady;
  f.bar_file = nullptr;
  f.bar_line = 0;
  f.fake_stack = nullptr;
#if defined(__x86_64__)
  // top: 16-byte aligned; [top - 8] a null return address for fiber_entry (which never returns), [top - 16]
  // fiber_entry, popped by ck_emu_switch's ret (rsp is then top - 8 = 8 mod 16, as at any function entry),
  // below them the six registers it pops.
  auto* top = reinterpret_cast<uintptr_t*>((reinterpret_cast<uintptr_t>(f.stack) + kStackBytes) & ~uintptr_t(15));
  uintptr_t* sp = top;
  *--sp = 0;
  *--sp = reinterpret_cast<uintptr_t>(&fiber_entry);
  for (int i = 0; i < 6; ++i) *--sp = 0;
  f.sp = sp;
#else
  TORCH_CHECK(getcontext(&f.ctx) == 0, "CUDA emulation: getcontext failed");
  f.ctx.uc_stack.ss_sp = f.stack;
  f.ctx.uc_stack.ss_size = kStackBytes;
  f.ctx.uc_link = nullptr;
  makecontext(&f.ctx, reinterpret_cast<void (*)()>(&fiber_entry), 0);
#endif
}

// Main -> fiber f, until f yields at a barrier or returns.
void resume(Fiber& f) {
  void* fake = nullptr;
  g_current = &f;
  asan_start(&fake, f.stack, kStackBytes);
#if defined(__x86_64__)
  ck_emu_switch(&g_main_sp, f.sp);
#else
  swapcontext(&g_main_ctx, &f.ctx);
#endif
  asan_finish(fake, nullptr, nullptr);
}

// Fiber f -> main; returns when the scheduler resumes f (never, when f has returned).
void yield(Fiber& f, bool finished) {
  asan_start(finished ? nullptr : &f.fake_stack, g_main_stack_bottom, g_main_stack_size);
#if defined(__x86_64__)
  ck_emu_switch(&f.sp, g_main_sp);
#else
  swapcontext(&f.ctx, &g_main_ctx);
#endif
  asan_finish(f.fake_stack, &g_main_stack_bottom, &g_main_stack_size);
}

void fiber_entry() {
  asan_finish(nullptr, &g_main_stack_bottom, &g_main_stack_size);
  Fiber& f = *g_current;
  try {
    g_body(g_arg);
  } catch (const std::exception& e) {
    if (g_error.empty()) g_error = std::string("exception in a kernel thread: ") + e.what();
  } catch (...) {
    if (g_error.empty()) g_error = "unknown exception in a kernel thread";
  }
  f.state = State::kDone;
  yield(f, true);
  std::abort();  // a returned fiber is never resumed
}

// ---------------------------------------------------------------------------------- shared memory

struct Range {
  unsigned char* begin;
  size_t bytes;
};

// The __shared__ objects of this library: the OBJECT symbols of its ELF symbol table whose mangled name
// carries the abi_tag that cuda_emulation.h's __shared__ gives them ("B13ck_emu_shared"), at the load
// base plus their value. Read once, from the library file.
std::vector<Range> find_shared_objects() {
  std::vector<Range> out;
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&find_shared_objects), &info) == 0 || info.dli_fname == nullptr) return out;
  struct Find {
    const char* name;
    uintptr_t base;
    bool found;
  } find{info.dli_fname, 0, false};
  dl_iterate_phdr(
      [](dl_phdr_info* phdr, size_t, void* data) {
        auto* f = static_cast<Find*>(data);
        if (phdr->dlpi_name == nullptr || std::strcmp(phdr->dlpi_name, f->name) != 0) return 0;
        f->base = phdr->dlpi_addr;
        f->found = true;
        return 1;
      },
      &find);
  std::ifstream file(info.dli_fname, std::ios::binary);
  const std::vector<char> elf((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  if (!find.found || elf.size() < sizeof(Elf64_Ehdr)) return out;
  const auto* eh = reinterpret_cast<const Elf64_Ehdr*>(elf.data());
  if (std::memcmp(eh->e_ident, ELFMAG, SELFMAG) != 0 || eh->e_ident[EI_CLASS] != ELFCLASS64 ||
      eh->e_shoff + eh->e_shnum * sizeof(Elf64_Shdr) > elf.size())
    return out;
  const auto* sh = reinterpret_cast<const Elf64_Shdr*>(elf.data() + eh->e_shoff);
  for (int i = 0; i < eh->e_shnum; ++i) {
    if (sh[i].sh_type != SHT_SYMTAB || sh[i].sh_link >= eh->e_shnum) continue;
    const Elf64_Shdr& strtab = sh[sh[i].sh_link];
    if (sh[i].sh_offset + sh[i].sh_size > elf.size() || strtab.sh_offset + strtab.sh_size > elf.size()) continue;
    const auto* syms = reinterpret_cast<const Elf64_Sym*>(elf.data() + sh[i].sh_offset);
    const char* names = elf.data() + strtab.sh_offset;
    for (size_t k = 0; k < sh[i].sh_size / sizeof(Elf64_Sym); ++k) {
      const Elf64_Sym& sym = syms[k];
      if (ELF64_ST_TYPE(sym.st_info) != STT_OBJECT || sym.st_size == 0 || sym.st_shndx == SHN_UNDEF ||
          sym.st_name >= strtab.sh_size)
        continue;
      if (std::strstr(names + sym.st_name, "B13ck_emu_shared") == nullptr) continue;
      out.push_back(Range{reinterpret_cast<unsigned char*>(find.base + sym.st_value), static_cast<size_t>(sym.st_size)});
    }
  }
  return out;
}

const std::vector<Range>& shared_objects() {
  static const std::vector<Range> ranges = find_shared_objects();
  return ranges;
}

// 0xFF bytes: NaN in float and double, -1 in integers.
void poison_shared() {
  for (const Range& r : shared_objects()) std::memset(r.begin, 0xFF, r.bytes);
}

// ---------------------------------------------------------------------------------------- launches

std::string where(const char* file, int line) {
  const char* slash = std::strrchr(file, '/');
  return std::string(slash ? slash + 1 : file) + ":" + std::to_string(line);
}

std::string triple(long long x, long long y, long long z) {
  return "(" + std::to_string(x) + ", " + std::to_string(y) + ", " + std::to_string(z) + ")";
}

// Runs one block (g_block_idx, g_block_dim set); returns an error message, empty on success.
std::string run_block(unsigned n, std::mt19937_64& rng) {
  while (g_fibers.size() < n) g_fibers.push_back(std::make_unique<Fiber>());
  for (unsigned t = 0; t < n; ++t) init_fiber(*g_fibers[t]);
  poison_shared();  // a block's shared memory starts undefined
  const unsigned bx = g_block_dim.x, by = g_block_dim.y;
  std::vector<unsigned> order;
  order.reserve(n);
  for (;;) {
    order.clear();
    for (unsigned t = 0; t < n; ++t)
      if (g_fibers[t]->state == State::kReady) order.push_back(t);
    std::shuffle(order.begin(), order.end(), rng);
    for (unsigned t : order) {
      g_thread_idx = uint3{t % bx, (t / bx) % by, t / (bx * by)};
      resume(*g_fibers[t]);
      if (!g_error.empty()) return g_error;
    }
    unsigned done = 0, waiting = 0, first_t = 0;
    const Fiber* first = nullptr;
    for (unsigned t = 0; t < n; ++t) {
      const Fiber& f = *g_fibers[t];
      if (f.state == State::kDone) {
        ++done;
      } else {
        ++waiting;
        if (first == nullptr) {
          first = &f;
          first_t = t;
        }
      }
    }
    if (waiting == 0) return "";
    std::ostringstream msg;
    if (done > 0) {
      msg << "__syncthreads() at " << where(first->bar_file, first->bar_line) << " reached by " << waiting << " of "
          << n << " threads of block " << triple(g_block_idx.x, g_block_idx.y, g_block_idx.z) << ": the other "
          << done << " returned without reaching it (a barrier in divergent code)";
      return msg.str();
    }
    for (unsigned t = 0; t < n; ++t) {
      const Fiber& f = *g_fibers[t];
      if (f.bar_line != first->bar_line || std::strcmp(f.bar_file, first->bar_file) != 0) {
        msg << "threads of block " << triple(g_block_idx.x, g_block_idx.y, g_block_idx.z)
            << " wait at different __syncthreads(): thread " << first_t << " at "
            << where(first->bar_file, first->bar_line) << ", thread " << t << " at "
            << where(f.bar_file, f.bar_line);
        return msg.str();
      }
    }
    ++g_counts.barriers;
    for (unsigned t = 0; t < n; ++t) g_fibers[t]->state = State::kReady;
  }
}

}  // namespace

void sync_threads(const char* file, int line) {
  Fiber* f = g_current;
  TORCH_CHECK(f != nullptr, "__syncthreads() called outside an emulated kernel");
  f->state = State::kBarrier;
  f->bar_file = file;
  f->bar_line = line;
  yield(*f, false);
}

const char* signature_of(const char* mangled) {
  static std::mutex mutex;
  static std::map<std::string, std::string> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(mangled);
  if (it == cache.end()) {
    int status = 0;
    char* name = abi::__cxa_demangle(mangled, nullptr, nullptr, &status);
    it = cache.emplace(mangled, status == 0 && name ? name : mangled).first;
    std::free(name);
  }
  return it->second.c_str();
}

void launch(const Extent& grid_in, const Extent& block_in, const char* kernel, const char* signature, const char* file,
            int line, void (*body)(void*), void* arg) {
  const std::string site = std::string("kernel ") + kernel + " launched at " + where(file, line);
  // (a launch from a kernel thread would wait for the launch lock for ever)
  TORCH_CHECK(!t_launching, "CUDA emulation: ", site, " from inside a kernel: dynamic parallelism is not emulated");
  std::lock_guard<std::mutex> lock(g_mutex);
  const bool grid_ok = grid_in.x >= 1 && grid_in.x <= 2147483647LL && grid_in.y >= 1 && grid_in.y <= 65535 &&
                       grid_in.z >= 1 && grid_in.z <= 65535;
  const bool block_ok = block_in.x >= 1 && block_in.y >= 1 && block_in.z >= 1 && block_in.x <= 1024 &&
                        block_in.y <= 1024 && block_in.z <= 64 && block_in.x * block_in.y * block_in.z <= 1024;
  TORCH_CHECK(grid_ok && block_ok, "CUDA error (emulated): invalid configuration argument: ", site, " with grid ",
              triple(grid_in.x, grid_in.y, grid_in.z), " and block ", triple(block_in.x, block_in.y, block_in.z),
              " (CUDA allows grid.x in [1, 2^31 - 1], grid.y and grid.z in [1, 65535], 1 to 1024 threads a block)");
  Extent grid = grid_in, block = block_in;
  if (g_config.max_grid > 0) grid.x = std::min<long long>(grid.x, g_config.max_grid);
  if (g_config.max_block > 0) block.x = std::min<long long>(block.x, g_config.max_block);
  TORCH_CHECK(grid.x * grid.y * grid.z <= kMaxBlocks, "CUDA emulation: ", site, " with grid ",
              triple(grid.x, grid.y, grid.z), ": more blocks than the emulation runs (", kMaxBlocks,
              "); force a smaller grid (max_grid)");

  ++g_counts.launches;
  ++g_per_kernel[{kernel, signature}];
  std::mt19937_64 rng(static_cast<uint64_t>(g_config.seed) * 0x9E3779B97F4A7C15ULL + static_cast<uint64_t>(g_launch_index++));
  g_grid_dim = dim3(static_cast<unsigned>(grid.x), static_cast<unsigned>(grid.y), static_cast<unsigned>(grid.z));
  g_block_dim = dim3(static_cast<unsigned>(block.x), static_cast<unsigned>(block.y), static_cast<unsigned>(block.z));
  const unsigned threads = static_cast<unsigned>(block.x * block.y * block.z);
  const uint64_t blocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  std::vector<uint64_t> order(blocks);
  for (uint64_t b = 0; b < blocks; ++b) order[b] = b;
  std::shuffle(order.begin(), order.end(), rng);

  g_body = body;
  g_arg = arg;
  g_error.clear();
  t_launching = true;
  std::string error;
  for (uint64_t b : order) {
    g_block_idx = uint3{static_cast<unsigned>(b % grid.x), static_cast<unsigned>((b / grid.x) % grid.y),
                        static_cast<unsigned>(b / (static_cast<uint64_t>(grid.x) * grid.y))};
    error = run_block(threads, rng);
    ++g_counts.blocks;
    g_counts.threads += threads;
    if (!error.empty()) break;
  }
  t_launching = false;
  g_current = nullptr;
  g_body = nullptr;
  g_arg = nullptr;
  g_error.clear();
  TORCH_CHECK(error.empty(), "CUDA emulation: ", site, " with grid ", triple(grid.x, grid.y, grid.z), " and block ",
              triple(block.x, block.y, block.z), ": ", error);
}

namespace {

void configure(int64_t seed, int64_t max_grid, int64_t max_block) {
  TORCH_CHECK(max_grid >= 0, "max_grid must be >= 0 (0: as launched), got ", max_grid);
  TORCH_CHECK(max_block >= 0 && max_block <= 1024 && (max_block & (max_block - 1)) == 0,
              "max_block must be 0 (as launched) or a power of two up to 1024 (the kernels' tree reductions "
              "halve the block), got ",
              max_block);
  std::lock_guard<std::mutex> lock(g_mutex);
  g_config = Config{seed, max_grid, max_block};
  g_launch_index = 0;
}

std::vector<int64_t> get_config() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return {g_config.seed, g_config.max_grid, g_config.max_block};
}

std::vector<int64_t> get_counts() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return {g_counts.launches, g_counts.blocks, g_counts.threads, g_counts.barriers};
}

// One line a kernel instantiation: name, tab, signature, tab, launches.
std::string get_kernel_counts() {
  std::lock_guard<std::mutex> lock(g_mutex);
  std::string out;
  for (const auto& kv : g_per_kernel)
    out += kv.first.first + "\t" + kv.first.second + "\t" + std::to_string(kv.second) + "\n";
  return out;
}

bool asan_build() { return CK_EMU_ASAN != 0; }

int64_t shared_bytes() {
  int64_t bytes = 0;
  for (const Range& r : shared_objects()) bytes += static_cast<int64_t>(r.bytes);
  return bytes;
}

}  // namespace
}  // namespace ck_emu

TORCH_LIBRARY_FRAGMENT(crowdkernels_cuda_emulated, m) {
  m.def("_configure(int seed, int max_grid, int max_block) -> ()", &ck_emu::configure);
  m.def("_config() -> int[]", &ck_emu::get_config);
  m.def("_counts() -> int[]", &ck_emu::get_counts);
  m.def("_kernel_counts() -> str", &ck_emu::get_kernel_counts);
  m.def("_asan_build() -> bool", &ck_emu::asan_build);
  // bytes of __shared__ objects found (and poisoned at the start of every block)
  m.def("_shared_bytes() -> int", &ck_emu::shared_bytes);
}
