// A 3x3, stride-1, padding-1 grouped conv of 4 input and 4 output channels a group (stage 1 of
// ResNeXt 32x4d), float32 NHWC, written for AVX-512: oneDNN 3.2's kernel for such narrow groups
// runs far below the CPU's speed (docs/benchmarks.md, "A narrow-group conv kernel of our own").
// One XLA FFI handler; resnext_jax/ops/onednn.py builds this file beside the oneDNN ones and
// calls it for the forward and, with the kernel flipped and transposed within groups, for the
// input gradient, where `narrow_conv_applies` says so.
//
// Output channel o of group g is sum over taps t and inputs i of x[t][4g+i] * w[t][i][4g+o].
// One 16-float vector holds 4 groups' channels. Multiplying the input vector by w_r, whose
// lane 4g+i holds w[t][i][4g+(i+r)%4], puts in lane 4g+i a term of output 4g+(i+r)%4; so four
// accumulators (r = 0..3) take every tap's products with no shuffle, and the output is their
// sum after rotating accumulator r by r lanes within each group, once per output vector.

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

#define EXPORT extern "C" __attribute__((visibility("default")))

namespace ffi = xla::ffi;

namespace resnext_narrow {
namespace {

constexpr int kPer = 4;     // channels a group, in and out
constexpr int kLanes = 16;  // floats a vector

// w [3][3][4][c] (flax's layout: tap, input in group, output) to [9][4 rotations][c].
void Pack(const float* w, int64_t c, float* packed) {
  for (int t = 0; t < 9; ++t)
    for (int r = 0; r < kPer; ++r)
      for (int64_t o = 0; o < c; ++o) {
        const int64_t g = o / kPer, i = o % kPer;
        packed[(t * kPer + r) * c + o] = w[(t * kPer + i) * c + g * kPer + (i + r) % kPer];
      }
}

// Lane permutations that rotate each group of 4 lanes by r = 0..3: lane 4g+k of rotation r
// reads lane 4g+(k+sign*r)%4.
__attribute__((target("avx512f"))) void Rotations(int sign, __m512i* rotate) {
  for (int r = 0; r < kPer; ++r) {
    alignas(64) int32_t lanes[kLanes];
    for (int l = 0; l < kLanes; ++l)
      lanes[l] = l / kPer * kPer + ((l % kPer + sign * r) & (kPer - 1));
    rotate[r] = _mm512_load_si512(lanes);
  }
}

// P neighbouring output pixels of row (n, oh) from column ow, channels [16j, 16j + 16).
template <int P>
__attribute__((target("avx512f"))) inline void Block(const float* x, const float* packed,
                                                      float* y, int64_t h, int64_t w, int64_t c,
                                                      int64_t n, int64_t oh, int64_t ow,
                                                      int64_t j, const __m512i* rotate) {
  // Every loop here unrolled, so that the accumulators stay in registers (GCC -O2 does not).
  __m512 acc[P][kPer];
#pragma GCC unroll 4
  for (int p = 0; p < P; ++p)
#pragma GCC unroll 4
    for (int r = 0; r < kPer; ++r) acc[p][r] = _mm512_setzero_ps();
#pragma GCC unroll 3
  for (int kh = 0; kh < 3; ++kh) {
    const int64_t ih = oh + kh - 1;
    if (ih < 0 || ih >= h) continue;
    const float* row = x + (n * h + ih) * w * c + j * kLanes;
#pragma GCC unroll 3
    for (int kw = 0; kw < 3; ++kw) {
      const float* wt = packed + (kh * 3 + kw) * kPer * c + j * kLanes;
      const __m512 w0 = _mm512_loadu_ps(wt), w1 = _mm512_loadu_ps(wt + c),
                   w2 = _mm512_loadu_ps(wt + 2 * c), w3 = _mm512_loadu_ps(wt + 3 * c);
#pragma GCC unroll 4
      for (int p = 0; p < P; ++p) {
        const int64_t iw = ow + p + kw - 1;
        if (iw < 0 || iw >= w) continue;
        const __m512 v = _mm512_loadu_ps(row + iw * c);
        acc[p][0] = _mm512_fmadd_ps(v, w0, acc[p][0]);
        acc[p][1] = _mm512_fmadd_ps(v, w1, acc[p][1]);
        acc[p][2] = _mm512_fmadd_ps(v, w2, acc[p][2]);
        acc[p][3] = _mm512_fmadd_ps(v, w3, acc[p][3]);
      }
    }
  }
#pragma GCC unroll 4
  for (int p = 0; p < P; ++p) {
    __m512 out = acc[p][0];
#pragma GCC unroll 4
    for (int r = 1; r < kPer; ++r)
      out = _mm512_add_ps(out, _mm512_permutexvar_ps(rotate[r], acc[p][r]));
    _mm512_storeu_ps(y + ((n * h + oh) * w + ow + p) * c + j * kLanes, out);
  }
}

__attribute__((target("avx512f"))) void Conv(const float* x, const float* packed, float* y,
                                             int64_t n, int64_t h, int64_t w, int64_t c) {
  __m512i rotate[kPer];  // lane 4g+o of rotation r reads lane 4g+(o-r)%4
  Rotations(-1, rotate);
  const int64_t chunks = c / kLanes, full = w / 4 * 4;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < n; ++b)
    for (int64_t oh = 0; oh < h; ++oh) {
      for (int64_t ow = 0; ow < full; ow += 4)
        for (int64_t j = 0; j < chunks; ++j) Block<4>(x, packed, y, h, w, c, b, oh, ow, j, rotate);
      for (int64_t j = 0; j < chunks; ++j) switch (w - full) {
          case 3: Block<3>(x, packed, y, h, w, c, b, oh, full, j, rotate); break;
          case 2: Block<2>(x, packed, y, h, w, c, b, oh, full, j, rotate); break;
          case 1: Block<1>(x, packed, y, h, w, c, b, oh, full, j, rotate); break;
          default: break;
        }
    }
}

// The kernel gradient, [3][3][4][c], of the conv above from its input x and output gradient dy:
// dw[t][i][4g+o] is the sum over pixels of x[pixel + t][4g+i] * dy[pixel][4g+o]. Multiplying
// the input vector by dy rotated by r lanes within groups (lane 4g+i holding dy[4g+(i+r)%4])
// accumulates, in lane 4g+i, the weight Pack puts there for rotation r; so the sums land in
// Pack's layout, three rotations of dy per pixel, and are unpacked at the end. Each thread
// takes whole output rows (their activations stay in cache while it goes over the channels
// and kernel rows) and sums into its own copy of the gradient; the copies are added last.
__attribute__((target("avx512f"))) void KernelGrad(const float* x, const float* dy, float* dw,
                                                   int64_t n, int64_t h, int64_t w,
                                                   int64_t c) {
  __m512i rotate[kPer];  // lane 4g+i of rotation r reads lane 4g+(i+r)%4
  Rotations(1, rotate);
  const int64_t size = 9 * kPer * c, chunks = c / kLanes;
  std::vector<float> partial(omp_get_max_threads() * size, 0.f);
  int threads = 1;
#pragma omp parallel
  {
#pragma omp single
    threads = omp_get_num_threads();
    float* mine = partial.data() + omp_get_thread_num() * size;
#pragma omp for schedule(static)
    for (int64_t row = 0; row < n * h; ++row) {
      const int64_t oh = row % h;
      const float* dyrow = dy + row * w * c;
      for (int kh = 0; kh < 3; ++kh) {
        const int64_t ih = oh + kh - 1;
        if (ih < 0 || ih >= h) continue;
        const float* xrow = x + (row + kh - 1) * w * c;
        for (int64_t j = 0; j < chunks; ++j) {
          float* sums = mine + kh * 3 * kPer * c + j * kLanes;  // [kw][r] at stride c
          __m512 acc[3][kPer];
#pragma GCC unroll 3
          for (int kw = 0; kw < 3; ++kw)
#pragma GCC unroll 4
            for (int r = 0; r < kPer; ++r) acc[kw][r] = _mm512_loadu_ps(sums + (kw * kPer + r) * c);
          for (int64_t ow = 0; ow < w; ++ow) {
            __m512 d[kPer];
            d[0] = _mm512_loadu_ps(dyrow + ow * c + j * kLanes);
#pragma GCC unroll 4
            for (int r = 1; r < kPer; ++r) d[r] = _mm512_permutexvar_ps(rotate[r], d[0]);
#pragma GCC unroll 3
            for (int kw = 0; kw < 3; ++kw) {
              const int64_t iw = ow + kw - 1;
              if (iw < 0 || iw >= w) continue;
              const __m512 v = _mm512_loadu_ps(xrow + iw * c + j * kLanes);
#pragma GCC unroll 4
              for (int r = 0; r < kPer; ++r) acc[kw][r] = _mm512_fmadd_ps(v, d[r], acc[kw][r]);
            }
          }
#pragma GCC unroll 3
          for (int kw = 0; kw < 3; ++kw)
#pragma GCC unroll 4
            for (int r = 0; r < kPer; ++r) _mm512_storeu_ps(sums + (kw * kPer + r) * c, acc[kw][r]);
        }
      }
    }
  }
  for (int k = 1; k < threads; ++k)
    for (int64_t e = 0; e < size; ++e) partial[e] += partial[k * size + e];
  for (int t = 0; t < 9; ++t)  // Pack's inverse
    for (int i = 0; i < kPer; ++i)
      for (int64_t o = 0; o < c; ++o) {
        const int64_t g = o / kPer, r = (o % kPer - i + kPer) % kPer;
        dw[(t * kPer + i) * c + o] = partial[(t * kPer + r) * c + g * kPer + i];
      }
}

// Checks a call's shapes: NHWC `x`, `other` (the output, or the output gradient: `what`) shaped
// like it, and a 3x3x4xC kernel (or kernel gradient) `kd`; and that the CPU has AVX-512.
ffi::Error Check(ffi::Span<const int64_t> xd, ffi::Span<const int64_t> other,
                 ffi::Span<const int64_t> kd, const char* what) {
  if (xd.size() != 4 || other.size() != 4 || kd.size() != 4)
    return ffi::Error::InvalidArgument("narrow conv: NHWC activations and an HWIO kernel");
  const int64_t c = xd[3];
  if (kd[0] != 3 || kd[1] != 3 || kd[2] != kPer || kd[3] != c || c % kLanes)
    return ffi::Error::InvalidArgument(
        "narrow conv: the kernel must be 3x3x4xC, C (a multiple of 16) the input's channels");
  for (int d = 0; d < 4; ++d)
    if (other[d] != xd[d])
      return ffi::Error::InvalidArgument(std::string("narrow conv: ") + what + " shape differs");
  if (!__builtin_cpu_supports("avx512f"))
    return ffi::Error::Internal("narrow conv: this CPU has no AVX-512");
  return ffi::Error::Success();
}

ffi::Error NarrowConv(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                      ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  if (auto error = Check(xd, y->dimensions(), kernel.dimensions(), "output"); error.failure())
    return error;
  const int64_t c = xd[3];
  std::vector<float> packed(9 * kPer * c);
  Pack(kernel.typed_data(), c, packed.data());
  Conv(x.typed_data(), packed.data(), y->typed_data(), xd[0], xd[1], xd[2], c);
  return ffi::Error::Success();
}

ffi::Error NarrowConvKernelGrad(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                                ffi::ResultBuffer<ffi::F32> dw) {
  const auto xd = x.dimensions();
  if (auto error = Check(xd, dy.dimensions(), dw->dimensions(), "gradient"); error.failure())
    return error;
  KernelGrad(x.typed_data(), dy.typed_data(), dw->typed_data(), xd[0], xd[1], xd[2], xd[3]);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace resnext_narrow

EXPORT XLA_FFI_Error* ResnextNarrowConv(XLA_FFI_CallFrame*);
XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnextNarrowConv, resnext_narrow::NarrowConv,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

EXPORT XLA_FFI_Error* ResnextNarrowConvKernelGrad(XLA_FFI_CallFrame*);
XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnextNarrowConvKernelGrad, resnext_narrow::NarrowConvKernelGrad,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// For the Python side: whether this CPU runs the kernel (AVX-512).
EXPORT int ResnextNarrowConvSupported() { return __builtin_cpu_supports("avx512f") ? 1 : 0; }
