// The CUDA kernels of dylora::forward / dylora::backward: one plan per key, made once by the Python planner,
// then run from C++ with no Python per call.
//
//   key   what decides the fastest implementation and nothing that changes per call: op (and the backward's
//         mode and outputs), backend, device, dtypes, which operands are present, shared vs per-row rank and
//         where it lives, M rounded up to a power of two, N, K, r_max, the operands' layouts, torch's fp32 matmul
//         precision and deterministic mode (the same fields as backends.py's Python key)
//   plan  one part, or for a backward pair two (dx from the first, dA and dB from the second), each
//           cublas  the ATen composition of dylora.cpp (cuBLAS GEMMs)
//           triton  Triton binaries launched from C++ (triton_launch.h)
//           python  a Python callable (what the C++ launcher does not handle)
//
// A new key calls the planner once (dylora_kernels.backends.plan: it measures the candidates on this GPU, as
// dispatch.py describes, and names the fastest); its answer is kept here for the life of the process (and the
// choice on disk by dispatch.py). An answer the planner marks provisional (chosen without measuring, inside a
// CUDA-graph capture) is used once and not kept. DYLORA_CUDA_PATH=python routes every CUDA call through the
// Python path instead (backends.forward / backward), as before the GPU build.
//
// The executor is built in every build: the CPU build runs it on CPU tensors under test (_C.executor_forward /
// executor_backward, with a planner the test supplies); the GPU build registers it for CUDA tensors. CPU tensors
// that reach the CUDA kernel (a Triton backend under TRITON_INTERPRET=1) go to the Python path.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <unordered_map>

#ifdef WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGraphsUtils.cuh>
#endif

#include "dylora.h"
#include "triton_launch.h"

namespace py = pybind11;

