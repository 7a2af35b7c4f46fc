// udi_kernels.cu on the CPU: the runtime behind cuda_emu.h, and `udi_cuda_emu_launch`, which
// runs one kernel by name on a grid. This file includes the kernel source; the whole is one
// shared library, built and loaded by trainer/tests/cuda_emu (flags there), roughly
//   c++ -std=c++20 -O2 -pthread -fPIC -shared -fvisibility=hidden -Iemu -include cuda_emu.h
//       emu/launch.cpp -o libudi_cuda_emu.so
//
// Blocks run one after another; the threads of a block are blockDim real threads. Launches are
// serialised (shared memory is static).
#include <atomic>
#include <cstdarg>
#include <cstdio>
#include <mutex>
#include <string>
#include <system_error>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "../udi_kernels.cu"

namespace cuda_emu {
namespace {

thread_local uint64_t t_rng = 0;

// After a block-level barrier some threads give way a few times, so that threads of one phase
// drift apart as they would on a GPU: a race between a fast warp's next phase and a slow warp's
// reads of the last one then shows up in the results, not only under ThreadSanitizer.
void jitter() {
  t_rng ^= t_rng << 13;
  t_rng ^= t_rng >> 7;
  t_rng ^= t_rng << 17;
  if ((t_rng & 3) == 0)
    for (unsigned i = 0; i < 1 + (t_rng >> 8) % 8; ++i) std::this_thread::yield();
}

// A reusable barrier whose participants can leave (a thread that returns from the kernel no
// longer counts). Every thread of one phase must arrive from the same call site.
struct Barrier {
  std::mutex mu;
  int expected = 0, arrived = 0;
  const char *what = nullptr;
  unsigned line = 0;
  bool drift = false;  // jitter() on leaving
  std::atomic<unsigned> gen{0};

