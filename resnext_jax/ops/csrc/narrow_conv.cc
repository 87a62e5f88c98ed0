// A 3x3, padding-1 grouped conv of stride 1 or 2 and K = 4, 8, 16 or 32 input and output
// channels a group (the four stages of ResNeXt 32x4d), float32 NHWC, written for AVX-512:
// oneDNN 3.2's kernels for such groups run far below the CPU's speed (docs/benchmarks.md, "A
// narrow-group conv kernel of our own", "16- and 32-channel groups"). Two XLA FFI handlers;
// resnext_jax/ops/onednn.py builds this file beside the oneDNN ones and calls it for the
// forward, the input gradient (the conv's transpose, with the kernel flipped and transposed
// within groups) and, for K = 4 or 8, the kernel gradient, where `narrow_conv_passes` says so.
//
// K = 4 or 8: output channel o of group g is sum over taps t and inputs i of
// x[t][Kg+i] * w[t][i][Kg+o].
// One 16-float vector holds 16/K groups' channels. Multiplying the input vector by w_r, whose
// lane Kg+i holds w[t][i][Kg+(i+r)%K], puts in lane Kg+i a term of output Kg+(i+r)%K; so K
// accumulators (r = 0..K-1) take every tap's products with no shuffle, and the output is their
// sum after rotating accumulator r by r lanes within each group, once per output vector.

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

#define EXPORT extern "C" __attribute__((visibility("default")))

namespace ffi = xla::ffi;

