// Max pooling on CPU through oneDNN, as two XLA FFI handlers: the training forward (the output
// and a workspace recording where each maximum came from) and its backward (the input gradient
// from the output gradient and that workspace). resnext_jax/ops/onednn.py builds this file
// beside onednn_conv.cc, registers the handlers and calls them from its `max_pool`.
//
// Activations are NHWC, read in place (format tag nhwc), float32 or bfloat16 (a call's input,
// output and gradients alike). Square windows, symmetric
// padding; padded positions never win (as with flax's -inf padding). Where a window holds
// several equal maxima, the gradient goes to the one oneDNN recorded, which need not be the
// one XLA's select-and-scatter picks.

#include <cstdint>
#include <stdexcept>
#include <tuple>

#include "onednn_common.h"

namespace resnext_onednn {
namespace {

struct PoolProblem {
  int64_t n, h, w, c, window, stride, pad;
  memory::data_type dt;
  int64_t ho() const { return (h + 2 * pad - window) / stride + 1; }
  int64_t wo() const { return (w + 2 * pad - window) / stride + 1; }
  auto key() const { return std::tie(n, h, w, c, window, stride, pad, dt); }
  bool operator<(const PoolProblem& o) const { return key() < o.key(); }
  memory::desc src() const { return {{n, c, h, w}, dt, Tag::nhwc}; }
  memory::desc dst() const { return {{n, c, ho(), wo()}, dt, Tag::nhwc}; }
};

struct PoolPrimitives {
  dnnl::pooling_forward::primitive_desc fwd_pd;
  dnnl::pooling_forward fwd;
  dnnl::pooling_backward::primitive_desc bwd_pd;
  dnnl::pooling_backward bwd;

  explicit PoolPrimitives(const PoolProblem& p) {
    auto& engine = Engine();
    const dnnl::primitive_attr attr = UserScratchpad();
    const memory::dims strides{p.stride, p.stride}, kernel{p.window, p.window}, dilation{0, 0},
        pad{p.pad, p.pad};
    fwd_pd = dnnl::pooling_forward::primitive_desc(
        engine, dnnl::prop_kind::forward_training, dnnl::algorithm::pooling_max, p.src(),
        p.dst(), strides, kernel, dilation, pad, pad, attr);
    fwd = dnnl::pooling_forward(fwd_pd);
    bwd_pd = dnnl::pooling_backward::primitive_desc(engine, dnnl::algorithm::pooling_max,
                                                    p.src(), p.dst(), strides, kernel, dilation,
                                                    pad, pad, fwd_pd, attr);
    bwd = dnnl::pooling_backward(bwd_pd);
  }
};

PoolPrimitives& GetPool(const PoolProblem& p) { return Cached<PoolPrimitives>(p); }

// The problem from the input (or its gradient) `xb` and the output (or its gradient) `yb`.
ffi::ErrorOr<PoolProblem> MakePoolProblem(const Data& xb, const Data& yb, int64_t window,
                                          int64_t stride, int64_t pad) {
  const auto x = xb.dimensions(), y = yb.dimensions();
  if (x.size() != 4 || y.size() != 4) return Invalid("onednn max pool: arrays must be NHWC");
  memory::data_type dt;
  if (!SharedDataType({&xb, &yb}, &dt))
    return Invalid("onednn max pool: arrays must be all float32 or all bfloat16");
  PoolProblem p{x[0], x[1], x[2], x[3], window, stride, pad, dt};
  if (window < 1 || stride < 1 || pad < 0 || pad >= window || p.ho() < 1 || p.wo() < 1 ||
      y[0] != p.n || y[1] != p.ho() || y[2] != p.wo() || y[3] != p.c)
    return Invalid("onednn max pool: output shape does not match the pooling");
  return p;
}

void CheckWorkspace(const PoolPrimitives& prims, size_t bytes) {
  if (bytes != prims.fwd_pd.workspace_desc().get_size())
    throw std::invalid_argument("the workspace buffer has the wrong size");
}

ffi::Error PoolForward(Data x, DataResult y, ffi::ResultBuffer<ffi::U8> workspace, int64_t window,
                       int64_t stride, int64_t pad) {
  auto p = MakePoolProblem(x, *y, window, stride, pad);
  if (p.has_error()) return p.error();
  return Guard("onednn max pool", [&] {
    auto& prims = GetPool(*p);
    CheckWorkspace(prims, workspace->size_bytes());
    dnnl::stream s(Engine());
    prims.fwd.execute(
        s, {{DNNL_ARG_SRC, memory(p->src(), Engine(), x.untyped_data())},
            {DNNL_ARG_DST, memory(p->dst(), Engine(), y->untyped_data())},
            {DNNL_ARG_WORKSPACE,
             memory(prims.fwd_pd.workspace_desc(), Engine(), workspace->untyped_data())},
            {DNNL_ARG_SCRATCHPAD, Scratch(prims.fwd_pd)}});
    s.wait();
  });
}

ffi::Error PoolBackward(Data dy, ffi::Buffer<ffi::U8> workspace, DataResult dx, int64_t window,
                        int64_t stride, int64_t pad) {
  auto p = MakePoolProblem(*dx, dy, window, stride, pad);
  if (p.has_error()) return p.error();
  return Guard("onednn max pool", [&] {
    auto& prims = GetPool(*p);
    CheckWorkspace(prims, workspace.size_bytes());
    dnnl::stream s(Engine());
    prims.bwd.execute(
        s, {{DNNL_ARG_DIFF_DST, memory(p->dst(), Engine(), dy.untyped_data())},
            {DNNL_ARG_WORKSPACE,
             memory(prims.fwd_pd.workspace_desc(), Engine(), workspace.untyped_data())},
            {DNNL_ARG_DIFF_SRC, memory(p->src(), Engine(), dx->untyped_data())},
            {DNNL_ARG_SCRATCHPAD, Scratch(prims.bwd_pd)}});
    s.wait();
  });
}

}  // namespace
}  // namespace resnext_onednn

EXPORT XLA_FFI_Error* ResnextOnednnPoolForward(XLA_FFI_CallFrame*);
EXPORT XLA_FFI_Error* ResnextOnednnPoolBackward(XLA_FFI_CallFrame*);

using resnext_onednn::Data;

#define POOL_ATTRS Attr<int64_t>("window").Attr<int64_t>("stride").Attr<int64_t>("padding")

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    ResnextOnednnPoolForward, resnext_onednn::PoolForward,
    ffi::Ffi::Bind().Arg<Data>().Ret<Data>().Ret<ffi::Buffer<ffi::U8>>().POOL_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    ResnextOnednnPoolBackward, resnext_onednn::PoolBackward,
    ffi::Ffi::Bind().Arg<Data>().Arg<ffi::Buffer<ffi::U8>>().Ret<Data>().POOL_ATTRS);

// For the Python side, when it traces a forward: the workspace's bytes, for bfloat16
// activations if `bfloat16` is nonzero, else float32; -1 if oneDNN cannot build the pooling.
EXPORT int64_t ResnextOnednnPoolWorkspaceBytes(int64_t n, int64_t h, int64_t w, int64_t c,
                                               int64_t window, int64_t stride, int64_t pad,
                                               int64_t bfloat16) {
  try {
    const auto dt = bfloat16 ? dnnl::memory::data_type::bf16 : dnnl::memory::data_type::f32;
    return resnext_onednn::GetPool({n, h, w, c, window, stride, pad, dt})
        .fwd_pd.workspace_desc()
        .get_size();
  } catch (...) {
    return -1;
  }
}
