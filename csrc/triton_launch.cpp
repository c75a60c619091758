// Triton binaries launched from C++ (see triton_launch.h). Compiled in every build: without WITH_CUDA (and
// whenever the recording stub is on) a launch is recorded instead of reaching the driver.
//
// Sources of truth, mirrored here and checked against by tests/test_triton_launch.py:
//   the launch wrappers     dylora_kernels/triton/__init__.py, kernels.py (shrink, fused_linear, decode_linear,
//                           finish, lora_grad, frozen_grad), hopper.py (fused_linear, _run)
//   the specialisation      triton 3.6's native_specialize_impl, as dylora_kernels/triton/launch.py calls it
//   the parameter packing   triton 3.6's make_launcher / make_tensordesc_arg (triton/backends/nvidia/driver.py)
#include "triton_launch.h"

#include "dropout.h"

#include <ATen/ATen.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>  // at::Tensor <-> torch.Tensor for the test bindings

#include <array>
#include <chrono>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#ifdef WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda.h>
#include <cuda_runtime_api.h>
#endif

namespace py = pybind11;

namespace dylora::triton_launch {
namespace {

// ------------------------------------------------------------------------------------------------
// Kernels (steps) and their runtime arguments
// ------------------------------------------------------------------------------------------------
enum Step : int { kShrink, kFused, kDecode, kGrad, kGemv, kFinish, kTma, kNumSteps };
constexpr const char* kStepNames[kNumSteps] = {"shrink", "fused", "decode", "grad", "gemv", "finish", "tma"};
// Runtime parameters per kernel (make_plan checks them against the kernel's own).
constexpr int kStepParams[kNumSteps] = {25, 32, 35, 21, 20, 12, 20};

// One runtime argument, as a Python wrapper passes it.
// (Trivial, so that a launch's array of them costs nothing to set up: each is written before it is read.)
struct Arg {
  enum Kind : uint8_t { kNone, kTensor, kInt, kFloat, kDesc } kind;
  at::ScalarType dtype;                 // kTensor, kDesc
  int64_t i;                            // kInt: the value; kTensor, kDesc: the data pointer
  double f;                             // kFloat
  int64_t shape[2], strides[2];         // kDesc (the block shape comes with the binary)
};

Arg none() {
  Arg a{};
  a.kind = Arg::kNone;
  return a;
}
Arg tensor(const at::Tensor& t) {
  Arg a{};
  a.kind = Arg::kTensor;
  a.dtype = t.scalar_type();
  a.i = reinterpret_cast<int64_t>(t.data_ptr());
  return a;
}
Arg integer(int64_t v) {
  Arg a{};
  a.kind = Arg::kInt;
  a.i = v;
  return a;
}
Arg real(double v) {
  Arg a{};
  a.kind = Arg::kFloat;
  a.f = v;
  return a;
}
Arg desc(const at::Tensor& base, int64_t rows, int64_t cols) {  // TensorDescriptor(base, [rows, cols], strides)
  Arg a = tensor(base);
  a.kind = Arg::kDesc;
  a.shape[0] = rows, a.shape[1] = cols;
  a.strides[0] = base.stride(0), a.strides[1] = base.stride(1);
  return a;
}

const char* dtype_name(at::ScalarType t) {  // torch.<name>
  switch (t) {
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kByte: return "uint8";
    case at::kChar: return "int8";
    case at::kShort: return "int16";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    case at::kBool: return "bool";
    default: throw std::invalid_argument(std::string("triton_launch: no triton dtype for ") + c10::toString(t));
  }
}

// ------------------------------------------------------------------------------------------------
// Host formulas of dylora_kernels/triton/kernels.py
// ------------------------------------------------------------------------------------------------
int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }  // a ≥ 0, b > 0
int64_t next_power_of_2(int64_t n) {
  int64_t p = 1;
  while (p < n) p <<= 1;
  return p;
}
int64_t bucket(int64_t n) { return next_power_of_2(n); }
int64_t block_r(int64_t r_max) { return std::min<int64_t>(64, next_power_of_2(std::max<int64_t>(16, r_max))); }
int64_t seed_block_r(int64_t r_max) { return std::min<int64_t>(32, block_r(r_max)); }
int64_t layout_code(std::initializer_list<const at::Tensor*> tensors) {
  int64_t code = 0;
  for (const at::Tensor* t : tensors)
    code = code * 4 + (t == nullptr ? 3 : t->stride(-1) == 1 ? 0 : t->stride(0) == 1 ? 1 : 2);
  return code;
}
const at::Tensor* opt(const std::optional<at::Tensor>& t) { return t ? &*t : nullptr; }

// kernels.dropout_args / _dropout_launch: the (seed_ptr, threshold) runtime arguments and the DROPOUT and
// DROPOUT_VEC4 constexprs of a launch.
// The threshold floor(p·2³²) travels as the int32 with its bits (every p: one binary); none and 0 without dropout.
struct Drop {
  const at::Tensor* seed = nullptr;  // nullptr: DROPOUT=False
  int64_t threshold = 0;
  bool on() const { return seed != nullptr; }
  // DROPOUT_VEC4 of a launch whose mask has k columns (one Philox call per 4 elements when k % 4 == 0)
  bool vec4(int64_t k) const { return on() && k % 4 == 0; }
};
Drop drop_of(double p, const std::optional<at::Tensor>& seed) {
  if (!(p > 0)) return {};
  if (!seed) throw std::invalid_argument("triton_launch: dropout_p > 0 without a dropout_seed");
  const int64_t t = static_cast<int64_t>(dropout::threshold(p));
  return {&*seed, t >= (int64_t{1} << 31) ? t - (int64_t{1} << 32) : t};
}
Arg seed_arg(const Drop& d) { return d.on() ? tensor(*d.seed) : none(); }

// ------------------------------------------------------------------------------------------------
// Binaries: what binary_for answers, parsed once
// ------------------------------------------------------------------------------------------------
enum PType : uint8_t { kDrop, kPtr, kI1, kI8, kI16, kI32, kI64, kU8, kU16, kU32, kU64, kF16, kBF16, kF32, kF64, kTmaDesc };

PType parse_type(const std::string& t) {
  static const std::unordered_map<std::string, PType> types = {
      {"constexpr", kDrop}, {"i1", kI1},   {"i8", kI8},     {"i16", kI16},   {"i32", kI32}, {"i64", kI64},
      {"u1", kU8},          {"u8", kU8},   {"u16", kU16},   {"u32", kU32},   {"u64", kU64}, {"fp16", kF16},
      {"bf16", kBF16},      {"fp32", kF32}, {"f32", kF32},  {"fp64", kF64}};
  if (!t.empty() && t[0] == '*') return kPtr;
  if (t.rfind("tensordesc", 0) == 0) return kTmaDesc;
  auto it = types.find(t);
  if (it == types.end()) throw std::invalid_argument("triton_launch: unknown signature type " + t);
  return it->second;
}

// Bytes triton's launcher passes for one parameter of this type (ty_to_cpp / FLOAT_STORAGE_TYPE).
int param_size(PType t) {
  switch (t) {
    case kI1: case kI8: case kU8: return 1;
    case kI16: case kU16: case kF16: case kBF16: return 2;
    case kI32: case kU32: case kF32: return 4;
    case kPtr: case kI64: case kU64: case kF64: return 8;
    case kTmaDesc: return 128;
    default: return 0;
  }
}

struct DescMeta {
  int swizzle = 0, elem_size = 0, elem_type = 0;
  uint32_t block[2] = {0, 0};  // as the descriptor's block shape: [rows, cols]
};

struct Binary {
  std::string name, refused;  // refused: why this launcher does not run it (then nothing else is read)
  uint64_t function = 0;
  int num_warps = 0, shared = 0;
  std::vector<PType> types;      // per runtime parameter
  std::vector<std::string> type_names;  // as triton writes them (recorded, for tests)
  std::vector<DescMeta> descs;   // per descriptor parameter
  int64_t block_m = 0, block_n = 0, block_k = 0, out_block_m = 0;
  int64_t ctas_per_sm = 1;       // the TMA kernel's persistent programs per SM (its config's CTAS_PER_SM)
  std::vector<py::object> tail;  // constexpr values (recorded, for tests)
  py::object kernel;             // the compiled kernel: owns the module that holds the function
  bool attribute_set = false;
};

// ------------------------------------------------------------------------------------------------
// The recording stub (tests, benchmarks, and every build without a driver)
// ------------------------------------------------------------------------------------------------
struct Record {
  std::string name;
  std::array<uint32_t, 3> grid;
  int num_warps, shared;
  std::vector<Arg> args;
  std::vector<std::pair<PType, std::array<uint8_t, 16>>> packed;  // descriptors: their first 16 bytes unused
  const Binary* binary;
};
enum RecordMode { kOff = 0, kCount = 1, kFull = 2 };
RecordMode g_record = kOff;
int64_t g_launches = 0;
std::vector<Record> g_records;

// ------------------------------------------------------------------------------------------------
// The driver (GPU build), reached through cudaGetDriverEntryPoint: no libcuda link
// ------------------------------------------------------------------------------------------------
#ifdef WITH_CUDA
struct Driver {
  decltype(&cuLaunchKernelEx) launch = nullptr;
  decltype(&cuFuncSetAttribute) set_attribute = nullptr;
  decltype(&cuTensorMapEncodeTiled) encode_tiled = nullptr;
};

template <typename F>
void entry_point(const char* symbol, F& fn) {
  void* p = nullptr;
  cudaDriverEntryPointQueryResult status;
#if CUDART_VERSION >= 12050
  cudaError_t err = cudaGetDriverEntryPointByVersion(symbol, &p, 12000, cudaEnableDefault, &status);
#else
  cudaError_t err = cudaGetDriverEntryPoint(symbol, &p, cudaEnableDefault, &status);
#endif
  if (err != cudaSuccess || status != cudaDriverEntryPointSuccess || p == nullptr)
    throw std::runtime_error(std::string("triton_launch: the CUDA driver has no ") + symbol);
  fn = reinterpret_cast<F>(p);
}

const Driver& driver() {
  static Driver d = [] {
    Driver d;
    entry_point("cuLaunchKernelEx", d.launch);
    entry_point("cuFuncSetAttribute", d.set_attribute);
    entry_point("cuTensorMapEncodeTiled", d.encode_tiled);
    return d;
  }();
  return d;
}

void check(CUresult r, const char* what) {
  if (r != CUDA_SUCCESS) throw std::runtime_error(std::string("triton_launch: ") + what + " failed (CUresult " +
                                                  std::to_string(static_cast<int>(r)) + ")");
}

// fillTMADescriptor of triton/backends/nvidia/driver.c, for a 2-D descriptor with padding "zero".
void encode_tma(void* out, const Arg& a, const DescMeta& m) {
  uint64_t dims[2] = {static_cast<uint64_t>(a.shape[1]), static_cast<uint64_t>(a.shape[0])};
  uint64_t strides[1] = {static_cast<uint64_t>(m.elem_size * a.strides[0])};
  uint32_t box[2] = {m.block[1], m.block[0]};
  uint32_t element_strides[2] = {1, 1};
  check(driver().encode_tiled(static_cast<CUtensorMap*>(out), static_cast<CUtensorMapDataType>(m.elem_type), 2,
                              reinterpret_cast<void*>(a.i), dims, strides, box, element_strides,
                              CU_TENSOR_MAP_INTERLEAVE_NONE, static_cast<CUtensorMapSwizzle>(m.swizzle),
                              CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE),
        "cuTensorMapEncodeTiled");
}
#endif

// triton's TMA_DTYPE_DEVICE_TO_HOST (driver.py): the compiled kernel's elem_type -> CUtensorMapDataType
int tma_dtype_device_to_host(int t) { return t == 8 ? 10 : t == 9 ? 8 : t == 10 ? 9 : t; }

// ------------------------------------------------------------------------------------------------
// One launch: its arguments, the key of its binary, then packing and launching
// ------------------------------------------------------------------------------------------------
struct Launch {
  Step step = kShrink;
  std::array<Arg, 48> args;
  int n = 0;
  std::array<std::pair<const char*, int64_t>, 12> constexprs;  // name, value (flags: 0/1)
  uint32_t bool_mask = 0;                                       // which constexprs are Python bools
  uint32_t text_mask = 0;  // which are strings: index into kTexts (PRECISION: "tf32" or "ieee")
  int nc = 0;
  std::array<int64_t, 3> extra{0, 0, 0};  // key values beyond the arguments (the TMA config key's buckets)
  const Binary* binary = nullptr;
  std::array<uint32_t, 3> grid{1, 1, 1};