namespace resnext_narrow {
namespace {

constexpr int kLanes = 16;  // floats a vector

// w [3][3][K][c] (flax's layout: tap, input in group, output) to [9][K rotations][c].
template <int K>
void Pack(const float* w, int64_t c, float* packed) {
  for (int t = 0; t < 9; ++t)
    for (int r = 0; r < K; ++r)
      for (int64_t o = 0; o < c; ++o) {
        const int64_t g = o / K, i = o % K;
        packed[(t * K + r) * c + o] = w[(t * K + i) * c + g * K + (i + r) % K];
      }
}

// Lane permutations that rotate each group of K lanes by r = 0..K-1: lane Kg+k of rotation r
// reads lane Kg+(k+sign*r)%K.
template <int K>
__attribute__((target("avx512f"))) void Rotations(int sign, __m512i* rotate) {
  for (int r = 0; r < K; ++r) {
    alignas(64) int32_t lanes[kLanes];
    for (int l = 0; l < kLanes; ++l) lanes[l] = l / K * K + ((l % K + sign * r) & (K - 1));
    rotate[r] = _mm512_load_si512(lanes);
  }
}

// Where a conv reads its input: a conv of stride `stride` (D = 1), or the transpose of a
// stride-2 conv (D = 2: the input's pixels lie two apart on the output's grid, the input
// gradient of a stride-2 conv from its output gradient and the flipped kernel). Tap k of
// output row or column o reads input o * stride + k - 1 (D = 1) or (o + k - 1) / 2 where
// that divides (D = 2); -1 where there is none.
template <int D>
inline int64_t Source(int64_t o, int k, int64_t stride, int64_t size) {
  int64_t i = o * stride + k - 1;
  if constexpr (D == 2) {
    if (i & 1) return -1;
    i /= 2;
  }
  return i >= 0 && i < size ? i : -1;
}

// P neighbouring output pixels of row (n, oh) from column ow, channels [16j, 16j + 16); the
// input is h x w, the output ho x wo. With D = 2, ow is even, so whether tap kw of pixel p
// reads an input pixel is known when compiling: the skipped taps cost nothing.
template <int K, int P, int D>
__attribute__((target("avx512f"))) inline void Block(const float* x, const float* packed,
                                                      float* y, int64_t h, int64_t w, int64_t ho,
                                                      int64_t wo, int64_t c, int64_t stride,
                                                      int64_t n, int64_t oh, int64_t ow,
                                                      int64_t j, const __m512i* rotate) {
  // Every loop here unrolled, so that the accumulators stay in registers (GCC -O2 does not).
  __m512 acc[P][K];
#pragma GCC unroll 4
  for (int p = 0; p < P; ++p)
#pragma GCC unroll 8
    for (int r = 0; r < K; ++r) acc[p][r] = _mm512_setzero_ps();
#pragma GCC unroll 3
  for (int kh = 0; kh < 3; ++kh) {
    const int64_t ih = Source<D>(oh, kh, stride, h);
    if (ih < 0) continue;
    const float* row = x + (n * h + ih) * w * c + j * kLanes;
#pragma GCC unroll 3
    for (int kw = 0; kw < 3; ++kw) {
      const float* wt = packed + (kh * 3 + kw) * K * c + j * kLanes;
      __m512 wr[K];
#pragma GCC unroll 8
      for (int r = 0; r < K; ++r) wr[r] = _mm512_loadu_ps(wt + r * c);
#pragma GCC unroll 4
      for (int p = 0; p < P; ++p) {
        if (D == 2 && ((p + kw + 1) & 1)) continue;  // ow even: column ow + p + kw - 1 is odd
        const int64_t iw = Source<D>(ow + p, kw, stride, w);
        if (iw < 0) continue;
        const __m512 v = _mm512_loadu_ps(row + iw * c);
#pragma GCC unroll 8
        for (int r = 0; r < K; ++r) acc[p][r] = _mm512_fmadd_ps(v, wr[r], acc[p][r]);
      }
    }
  }
#pragma GCC unroll 4
  for (int p = 0; p < P; ++p) {
    __m512 out = acc[p][0];
#pragma GCC unroll 8
    for (int r = 1; r < K; ++r)
      out = _mm512_add_ps(out, _mm512_permutexvar_ps(rotate[r], acc[p][r]));
    _mm512_storeu_ps(y + ((n * ho + oh) * wo + ow + p) * c + j * kLanes, out);
  }
}

// Columns [ow, wo) of row (n, oh), fewer than P of them, in one Block.
template <int K, int P, int D>
__attribute__((target("avx512f"))) inline void Tail(const float* x, const float* packed, float* y,
                                                     int64_t h, int64_t w, int64_t ho, int64_t wo,
                                                     int64_t c, int64_t stride, int64_t n,
                                                     int64_t oh, int64_t ow, int64_t j,
                                                     const __m512i* rotate) {
  if constexpr (P > 1) {
    if (wo - ow == P - 1)
      return Block<K, P - 1, D>(x, packed, y, h, w, ho, wo, c, stride, n, oh, ow, j, rotate);
    return Tail<K, P - 1, D>(x, packed, y, h, w, ho, wo, c, stride, n, oh, ow, j, rotate);
  }
}

// Output pixels a Block: as many as keep its K accumulators each, the input and the weights of
// a tap within AVX-512's 32 registers; even for D = 2, whose Blocks must start at even columns.
template <int K, int D>
constexpr int kPixels = K == 4 ? 4 : (D == 2 ? 2 : 3);

// The conv of x (n x h x w x c) into y (n x ho x wo x c) with the packed kernel.
template <int K, int D>
__attribute__((target("avx512f"))) void Conv(const float* x, const float* packed, float* y,
                                             int64_t n, int64_t h, int64_t w, int64_t ho,
                                             int64_t wo, int64_t c, int64_t stride) {
  constexpr int P = kPixels<K, D>;
  __m512i rotate[K];  // lane Kg+o of rotation r reads lane Kg+(o-r)%K
  Rotations<K>(-1, rotate);
  const int64_t chunks = c / kLanes, full = wo / P * P;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < n; ++b)
    for (int64_t oh = 0; oh < ho; ++oh) {
      for (int64_t ow = 0; ow < full; ow += P)
        for (int64_t j = 0; j < chunks; ++j)
          Block<K, P, D>(x, packed, y, h, w, ho, wo, c, stride, b, oh, ow, j, rotate);
      if (full < wo)
        for (int64_t j = 0; j < chunks; ++j)
          Tail<K, P, D>(x, packed, y, h, w, ho, wo, c, stride, b, oh, full, j, rotate);
    }
}

// One output pixel's terms of the kernel gradient below: acc[kw][r] += x[col + kw - 1] * dy[ow]
// rotated by r, for the neighbours of input column `col` that exist (`left`: col - 1, `right`:
// col + 1). One rotation of dy at a time, so that the 3K accumulators, three inputs and one
// rotation fit AVX-512's 32 registers for K = 8 too.
template <int K, bool left, bool right>
__attribute__((target("avx512f"))) inline void GradPixel(const float* x, const float* dy,
                                                          int64_t c, int64_t col, int64_t ow,
                                                          const __m512i* rotate,
                                                          __m512 (&acc)[3][K]) {
  const __m512 d0 = _mm512_loadu_ps(dy + ow * c);
  const __m512 v0 = left ? _mm512_loadu_ps(x + (col - 1) * c) : d0;
  const __m512 v1 = _mm512_loadu_ps(x + col * c);
  const __m512 v2 = right ? _mm512_loadu_ps(x + (col + 1) * c) : d0;
#pragma GCC unroll 8
  for (int r = 0; r < K; ++r) {
    const __m512 d = r ? _mm512_permutexvar_ps(rotate[r], d0) : d0;
    if (left) acc[0][r] = _mm512_fmadd_ps(v0, d, acc[0][r]);
    acc[1][r] = _mm512_fmadd_ps(v1, d, acc[1][r]);
    if (right) acc[2][r] = _mm512_fmadd_ps(v2, d, acc[2][r]);
  }
}

// GradPixel with its neighbours known only when running.
template <int K>
__attribute__((target("avx512f"))) inline void EdgePixel(const float* x, const float* dy,
                                                          int64_t c, int64_t w, int64_t col,
                                                          int64_t ow, const __m512i* rotate,
                                                          __m512 (&acc)[3][K]) {
  const bool left = col > 0, right = col + 1 < w;
  if (left && right) return GradPixel<K, true, true>(x, dy, c, col, ow, rotate, acc);
  if (left) return GradPixel<K, true, false>(x, dy, c, col, ow, rotate, acc);
  if (right) return GradPixel<K, false, true>(x, dy, c, col, ow, rotate, acc);
  GradPixel<K, false, false>(x, dy, c, col, ow, rotate, acc);
}

// The kernel gradient, [3][3][K][c], of the conv above (D = 1) from its input x (n x h x w x c)
// and output gradient dy (n x ho x wo x c): dw[t][i][Kg+o] is the sum over output pixels of
// x[pixel * stride + t][Kg+i] * dy[pixel][Kg+o]. Multiplying the input vector by dy rotated by
// r lanes within groups (lane Kg+i holding dy[Kg+(i+r)%K]) accumulates, in lane Kg+i, the
// weight Pack puts there for rotation r; so the sums land in Pack's layout, K-1 rotations of dy
// per pixel, and are unpacked at the end. Each thread takes whole output rows (their
// activations stay in cache while it goes over the channels and kernel rows) and sums into its
// own copy of the gradient; the copies are added last.
template <int K>
__attribute__((target("avx512f"))) void KernelGrad(const float* x, const float* dy, float* dw,
                                                   int64_t n, int64_t h, int64_t w, int64_t ho,
                                                   int64_t wo, int64_t c, int64_t stride) {
  __m512i rotate[K];  // lane Kg+i of rotation r reads lane Kg+(i+r)%K
  Rotations<K>(1, rotate);
  const int64_t size = 9 * K * c, chunks = c / kLanes;
  std::vector<float> partial(omp_get_max_threads() * size, 0.f);
  int threads = 1;
#pragma omp parallel
  {
#pragma omp single
    threads = omp_get_num_threads();
    float* mine = partial.data() + omp_get_thread_num() * size;
#pragma omp for schedule(static)
    for (int64_t row = 0; row < n * ho; ++row) {
      const int64_t b = row / ho, oh = row % ho;
      const float* dyrow = dy + row * wo * c;
      for (int kh = 0; kh < 3; ++kh) {
        const int64_t ih = Source<1>(oh, kh, stride, h);
        if (ih < 0) continue;
        const float* xrow = x + (b * h + ih) * w * c;
        for (int64_t j = 0; j < chunks; ++j) {
          float* sums = mine + kh * 3 * K * c + j * kLanes;  // [kw][r] at stride c
          __m512 acc[3][K];
#pragma GCC unroll 3
          for (int kw = 0; kw < 3; ++kw)
#pragma GCC unroll 8
            for (int r = 0; r < K; ++r) acc[kw][r] = _mm512_loadu_ps(sums + (kw * K + r) * c);
          const float* xs = xrow + j * kLanes;
          const float* ds = dyrow + j * kLanes;
          // Only the first and last output columns can lack a neighbour.
          EdgePixel<K>(xs, ds, c, w, 0, 0, rotate, acc);
          for (int64_t ow = 1; ow < wo - 1; ++ow)
            GradPixel<K, true, true>(xs, ds, c, ow * stride, ow, rotate, acc);
          if (wo > 1) EdgePixel<K>(xs, ds, c, w, (wo - 1) * stride, wo - 1, rotate, acc);
#pragma GCC unroll 3
          for (int kw = 0; kw < 3; ++kw)
#pragma GCC unroll 8
            for (int r = 0; r < K; ++r) _mm512_storeu_ps(sums + (kw * K + r) * c, acc[kw][r]);
        }
      }
    }
  }
  for (int k = 1; k < threads; ++k)
    for (int64_t e = 0; e < size; ++e) partial[e] += partial[k * size + e];
  for (int t = 0; t < 9; ++t)  // Pack's inverse
    for (int i = 0; i < K; ++i)
      for (int64_t o = 0; o < c; ++o) {
        const int64_t g = o / K, r = (o % K - i + K) % K;
        dw[(t * K + i) * c + o] = partial[(t * K + r) * c + g * K + i];
      }
}

// Wider groups, K = 16 or 32 channels (stages 3 and 4 of ResNeXt 32x4d): a group's outputs
// fill K / 16 vectors, so each input channel is broadcast and multiplied by its row of the
// kernel, with no rotation. Each thread takes a group of one image at a time and first copies
// what it reads into buffers of its own: the group's input, zero-padded, (h + 2) x (w + 2) x
// K, and its kernel, [9][K][K]. There every address is a constant offset, the padding needs no
// bounds checks and the kernel's rows lie K floats apart instead of C: at a C of 512 or more,
// rows C floats apart share two of the L1 cache's 64 sets and evict each other.

// Copies `rows` x `cols` pixels of K channels, C apart in `src`, into `dst` at `pad` rows and
// columns in from its corner; dst has cols + 2 * pad columns; the padding is zeroed.
template <int K>
__attribute__((target("avx512f"))) void CopySlice(const float* src, int64_t rows, int64_t cols,
                                                  int64_t c, int pad, float* dst) {
  const int64_t dw = cols + 2 * pad;
  std::fill(dst, dst + pad * dw * K, 0.f);
  std::fill(dst + (rows + pad) * dw * K, dst + (rows + 2 * pad) * dw * K, 0.f);
  for (int64_t r = 0; r < rows; ++r) {
    float* out = dst + (r + pad) * dw * K;
    std::fill(out, out + pad * K, 0.f);
    std::fill(out + (cols + pad) * K, out + dw * K, 0.f);
    for (int64_t col = 0; col < cols; ++col)
#pragma GCC unroll 2
      for (int v = 0; v < K / kLanes; ++v)
        _mm512_storeu_ps(out + (col + pad) * K + v * kLanes,
                         _mm512_loadu_ps(src + (r * cols + col) * c + v * kLanes));
  }
}

// P neighbouring output pixels, from column ow of output row oh, of one group: `buf` is the
// group's padded input (bw its padded width), `wg` its kernel [9][K][K], `yp` the first
// pixel's outputs. D and S as for Block: a conv of stride S (D = 1), or the transpose of a
// stride-2 conv (D = 2; ow even). h is the input's height.
template <int K, int P, int D, int S>
__attribute__((target("avx512f"))) inline void WideBlock(const float* buf, int64_t bw,
                                                          const float* wg, int64_t c, float* yp,
                                                          int64_t h, int64_t oh, int64_t ow) {
  constexpr int V = K / kLanes;
  __m512 acc[P][V];
#pragma GCC unroll 16
  for (int p = 0; p < P; ++p)
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) acc[p][v] = _mm512_setzero_ps();
#pragma GCC unroll 3
  for (int kh = 0; kh < 3; ++kh) {
    const int64_t ih = Source<D>(oh, kh, S, h);
    if (ih < 0) continue;  // a padding row, or no tap
    const float* row = buf + ((ih + 1) * bw + (D == 1 ? ow * S : ow / 2)) * K;
#pragma GCC unroll 3
    for (int kw = 0; kw < 3; ++kw) {
      const float* wt = wg + (kh * 3 + kw) * K * K;
#pragma GCC unroll 2
      for (int i = 0; i < K; ++i) {
        __m512 wv[V];
#pragma GCC unroll 2
        for (int v = 0; v < V; ++v) wv[v] = _mm512_loadu_ps(wt + i * K + v * kLanes);
#pragma GCC unroll 16
        for (int p = 0; p < P; ++p) {
          if (D == 2 && ((p + kw + 1) & 1)) continue;  // reads an odd column: no tap
          // The buffer's column from the block's first: (ow + p) * S + kw - 1 + 1, or for
          // D = 2, (ow + p + kw - 1) / 2 + 1.
          const int col = D == 1 ? p * S + kw : (p + kw - 1) / 2 + 1;
          const __m512 b = _mm512_set1_ps(row[col * K + i]);
#pragma GCC unroll 2
          for (int v = 0; v < V; ++v) acc[p][v] = _mm512_fmadd_ps(b, wv[v], acc[p][v]);
        }
      }
    }
  }
#pragma GCC unroll 16
  for (int p = 0; p < P; ++p)
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) _mm512_storeu_ps(yp + p * c + v * kLanes, acc[p][v]);
}