  void reset(int n) {
    std::lock_guard<std::mutex> lk(mu);
    expected = n;
    arrived = 0;
  }
  void release_locked() {
    arrived = 0;
    gen.store(gen.load(std::memory_order_relaxed) + 1, std::memory_order_release);
    gen.notify_all();
  }
  void wait(const char *site, const loc_t &w) {
    unsigned g;
    {
      std::lock_guard<std::mutex> lk(mu);
      g = gen.load(std::memory_order_relaxed);
      if (arrived == 0) {
        what = site;
        line = w.line();
      } else if (line != w.line() || std::strcmp(what, site) != 0) {
        fail(w, "%s reached while other threads of the barrier are at %s (line %u)", site, what,
             line);
      }
      if (++arrived == expected) {
        release_locked();
        if (drift) jitter();
        return;
      }
    }
    while (gen.load(std::memory_order_acquire) == g) gen.wait(g, std::memory_order_acquire);
    if (drift) jitter();
  }
  void leave() {
    std::lock_guard<std::mutex> lk(mu);
    --expected;
    if (arrived > 0 && arrived == expected) release_locked();
  }
};

struct Warp {
  Barrier bar;
  int size = 32;                  // lanes that exist (blockDim need not be a multiple of 32)
  std::atomic<unsigned> exited{0};  // lanes that have returned
  uint64_t slot[2][32];           // shuffle exchange, double-buffered (see shfl_xor)
  uint64_t fingerprint[2][32];    // WMMA store check, likewise
};

// The kernel table: name, parameter signature, and a call that unpacks cudaLaunchKernel-style
// arguments (an array of pointers to the values).
struct Entry {
  const char *name;
  std::string sig;
  void (*call)(const void *fn, void **args);
  const void *fn;
};

template <typename T> struct Code;
template <> struct Code<int> { static constexpr char c = 'i'; };
template <> struct Code<unsigned long> { static constexpr char c = 'z'; };  // size_t
template <> struct Code<float> { static constexpr char c = 'f'; };
template <> struct Code<float *> { static constexpr char c = 'F'; };
template <> struct Code<const float *> { static constexpr char c = 'F'; };
template <> struct Code<__nv_bfloat16 *> { static constexpr char c = 'B'; };
template <> struct Code<const __nv_bfloat16 *> { static constexpr char c = 'B'; };
template <> struct Code<const uint32_t *> { static constexpr char c = 'U'; };
template <> struct Code<const uint8_t *> { static constexpr char c = 'b'; };
template <> struct Code<double *> { static constexpr char c = 'D'; };
template <> struct Code<const double *> { static constexpr char c = 'D'; };

template <typename... A, size_t... I>
void call_with(void (*f)(A...), void **args, std::index_sequence<I...>) {
  f(*static_cast<std::remove_cv_t<A> *>(args[I])...);
}

template <typename... A>
Entry entry(const char *name, void (*f)(A...)) {
  return Entry{name, std::string{Code<std::remove_cv_t<A>>::c...},
               [](const void *fn, void **args) {
                 call_with(reinterpret_cast<void (*)(A...)>(const_cast<void *>(fn)), args,
                           std::index_sequence_for<A...>{});
               },
               reinterpret_cast<const void *>(f)};
}

#define K(name) entry(#name, &name)
const std::vector<Entry> &table() {
  static const std::vector<Entry> t = {
      K(ln_fwd_f32_f32), K(ln_bwd_dx_f32_f32), K(ln_bwd_wb_f32_f32),
      K(ln_fwd_f32_bf16), K(ln_bwd_dx_f32_bf16), K(ln_bwd_wb_f32_bf16),
      K(ln_fwd_bf16_bf16), K(ln_bwd_dx_bf16_bf16), K(ln_bwd_wb_bf16_bf16),
      K(ln_fwd_bf16_f32), K(ln_bwd_dx_bf16_f32), K(ln_bwd_wb_bf16_f32),
      K(bias_gelu_fwd_f32), K(bias_gelu_bwd_f32), K(bias_gelu_fwd_bf16), K(bias_gelu_bwd_bf16),
      K(bias_add_f32), K(bias_add_bf16), K(col_sum_f32), K(col_sum_bf16),
      K(normalise_crops), K(residual_add_f32), K(residual_add_bf16), K(grad_accumulate_f32), K(grad_accumulate_bf16), K(row_scale_f32), K(row_scale_bf16),
      K(centered_softmax_f32), K(weighted_rows_f32), K(local_multimodal_f32), K(soft_ce_fwd_f32), K(soft_ce_bwd_f32), K(soft_ce_fused_f32),
      K(centered_softmax_bf16), K(weighted_rows_bf16), K(local_multimodal_bf16), K(soft_ce_fwd_bf16), K(soft_ce_bwd_bf16), K(soft_ce_fused_bf16),
      K(weight_norm_f32), K(weight_norm_bf16), K(weight_norm_bwd),
      K(attn_softmax_fwd_f32), K(attn_softmax_bwd_f32),
      K(attn_softmax_fwd_bf16), K(attn_softmax_bwd_bf16),
      K(residual_ln_fwd_f32_f32), K(residual_ln_fwd_bf16_bf16), K(residual_ln_fwd_bf16_f32),
      K(residual_ln_fwd_f32_bf16), K(ln_bwd_residual_f32), K(ln_bwd_residual_bf16),
      K(adamw_ema), K(sq_norm_chunks), K(sq_norm_segments),
      K(flash_fwd_bf16), K(flash_bwd_dot_bf16), K(flash_bwd_dq_bf16), K(flash_bwd_dkdv_bf16),
  };
  return t;
}
#undef K

// The launch in progress (launches are serialised by `launch_mu`).
struct Launch {
  const Entry *kernel;
  void **args;
  dim3 grid, block;
  int nthreads;
  Barrier start;  // every thread and the launching one, once all threads exist
  bool abort = false;  // not every thread could be created: run nothing
  Barrier gate;   // between blocks: every thread, never left
  Barrier block_bar;
  std::vector<Warp> warps;
  std::mutex err_mu;
  std::string err;
  unsigned errors = 0;