  Launch() = default;
  explicit Launch(Step s) : step(s) {}
  Launch& operator<<(const Arg& a) {
    if (n == static_cast<int>(args.size())) throw std::length_error("triton_launch: too many kernel arguments");
    args[n++] = a;
    return *this;
  }
  Launch& strides(const at::Tensor& t) {
    for (int64_t d = 0; d < t.dim(); ++d) *this << integer(t.stride(d));
    return *this;
  }
  Launch& strides(const at::Tensor* t, int dims) {  // _strides(t, dims): zeros for an absent operand
    if (t != nullptr) return strides(*t);
    for (int d = 0; d < dims; ++d) *this << integer(0);
    return *this;
  }
  Launch& flag(const char* name, bool v) {
    bool_mask |= 1u << nc;
    constexprs[nc++] = {name, v};
    return *this;
  }
  Launch& value(const char* name, int64_t v) {
    constexprs[nc++] = {name, v};
    return *this;
  }
  Launch& text(const char* name, int64_t index) {  // a string constexpr, kTexts[index]
    text_mask |= 1u << nc;
    constexprs[nc++] = {name, index};
    return *this;
  }
};

// The string constexprs' values: PRECISION, how dots with fp32 operands run (kernels._options; the plan's).
constexpr const char* kTexts[] = {"tf32", "ieee"};

struct KeyHash {
  size_t operator()(const std::vector<int64_t>& k) const {
    uint64_t h = 1469598103934665603ull;
    for (int64_t v : k) h = (h ^ static_cast<uint64_t>(v)) * 1099511628211ull;
    return h;
  }
};

}  // namespace