// The last `left` (< P) pixels of a row, in one WideBlock.
template <int K, int P, int D, int S>
__attribute__((target("avx512f"))) inline void WideTail(const float* buf, int64_t bw,
                                                         const float* wg, int64_t c, float* yp,
                                                         int64_t h, int64_t oh, int64_t ow,
                                                         int64_t left) {
  if constexpr (P > 1) {
    if (left == P - 1) return WideBlock<K, P - 1, D, S>(buf, bw, wg, c, yp, h, oh, ow);
    return WideTail<K, P - 1, D, S>(buf, bw, wg, c, yp, h, oh, ow, left);
  }
}

// Output pixels a WideBlock: P * K / 16 accumulators, K / 16 kernel vectors and a broadcast
// input within AVX-512's 32 registers; even, for D = 2.
constexpr int kWidePixels = 14;

// Prefetches into L2 the lines CopySlice will read for a group of one image.
template <int K>
inline void PrefetchSlice(const float* src, int64_t pixels, int64_t c) {
  for (int64_t p = 0; p < pixels; ++p)
    for (int v = 0; v < K / kLanes; ++v)
      _mm_prefetch(reinterpret_cast<const char*>(src + p * c + v * kLanes), _MM_HINT_T1);
}

// The conv of x (n x h x w x c) into y (n x ho x wo x c) with the kernel in flax's layout.
// Threads take (image, group) pairs in order, so that a thread's next slice of x lies in the
// lines beside its current one; each prefetches its next.
template <int K, int D, int S>
__attribute__((target("avx512f"))) void WideConv(const float* x, const float* kernel, float* y,
                                                 int64_t n, int64_t h, int64_t w, int64_t ho,
                                                 int64_t wo, int64_t c) {
  constexpr int P = kWidePixels;
  const int64_t groups = c / K, bw = w + 2;
  // Left uninitialised: CopySlice writes every element of both buffers, padding included.
  std::unique_ptr<float[]> packed(new float[9 * K * c]);  // [group][9][K][K]
#pragma omp parallel
  {
#pragma omp for schedule(static)
    for (int64_t g = 0; g < groups; ++g)
      CopySlice<K>(kernel + g * K, 1, 9 * K, c, 0, packed.get() + g * 9 * K * K);
    std::unique_ptr<float[]> buf(new float[(h + 2) * bw * K]);
#pragma omp for collapse(2) schedule(static)
    for (int64_t b = 0; b < n; ++b)
      for (int64_t g = 0; g < groups; ++g) {
        const float* wg = packed.get() + g * 9 * K * K;
        const float* src = x + b * h * w * c + g * K;
        CopySlice<K>(src, h, w, c, 1, buf.get());
        if (g + 1 < groups || b + 1 < n)  // the next pair's slice
          PrefetchSlice<K>(src + (g + 1 < groups ? K : h * w * c - g * K), h * w, c);
        for (int64_t oh = 0; oh < ho; ++oh) {
          float* yrow = y + (b * ho + oh) * wo * c + g * K;
          int64_t ow = 0;
          for (; ow + P <= wo; ow += P)
            WideBlock<K, P, D, S>(buf.get(), bw, wg, c, yrow + ow * c, h, oh, ow);
          if (ow < wo)
            WideTail<K, P, D, S>(buf.get(), bw, wg, c, yrow + ow * c, h, oh, ow, wo - ow);
        }
      }
  }
}

