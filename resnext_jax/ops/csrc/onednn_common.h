// What the oneDNN FFI handlers of this directory share: one CPU engine, the activations'
// data types, shape checks and errors, a guard that turns exceptions into FFI errors, and per-call
// scratchpads.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <string>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

// Built with -fvisibility=hidden: only the handlers marked EXPORT leave the library.
#define EXPORT extern "C" __attribute__((visibility("default")))

namespace ffi = xla::ffi;

namespace resnext_onednn {

using dnnl::memory;
using Tag = memory::format_tag;
using F32 = ffi::Buffer<ffi::F32>;
// Activations and conv kernels: float32 or bfloat16, the same type for a call's every one.
using Data = ffi::AnyBuffer;
using DataResult = ffi::Result<ffi::AnyBuffer>;

inline dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

inline ffi::Unexpected<ffi::Error> Invalid(const char* message) {
  return ffi::Unexpected(ffi::Error::InvalidArgument(message));
}

// oneDNN's type for activations of XLA type `type`: f32 or bf16 (oneDNN runs bf16 on
// AVX512-BF16 and AMX where the CPU has them, and emulates it on other AVX-512 CPUs); false
// for any other type.
inline bool DataType(ffi::DataType type, memory::data_type* out) {
  if (type == ffi::DataType::F32) {
    *out = memory::data_type::f32;
  } else if (type == ffi::DataType::BF16) {
    *out = memory::data_type::bf16;
  } else {
    return false;
  }
  return true;
}

// The oneDNN type shared by `buffers` (one f32 or bf16 type); false if they differ or if it is
// another type.
inline bool SharedDataType(std::initializer_list<const Data*> buffers, memory::data_type* out) {
  const ffi::DataType type = (*buffers.begin())->element_type();
  for (const Data* b : buffers)
    if (b->element_type() != type) return false;
  return DataType(type, out);
}

// Whether two buffers' dimensions are the same.
inline bool SameShape(ffi::Span<const int64_t> a, ffi::Span<const int64_t> b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i] != b[i]) return false;
  return true;
}

// `base` advanced by `elements` elements of `type`.
inline void* Advance(void* base, int64_t elements, memory::data_type type) {
  return static_cast<char*>(base) + elements * static_cast<int64_t>(memory::data_type_size(type));
}

// Runs `body` and turns any exception into an FFI error whose message starts with `what`.
template <typename Body>
ffi::Error Guard(const char* what, Body body) {
  try {
    body();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN: ") + e.what());
  } catch (const std::exception& e) {  // out of memory, say: never unwind into XLA
    return ffi::Error::Internal(std::string(what) + ": " + e.what());
  } catch (...) {  // nor with anything else: past XLA's C frames it would end the process
    return ffi::Error::Internal(std::string(what) + ": an exception that is not a std::exception");
  }
  return ffi::Error::Success();
}

// Scratch space of at least `bytes`, owned by the calling thread and reused by its later calls;
// `slot` tells apart the buffers one call needs at once. A call runs to completion on its
// thread, so nothing else uses the buffer meanwhile. Allocating these on every call instead
// (megabytes each, between the step's own large buffers) fragmented the heap: tcmalloc then
// kept two steps' worth of memory.
enum Slot { kScratchpad, kKernel, kSecondScratchpad, kSlots };
inline void* ThreadBuffer(Slot slot, size_t bytes) {
  struct Buffer {
    void* data = nullptr;
    size_t size = 0;
    ~Buffer() { std::free(data); }
  };
  thread_local Buffer buffers[kSlots];
  Buffer& b = buffers[slot];
  if (b.size < bytes || !b.data) {
    const size_t size = (bytes + 63) / 64 * 64 + 64;  // never 0, a multiple of the alignment
    void* data = std::aligned_alloc(64, size);
    if (!data) throw std::bad_alloc();
    std::free(b.data);
    b.data = data;
    b.size = size;
  }
  return b.data;
}

// A memory object of `desc` in this thread's buffer `slot`.
inline memory ThreadMemory(const memory::desc& desc, Slot slot) {
  return memory(desc, Engine(), ThreadBuffer(slot, desc.get_size()));
}

// Attributes for a primitive whose calls bring their own scratchpad (`Scratch` below).
inline dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

// The primitives of `problem`, built on first use (oneDNN JIT-compiles each one) and reused.
template <typename Primitives, typename Problem>
Primitives& Cached(const Problem& problem) {
  static std::mutex mutex;
  static std::map<Problem, std::unique_ptr<Primitives>> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto& slot = cache[problem];
  if (!slot) slot = std::make_unique<Primitives>(problem);
  return *slot;
}

// XLA may run two primitives of the same shape at once on different threads, which oneDNN's
// library-held scratchpad does not allow: every call brings its own (primitives are built
// with scratchpad_mode::user), from its thread's buffer.
template <typename PrimitiveDesc>
memory Scratch(const PrimitiveDesc& pd, Slot slot = kScratchpad) {
  return ThreadMemory(pd.scratchpad_desc(), slot);
}

}  // namespace resnext_onednn