class __attribute__((visibility("hidden"))) Plan {
 public:
  struct Kernel {
    std::string name;
    std::vector<bool> specialize, align, is_key;
  };
  std::string op, variant;
  int64_t num_sms = 0, split_rows = 0;
  int64_t precision = 0;  // index into kTexts: the PRECISION constexpr of the launches that take one
  std::array<Kernel, kNumSteps> kernels;
  py::object binary_for;
  std::unordered_map<std::vector<int64_t>, std::unique_ptr<Binary>, KeyHash> binaries;
  std::mutex mutex;

  ~Plan() {  // its Python objects go with the GIL held (or are leaked at interpreter exit)
    if (Py_IsInitialized()) {
      py::gil_scoped_acquire gil;
      binary_for = py::object();
      binaries.clear();
    } else {
      binary_for.release();
      for (auto& [key, b] : binaries) {
        b->kernel.release();
        for (auto& t : b->tail) t.release();
      }
    }
  }

  // The binary for this launch (asking Python on a new key), or nullptr when Python has none yet.
  const Binary* resolve(Launch& l);

 private:
  std::unique_ptr<Binary> ask_python(const Launch& l);
};

namespace {

// triton's native_specialize_impl, reduced to what tells binaries apart: a code per argument.
int64_t spec_code(const Arg& a, bool specialize, bool align) {
  switch (a.kind) {
    case Arg::kNone: return 0;
    case Arg::kTensor:
      return 1 | (static_cast<int64_t>(a.dtype) << 8) | ((align && a.i % 16 == 0) ? 16 : 0);
    case Arg::kInt: {
      int64_t width = (a.i >= INT32_MIN && a.i <= INT32_MAX) ? 0 : 1;  // i32 : i64
      int64_t special = !specialize ? 0 : a.i == 1 ? 1 : a.i % 16 == 0 ? 2 : 0;
      return 2 | (width << 8) | (special << 4);
    }
    case Arg::kFloat: return 3;
    case Arg::kDesc: return 4 | (static_cast<int64_t>(a.dtype) << 8);
  }
  return -1;
}

py::object to_python(const Arg& a) {
  switch (a.kind) {
    case Arg::kNone: return py::none();
    case Arg::kTensor: return py::make_tuple("t", dtype_name(a.dtype), a.i);
    case Arg::kInt: return py::int_(a.i);
    case Arg::kFloat: return py::float_(a.f);
    case Arg::kDesc:
      return py::make_tuple("d", dtype_name(a.dtype), a.i, py::make_tuple(a.shape[0], a.shape[1]),
                            py::make_tuple(a.strides[0], a.strides[1]));
  }
  return py::none();
}

std::unique_ptr<Binary> parse_binary(py::handle d, Step step) {
  auto b = std::make_unique<Binary>();
  b->name = d["name"].cast<std::string>();
  auto refuse = [&](const std::string& why) {
    b->refused = why;
    return std::move(b);
  };
  if (d["num_ctas"].cast<int>() != 1) return refuse("num_ctas != 1");
  if (d["launch_cooperative_grid"].cast<bool>()) return refuse("a cooperative launch");
  if (d["launch_pdl"].cast<bool>()) return refuse("a PDL launch");
  if (d["global_scratch_size"].cast<int64_t>() != 0 || d["profile_scratch_size"].cast<int64_t>() != 0)
    return refuse("global or profile scratch memory");
  b->function = d["function"].cast<uint64_t>();
  b->num_warps = d["num_warps"].cast<int>();
  b->shared = d["shared"].cast<int>();
  b->type_names = d["types"].cast<std::vector<std::string>>();
  for (const std::string& t : b->type_names) b->types.push_back(parse_type(t));
  if (static_cast<int>(b->types.size()) != kStepParams[step])
    throw std::runtime_error("triton_launch: " + b->name + " has " + std::to_string(b->types.size()) +
                             " runtime parameters, this launcher passes " + std::to_string(kStepParams[step]));
  int n_desc = 0;
  for (PType t : b->types) n_desc += t == kTmaDesc;
  py::list metas = d["tensordesc_meta"];
  py::list blocks = d["desc_blocks"];
  if (n_desc > 0 && (static_cast<int>(metas.size()) != n_desc || static_cast<int>(blocks.size()) != n_desc))
    return refuse("tensor descriptors without TMA metadata");
  for (int i = 0; i < n_desc; ++i) {
    py::dict m = metas[i];
    if (m["fp4_padded"].cast<bool>()) return refuse("an fp4-padded descriptor");
    DescMeta dm;
    dm.swizzle = m["swizzle"].cast<int>();
    dm.elem_size = m["elem_size"].cast<int>();
    dm.elem_type = tma_dtype_device_to_host(m["elem_type"].cast<int>());
    // The box encoded is the compiled kernel's (the out descriptor's may be narrower than the config's block).
    auto block = m["block_size"].cast<std::vector<int64_t>>();
    if (block.size() != 2) return refuse("a descriptor that is not 2-D");
    dm.block[0] = static_cast<uint32_t>(block[0]), dm.block[1] = static_cast<uint32_t>(block[1]);
    b->descs.push_back(dm);
  }
  py::dict meta = d["meta"];
  auto get = [&](const char* k) { return meta.contains(k) ? meta[k].cast<int64_t>() : 0; };
  b->block_m = get("BLOCK_M"), b->block_n = get("BLOCK_N"), b->block_k = get("BLOCK_K");
  b->ctas_per_sm = std::max<int64_t>(1, get("CTAS_PER_SM"));
  if (n_desc == 3) b->out_block_m = blocks[2].cast<std::vector<int64_t>>().at(0);  // the grid's tile rows
  for (auto v : d["tail"]) b->tail.push_back(py::reinterpret_borrow<py::object>(v));
  if (d.contains("kernel")) b->kernel = d["kernel"];
  return b;
}

}  // namespace

std::unique_ptr<Binary> Plan::ask_python(const Launch& l) {
  py::gil_scoped_acquire gil;
  py::list args;
  for (int i = 0; i < l.n; ++i) args.append(to_python(l.args[i]));
  py::list constexprs;
  for (int i = 0; i < l.nc; ++i) {
    const int64_t value = l.constexprs[i].second;
    py::object v = (l.text_mask >> i) & 1   ? py::object(py::str(kTexts[value]))
                   : (l.bool_mask >> i) & 1 ? py::object(py::bool_(value != 0))
                                            : py::object(py::int_(value));
    constexprs.append(py::make_tuple(l.constexprs[i].first, v));
  }
  py::object answer = binary_for(kStepNames[l.step], args, constexprs);
  if (answer.is_none()) return nullptr;
  return parse_binary(answer, l.step);
}