// The output size of a 3x3, padding-1 conv of stride `stride` over `size` pixels.
int64_t Out(int64_t size, int64_t stride) { return (size - 1) / stride + 1; }

// Checks a call's shapes: NHWC `x`, `y` (its output: the conv's, or the input gradient's with
// `transposed`; or its output gradient: `what` names it), and a 3x3xKxC kernel (or kernel
// gradient) `kd`, K 4, 8, 16 or 32; and that the CPU has AVX-512.
ffi::Error Check(ffi::Span<const int64_t> xd, ffi::Span<const int64_t> yd,
                 ffi::Span<const int64_t> kd, int64_t stride, bool transposed, const char* what) {
  if (xd.size() != 4 || yd.size() != 4 || kd.size() != 4)
    return ffi::Error::InvalidArgument("narrow conv: NHWC activations and an HWIO kernel");
  const int64_t c = xd[3];
  const int64_t k = kd[2];
  if (kd[0] != 3 || kd[1] != 3 || (k != 4 && k != 8 && k != 16 && k != 32) || kd[3] != c ||
      c % std::max<int64_t>(k, kLanes))
    return ffi::Error::InvalidArgument(
        "narrow conv: the kernel must be 3x3xKxC, K 4, 8, 16 or 32, C (a multiple of 16 and of "
        "K) the input's channels");
  if (stride != 1 && stride != 2)
    return ffi::Error::InvalidArgument("narrow conv: stride 1 or 2");
  const auto small = transposed ? xd : yd, large = transposed ? yd : xd;
  if (small[0] != large[0] || small[1] != Out(large[1], stride) ||
      small[2] != Out(large[2], stride) || small[3] != large[3])
    return ffi::Error::InvalidArgument(std::string("narrow conv: ") + what +
                                       " shape does not match the conv");
  if (!__builtin_cpu_supports("avx512f"))
    return ffi::Error::Internal("narrow conv: this CPU has no AVX-512");
  return ffi::Error::Success();
}