namespace dylora::executor {
namespace {

using at::Tensor;
using std::optional;

// ---------------------------------------------------------------------------------------------
// The Python side: the planner and the Python path, set once by dylora_kernels/ops.py (kept for the
// life of the process: never destroyed, so no Python object outlives the interpreter's teardown).
// ---------------------------------------------------------------------------------------------
struct PythonSide {
  py::object plan;      // backends.plan(op, backend, args) -> (parts, final)
  py::object forward;   // backends.forward(*args, backend): the Python path
  py::object backward;  // backends.backward(*args, backend)
};

PythonSide*& python_side() {
  static PythonSide* side = nullptr;
  return side;
}

const PythonSide& python() {
  TORCH_CHECK(python_side() != nullptr, "dylora: the CUDA executor has no planner (import dylora_kernels first)");
  return *python_side();
}

py::object opt(const optional<Tensor>& t) { return t.has_value() ? py::cast(*t) : py::none(); }

// ---------------------------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------------------------
constexpr size_t kKeyFields = 26;
using Key = std::array<int64_t, kKeyFields>;

struct KeyHash {
  size_t operator()(const Key& key) const noexcept {
    uint64_t h = 1469598103934665603ULL;  // FNV-1a over the fields
    for (const int64_t v : key) h = (h ^ static_cast<uint64_t>(v)) * 1099511628211ULL;
    return static_cast<size_t>(h);
  }
};

int64_t bucket(int64_t n) {  // the next power of two (1 for n <= 1), as backends._bucket
  int64_t b = 1;
  while (b < n) b <<= 1;
  return b;
}

// A TMA descriptor's needs: unit last stride, 16-byte aligned base and row stride (backends.tma_ready); or absent.
int64_t tma_ready(const optional<Tensor>& t) {
  if (!t.has_value()) return 1;
  const auto address = reinterpret_cast<uintptr_t>(t->data_ptr());
  return t->stride(-1) == 1 && ((address | static_cast<uintptr_t>(t->stride(0) * t->element_size())) & 15) == 0;
}

int64_t rows_contiguous(const optional<Tensor>& t) { return !t.has_value() || t->stride(-1) == 1; }

int64_t backend_id(c10::string_view backend) {
  static const char* const names[] = {"auto", "cublas", "triton", "triton-tma", "triton-decode", "cpp", "reference"};
  for (int64_t i = 0; i < static_cast<int64_t>(std::size(names)); ++i) {
    if (backend == names[i]) return i;
  }
  TORCH_CHECK_VALUE(false, "dylora: unknown backend '", std::string(backend), "'");
}

// What torch's global settings change in the choice: fp32 matmul precision (tf32 allowed or not) and
// deterministic mode (a fixed choice instead of a measured one).
int64_t global_settings() {
  const auto& ctx = at::globalContext();
  return (ctx.allowTF32CuBLAS() ? 1 : 0) | (ctx.deterministicAlgorithms() ? 2 : 0) |
         (static_cast<int64_t>(ctx.float32MatmulPrecision()) << 2);
}

template <typename... Fields>
Key make_key(Fields... fields) {
  static_assert(sizeof...(Fields) <= kKeyFields, "raise kKeyFields");
  Key key{};
  size_t i = 0;
  ((key[i++] = static_cast<int64_t>(fields)), ...);
  return key;
}

Key forward_key(c10::string_view backend, const Tensor& x, const optional<Tensor>& weight,
                const optional<Tensor>& bias, const optional<Tensor>& base, const Tensor& lora_A,
                const Tensor& lora_B, const Tensor& rank, double dropout_p) {
  return make_key(0, backend_id(backend), x.device().index(), x.scalar_type(), lora_A.scalar_type(),
                  weight.has_value(), bias.has_value(), base.has_value(), rank.dim(), rank.is_cpu(), dropout_p > 0,
                  bucket(x.size(0)), lora_B.size(0), x.size(1), lora_A.size(0), tma_ready(x), tma_ready(weight),
                  rows_contiguous(base), rows_contiguous(lora_A), rows_contiguous(lora_B), global_settings());
}

Key backward_key(c10::string_view backend, const Tensor& grad, const Tensor& x, const optional<Tensor>& weight,
                 const Tensor& lora_A, const Tensor& lora_B, const Tensor& rank, bool frozen_prefix,
                 bool compute_dx, bool compute_lora, double dropout_p) {
  return make_key(1, backend_id(backend), x.device().index(), x.scalar_type(), lora_A.scalar_type(),
                  weight.has_value(), rank.dim(), rank.is_cpu(), frozen_prefix, compute_dx, compute_lora,
                  dropout_p > 0,
                  bucket(x.size(0)), lora_B.size(0), x.size(1), lora_A.size(0), tma_ready(grad), tma_ready(weight),
                  rows_contiguous(x), rows_contiguous(lora_A), rows_contiguous(lora_B), global_settings());
}

// ---------------------------------------------------------------------------------------------
// Plans
// ---------------------------------------------------------------------------------------------
enum class Kind { kCublas, kTriton, kPython };

struct Part {
  Kind kind;
  std::shared_ptr<triton_launch::Plan> triton;  // kTriton
  py::object* python = nullptr;  // kPython, and kTriton's fallback for a call its launcher does not take (never
                                 // destroyed: see PythonSide)
};

struct Plan {
  std::vector<Part> parts;  // one, or for a backward pair (dx part, dA/dB part)
};

// A part from the planner's answer (name, triton description or None, Python callable): the ATen composition
// for "cublas"; Triton binaries from C++ when a description is given and the C++ launcher takes it; else the
// Python callable (what the launcher refuses, e.g. a launch feature it does not handle).
Part make_part(const py::handle& answer) {
  const auto entry = answer.cast<py::tuple>();
  TORCH_CHECK(entry.size() == 3, "dylora: a plan part is (name, triton description, callable), got ",
              py::str(answer).cast<std::string>());
  if (entry[0].cast<std::string>() == "cublas") return {Kind::kCublas};
  auto* kernel = new py::object(py::reinterpret_borrow<py::object>(entry[2]));
  if (!entry[1].is_none()) {
    if (auto plan = triton_launch::make_plan(entry[1])) return {Kind::kTriton, std::move(plan), kernel};
  }
  return {Kind::kPython, nullptr, kernel};
}

class PlanCache {
 public:
  // The plan for `key`, asking the planner (with the call's arguments) on a miss.
  std::shared_ptr<const Plan> get(const Key& key, const char* op, c10::string_view backend,
                                  const std::function<py::tuple()>& args) {
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      const auto found = plans_.find(key);
      if (found != plans_.end()) return found->second;
    }
    py::gil_scoped_acquire gil;
    const auto answer = python().plan(op, std::string(backend), args()).cast<py::tuple>();
    auto plan = std::make_shared<Plan>();
    for (const auto& part : answer[0]) plan->parts.push_back(make_part(part));
    TORCH_CHECK(!plan->parts.empty() && plan->parts.size() <= 2, "dylora: the planner answered ",
                plan->parts.size(), " parts (1, or 2 for a backward pair)");
    if (answer[1].cast<bool>()) {  // final: keep it (a provisional choice is used once)
      const std::lock_guard<std::mutex> lock(mutex_);
      plans_.emplace(key, plan);
    }
    ++misses_;
    return plan;
  }