const Binary* Plan::resolve(Launch& l) {
  const Kernel& k = kernels[l.step];
  if (l.n != kStepParams[l.step])  // a launch wrapper below out of step with the table above
    throw std::logic_error("triton_launch: " + k.name + " launched with " + std::to_string(l.n) + " arguments");
  thread_local std::vector<int64_t> key;  // reused: no allocation per launch once warm
  key.clear();
  key.push_back(l.step);
  for (int i = 0; i < l.n; ++i) {
    key.push_back(spec_code(l.args[i], k.specialize[i], k.align[i]));
    if (k.is_key[i]) key.push_back(l.args[i].i);  // the autotune key's values pick the config
  }
  for (int i = 0; i < l.nc; ++i) key.push_back(l.constexprs[i].second);
  key.insert(key.end(), l.extra.begin(), l.extra.end());
  const Binary* found = nullptr;
  {
    std::lock_guard<std::mutex> lock(mutex);  // never held while Python runs (that would deadlock on the GIL)
    auto it = binaries.find(key);
    if (it != binaries.end()) found = it->second.get();
  }
  if (found == nullptr) {
    std::vector<int64_t> new_key = key;  // (the buffer is reused by the launches binary_for may cause)
    std::unique_ptr<Binary> b = ask_python(l);
    if (!b) return nullptr;  // not yet run through Python: not kept, asked again next time
    std::unique_lock<std::mutex> lock(mutex);
    auto [it, inserted] = binaries.try_emplace(std::move(new_key), std::move(b));
    found = it->second.get();
    lock.unlock();
    if (!inserted) {  // another thread's came first: ours holds Python objects, dropped with the GIL
      py::gil_scoped_acquire gil;
      b.reset();
    }
  }
  return found->refused.empty() ? found : nullptr;
}

namespace {

// One launch's parameters, packed as triton's launcher packs them: params[i] points at the i-th parameter's bytes.
struct Packed {
  alignas(128) uint8_t storage[2048];
  void* params[48];
  std::array<std::pair<PType, int>, 48> layout;  // type and size of each parameter
  int n = 0;
  size_t offset = 0;

  void put(PType t, const void* src, int size, int align) {
    offset = (offset + align - 1) / align * align;
    if (offset + size > sizeof(storage) || n == 48) throw std::runtime_error("triton_launch: too many parameters");
    std::memcpy(storage + offset, src, size);
    layout[n] = {t, size};
    params[n++] = storage + offset;
    offset += size;
  }
};

// make_launcher's parameter list (constexprs dropped; fp32 as its bits; a TMA descriptor as its CUtensorMap, then
// shape as i32 and strides as i64) and the global and profile scratch pointers last (none: binaries that need
// scratch are refused). encode: fill the CUtensorMaps (the GPU build, launching for real).
void pack(const Binary& b, const Launch& l, Packed& p, bool encode) {
  int desc = 0;
  for (int i = 0; i < l.n; ++i) {
    const Arg& a = l.args[i];
    PType t = b.types[i];
    bool ok = t == kDrop || (t == kPtr && a.kind == Arg::kTensor) || (t == kTmaDesc && a.kind == Arg::kDesc) ||
              (t == kF32 && a.kind == Arg::kFloat) || ((t == kI32 || t == kI64 || t == kU64) && a.kind == Arg::kInt);
    if (!ok)
      throw std::runtime_error("triton_launch: " + b.name + ": argument " + std::to_string(i) +
                               " does not match the compiled signature");
    switch (t) {
      case kDrop: break;
      case kPtr: case kI64: case kU64: p.put(t, &a.i, 8, 8); break;
      case kI32: {
        int32_t v = static_cast<int32_t>(a.i);
        p.put(t, &v, 4, 4);
        break;
      }
      case kF32: {
        float v = static_cast<float>(a.f);  // pack_fp32
        p.put(t, &v, 4, 4);
        break;
      }
      case kTmaDesc: {
        const DescMeta& m = b.descs.at(desc++);
        static const uint8_t unencoded[128] = {};
        p.put(t, unencoded, 128, 128);  // CUtensorMap storage, 128-byte aligned
#ifdef WITH_CUDA
        if (encode) encode_tma(p.params[p.n - 1], a, m);
#endif
        (void)m, (void)encode;
        for (int d = 0; d < 2; ++d) {
          int32_t s = static_cast<int32_t>(a.shape[d]);
          p.put(kI32, &s, 4, 4);
        }
        for (int d = 0; d < 2; ++d) p.put(kI64, &a.strides[d], 8, 8);
        break;
      }
      default: throw std::runtime_error("triton_launch: " + b.name + ": unsupported parameter type");
    }
  }
  const uint64_t scratch = 0;
  p.put(kPtr, &scratch, 8, 8);
  p.put(kPtr, &scratch, 8, 8);
}

// Packs one launch's parameters and launches it (or records it).
void execute(const Launch& l) {
  const Binary& b = *l.binary;
  Packed p;
  pack(b, l, p, g_record == kOff);
  void** params = p.params;
  (void)params;
  if (g_record == kFull) {
    Record r{b.name, l.grid, b.num_warps, b.shared, std::vector<Arg>(l.args.begin(), l.args.begin() + l.n), {}, &b};
    for (int i = 0; i < p.n; ++i) {
      std::array<uint8_t, 16> bytes{};
      std::memcpy(bytes.data(), p.params[i], std::min(p.layout[i].second, 16));
      r.packed.emplace_back(p.layout[i].first, bytes);
    }
    g_records.push_back(std::move(r));
  }
  if (g_record != kOff) {
    ++g_launches;
    return;
  }
#ifdef WITH_CUDA
  if (l.grid[0] * l.grid[1] * l.grid[2] == 0) return;
  const Driver& drv = driver();
  auto function = reinterpret_cast<CUfunction>(b.function);
  if (b.shared > 49152 && !b.attribute_set) {
    check(drv.set_attribute(function, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, b.shared),
          "cuFuncSetAttribute");
    const_cast<Binary&>(b).attribute_set = true;
  }
  CUlaunchConfig config{};
  config.gridDimX = l.grid[0], config.gridDimY = l.grid[1], config.gridDimZ = l.grid[2];
  config.blockDimX = 32 * b.num_warps, config.blockDimY = 1, config.blockDimZ = 1;
  config.sharedMemBytes = b.shared;
  config.hStream = reinterpret_cast<CUstream>(c10::cuda::getCurrentCUDAStream().stream());
  config.attrs = nullptr, config.numAttrs = 0;
  check(drv.launch(&config, function, params, nullptr), "cuLaunchKernelEx");
#else
  throw std::runtime_error("triton_launch: this build has no CUDA driver (enable the recording stub)");
#endif
}

// The launches of one call, resolved before any runs: a call either launches everything in C++ or nothing.
// Each launch is built in place: begin(step), its arguments, then add(grid).
struct Calls {
  Plan& plan;
  std::array<Launch, 6> launches;  // a backward makes 6 at most
  int n = 0;
  bool ok = true;
  std::array<at::Tensor, 2> temporaries;  // kept until the launches are enqueued (the caching allocator's rule)
  int n_temporaries = 0;

