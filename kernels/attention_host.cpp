// fastlm._attention_host: flash attention's host path in C++, for eager calls on CUDA tensors.
//
// A Python autograd.Function costs a forward + backward tens of microseconds before it launches anything
// (kernels/flash_attention.py: the "floor" of benchmarks/test_attention_host_path.py), and fastlm's
// Python path adds as much again (checks, layouts, plan keys, allocations). Here the autograd node, the
// allocation of outputs and gradients, the key of a call and the replay of its launch plan are C++; the
// launches themselves are Triton's own C launcher functions (the one kernels/launch.py's plans call),
// given the same arguments a Python replay gives them. A call whose key has no plan yet goes through
// fastlm's Python path once (a "miss" callback: tuning, compiling, recording) and keeps the plan that
// call made, if it made one; every call it cannot serve exactly (a tensor not 16-byte aligned, another
// current device, launch hooks registered) goes through the Python path as well.
//
// The plan of a key is valid for every call with that key: the key holds what fastlm's Python plan key
// holds (shapes, strides, dtypes, causal, softmax scale, deterministic mode, the device) and the state of
// the Python knobs that choose tilings and modes (a token the caller passes); alignment is not in the key
// because only calls whose every tensor is 16-byte aligned use a plan, or make one.
#include <torch/extension.h>

#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cmath>
#include <cstring>
#include <optional>
#include <unordered_map>
#include <vector>

