// A stand-in "mlu" device for CI machines without Cambricon hardware (see fake_torch_mlu.py, which builds and loads
// this file). It is PyTorch's PrivateUse1 backend with host memory behind it, registered the way PyTorch's own
// out-of-tree device test does (pytorch test/cpp_extensions/open_registration_extension.cpp) and the way torch_mlu
// registers the real device (torch_mlu/csrc/aten/MLUFallback.cpp: a boxed CPU fallback for every op without an MLU
// kernel). Only what has to alias memory or allocate is written here: allocation, copies, views, resize and set_;
// every other op runs on the CPU through at::native::cpu_fallback, as torch_mlu's fallback would.
// Builds against torch 2.1 through 2.14: the allocator and hooks interfaces changed in between (TORCH_VERSION_*).

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <ATen/NativeFunctions.h>
#include <ATen/autocast_mode.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/detail/PrivateUse1HooksInterface.h>
#include <ATen/native/CPUFallback.h>
#include <ATen/native/Resize.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>
#include <torch/version.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <unordered_set>

#define FAKE_TORCH_AT_LEAST(major, minor) \
  (TORCH_VERSION_MAJOR > (major) || (TORCH_VERSION_MAJOR == (major) && TORCH_VERSION_MINOR >= (minor)))

namespace {

constexpr c10::DeviceType kMlu = c10::DeviceType::PrivateUse1;
thread_local c10::DeviceIndex current_device = 0;

c10::DeviceIndex device_count() {  // FAKE_MLU_DEVICES cards (default 1), like MLU_VISIBLE_DEVICES narrowing it
  static const c10::DeviceIndex n = [] {
    const char* env = std::getenv("FAKE_MLU_DEVICES");
    return static_cast<c10::DeviceIndex>(env ? std::atoi(env) : 1);
  }();
  return n;
}

// ---- memory: host memory, counted per process so torch.mlu.memory_allocated / max_memory_allocated mean something
std::atomic<int64_t> bytes_now{0}, bytes_peak{0};

void count(int64_t delta) {
  const int64_t now = bytes_now.fetch_add(delta) + delta;
  int64_t peak = bytes_peak.load();
  while (now > peak && !bytes_peak.compare_exchange_weak(peak, now)) {
  }
}

struct Header { int64_t bytes; int64_t pad; };  // in front of each block: the size to uncount on free

void free_block(void* ctx) {
  auto* h = static_cast<Header*>(ctx);
  count(-h->bytes);
  c10::free_cpu(h);
}

struct FakeMluAllocator final : c10::Allocator {
#if FAKE_TORCH_AT_LEAST(2, 3)
  c10::DataPtr allocate(size_t n) override {
#else
  c10::DataPtr allocate(size_t n) const override {
#endif
    auto* h = static_cast<Header*>(c10::alloc_cpu(n + sizeof(Header)));
    h->bytes = static_cast<int64_t>(n);
    count(h->bytes);
    return {h + 1, h, &free_block, c10::Device(kMlu, current_device)};
  }
#if FAKE_TORCH_AT_LEAST(2, 3)
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
#endif
};
// Every object that torch's registries point at is made once and never destroyed, as torch's own are (c10's
// REGISTER_* and the CUDA allocator): at exit our static destructors run before torch's (our library loaded
// later), while torch's autograd device thread for "mlu" (pt_autograd_0) may still be winding down; a call into
// a destroyed object is an abort ("pure virtual method called", "terminate called ...") after the right output.
FakeMluAllocator& allocator = *new FakeMluAllocator();
REGISTER_ALLOCATOR(c10::DeviceType::PrivateUse1, &allocator);  // torch.UntypedStorage(n, device="mlu") asks for it

// "Pinned" host memory: ordinary CPU memory whose pointers are remembered, so Tensor.is_pinned() answers true.
std::mutex& pinned_mutex = *new std::mutex();
std::unordered_set<const void*>& pinned = *new std::unordered_set<const void*>();

void free_pinned(void* p) {
  {
    std::lock_guard<std::mutex> lock(pinned_mutex);
    pinned.erase(p);
  }
  c10::free_cpu(p);
}

struct PinnedAllocator final : c10::Allocator {
#if FAKE_TORCH_AT_LEAST(2, 3)
  c10::DataPtr allocate(size_t n) override {
#else
  c10::DataPtr allocate(size_t n) const override {
#endif
    void* p = c10::alloc_cpu(n);
    std::lock_guard<std::mutex> lock(pinned_mutex);
    pinned.insert(p);
    return {p, p, &free_pinned, c10::Device(c10::DeviceType::CPU)};
  }
#if FAKE_TORCH_AT_LEAST(2, 3)
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
#endif
};
PinnedAllocator& pinned_allocator = *new PinnedAllocator();

bool is_pinned_ptr(const void* p) {
  std::lock_guard<std::mutex> lock(pinned_mutex);
  return pinned.count(p) > 0;
}

// ---- device guard: a current device per thread, no streams (every op is synchronous here)
struct FakeMluGuard final : c10::impl::DeviceGuardImplInterface {
  c10::DeviceType type() const override { return kMlu; }
  c10::Device exchangeDevice(c10::Device d) const override {
    const c10::Device old = getDevice();
    setDevice(d);
    return old;
  }
  c10::Device getDevice() const override { return c10::Device(kMlu, current_device); }
  void setDevice(c10::Device d) const override {
    TORCH_CHECK(d.index() >= 0 && d.index() < device_count(), "fake mlu: no card ", int(d.index()), " (",
                int(device_count()), " cards)");
    current_device = d.index();
  }
  void uncheckedSetDevice(c10::Device d) const noexcept override { current_device = d.index(); }
  c10::Stream getStream(c10::Device d) const noexcept override { return c10::Stream(c10::Stream::DEFAULT, d); }
  c10::Stream exchangeStream(c10::Stream s) const noexcept override {
    return c10::Stream(c10::Stream::DEFAULT, s.device());
  }
  c10::DeviceIndex deviceCount() const noexcept override { return device_count(); }
};
C10_REGISTER_GUARD_IMPL(PrivateUse1, FakeMluGuard);

// ---- generator and hooks: the RNG the device reports (ops themselves draw from the CPU generator in the fallback)
struct FakeMluGenerator : at::CPUGeneratorImpl {
  explicit FakeMluGenerator(c10::DeviceIndex i) {
    device_ = c10::Device(kMlu, i);
    key_set_ = c10::DispatchKeySet(c10::DispatchKey::PrivateUse1);
  }
};

at::Generator make_generator(c10::DeviceIndex i) { return at::make_generator<FakeMluGenerator>(i); }

const at::Generator& default_generator(c10::DeviceIndex i) {
  static const auto& gens = *[] {
    auto* g = new std::vector<at::Generator>();
    for (c10::DeviceIndex k = 0; k < std::max<c10::DeviceIndex>(device_count(), 1); ++k) g->push_back(make_generator(k));
    return g;
  }();
  return gens.at(i < 0 ? current_device : i);
}

struct FakeMluHooks final : at::PrivateUse1HooksInterface {
#if FAKE_TORCH_AT_LEAST(2, 5)
  bool isBuilt() const override { return true; }
  bool isAvailable() const override { return device_count() > 0; }
  const at::Generator& getDefaultGenerator(c10::DeviceIndex i) const override { return default_generator(i); }
  bool isPinnedPtr(const void* p) const override { return is_pinned_ptr(p); }
  c10::Allocator* getPinnedMemoryAllocator() const override { return &pinned_allocator; }
  bool hasPrimaryContext(c10::DeviceIndex) const override { return true; }
  c10::DeviceIndex deviceCount() const override { return device_count(); }
  void setCurrentDevice(c10::DeviceIndex d) const override { current_device = d; }
  c10::DeviceIndex getCurrentDevice() const override { return current_device; }
  c10::DeviceIndex exchangeDevice(c10::DeviceIndex d) const override {
    const auto old = current_device;
    current_device = d;
    return old;
  }
  c10::DeviceIndex maybeExchangeDevice(c10::DeviceIndex d) const override { return exchangeDevice(d); }
  void resizePrivateUse1Bytes(const c10::Storage& storage, size_t newsize) const override {
    at::native::resize_bytes_cpu(storage.unsafeGetStorageImpl(), newsize);
  }
#else
  const at::Generator& getDefaultGenerator(c10::DeviceIndex i) override { return default_generator(i); }
#endif
  at::Device getDeviceFromPtr(void*) const override { return c10::Device(kMlu, current_device); }
};

// ---- the kernels that must not go through the CPU fallback
// Allocation lands on the card asked for ("mlu:1"), not the current one: the kernel takes the device's guard, as
// torchgen's generated CUDA factory kernels do (torchgen/dest/register_dispatch_key.py, device_guard).
at::Tensor empty_memory_format(c10::IntArrayRef size, c10::optional<at::ScalarType> dtype, c10::optional<at::Layout>,
                               c10::optional<at::Device> device, c10::optional<bool>,
                               c10::optional<at::MemoryFormat> memory_format) {
  const c10::OptionalDeviceGuard guard(device);
  return at::detail::empty_generic(size, &allocator, c10::DispatchKeySet(c10::DispatchKey::PrivateUse1),
                                   c10::dtype_or_default(dtype), memory_format);
}

at::Tensor empty_strided(c10::IntArrayRef size, c10::IntArrayRef stride, c10::optional<at::ScalarType> dtype,
                         c10::optional<at::Layout>, c10::optional<at::Device> device, c10::optional<bool>) {
  const c10::OptionalDeviceGuard guard(device);
  return at::detail::empty_strided_generic(size, stride, &allocator,
                                           c10::DispatchKeySet(c10::DispatchKey::PrivateUse1),
                                           c10::dtype_or_default(dtype));
}

// A CPU tensor aliasing a device tensor's memory (same sizes, strides and offset): the memory is host memory.
at::Tensor host_alias(const at::Tensor& t) {
  if (t.device().type() != kMlu) return t;
  c10::DataPtr ptr(t.storage().mutable_data(), c10::Device(c10::DeviceType::CPU));
  c10::Storage storage(c10::Storage::use_byte_size_t(), t.storage().nbytes(), std::move(ptr), nullptr, false);
  return at::empty({0}, t.options().device(c10::DeviceType::CPU))
      .set_(storage, t.storage_offset(), t.sizes(), t.strides());
}

at::Tensor copy_from(const at::Tensor& self, const at::Tensor& dst, bool /*non_blocking*/) {
  host_alias(dst).copy_(host_alias(self));
  return dst;
}

at::Tensor copy_from_and_resize(const at::Tensor& self, const at::Tensor& dst) {
  if (dst.sizes() != self.sizes()) dst.resize_(self.sizes());
  return copy_from(self, dst, false);
}

const at::Tensor& resize_(const at::Tensor& self, c10::IntArrayRef size, c10::optional<at::MemoryFormat> format) {
  // The storage was made by our allocator, so ATen's CPU resize grows it through that allocator.
  at::native::resize_impl_cpu_(self.unsafeGetTensorImpl(), size, /*stride=*/c10::nullopt);
  if (format.has_value()) {
    TORCH_CHECK(*format != at::MemoryFormat::Preserve, "fake mlu resize_: Preserve is not a target format");
    self.unsafeGetTensorImpl()->empty_tensor_restride(*format);
  }
  return self;
}

at::Tensor& set_storage(at::Tensor& self, c10::Storage src, int64_t offset, c10::IntArrayRef size,
                        c10::IntArrayRef stride) {
  at::TensorImpl* impl = self.unsafeGetTensorImpl();
  if (!impl->storage().is_alias_of(src)) impl->set_storage_keep_dtype(std::move(src));
  impl->set_storage_offset(offset);
  impl->set_sizes_and_strides(size, stride);
  return self;
}

at::Tensor& set_storage_whole(at::Tensor& self, c10::Storage src) {
  const int64_t n = static_cast<int64_t>(src.nbytes() / self.dtype().itemsize());
  return set_storage(self, std::move(src), 0, {n}, {1});
}

at::Tensor& set_tensor(at::Tensor& self, const at::Tensor& src) {
  return set_storage(self, src.storage(), src.storage_offset(), src.sizes(), src.strides());
}

bool is_pinned(const at::Tensor& self, c10::optional<at::Device>) { return is_pinned_ptr(self.storage().data()); }

at::Tensor pin_memory(const at::Tensor& self, c10::optional<at::Device>) {
  at::Tensor out = at::detail::empty_strided_generic(self.sizes(), self.strides(), &pinned_allocator,
                                                     c10::DispatchKeySet(c10::DispatchKey::CPU),
                                                     self.scalar_type());
  return out.copy_(self);
}

void fallback(const c10::OperatorHandle& op, torch::jit::Stack* stack) { at::native::cpu_fallback(op, stack); }

// Counters for the Python side (torch.mlu.memory_allocated and friends), as an op so no pybind module is needed.
std::vector<int64_t> memory_stats(bool reset_peak) {
  if (reset_peak) bytes_peak.store(bytes_now.load());
  return {bytes_now.load(), bytes_peak.load(), int64_t(device_count())};
}

// Before torch 2.3 the Python autocast context asks the device module for its state; torch_mlu keeps it in ATen.
#if !FAKE_TORCH_AT_LEAST(2, 3)
bool autocast_enabled(c10::optional<bool> set) {
  if (set.has_value()) at::autocast::set_privateuseone_enabled(*set);
  return at::autocast::is_privateuseone_enabled();
}
int64_t autocast_dtype(c10::optional<int64_t> set) {
  if (set.has_value()) at::autocast::set_autocast_privateuseone_dtype(static_cast<at::ScalarType>(*set));
  return static_cast<int64_t>(at::autocast::get_autocast_privateuseone_dtype());
}
#else
bool autocast_enabled(c10::optional<bool> set) {
  if (set.has_value()) at::autocast::set_autocast_enabled(kMlu, *set);
  return at::autocast::is_autocast_enabled(kMlu);
}
int64_t autocast_dtype(c10::optional<int64_t> set) {
  if (set.has_value()) at::autocast::set_autocast_dtype(kMlu, static_cast<at::ScalarType>(*set));
  return static_cast<int64_t>(at::autocast::get_autocast_dtype(kMlu));
}
#endif

// torch.mlu.set_device: this thread's current card (the guard's setter checks the index).
void set_device(int64_t index) { FakeMluGuard().setDevice(c10::Device(kMlu, static_cast<c10::DeviceIndex>(index))); }

void register_hooks() {
  static auto* hooks = new FakeMluHooks();
  at::RegisterPrivateUse1HooksInterface(hooks);
}

}  // namespace

TORCH_LIBRARY_IMPL(aten, PrivateUse1, m) {
  m.impl("empty.memory_format", &empty_memory_format);
  m.impl("empty_strided", &empty_strided);
  m.impl("_copy_from", &copy_from);
  m.impl("_copy_from_and_resize", &copy_from_and_resize);
  m.impl("resize_", &resize_);
  m.impl("set_.source_Storage", &set_storage_whole);
  m.impl("set_.source_Storage_storage_offset", &set_storage);
  m.impl("set_.source_Tensor", &set_tensor);
  m.impl("as_strided", &at::native::as_strided_tensorimpl);
  m.impl("view", &at::native::view);
  m.impl("_reshape_alias", &at::native::_reshape_alias);
  m.impl("unfold", &at::native::unfold);
}

TORCH_LIBRARY_IMPL(_, PrivateUse1, m) { m.fallback(torch::CppFunction::makeFromBoxedFunction<&fallback>()); }

// Ops without an autograd formula (torch.ops.frcnn_ops.*, torchvision::nms) pass the autograd key, as torch_mlu's
// MLUFallback.cpp registers it; torch 2.1 has no such default.
TORCH_LIBRARY_IMPL(_, AutogradPrivateUse1, m) { m.fallback(torch::CppFunction::makeFallthrough()); }

// Composite ops that pick a backend by device type and would land in the unimplemented *_overrideable variants:
// run the whole op on the CPU instead.
TORCH_LIBRARY_IMPL(aten, PrivateUse1, m) {
  m.impl("convolution", torch::CppFunction::makeFromBoxedFunction<&fallback>());
  m.impl("convolution_backward", torch::CppFunction::makeFromBoxedFunction<&fallback>());
}

// torch.autocast("mlu"): ops without an autocast rule run as they are (fake_torch_mlu.py adds the float16 ones).
TORCH_LIBRARY_IMPL(_, AutocastPrivateUse1, m) { m.fallback(torch::CppFunction::makeFallthrough()); }

#if !FAKE_TORCH_AT_LEAST(2, 5)
// Before the hooks interface carried pinned memory, Tensor.pin_memory(device) dispatched on the device argument.
TORCH_LIBRARY_IMPL(aten, PrivateUse1, m) {
  m.impl("is_pinned", &is_pinned);
  m.impl("_pin_memory", &pin_memory);
}
#endif

TORCH_LIBRARY(fake_mlu, m) {
  m.def("memory_stats(bool reset_peak=False) -> int[]", &memory_stats);
  m.def("register_hooks() -> ()", &register_hooks);
  m.def("set_device(int index) -> ()", &set_device);
  m.def("autocast_enabled(bool? set=None) -> bool", &autocast_enabled);
  m.def("autocast_dtype(int? set=None) -> int", &autocast_dtype);
}