  explicit Calls(Plan& p) : plan(p) {}
  Launch& begin(Step step) {
    Launch& l = launches[n];
    l.step = step, l.n = 0, l.nc = 0, l.bool_mask = 0, l.extra = {0, 0, 0};
    return l;
  }
  // Resolves the launch begun last: its binary and grid (grid(binary) -> {x, y, z}); nullptr when Python has no
  // binary for it (the call is not handled, nothing of it is launched).
  template <typename Grid>
  const Binary* add(Grid grid) {
    if (!ok) return nullptr;
    Launch& l = launches[n];
    l.binary = plan.resolve(l);
    if (l.binary == nullptr) {
      ok = false;
      return nullptr;
    }
    l.grid = grid(*l.binary);
    ++n;
    return l.binary;
  }
  void keep(at::Tensor t) { temporaries.at(n_temporaries++) = std::move(t); }
  void run() {
    for (int i = 0; i < n; ++i) execute(launches[i]);
  }
};

std::array<uint32_t, 3> grid3(int64_t x, int64_t y = 1, int64_t z = 1) {
  return {static_cast<uint32_t>(x), static_cast<uint32_t>(y), static_cast<uint32_t>(z)};
}

// ------------------------------------------------------------------------------------------------
// The launch wrappers of kernels.py and hopper.py
// ------------------------------------------------------------------------------------------------
// kernels.shrink: out (M, R) fp32 = (x·yᵀ) ⊙ [j < b_m]; with fold_u also the fold partials. Returns the number
// of fold row blocks (0 without fold), or -1 when not handled.
int64_t shrink(Calls& c, const at::Tensor& x, const at::Tensor& y, const at::Tensor& rank, const at::Tensor& out,
               const at::Tensor* fold_u, const at::Tensor* fold, const Drop& drop = {}) {
  int64_t M = x.size(0), K = x.size(1), R = y.size(0), BLOCK_R = block_r(R);
  Launch& l = c.begin(kShrink);
  l << tensor(x) << tensor(y) << tensor(rank) << tensor(out) << (fold_u ? tensor(*fold_u) : none())
    << (fold ? tensor(*fold) : none()) << seed_arg(drop) << integer(M) << integer(K) << integer(R)
    << integer(drop.threshold);
  l.strides(x).strides(y).strides(out).strides(fold_u, 2).strides(fold, 2);
  l << integer(bucket(M)) << integer(bucket(R)) << integer(bucket(K)) << integer(layout_code({&x, &y}));
  l.flag("PER_ROW", rank.dim() == 1).flag("FOLD", fold_u != nullptr).flag("DROPOUT", drop.on());
  l.flag("DROPOUT_VEC4", drop.vec4(K));
  l.value("BLOCK_R", BLOCK_R);
  l.text("PRECISION", c.plan.precision);
  const Binary* b = c.add([&](const Binary& b) { return grid3(cdiv(M, b.block_m), cdiv(R, BLOCK_R)); });
  if (b == nullptr) return -1;
  return fold_u != nullptr ? cdiv(M, b->block_m) : 0;
}

// kernels.fused_linear: out (M, N) = (alpha/b_m)·(u ⊙ [j < b_m])·zᵀ + [x·yᵀ] + [bias] + [base].
void fused_linear(Calls& c, const at::Tensor& x, const at::Tensor* y, const at::Tensor* bias, const at::Tensor* base,
                  const at::Tensor& u, const at::Tensor& z, const at::Tensor& rank, double alpha,
                  const at::Tensor& out, const Drop& drop = {}) {
  int64_t M = x.size(0), K = x.size(1), N = z.size(0), R = z.size(1);
  Launch& l = c.begin(kFused);
  l << tensor(x) << (y ? tensor(*y) : none()) << tensor(u) << tensor(z) << (bias ? tensor(*bias) : none())
    << (base ? tensor(*base) : none()) << tensor(rank) << tensor(out) << seed_arg(drop) << integer(M) << integer(N)
    << integer(K) << integer(R) << real(alpha) << integer(drop.threshold);
  l.strides(x).strides(y, 2).strides(u).strides(z).strides(bias, 1).strides(base, 2).strides(out);
  l << integer(bucket(M)) << integer(bucket(N)) << integer(bucket(K)) << integer(layout_code({&x, y, &z}));
  l.flag("HAS_W", y != nullptr).flag("HAS_BIAS", bias != nullptr).flag("HAS_BASE", base != nullptr);
  l.flag("PER_ROW", rank.dim() == 1).flag("DROPOUT", drop.on()).flag("DROPOUT_VEC4", drop.vec4(N));
  l.value("BLOCK_R", seed_block_r(R));
  l.text("PRECISION", c.plan.precision);
  c.add([&](const Binary& b) { return grid3(cdiv(M, b.block_m) * cdiv(N, b.block_n)); });
}

constexpr int64_t kDecodeMaxM = 16;  // kernels.DECODE_MAX_M

// kernels.decode_linear: the whole forward for M ≤ 16 in one launch (u written when given).
void decode_linear(Calls& c, const at::Tensor& x, const at::Tensor* w, const at::Tensor* bias, const at::Tensor* base,
                   const at::Tensor& a, const at::Tensor& z, const at::Tensor& rank, double alpha,
                   const at::Tensor& out, const at::Tensor* u, const Drop& drop = {}) {
  int64_t M = x.size(0), K = x.size(1), N = z.size(0), R = z.size(1);
  Launch& l = c.begin(kDecode);
  l << tensor(x) << (w ? tensor(*w) : none()) << tensor(a) << tensor(z) << (bias ? tensor(*bias) : none())
    << (base ? tensor(*base) : none()) << tensor(rank) << tensor(out) << (u ? tensor(*u) : none()) << seed_arg(drop)
    << integer(M) << integer(N) << integer(K) << integer(R) << real(alpha) << integer(drop.threshold);
  l.strides(x).strides(w, 2).strides(a).strides(z).strides(bias, 1).strides(base, 2).strides(out).strides(u, 2);
  l << integer(bucket(M)) << integer(bucket(N)) << integer(bucket(K)) << integer(layout_code({&x, w, &a, &z}));
  l.flag("HAS_W", w != nullptr).flag("HAS_BIAS", bias != nullptr).flag("HAS_BASE", base != nullptr);
  l.flag("PER_ROW", rank.dim() == 1).flag("NEED_U", u != nullptr).flag("DROPOUT", drop.on());
  l.flag("DROPOUT_VEC4", drop.vec4(K));
  l.value("R_CAP", next_power_of_2(std::max<int64_t>(16, R))).value("BLOCK_M", kDecodeMaxM);
  l.text("PRECISION", c.plan.precision);
  c.add([&](const Binary& b) { return grid3(cdiv(N, b.block_n)); });
}

constexpr int64_t kFinishLoad = 8192;  // kernels.FINISH_LOAD

// kernels.finish: out (R, K) = alpha·Σ_{s < n_parts} part[s] (or into row b-1 with one_slot); blocks as
// kernels.finish_blocks.
void finish(Calls& c, const at::Tensor& part, int64_t n_parts, const at::Tensor& rank, double alpha, bool one_slot,
            const at::Tensor& out) {
  int64_t R = out.size(0), K = out.size(1), BLOCK_R = block_r(R), BLOCK_K = std::max<int64_t>(32, 2048 / BLOCK_R);
  int64_t BLOCK_S = kFinishLoad / (one_slot ? BLOCK_K : BLOCK_R * BLOCK_K);
  Launch& l = c.begin(kFinish);
  l << tensor(part) << tensor(rank) << tensor(out) << integer(K) << integer(R) << integer(n_parts) << real(alpha)
    << integer(part.stride(0)) << integer(part.dim() == 3 ? part.stride(1) : 0) << integer(part.stride(-1));
  l.strides(out);
  l.flag("ONE_SLOT", one_slot).value("BLOCK_R", BLOCK_R).value("BLOCK_K", BLOCK_K).value("BLOCK_S", BLOCK_S);
  c.add([&](const Binary&) { return grid3(cdiv(R, BLOCK_R), cdiv(K, BLOCK_K)); });
}

// kernels.split_rows
std::pair<int64_t, int64_t> split_rows(const Plan& plan, int64_t M, int64_t tiles) {
  int64_t sr = plan.split_rows;
  int64_t splits = std::max<int64_t>(1, std::min(cdiv(plan.num_sms, std::max<int64_t>(tiles, 1)), cdiv(M, sr)));
  int64_t m1 = std::max<int64_t>(M, 1);
  int64_t rows = cdiv(cdiv(m1, splits), sr) * sr;
  return {cdiv(m1, rows), rows};
}

// kernels.lora_grad (split-M partials, then finish) and kernels.frozen_grad (one_hot_row: the GEMV).
void grad_of(Calls& c, bool gemv, const at::Tensor& p, const at::Tensor& q, const at::Tensor& rank, double alpha,
             bool frozen_prefix, const at::Tensor& out, const Drop& drop = {}) {
  int64_t M = q.size(0), K = q.size(1), R = p.size(1), BLOCK_R = block_r(R);
  auto [splits, rows] = split_rows(c.plan, M, gemv ? cdiv(K, 128) : cdiv(R, BLOCK_R) * cdiv(K, 128));
  at::Tensor part = gemv ? at::empty({splits, K}, q.options().dtype(at::kFloat))
                         : at::empty({splits, R, K}, q.options().dtype(at::kFloat));
  Launch& l = c.begin(gemv ? kGemv : kGrad);
  l << tensor(p) << tensor(q) << tensor(rank) << tensor(part) << seed_arg(drop) << integer(M) << integer(K)
    << integer(R) << integer(rows) << integer(drop.threshold);
  l.strides(p).strides(q).strides(part);
  l << integer(bucket(M)) << integer(bucket(R)) << integer(bucket(K)) << integer(layout_code({&p, &q}));
  if (gemv) {
    l.flag("DROPOUT", drop.on()).flag("DROPOUT_VEC4", drop.vec4(K));
  } else {
    l.flag("ONE_HOT", frozen_prefix).flag("PER_ROW", rank.dim() == 1).flag("DROPOUT", drop.on());
    l.flag("DROPOUT_VEC4", drop.vec4(K));
    l.value("BLOCK_R", BLOCK_R).text("PRECISION", c.plan.precision);
  }
  int64_t r_tiles = gemv ? 1 : cdiv(R, BLOCK_R);
  c.add([&](const Binary& b) { return grid3(r_tiles * cdiv(K, b.block_k), splits); });
  finish(c, part, splits, rank, alpha, gemv, out);
  c.keep(std::move(part));
}

// hopper.fused_linear / _run: the persistent TMA kernel (w as stored: (N, K), or (K, N) with w_kn); grid: one
// program per tile, at most SMs × the config's CTAS_PER_SM.
void tma_linear(Calls& c, const at::Tensor& x, const at::Tensor& w, bool w_kn, const at::Tensor* bias,
                const at::Tensor* base, const at::Tensor& u, const at::Tensor& z, const at::Tensor& rank,
                double alpha, const at::Tensor& out) {
  int64_t M = x.size(0), K = x.size(1), N = z.size(0), R = z.size(1), sms = c.plan.num_sms;
  int64_t BLOCK_R = seed_block_r(R);
  Launch& l = c.begin(kTma);
  l << desc(x, M, K) << desc(w, w.size(0), w.size(1)) << desc(out, M, N) << tensor(u) << tensor(z)
    << (bias ? tensor(*bias) : none()) << (base ? tensor(*base) : none()) << tensor(rank) << integer(M)
    << integer(N) << integer(K) << integer(R) << real(alpha);
  l.strides(u).strides(z).strides(bias, 1).strides(base, 2);
  l.flag("Y_KN", w_kn).flag("HAS_BIAS", bias != nullptr).flag("HAS_BASE", base != nullptr);
  l.flag("PER_ROW", rank.dim() == 1).value("BLOCK_R", BLOCK_R).value("NUM_SMS", sms);
  l.value("R_BLOCKS", cdiv(R, BLOCK_R)).text("PRECISION", c.plan.precision);
  l.extra = {bucket(M), bucket(N), bucket(K)};  // with the dtypes and flags: hopper's config key
  c.add([&](const Binary& b) {
    return grid3(std::min(sms * b.ctas_per_sm, cdiv(M, b.out_block_m) * cdiv(N, b.block_n)));
  });
}

// hopper.applies(x, weight, out_cols) for an sm_90 plan: TMA-addressable operands of one 16-bit dtype.
bool tma_ok(const at::Tensor& t) {
  return t.dim() == 2 && t.numel() > 0 && t.stride(-1) == 1 &&
         ((reinterpret_cast<uintptr_t>(t.data_ptr()) | static_cast<uint64_t>(t.stride(0) * t.element_size())) & 15) == 0;
}
bool tma_applies(const at::Tensor& x, const at::Tensor* w, int64_t out_cols) {
  return w != nullptr && (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16) &&
         w->scalar_type() == x.scalar_type() && tma_ok(x) && tma_ok(*w) && out_cols > 0 &&
         (out_cols * x.element_size()) % 16 == 0;
}

#ifdef WITH_CUDA
struct DeviceGuard {  // x's device current while launching (nothing for CPU tensors: the recording stub)
  c10::cuda::OptionalCUDAGuard guard;
  explicit DeviceGuard(c10::Device d) {
    if (d.is_cuda()) guard.set_device(d);
  }
};
#else
struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};
#endif

}  // namespace