namespace py = pybind11;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {

struct Launch {
  py::object launch;      // Triton's C launcher of one compiled kernel
  py::tuple middle;       // what goes between the stream and the tensor addresses
  uint64_t grid[3];
  std::vector<int> slots;  // the call's address that each tensor argument takes
  py::tuple scalars;      // the arguments after the tensors
};

struct Plan {
  std::vector<Launch> launches;
  int n_tensors = 0;        // addresses a replay passes (the call's tensors, in the Python path's order)
  bool own_acc = false;     // backward: an fp32 accumulator for dq besides the gradients (atomic dq)
};

struct KeyHash {
  size_t operator()(const std::vector<int64_t>& k) const {
    size_t h = 1469598103934665603ull;
    for (int64_t x : k) h = (h ^ static_cast<uint64_t>(x)) * 1099511628211ull;
    return h;
  }
};

constexpr size_t kMaxPlans = 512;  // (as kernels/flash_attention.py's MAX_PLANS)

// Never destroyed: it holds Python objects, which must not be released after the interpreter is gone.
auto& plans = *new std::unordered_map<std::vector<int64_t>, Plan, KeyHash>();
// The Python side (set by install()): the miss callbacks and the check that direct launches are allowed
// (held as objects, not looked up by name: the check runs on every replay).
struct Callbacks {
  py::object forward, backward, packed_forward, packed_backward, allowed;
};
auto& callbacks = *new Callbacks();
int64_t replays = 0;  // (read by tests)

enum Kind : int64_t { kForward = 1, kBackward = 2, kPackedForward = 3, kPackedBackward = 4 };

void add_layout(std::vector<int64_t>& key, const at::Tensor& t) {
  key.push_back(t.dim());
  key.push_back(static_cast<int64_t>(t.scalar_type()));
  for (int64_t i = 0; i < t.dim(); ++i) {
    key.push_back(t.size(i));
    key.push_back(t.stride(i));
  }
}

std::vector<int64_t> make_key(Kind kind, std::initializer_list<const at::Tensor*> tensors, bool causal,
                              double scale, int64_t knobs, int64_t extra1 = 0, int64_t extra2 = 0) {
  std::vector<int64_t> key;
  key.reserve(64);
  key.push_back(kind);
  for (const at::Tensor* t : tensors) add_layout(key, *t);
  const at::Tensor& first = **tensors.begin();
  key.push_back(first.is_cuda() ? first.get_device() : -1);
  int64_t scale_bits;
  std::memcpy(&scale_bits, &scale, sizeof scale_bits);
  key.push_back(scale_bits);
  key.push_back(causal);
  key.push_back(at::globalContext().deterministicAlgorithms());
  key.push_back(knobs);
  key.push_back(extra1);
  key.push_back(extra2);
  return key;
}

bool all_aligned(const std::vector<uint64_t>& addresses) {
  for (uint64_t a : addresses)
    if (a % 16) return false;
  return true;
}

// The stream the launches go to, or -1 where a plan must not serve the call: the current CUDA device is
// not the tensors' (the Python path launches on the current device; a plan is made there and kept for it).
// CPU tensors (tests only: Triton's interpreter, stand-in launchers) get stream 0.
int64_t current_stream(const at::Tensor& t) {
  if (!t.is_cuda()) return 0;
  const auto* impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
  const c10::Device device = impl->getDevice();
  if (device.index() != t.get_device()) return -1;
  return static_cast<int64_t>(reinterpret_cast<uintptr_t>(impl->getStream(device).native_handle()));
}

void replay(const Plan& plan, const std::vector<uint64_t>& addresses, int64_t stream) {
  for (const Launch& l : plan.launches) {
    const Py_ssize_t n_middle = PyTuple_GET_SIZE(l.middle.ptr());
    const Py_ssize_t n_scalars = PyTuple_GET_SIZE(l.scalars.ptr());
    const Py_ssize_t n = 4 + n_middle + static_cast<Py_ssize_t>(l.slots.size()) + n_scalars;
    py::tuple args(n);
    PyObject* a = args.ptr();
    Py_ssize_t i = 0;
    for (int d = 0; d < 3; ++d) PyTuple_SET_ITEM(a, i++, PyLong_FromUnsignedLongLong(l.grid[d]));
    PyTuple_SET_ITEM(a, i++, PyLong_FromLongLong(stream));
    for (Py_ssize_t j = 0; j < n_middle; ++j) {
      PyObject* item = PyTuple_GET_ITEM(l.middle.ptr(), j);
      Py_INCREF(item);
      PyTuple_SET_ITEM(a, i++, item);
    }
    for (int slot : l.slots) PyTuple_SET_ITEM(a, i++, PyLong_FromUnsignedLongLong(addresses[slot]));
    for (Py_ssize_t j = 0; j < n_scalars; ++j) {
      PyObject* item = PyTuple_GET_ITEM(l.scalars.ptr(), j);
      Py_INCREF(item);
      PyTuple_SET_ITEM(a, i++, item);
    }
    PyObject* result = PyObject_Call(l.launch.ptr(), a, nullptr);
    if (result == nullptr) throw py::error_already_set();
    Py_DECREF(result);
  }
  ++replays;
}

const Plan* find(const std::vector<int64_t>& key) {
  auto it = plans.find(key);
  return it == plans.end() ? nullptr : &it->second;
}

bool launches_allowed() { return callbacks.allowed().cast<bool>(); }

uint64_t address(const at::Tensor& t) { return reinterpret_cast<uint64_t>(t.data_ptr()); }

// One call's tensors in the order of the Python path's recording (kernels/flash_attention.py: _forward,
// _backward_with), as addresses, and the new ones (outputs, gradients, scratch) this path allocates for
// it, allocated as the Python path allocates them. `fresh` marks the places of the new ones.
struct Call {
  std::vector<uint64_t> addresses;
  std::vector<at::Tensor> fresh;  // in the order of their places
  std::vector<bool> is_fresh;
  void input(uint64_t a) { addresses.push_back(a); is_fresh.push_back(false); }
  void output(const at::Tensor& t) { addresses.push_back(address(t)); fresh.push_back(t); is_fresh.push_back(true); }
};

// o stored (batch, seq, heads, head_dim), and the fp32 lse (kernels/flash_attention.py _new_outputs)
void new_outputs(Call& call, int64_t b, int64_t h, int64_t t, int64_t d, const at::TensorOptions& options) {
  call.output(at::empty_strided({b, h, t, d}, {t * h * d, d, h * d, 1}, options));
  call.output(at::empty({b, h, t}, options.dtype(at::kFloat)));
}

// The q, k and v head views of a packed (batch, seq, (n_head + 2 * n_kv_head) * head_dim) tensor
// (kernels/flash_attention.py _split_qkv).
std::vector<at::Tensor> head_views(const at::Tensor& qkv, int64_t n_head, int64_t n_kv_head) {
  const int64_t b = qkv.size(0), t = qkv.size(1), d = qkv.size(2) / (n_head + 2 * n_kv_head);
  const int64_t sb = qkv.stride(0), st = qkv.stride(1), sw = qkv.stride(2), start = qkv.storage_offset();
  return {qkv.as_strided({b, n_head, t, d}, {sb, d * sw, st, sw}, start),
          qkv.as_strided({b, n_kv_head, t, d}, {sb, d * sw, st, sw}, start + n_head * d * sw),
          qkv.as_strided({b, n_kv_head, t, d}, {sb, d * sw, st, sw}, start + (n_head + n_kv_head) * d * sw)};
}

Call forward_call(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  Call call;
  for (const at::Tensor* t : {&q, &k, &v}) call.input(address(*t));
  new_outputs(call, q.size(0), q.size(1), q.size(2), q.size(3), q.options());
  return call;
}

// grads: dq, dk, dv (new, dense, laid out as their inputs; or views of one packed gradient)
Call backward_call(const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& o, const at::Tensor& lse, const std::vector<at::Tensor>& grads,
                   bool own_acc) {
  Call call;
  for (const at::Tensor* t : {&q, &k, &v, &o, &grad, &lse}) call.input(address(*t));
  call.output(at::empty_like(lse));  // delta
  for (const at::Tensor& g : grads) call.output(g);
  if (own_acc) call.output(at::empty_like(q, q.options().dtype(at::kFloat)));
  return call;
}

// Whether `call` has the layout of the recorded call `tensors` (the same inputs; new tensors of the same
// shapes, strides and dtypes): the plan's arguments (strides among them) then fit every call of its key.
bool same_call(const Call& call, const py::tuple& tensors) {
  if (call.addresses.size() != tensors.size()) return false;
  size_t f = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto recorded = tensors[i].cast<at::Tensor>();
    if (!call.is_fresh[i]) {
      if (address(recorded) != call.addresses[i]) return false;
      continue;
    }
    const at::Tensor& mine = call.fresh[f++];
    if (mine.sizes() != recorded.sizes() || mine.strides() != recorded.strides() ||
        mine.scalar_type() != recorded.scalar_type())
      return false;
  }
  return true;
}