  void clear() {
    const std::lock_guard<std::mutex> lock(mutex_);
    plans_.clear();
  }

  int64_t size() {
    const std::lock_guard<std::mutex> lock(mutex_);
    return static_cast<int64_t>(plans_.size());
  }

  int64_t misses() const { return misses_; }

 private:
  std::mutex mutex_;
  std::unordered_map<Key, std::shared_ptr<const Plan>, KeyHash> plans_;
  std::atomic<int64_t> misses_{0};
};

PlanCache& plans() {
  static auto* cache = new PlanCache();  // never destroyed (it holds Python objects)
  return *cache;
}

// ---------------------------------------------------------------------------------------------
// Ranks: the Triton kernels read the rank on the device. A host rank (a 0-d CPU tensor: a Python int the
// caller passed) becomes a cached device tensor per (value, device): no copy per call. The first one made on a
// device makes every rank 0..r_max at once (one device-side arange, no host→device copy), 16 bytes apart (the
// alignment a fresh tensor has, so Triton specialises alike), so that a CUDA graph captured later with any rank
// finds its copy (as backends.prepare_device_ranks does for the Python path).
// ---------------------------------------------------------------------------------------------
bool capturing(const Tensor& x) {
#ifdef WITH_CUDA
  return x.is_cuda() && at::cuda::currentStreamCaptureStatus() != at::cuda::CaptureStatus::None;
#else
  (void)x;
  return false;
#endif
}

Tensor rank_on(const Tensor& rank, const Tensor& x, int64_t r_max) {
  if (rank.device() == x.device()) return rank;
  static std::mutex mutex;
  static auto* cache = new std::map<std::pair<int64_t, c10::DeviceIndex>, Tensor>();
  const int64_t value = rank.item<int64_t>();  // a 0-d CPU tensor: a host read, no sync
  const c10::DeviceIndex index = x.device().index();
  const std::lock_guard<std::mutex> lock(mutex);
  auto found = cache->find({value, index});
  if (found != cache->end()) return found->second;
  TORCH_CHECK(!capturing(x), "dylora: rank ", value, " given on the host has no copy on ", x.device(),
              " yet, and none can be made during CUDA-graph capture: run the layer once eagerly before capturing, "
              "or pass the rank as an integer tensor on the GPU");
  if (value < 0 || value > r_max) {
    return cache->emplace(std::make_pair(value, index), rank.to(x.device(), at::kLong)).first->second;
  }
  Tensor table = at::zeros({r_max + 1, 2}, x.options().dtype(at::kLong));
  table.select(1, 0).copy_(at::arange(r_max + 1, table.options()));
  for (int64_t b = 0; b <= r_max; ++b) cache->emplace(std::make_pair(b, index), table.select(0, b).select(0, 0));
  return cache->at({value, index});
}

// ---------------------------------------------------------------------------------------------
// Execution
// ---------------------------------------------------------------------------------------------
using ForwardResult = std::tuple<Tensor, Tensor>;
using BackwardResult = std::tuple<Tensor, Tensor, Tensor>;

ForwardResult run_forward(const Part& part, const Tensor& x, const optional<Tensor>& weight,
                          const optional<Tensor>& bias, const optional<Tensor>& base, const Tensor& lora_A,
                          const Tensor& lora_B, const Tensor& rank, double alpha, bool need_u, double dropout_p,
                          const optional<Tensor>& dropout_seed) {
  switch (part.kind) {
    case Kind::kCublas:
      return forward_aten(x, weight, bias, base, lora_A, lora_B, rank, alpha, need_u, dropout_p, dropout_seed);
    case Kind::kTriton:  // the C++ launcher, or (a launch it does not take yet) the Python kernel below
      if (auto out = triton_launch::forward(*part.triton, x, weight, bias, base, lora_A, lora_B,
                                            rank_on(rank, x, lora_A.size(0)), alpha, need_u, dropout_p,
                                            dropout_seed)) {
        return *out;
      }
      [[fallthrough]];
    case Kind::kPython: {
      py::gil_scoped_acquire gil;
      return (*part.python)(x, opt(weight), opt(bias), opt(base), lora_A, lora_B, rank, alpha, need_u, dropout_p,
                            opt(dropout_seed))
          .cast<ForwardResult>();
    }
  }
  TORCH_CHECK(false, "dylora: unknown plan kind");
}

BackwardResult run_backward(const Part& part, const Tensor& grad, const Tensor& x, const optional<Tensor>& weight,
                            const Tensor& lora_A, const Tensor& lora_B, const Tensor& u, const Tensor& rank,
                            double alpha, bool frozen_prefix, bool compute_dx, bool compute_lora, double dropout_p,
                            const optional<Tensor>& dropout_seed) {
  switch (part.kind) {
    case Kind::kCublas:
      return backward_aten(grad, x, weight, lora_A, lora_B, u, rank, alpha, frozen_prefix, compute_dx,
                           compute_lora, dropout_p, dropout_seed);
    case Kind::kTriton:  // as in run_forward
      if (auto out = triton_launch::backward(*part.triton, grad, x, weight, lora_A, lora_B, u,
                                             rank_on(rank, x, lora_A.size(0)), alpha, frozen_prefix, compute_dx,
                                             compute_lora, dropout_p, dropout_seed)) {
        return *out;
      }
      [[fallthrough]];
    case Kind::kPython: {
      py::gil_scoped_acquire gil;
      return (*part.python)(grad, x, opt(weight), lora_A, lora_B, u, rank, alpha, frozen_prefix, compute_dx,
                            compute_lora, dropout_p, opt(dropout_seed))
          .cast<BackwardResult>();
    }
  }
  TORCH_CHECK(false, "dylora: unknown plan kind");
}

ForwardResult execute_forward(const Tensor& x, const optional<Tensor>& weight, const optional<Tensor>& bias,
                              const optional<Tensor>& base, const Tensor& lora_A, const Tensor& lora_B,
                              const Tensor& rank, double alpha, bool need_u, c10::string_view backend,
                              double dropout_p, const optional<Tensor>& dropout_seed) {
  const c10::OptionalDeviceGuard device(x.device());
  const auto plan = plans().get(forward_key(backend, x, weight, bias, base, lora_A, lora_B, rank, dropout_p),
                                "forward", backend, [&] {
                                  return py::make_tuple(x, opt(weight), opt(bias), opt(base), lora_A, lora_B, rank,
                                                        alpha, need_u, dropout_p, opt(dropout_seed));
                                });
  return run_forward(plan->parts[0], x, weight, bias, base, lora_A, lora_B, rank, alpha, need_u, dropout_p,
                     dropout_seed);
}

BackwardResult execute_backward(const Tensor& grad, const Tensor& x, const optional<Tensor>& weight,
                                const Tensor& lora_A, const Tensor& lora_B, const Tensor& u, const Tensor& rank,
                                double alpha, bool frozen_prefix, bool compute_dx, bool compute_lora,
                                c10::string_view backend, double dropout_p, const optional<Tensor>& dropout_seed) {
  const c10::OptionalDeviceGuard device(x.device());
  const auto plan = plans().get(
      backward_key(backend, grad, x, weight, lora_A, lora_B, rank, frozen_prefix, compute_dx, compute_lora,
                   dropout_p),
      "backward", backend, [&] {
        return py::make_tuple(grad, x, opt(weight), lora_A, lora_B, u, rank, alpha, frozen_prefix, compute_dx,
                              compute_lora, dropout_p, opt(dropout_seed));
      });
  if (plan->parts.size() == 1) {
    return run_backward(plan->parts[0], grad, x, weight, lora_A, lora_B, u, rank, alpha, frozen_prefix, compute_dx,
                        compute_lora, dropout_p, dropout_seed);
  }
  // A pair: dx from the first part, dA and dB from the second.
  Tensor dx = std::get<0>(run_backward(plan->parts[0], grad, x, weight, lora_A, lora_B, u, rank, alpha,
                                       frozen_prefix, true, false, dropout_p, dropout_seed));
  auto [unused, dA, dB] = run_backward(plan->parts[1], grad, x, weight, lora_A, lora_B, u, rank, alpha,
                                       frozen_prefix, false, true, dropout_p, dropout_seed);
  return {dx, dA, dB};
}

// ---------------------------------------------------------------------------------------------
// The kernels registered for CUDA tensors (GPU build)
// ---------------------------------------------------------------------------------------------
#ifdef WITH_CUDA
bool python_path_forced() {
  static const bool forced = [] {
    const char* value = std::getenv("DYLORA_CUDA_PATH");
    if (value == nullptr || !*value || std::strcmp(value, "cpp") == 0) return false;
    TORCH_CHECK_VALUE(std::strcmp(value, "python") == 0, "DYLORA_CUDA_PATH must be 'cpp' (default) or 'python', got '",
                      value, "'");
    return true;
  }();
  return forced;
}

ForwardResult forward_python(const Tensor& x, const optional<Tensor>& weight, const optional<Tensor>& bias,
                             const optional<Tensor>& base, const Tensor& lora_A, const Tensor& lora_B,
                             const Tensor& rank, double alpha, bool need_u, c10::string_view backend,
                             double dropout_p, const optional<Tensor>& dropout_seed) {
  py::gil_scoped_acquire gil;
  return python()
      .forward(x, opt(weight), opt(bias), opt(base), lora_A, lora_B, rank, alpha, need_u, std::string(backend),
               dropout_p, opt(dropout_seed))
      .cast<ForwardResult>();
}

BackwardResult backward_python(const Tensor& grad, const Tensor& x, const optional<Tensor>& weight,
                               const Tensor& lora_A, const Tensor& lora_B, const Tensor& u, const Tensor& rank,
                               double alpha, bool frozen_prefix, bool compute_dx, bool compute_lora,
                               c10::string_view backend, double dropout_p, const optional<Tensor>& dropout_seed) {
  py::gil_scoped_acquire gil;
  return python()
      .backward(grad, x, opt(weight), lora_A, lora_B, u, rank, alpha, frozen_prefix, compute_dx, compute_lora,
                std::string(backend), dropout_p, opt(dropout_seed))
      .cast<BackwardResult>();
}

ForwardResult forward_cuda(const Tensor& x, const optional<Tensor>& weight, const optional<Tensor>& bias,
                           const optional<Tensor>& base, const Tensor& lora_A, const Tensor& lora_B,
                           const Tensor& rank, double alpha, bool need_u, c10::string_view backend,
                           double dropout_p, const optional<Tensor>& dropout_seed) {
  if (!x.is_cuda() || python_path_forced()) {
    return forward_python(x, weight, bias, base, lora_A, lora_B, rank, alpha, need_u, backend, dropout_p,
                          dropout_seed);
  }
  return execute_forward(x, weight, bias, base, lora_A, lora_B, rank, alpha, need_u, backend, dropout_p,
                         dropout_seed);
}

BackwardResult backward_cuda(const Tensor& grad, const Tensor& x, const optional<Tensor>& weight,
                             const Tensor& lora_A, const Tensor& lora_B, const Tensor& u, const Tensor& rank,
                             double alpha, bool frozen_prefix, bool compute_dx, bool compute_lora,
                             c10::string_view backend, double dropout_p, const optional<Tensor>& dropout_seed) {
  if (!x.is_cuda() || python_path_forced()) {
    return backward_python(grad, x, weight, lora_A, lora_B, u, rank, alpha, frozen_prefix, compute_dx,
                           compute_lora, backend, dropout_p, dropout_seed);
  }
  return execute_backward(grad, x, weight, lora_A, lora_B, u, rank, alpha, frozen_prefix, compute_dx, compute_lora,
                          backend, dropout_p, dropout_seed);
}

#endif  // WITH_CUDA

}  // namespace