// ------------------------------------------------------------------------------------------------
// The kernel contract (dylora_kernels/triton/__init__.py)
// ------------------------------------------------------------------------------------------------
std::optional<std::tuple<at::Tensor, at::Tensor>> forward(Plan& plan, const at::Tensor& x,
                                                          const std::optional<at::Tensor>& weight,
                                                          const std::optional<at::Tensor>& bias,
                                                          const std::optional<at::Tensor>& base,
                                                          const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                          const at::Tensor& rank_in, double alpha, bool need_u,
                                                          double dropout_p,
                                                          const std::optional<at::Tensor>& dropout_seed) {
  if (plan.op != "forward") throw std::invalid_argument("triton_launch::forward: a " + plan.op + " plan");
  const Drop drop = drop_of(dropout_p, dropout_seed);  // as dylora_kernels.triton.forward: α/(1 − p), the mask on u
  if (drop.on()) alpha /= 1.0 - dropout_p;
  int64_t M = x.size(0), N = lora_B.size(0), R = lora_A.size(0);
  DeviceGuard guard(x.device());
  at::Tensor rank = rank_in.contiguous();
  at::Tensor y = at::empty({M, N}, x.options());
  Calls c(plan);
  at::Tensor u;
  if (plan.variant == "decode") {
    if (need_u) u = at::empty({M, R}, x.options().dtype(at::kFloat));
    decode_linear(c, x, opt(weight), opt(bias), opt(base), lora_A, lora_B, rank, alpha, y, need_u ? &u : nullptr,
                  drop);
    if (!c.ok) return std::nullopt;
    c.run();
    return std::make_tuple(y, need_u ? u : x.new_empty({0}, x.options().dtype(at::kFloat)));
  }
  u = at::empty({M, R}, x.options().dtype(at::kFloat));
  shrink(c, x, lora_A, rank, u, nullptr, nullptr, drop);
  if (plan.variant == "tma" && weight)
    tma_linear(c, x, *weight, false, opt(bias), opt(base), u, lora_B, rank, alpha, y);
  else
    fused_linear(c, x, opt(weight), opt(bias), opt(base), u, lora_B, rank, alpha, y);
  if (!c.ok) return std::nullopt;
  c.run();
  return std::make_tuple(y, need_u ? u : u.new_empty({0}));
}