// A plan from the Python side's description of the call it just ran: None, or (tensors, own_acc,
// launches) with each launch (launch, middle, (x, y, z), slots, scalars). Kept under `key` when this
// path's own call would have the recorded call's layout (`call_like`: one made for that check).
template <typename MakeCall>
void keep(std::vector<int64_t> key, const py::handle& spec, MakeCall call_like) {
  if (spec.is_none()) return;
  auto t = spec.cast<py::tuple>();
  auto tensors = t[0].cast<py::tuple>();
  Plan plan;
  plan.n_tensors = static_cast<int>(tensors.size());
  plan.own_acc = t[1].cast<bool>();
  for (const auto& item : t[2].cast<py::tuple>()) {
    auto l = item.cast<py::tuple>();
    Launch launch;
    launch.launch = py::reinterpret_borrow<py::object>(l[0]);
    launch.middle = l[1].cast<py::tuple>();
    auto grid = l[2].cast<py::tuple>();
    for (int d = 0; d < 3; ++d) launch.grid[d] = grid[d].cast<uint64_t>();
    for (const auto& s : l[3].cast<py::tuple>()) {
      const int slot = s.cast<int>();
      if (slot < 0 || slot >= plan.n_tensors) return;
      launch.slots.push_back(slot);
    }
    launch.scalars = l[4].cast<py::tuple>();
    plan.launches.push_back(std::move(launch));
  }
  if (plan.launches.empty() || !same_call(call_like(plan.own_acc), tensors)) return;
  if (plans.size() >= kMaxPlans) plans.clear();
  plans[std::move(key)] = std::move(plan);
}

// Serves a call from the plan of `key`: the call's tensors as `make_call(own_acc)` allocates them, their
// kernels launched by a replay. Nothing (and nothing launched) where the key has no plan (or the call
// no stream), direct launches are not allowed (hooks), or a tensor is not 16-byte aligned.
template <typename MakeCall>
std::optional<Call> replayed(const std::vector<int64_t>& key, int64_t stream, MakeCall make_call) {
  const Plan* plan = stream >= 0 ? find(key) : nullptr;
  if (plan == nullptr || !launches_allowed()) return std::nullopt;
  Call call = make_call(plan->own_acc);
  if (!all_aligned(call.addresses)) return std::nullopt;
  replay(*plan, call.addresses, stream);
  return call;
}