template <int K, int D>
void Forward(const float* x, const float* kernel, float* y, int64_t n, int64_t h, int64_t w,
             int64_t ho, int64_t wo, int64_t c, int64_t stride) {
  std::vector<float> packed(9 * K * c);
  Pack<K>(kernel, c, packed.data());
  Conv<K, D>(x, packed.data(), y, n, h, w, ho, wo, c, stride);
}

// The conv of x with the kernel into y, of stride 1 or 2; or, `transposed`, the transpose of
// that conv (x the output gradient of a stride-`stride` conv, y its input gradient, the kernel
// flipped and transposed within groups as for a stride-1 input gradient).
ffi::Error NarrowConv(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                      ffi::ResultBuffer<ffi::F32> y, int64_t stride, bool transposed) {
  const auto xd = x.dimensions(), yd = y->dimensions();
  if (auto error = Check(xd, yd, kernel.dimensions(), stride, transposed, "output");
      error.failure())
    return error;
  const int64_t k = kernel.dimensions()[2];
  const float *in = x.typed_data(), *w = kernel.typed_data();
  float* out = y->typed_data();
  // The transpose of a stride-1 conv is a stride-1 conv.
  const bool spread = transposed && stride == 2;
  const int64_t s = transposed ? 1 : stride;
  if (k >= 16) {
    using Wide = void (*)(const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t,
                          int64_t, int64_t);
    const bool k16 = k == 16;
    Wide wide = spread ? (k16 ? WideConv<16, 2, 1> : WideConv<32, 2, 1>)
                : s == 2 ? (k16 ? WideConv<16, 1, 2> : WideConv<32, 1, 2>)
                         : (k16 ? WideConv<16, 1, 1> : WideConv<32, 1, 1>);
    wide(in, w, out, xd[0], xd[1], xd[2], yd[1], yd[2], xd[3]);
    return ffi::Error::Success();
  }
  const bool k4 = k == 4;
  auto forward = spread ? (k4 ? Forward<4, 2> : Forward<8, 2>)
                        : (k4 ? Forward<4, 1> : Forward<8, 1>);
  forward(in, w, out, xd[0], xd[1], xd[2], yd[1], yd[2], xd[3], s);
  return ffi::Error::Success();
}