std::optional<std::tuple<at::Tensor, at::Tensor, at::Tensor>> backward(
    Plan& plan, const at::Tensor& grad, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& u, const at::Tensor& rank_in, double alpha,
    bool frozen_prefix, bool compute_dx, bool compute_lora, double dropout_p,
    const std::optional<at::Tensor>& dropout_seed) {
  if (plan.op != "backward") throw std::invalid_argument("triton_launch::backward: a " + plan.op + " plan");
  // As dylora_kernels.triton.backward: α/(1 − p); x's mask on dx's low-rank part and on x in dA (v and dB: none).
  const Drop drop = drop_of(dropout_p, dropout_seed);
  if (drop.on()) alpha /= 1.0 - dropout_p;
  int64_t M = x.size(0), K = x.size(1), N = lora_B.size(0), R = lora_B.size(1);
  at::Tensor dx = x.new_empty({0}), dA = lora_A.new_empty({0}), dB = lora_B.new_empty({0});
  if (!(compute_dx || compute_lora)) return std::make_tuple(dx, dA, dB);
  DeviceGuard guard(x.device());
  at::Tensor rank = rank_in.contiguous();
  bool one_slot = frozen_prefix && rank.dim() == 0 && compute_lora;
  auto f32 = x.options().dtype(at::kFloat);
  at::Tensor v = at::empty({M, R}, f32);
  at::Tensor fold = one_slot ? at::empty({cdiv(M, 16), N}, f32) : at::Tensor();
  Calls c(plan);
  at::Tensor lora_Bt = lora_B.t(), lora_At = lora_A.t();
  int64_t n_fold = shrink(c, grad, lora_Bt, rank, v, one_slot ? &u : nullptr, one_slot ? &fold : nullptr);
  if (compute_dx) {
    dx = at::empty({M, K}, x.options());
    if (plan.variant == "tma" && weight && !drop.on() && tma_applies(grad, opt(weight), K)) {
      tma_linear(c, grad, *weight, true, nullptr, nullptr, v, lora_At, rank, alpha, dx);
    } else {
      at::Tensor wt = weight ? weight->t() : at::Tensor();
      fused_linear(c, grad, weight ? &wt : nullptr, nullptr, nullptr, v, lora_At, rank, alpha, dx, drop);
    }
  }
  if (compute_lora) {
    dA = at::empty({R, K}, lora_A.options());
    dB = at::empty({N, R}, lora_B.options());
    at::Tensor dBt = dB.t();
    if (one_slot) {
      grad_of(c, true, v, x, rank, alpha, true, dA, drop);
      if (n_fold >= 0) finish(c, fold, n_fold, rank, alpha, true, dBt);
    } else {
      grad_of(c, false, v, x, rank, alpha, frozen_prefix, dA, drop);
      grad_of(c, false, u, grad, rank, alpha, frozen_prefix, dBt);
    }
  }
  if (!c.ok) return std::nullopt;
  c.run();
  return std::make_tuple(dx, dA, dB);
}

// ------------------------------------------------------------------------------------------------
// Plans
// ------------------------------------------------------------------------------------------------
std::shared_ptr<Plan> make_plan(py::handle description) {
  auto fail = [](const std::string& why) { throw std::invalid_argument("triton_launch::make_plan: " + why); };
  if (!py::isinstance<py::dict>(description)) fail("the description must be a dict (cplan.describe)");
  py::dict d = py::reinterpret_borrow<py::dict>(description);
  if (!d.contains("version") || d["version"].cast<int>() != 1) fail("description version must be 1");
  auto plan = std::make_shared<Plan>();
  plan->op = d["op"].cast<std::string>();
  plan->variant = d["variant"].cast<std::string>();
  bool forward_variant = plan->variant == "pointer" || plan->variant == "decode" || plan->variant == "tma";
  if (!(plan->op == "forward" || plan->op == "backward") || !forward_variant ||
      (plan->op == "backward" && plan->variant == "decode"))
    fail("unknown op/variant " + plan->op + "/" + plan->variant);
  plan->num_sms = d["num_sms"].cast<int64_t>();
  const auto precision = d.contains("precision") ? d["precision"].cast<std::string>() : std::string("tf32");
  if (precision != "tf32" && precision != "ieee") fail("precision must be 'tf32' or 'ieee'");
  plan->precision = precision == "ieee";
  plan->split_rows = d["split_rows"].cast<int64_t>();
  if (plan->num_sms < 1 || plan->split_rows < 1) fail("num_sms and split_rows must be positive");
  plan->binary_for = d["binary_for"];
  py::dict kernels = d["kernels"];
  for (int s = 0; s < kNumSteps; ++s) {
    if (!kernels.contains(kStepNames[s])) fail(std::string("no kernel ") + kStepNames[s]);
    py::dict k = kernels[kStepNames[s]];
    Plan::Kernel& kernel = plan->kernels[s];
    kernel.name = k["name"].cast<std::string>();
    size_t n = py::len(k["params"]);
    if (static_cast<int>(n) != kStepParams[s])
      fail(kernel.name + " has " + std::to_string(n) + " runtime parameters; this launcher passes " +
           std::to_string(kStepParams[s]) + " (csrc/triton_launch.cpp is out of date with the kernel)");
    kernel.specialize = k["specialize"].cast<std::vector<bool>>();
    kernel.align = k["align"].cast<std::vector<bool>>();
    kernel.is_key.assign(n, false);
    for (auto i : k["key_args"]) kernel.is_key.at(i.cast<size_t>()) = true;
    if (kernel.specialize.size() != n || kernel.align.size() != n) fail(kernel.name + ": flag lists of wrong length");
  }
  return plan;
}