  Launch(int nwarps) : warps(nwarps) { block_bar.drift = true; }
};
Launch *g_launch = nullptr;
std::mutex launch_mu;
thread_local int t_warp, t_lane;
thread_local unsigned t_shuffles, t_stores;

}  // namespace

void fail(const loc_t &where, const char *fmt, ...) {
  Launch &L = *g_launch;
  std::lock_guard<std::mutex> lk(L.err_mu);
  if (L.errors++ > 0) return;
  char msg[512];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  char buf[1024];
  std::snprintf(buf, sizeof buf, "%s:%u (%s): %s [block (%u,%u,%u), thread (%u,%u,%u)]",
                where.file_name(), where.line(), where.function_name(), msg, blockIdx.x,
                blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z);
  L.err = buf;
}

void sync_block(const loc_t &where) { g_launch->block_bar.wait("__syncthreads", where); }

void sync_warp(unsigned mask, const char *what, const loc_t &where) {
  Warp &W = g_launch->warps[t_warp];
  const unsigned lanes = W.size == 32 ? ~0u : (1u << W.size) - 1;
  if (mask != lanes)
    fail(where, "%s with mask %#x: the warp's lanes are %#x (only whole-warp collectives)", what,
         mask, lanes);
  if (const unsigned gone = W.exited.load() & mask)
    fail(where, "%s with mask %#x: lanes %#x have exited", what, mask, gone);
  W.bar.wait(what, where);
}

// One barrier per shuffle: the slots written for shuffle k are read before any lane can pass
// the barrier of shuffle k + 1, and rewritten only at shuffle k + 2.
uint64_t shfl_xor(unsigned mask, uint64_t v, int lane_mask, int width, const loc_t &where) {
  Warp &W = g_launch->warps[t_warp];
  if (width != 32) fail(where, "__shfl_xor_sync: width %d is not emulated", width);
  const unsigned p = t_shuffles++ & 1;
  W.slot[p][t_lane] = v;
  sync_warp(mask, "__shfl_xor_sync", where);
  const int src = t_lane ^ lane_mask;
  if (src < 0 || src >= W.size) {
    fail(where, "__shfl_xor_sync: lane %d reads lane %d, outside the warp", t_lane, src);
    return v;
  }
  return W.slot[p][src];
}

int lane() { return t_lane; }

bool wmma_store_lane(uint64_t fp, const loc_t &where) {
  Warp &W = g_launch->warps[t_warp];
  const unsigned p = t_stores++ & 1;
  W.fingerprint[p][t_lane] = fp;
  sync_warp(0xffffffffu, "store_matrix_sync", where);
  if (t_lane != 0) return false;
  for (int l = 1; l < W.size; ++l)
    if (W.fingerprint[p][l] != fp)
      fail(where, "store_matrix_sync: lane %d holds a different tile than lane 0", l);
  return true;
}

}  // namespace cuda_emu

extern "C" char __start_udi_emu_shared[] __attribute__((weak));
extern "C" char __stop_udi_emu_shared[] __attribute__((weak));