// Called by the extension's PYBIND11_MODULE (dylora.cpp).
void register_bindings(py::module& m) {
  m.def("set_python_side",
        [](py::object plan, py::object forward, py::object backward) {
          delete python_side();
          python_side() = new PythonSide{std::move(plan), std::move(forward), std::move(backward)};
        },
        "the planner and the Python path the CUDA executor calls (dylora_kernels/ops.py sets them)");
  using namespace pybind11::literals;
  m.def("executor_forward", &execute_forward, "the CUDA executor's forward (tests run it on CPU tensors)", "x"_a,
        "weight"_a, "bias"_a, "base"_a, "lora_A"_a, "lora_B"_a, "rank"_a, "alpha"_a, "need_u"_a, "backend"_a,
        "dropout_p"_a = 0.0, "dropout_seed"_a = py::none());
  m.def("executor_backward", &execute_backward, "the CUDA executor's backward (tests run it on CPU tensors)",
        "grad"_a, "x"_a, "weight"_a, "lora_A"_a, "lora_B"_a, "u"_a, "rank"_a, "alpha"_a, "frozen_prefix"_a,
        "compute_dx"_a, "compute_lora"_a, "backend"_a, "dropout_p"_a = 0.0, "dropout_seed"_a = py::none());
  m.def("executor_clear", [] { plans().clear(); }, "forget every plan");
  m.def("executor_stats", [] { return py::make_tuple(plans().size(), plans().misses()); },
        "(plans kept, planner calls so far)");
  m.attr("CUDA_BUILD") = py::bool_(
#ifdef WITH_CUDA
      true
#else
      false
#endif
  );
}

}  // namespace dylora::executor

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(dylora, CUDA, m) {
  m.impl("forward", &dylora::executor::forward_cuda);
  m.impl("backward", &dylora::executor::backward_cuda);
}
#endif