// ------------------------------------------------------------------------------------------------
// Bindings (tests and benchmarks)
// ------------------------------------------------------------------------------------------------
namespace {

py::object arg_value(const Arg& a) {
  switch (a.kind) {
    case Arg::kNone: return py::none();
    case Arg::kTensor: return py::int_(a.i);
    case Arg::kInt: return py::int_(a.i);
    case Arg::kFloat: return py::float_(a.f);
    case Arg::kDesc:
      return py::make_tuple("desc", a.i, py::make_tuple(a.shape[0], a.shape[1]),
                            py::make_tuple(a.strides[0], a.strides[1]));
  }
  return py::none();
}

const char* type_name(PType t) {
  constexpr const char* names[] = {"constexpr", "ptr", "i1", "i8", "i16", "i32", "i64", "u8",
                                   "u16",       "u32", "u64", "fp16", "bf16", "fp32", "fp64", "tensordesc"};
  return names[t];
}

// (type, size) of every parameter the launcher packs for a compiled kernel's runtime signature types (2-D
// descriptors), through the same pack() as a launch.
py::list param_layout(const std::vector<std::string>& types) {
  Binary b;
  b.name = "param_layout";
  Launch l(kShrink);
  for (const std::string& s : types) {
    PType t = parse_type(s);
    b.types.push_back(t);
    Arg a = t == kPtr ? tensor(at::empty({1})) : t == kF32 ? real(1.0) : integer(2);
    if (t == kTmaDesc) {
      a.kind = Arg::kDesc;
      b.descs.push_back(DescMeta{});
    }
    if (t == kDrop) a = none();
    l << a;
  }
  Packed p;
  pack(b, l, p, false);
  py::list out;
  for (int i = 0; i < p.n; ++i) out.append(py::make_tuple(type_name(p.layout[i].first), p.layout[i].second));
  return out;
}

}  // namespace

void register_bindings(py::module& m) {
  py::class_<Plan, std::shared_ptr<Plan>>(m, "TritonPlan")
      .def_property_readonly("variant", [](const Plan& p) { return p.variant; })
      .def_property_readonly("binaries", [](const Plan& p) { return p.binaries.size(); });
  m.def("triton_plan", [](py::handle d) { return make_plan(d); }, "a C++ Triton plan from cplan.describe()");
  m.def("triton_forward",
        [](Plan& p, const at::Tensor& x, const std::optional<at::Tensor>& w, const std::optional<at::Tensor>& bias,
           const std::optional<at::Tensor>& base, const at::Tensor& A, const at::Tensor& B, const at::Tensor& rank,
           double alpha, bool need_u, double dropout_p, const std::optional<at::Tensor>& dropout_seed) -> py::object {
          auto r = forward(p, x, w, bias, base, A, B, rank, alpha, need_u, dropout_p, dropout_seed);
          return r ? py::cast(*r) : py::none();
        },
        "triton_launch::forward: (y, u), or None when not handled", py::arg("plan"), py::arg("x"), py::arg("weight"),
        py::arg("bias"), py::arg("base"), py::arg("lora_A"), py::arg("lora_B"), py::arg("rank"), py::arg("alpha"),
        py::arg("need_u"), py::arg("dropout_p") = 0.0, py::arg("dropout_seed") = py::none());
  m.def("triton_backward",
        [](Plan& p, const at::Tensor& g, const at::Tensor& x, const std::optional<at::Tensor>& w,
           const at::Tensor& A, const at::Tensor& B, const at::Tensor& u, const at::Tensor& rank, double alpha,
           bool frozen, bool cdx, bool clora, double dropout_p,
           const std::optional<at::Tensor>& dropout_seed) -> py::object {
          auto r = backward(p, g, x, w, A, B, u, rank, alpha, frozen, cdx, clora, dropout_p, dropout_seed);
          return r ? py::cast(*r) : py::none();
        },
        "triton_launch::backward: (dx, dA, dB), or None when not handled", py::arg("plan"), py::arg("grad"),
        py::arg("x"), py::arg("weight"), py::arg("lora_A"), py::arg("lora_B"), py::arg("u"), py::arg("rank"),
        py::arg("alpha"), py::arg("frozen_prefix"), py::arg("compute_dx"), py::arg("compute_lora"),
        py::arg("dropout_p") = 0.0, py::arg("dropout_seed") = py::none());
  m.def("triton_record", [](int mode) {
          if (mode < 0 || mode > 2) throw std::invalid_argument("triton_record: mode must be 0 (off), 1 (count) or 2 (full)");
          g_record = static_cast<RecordMode>(mode);
          g_records.clear();
          g_launches = 0;
        },
        "the recording stub: 0 off (launch on the GPU), 1 count launches, 2 record every launch");
  m.def("triton_records", [] {
    py::list out;
    for (const Record& r : g_records) {
      py::list args, packed;
      for (const Arg& a : r.args) args.append(arg_value(a));
      for (const auto& [t, bytes] : r.packed) {
        py::object v;
        int64_t i64;
        int32_t i32;
        float f;
        switch (t) {
          case kI32: std::memcpy(&i32, bytes.data(), 4); v = py::int_(i32); break;
          case kF32: std::memcpy(&f, bytes.data(), 4); v = py::float_(f); break;
          case kTmaDesc: v = py::none(); break;
          default: std::memcpy(&i64, bytes.data(), 8); v = py::int_(i64);
        }
        packed.append(py::make_tuple(type_name(t), v));
      }
      out.append(py::dict(py::arg("name") = r.name, py::arg("grid") = py::make_tuple(r.grid[0], r.grid[1], r.grid[2]),
                          py::arg("num_warps") = r.num_warps, py::arg("shared") = r.shared, py::arg("args") = args,
                          py::arg("tail") = py::cast(r.binary->tail), py::arg("packed") = packed,
                          py::arg("types") = r.binary->type_names));
    }
    g_records.clear();
    return out;
  });
  m.def("triton_launches", [] { return g_launches; }, "launches since triton_record()");
  // Host time per call of forward() / backward() in a C++ loop (no Python per call): bench/bench_host.py.
  m.def("triton_time_forward",
        [](Plan& p, const at::Tensor& x, const std::optional<at::Tensor>& w, const std::optional<at::Tensor>& bias,
           const std::optional<at::Tensor>& base, const at::Tensor& A, const at::Tensor& B, const at::Tensor& rank,
           double alpha, bool need_u, int calls) {
          py::gil_scoped_release nogil;
          auto start = std::chrono::steady_clock::now();
          for (int i = 0; i < calls; ++i)
            if (!forward(p, x, w, bias, base, A, B, rank, alpha, need_u)) throw std::runtime_error("not handled");
          return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / calls;
        });
  m.def("triton_time_backward",
        [](Plan& p, const at::Tensor& g, const at::Tensor& x, const std::optional<at::Tensor>& w,
           const at::Tensor& A, const at::Tensor& B, const at::Tensor& u, const at::Tensor& rank, double alpha,
           bool frozen, bool cdx, bool clora, int calls) {
          py::gil_scoped_release nogil;
          auto start = std::chrono::steady_clock::now();
          for (int i = 0; i < calls; ++i)
            if (!backward(p, g, x, w, A, B, u, rank, alpha, frozen, cdx, clora))
              throw std::runtime_error("not handled");
          return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / calls;
        });
  m.def("triton_param_layout", &param_layout,
        "(type, bytes) of each parameter the C++ launcher packs for a compiled signature's runtime types");
}

}  // namespace dylora::triton_launch