namespace {
using namespace cuda_emu;

// The one call site of the `start` barrier (the launching thread waits on it too).
const loc_t start_site = loc_t::current();

void worker(Launch &L, int tid) {
  const dim3 b = L.block;
  threadIdx = {tid % b.x, (tid / b.x) % b.y, tid / (b.x * b.y)};
  blockDim = L.block;
  gridDim = L.grid;
  t_warp = tid / 32;
  t_lane = tid % 32;
  t_rng = 0x9e3779b97f4a7c15ull * (tid + 1);
  const auto here = loc_t::current();
  L.start.wait("start", start_site);
  if (L.abort) return;
  for (unsigned z = 0; z < L.grid.z; ++z)
    for (unsigned y = 0; y < L.grid.y; ++y)
      for (unsigned x = 0; x < L.grid.x; ++x) {
        L.gate.wait("block start", here);
        if (tid == 0) {
          if (__start_udi_emu_shared != nullptr)
            std::memset(__start_udi_emu_shared, 0xff,
                        __stop_udi_emu_shared - __start_udi_emu_shared);
          L.block_bar.reset(L.nthreads);
          for (auto &w : L.warps) {
            w.bar.reset(w.size);
            w.exited.store(0);
          }
        }
        L.gate.wait("block start", here);
        blockIdx = {x, y, z};
        t_shuffles = t_stores = 0;
        L.kernel->call(L.kernel->fn, L.args);
        L.block_bar.leave();
        Warp &w = L.warps[t_warp];
        w.exited.fetch_or(1u << t_lane);
        w.bar.leave();
      }
}

int put(char *err, size_t len, const std::string &msg) {
  std::snprintf(err, len, "%s", msg.c_str());
  return 1;
}
}  // namespace

// Runs kernel `name` on grid × block with `args` (pointers to the argument values, as
// cuLaunchKernel takes them). `sig` names the argument types, one letter each: F f32*, B bf16*,
// U u32*, i int, z size_t, f float; it must match the kernel's parameters. Returns 0, or 1 with
// a message in `err`.
extern "C" __attribute__((visibility("default"))) int udi_cuda_emu_launch(
    const char *name, const uint32_t *grid, const uint32_t *block, void **args, const char *sig,
    char *err, size_t err_len) {
  std::lock_guard<std::mutex> lk(launch_mu);
  const Entry *e = nullptr;
  for (const auto &t : table())
    if (std::strcmp(t.name, name) == 0) e = &t;
  if (e == nullptr) return put(err, err_len, std::string("no kernel ") + name);
  if (e->sig != sig)
    return put(err, err_len, std::string(name) + " takes (" + e->sig + "), launched with (" +
                                 sig + ")");
  const dim3 g{grid[0], grid[1], grid[2]}, b{block[0], block[1], block[2]};
  const unsigned long n = (unsigned long)b.x * b.y * b.z;
  if (n == 0 || n > 1024 || b.x > 1024 || b.y > 1024 || b.z > 64)
    return put(err, err_len, "invalid block dimensions");
  if (g.x == 0 || g.y == 0 || g.z == 0 || g.x > 0x7fffffffu || g.y > 65535 || g.z > 65535)
    return put(err, err_len, "invalid grid dimensions");
  const int nwarps = (int)((n + 31) / 32);
  Launch L(nwarps);
  L.kernel = e;
  L.args = args;
  L.grid = g;
  L.block = b;
  L.nthreads = (int)n;
  L.gate.reset((int)n);
  for (int w = 0; w < nwarps; ++w) L.warps[w].size = (int)std::min<unsigned long>(32, n - 32 * w);
  L.start.reset((int)n + 1);
  g_launch = &L;
  {
    std::vector<std::thread> threads;
    threads.reserve(n);
    try {
      for (int t = 0; t < (int)n; ++t) threads.emplace_back(worker, std::ref(L), t);
    } catch (const std::system_error &e) {
      L.abort = true;  // written before the threads pass `start`
      L.errors = 1;
      L.err = std::string("creating thread ") + std::to_string(threads.size()) + " of " +
              std::to_string(n) + ": " + e.what();
      for (size_t t = threads.size(); t < n; ++t) L.start.leave();
    }
    L.start.wait("start", start_site);
    for (auto &t : threads) t.join();
  }
  g_launch = nullptr;
  if (L.errors > 0) {
    char more[64] = "";
    if (L.errors > 1) std::snprintf(more, sizeof more, " (and %u more)", L.errors - 1);
    return put(err, err_len, std::string(name) + ": " + L.err + more);
  }
  return 0;
}