// What the Python path's callback answered for a call `replayed` could not serve (its results, then the
// spec of the plan it made), that plan kept under `key` where this path may replay it.
template <typename MakeCall>
py::tuple missed(std::vector<int64_t> key, int64_t stream, const py::object& answer, MakeCall make_call) {
  auto out = answer.cast<py::tuple>();
  if (stream >= 0) keep(std::move(key), out[out.size() - 1], make_call);
  return out;
}

std::vector<at::Tensor> new_grads(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  return {at::empty_like(q), at::empty_like(k), at::empty_like(v)};
}

Call packed_forward_call(const at::Tensor& qkv, int64_t n_head, int64_t n_kv_head) {
  Call call;
  const int64_t head = qkv.size(2) / (n_head + 2 * n_kv_head) * qkv.stride(2) * qkv.element_size();
  const uint64_t base = address(qkv);
  call.input(base);
  call.input(base + n_head * head);
  call.input(base + (n_head + n_kv_head) * head);
  new_outputs(call, qkv.size(0), n_head, qkv.size(1), qkv.size(2) / (n_head + 2 * n_kv_head), qkv.options());
  return call;
}

// (the views of qkv and of its gradient dqkv that the Python path's recording held)
Call packed_backward_call(const at::Tensor& grad, const at::Tensor& qkv, const at::Tensor& o,
                          const at::Tensor& lse, int64_t n_head, int64_t n_kv_head, const at::Tensor& dqkv,
                          bool own_acc) {
  auto views = head_views(qkv, n_head, n_kv_head);
  return backward_call(grad, views[0], views[1], views[2], o, lse, head_views(dqkv, n_head, n_kv_head), own_acc);
}

// ---- forward / backward over q, k, v, and over a packed qkv -----------------------------------------
// (each call's new tensors in order: o, lse; delta, the gradients, the accumulator)

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           bool causal, double scale, int64_t knobs) {
  const int64_t stream = current_stream(q);
  auto key = make_key(kForward, {&q, &k, &v}, causal, scale, knobs);
  auto call_for = [&](bool) { return forward_call(q, k, v); };
  if (auto call = replayed(key, stream, call_for)) return {call->fresh[0], call->fresh[1]};
  auto out = missed(std::move(key), stream, callbacks.forward(q, k, v, causal, scale), call_for);
  return {out[0].cast<at::Tensor>(), out[1].cast<at::Tensor>()};
}

variable_list backward(const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& o, const at::Tensor& lse, bool causal, double scale, int64_t knobs) {
  const int64_t stream = current_stream(q);
  auto key = make_key(kBackward, {&q, &k, &v, &o, &lse, &grad}, causal, scale, knobs);
  auto call_for = [&](bool own_acc) { return backward_call(grad, q, k, v, o, lse, new_grads(q, k, v), own_acc); };
  if (auto call = replayed(key, stream, call_for)) return {call->fresh[1], call->fresh[2], call->fresh[3]};
  auto out = missed(std::move(key), stream, callbacks.backward(grad, q, k, v, o, lse, causal, scale), call_for);
  return {out[0].cast<at::Tensor>(), out[1].cast<at::Tensor>(), out[2].cast<at::Tensor>()};
}

void raise_create_graph(const char* op) {
  // (kernels/launch.py refuse_create_graph, the same words)
  throw std::runtime_error(std::string(op) +
                           ": backward with create_graph=True (a second derivative) is not supported: the "
                           "gradient comes from Triton kernels, without a graph. HINT: use "
                           "torch.nn.functional.scaled_dot_product_attention where second derivatives are "
                           "needed");
}

std::tuple<at::Tensor, at::Tensor> packed_forward(const at::Tensor& qkv, int64_t n_head, int64_t n_kv_head,
                                                  bool causal, double scale, int64_t knobs) {
  const int64_t stream = current_stream(qkv);
  auto key = make_key(kPackedForward, {&qkv}, causal, scale, knobs, n_head, n_kv_head);
  auto call_for = [&](bool) { return packed_forward_call(qkv, n_head, n_kv_head); };
  if (auto call = replayed(key, stream, call_for)) return {call->fresh[0], call->fresh[1]};
  auto out = missed(std::move(key), stream, callbacks.packed_forward(qkv, n_head, n_kv_head, causal, scale),
                    call_for);
  return {out[0].cast<at::Tensor>(), out[1].cast<at::Tensor>()};
}