ffi::Error NarrowConvKernelGrad(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                                ffi::ResultBuffer<ffi::F32> dw, int64_t stride) {
  const auto xd = x.dimensions(), yd = dy.dimensions();
  if (auto error = Check(xd, yd, dw->dimensions(), stride, false, "gradient"); error.failure())
    return error;
  const int64_t k = dw->dimensions()[2];
  if (k > 8)
    return ffi::Error::InvalidArgument("narrow conv: the kernel gradient takes K 4 or 8");
  auto grad = k == 4 ? KernelGrad<4> : KernelGrad<8>;
  grad(x.typed_data(), dy.typed_data(), dw->typed_data(), xd[0], xd[1], xd[2], yd[1], yd[2],
       xd[3], stride);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace resnext_narrow

EXPORT XLA_FFI_Error* ResnextNarrowConv(XLA_FFI_CallFrame*);
XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnextNarrowConv, resnext_narrow::NarrowConv,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride")
                                  .Attr<bool>("transposed"));

EXPORT XLA_FFI_Error* ResnextNarrowConvKernelGrad(XLA_FFI_CallFrame*);
XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnextNarrowConvKernelGrad, resnext_narrow::NarrowConvKernelGrad,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride"));

// For the Python side: whether this CPU runs the kernel (AVX-512).
EXPORT int ResnextNarrowConvSupported() { return __builtin_cpu_supports("avx512f") ? 1 : 0; }