at::Tensor packed_backward(const at::Tensor& grad, const at::Tensor& qkv, const at::Tensor& o,
                           const at::Tensor& lse, int64_t n_head, int64_t n_kv_head, bool causal, double scale,
                           int64_t knobs) {
  const int64_t stream = current_stream(qkv);
  auto key = make_key(kPackedBackward, {&qkv, &o, &lse, &grad}, causal, scale, knobs, n_head, n_kv_head);
  at::Tensor dqkv;  // (kernels/flash_attention.py _new_packed_grad)
  auto call_for = [&](bool own_acc) {
    dqkv = at::empty(qkv.sizes(), qkv.options());
    return packed_backward_call(grad, qkv, o, lse, n_head, n_kv_head, dqkv, own_acc);
  };
  if (replayed(key, stream, call_for)) return dqkv;
  auto out = missed(std::move(key), stream,
                    callbacks.packed_backward(grad, qkv, o, lse, n_head, n_kv_head, causal, scale), call_for);
  return out[0].cast<at::Tensor>();
}

at::Tensor last_dim_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

struct Attention : public torch::autograd::Function<Attention> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            bool causal, double scale, int64_t knobs) {
    auto [o, lse] = ::forward(q, k, v, causal, scale, knobs);
    ctx->save_for_backward({q, k, v, o, lse});
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["knobs"] = knobs;
    return o;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (at::GradMode::is_enabled()) raise_create_graph("flash_attention");
    auto saved = ctx->get_saved_variables();
    py::gil_scoped_acquire gil;  // (autograd runs a CUDA backward on its device thread)
    auto g = ::backward(last_dim_contiguous(grads[0]), saved[0], saved[1], saved[2], saved[3], saved[4],
                        ctx->saved_data["causal"].toBool(), ctx->saved_data["scale"].toDouble(),
                        ctx->saved_data["knobs"].toInt());
    return {g[0], g[1], g[2], at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

struct PackedAttention : public torch::autograd::Function<PackedAttention> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& qkv, int64_t n_head, int64_t n_kv_head,
                            bool causal, double scale, int64_t knobs) {
    auto [o, lse] = packed_forward(qkv, n_head, n_kv_head, causal, scale, knobs);
    ctx->save_for_backward({qkv, o, lse});
    ctx->saved_data["heads"] = std::vector<int64_t>{n_head, n_kv_head};
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["knobs"] = knobs;
    return o;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (at::GradMode::is_enabled()) raise_create_graph("flash_attention_qkv");
    auto saved = ctx->get_saved_variables();
    auto heads = ctx->saved_data["heads"].toIntVector();
    py::gil_scoped_acquire gil;
    auto g = packed_backward(last_dim_contiguous(grads[0]), saved[0], saved[1], saved[2], heads[0], heads[1],
                             ctx->saved_data["causal"].toBool(), ctx->saved_data["scale"].toDouble(),
                             ctx->saved_data["knobs"].toInt());
    return {g, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// ---- the public functions' first try -----------------------------------------------------------------
// flash_attention() checks its arguments in Python before anything launches (~5 us of a forward on a
// 2-core CPU, about as much as this whole path's forward). A call whose key has a plan needs none of it:
// each check is a function of what the key holds (every tensor's shape, strides and dtype, q's device,
// causal, the scale), and that plan was made by a call that passed them. So the public functions offer a
// call here first; one this can take (plain tensors on q's device, causal True or False, the scale None or
// a float, n_head and n_kv_head ints) and whose key has a plan goes straight to the autograd node. For any
// other, None: the Python function checks it and goes on as before.

const at::Tensor* plain_tensor(const py::handle& h) {
  // (a Tensor subclass may mean something else by its operations: the Python path decides for it)
  return THPVariable_CheckExact(h.ptr()) ? &THPVariable_Unpack(h.ptr()) : nullptr;
}

// 1 for True, 0 for False, -1 for anything else (an int is not taken as a bool: the Python check refuses it)
int exact_bool(const py::handle& h) { return h.ptr() == Py_True ? 1 : h.ptr() == Py_False ? 0 : -1; }

// a head count: a positive int (not a bool) up to 2**31 (n_head + 2 * n_kv_head must not overflow), or -1
int64_t exact_count(const py::handle& h) {
  if (!PyLong_CheckExact(h.ptr())) return -1;
  int overflow = 0;
  const long long n = PyLong_AsLongLongAndOverflow(h.ptr(), &overflow);
  return overflow == 0 && n > 0 && n <= (1LL << 31) ? n : -1;
}

// the softmax scale as the Python path makes it (None: 1 / sqrt(head_dim)), or nothing for a value only
// the Python path may judge
std::optional<double> exact_scale(const py::handle& h, int64_t head_dim) {
  if (h.is_none()) return 1.0 / std::sqrt(static_cast<double>(head_dim));
  if (PyFloat_CheckExact(h.ptr())) return PyFloat_AS_DOUBLE(h.ptr());
  return std::nullopt;
}

bool served(const at::Tensor& t, bool on_cpu) { return t.is_cuda() || (on_cpu && t.is_cpu()); }

py::object planned_attention(const py::handle& q_, const py::handle& k_, const py::handle& v_,
                             const py::handle& causal_, const py::handle& scale_, int64_t knobs, bool on_cpu) {
  const at::Tensor *q = plain_tensor(q_), *k = plain_tensor(k_), *v = plain_tensor(v_);
  const int causal = exact_bool(causal_);
  if (!q || !k || !v || causal < 0 || q->dim() != 4 || !served(*q, on_cpu)) return py::none();
  // (the key holds q's device only)
  if (k->device() != q->device() || v->device() != q->device()) return py::none();
  const auto scale = exact_scale(scale_, q->size(3));
  if (!scale || current_stream(*q) < 0 || !find(make_key(kForward, {q, k, v}, causal, *scale, knobs)))
    return py::none();
  return py::cast(Attention::apply(*q, *k, *v, causal, *scale, knobs));
}

py::object planned_attention_qkv(const py::handle& qkv_, const py::handle& n_head_, const py::handle& n_kv_head_,
                                 const py::handle& causal_, const py::handle& scale_, int64_t knobs,
                                 bool on_cpu) {
  const at::Tensor* qkv = plain_tensor(qkv_);
  const int64_t n_head = exact_count(n_head_);
  const int64_t n_kv_head = n_kv_head_.is_none() ? n_head : exact_count(n_kv_head_);
  const int causal = exact_bool(causal_);
  if (!qkv || n_head < 0 || n_kv_head < 0 || causal < 0 || qkv->dim() != 3 || !served(*qkv, on_cpu))
    return py::none();
  const auto scale = exact_scale(scale_, qkv->size(2) / (n_head + 2 * n_kv_head));
  if (!scale || current_stream(*qkv) < 0 ||
      !find(make_key(kPackedForward, {qkv}, causal, *scale, knobs, n_head, n_kv_head)))
    return py::none();
  return py::cast(PackedAttention::apply(*qkv, n_head, n_kv_head, causal, *scale, knobs));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "flash attention's eager host path in C++ (kernels/attention_host.cpp)";
  m.def("install", [](py::function forward_miss, py::function backward_miss, py::function packed_forward_miss,
                      py::function packed_backward_miss, py::function allowed) {
    callbacks = {forward_miss, backward_miss, packed_forward_miss, packed_backward_miss, allowed};
  });
  m.def("attention", [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal, double scale,
                        int64_t knobs) { return Attention::apply(q, k, v, causal, scale, knobs); },
        "flash attention over q, k, v (differentiable)");
  m.def("attention_qkv", [](const at::Tensor& qkv, int64_t n_head, int64_t n_kv_head, bool causal, double scale,
                            int64_t knobs) { return PackedAttention::apply(qkv, n_head, n_kv_head, causal, scale, knobs); },
        "flash attention over a packed qkv (differentiable)");
  m.def("planned_attention", &planned_attention,
        "flash attention over q, k, v where the call's key has a plan (its arguments were checked when that "
        "plan was made), else None");
  m.def("planned_attention_qkv", &planned_attention_qkv,
        "flash attention over a packed qkv where the call's key has a plan, else None");
  m.def("forget", [] { plans.clear(); }, "drop every kept plan");
  m.def("plans", [] { return plans.size(); });
  m.def("replays", [] { return replays; });
}
