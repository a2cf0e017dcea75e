// Fused CPU kernels for one decode step of additive (Bahdanau) attention, and its gradient:
// one pass over the [n, P, U] tensors where TensorFlow's ops make five (forward) and nine
// (backward), with the softmax and the context in the same pass. Built on first use by
// model/fused_attention.py, which falls back to the same arithmetic in TensorFlow ops when
// this cannot be compiled.
//
//   SatAdditiveAttention(features [B, P, E], keys [B, P, U], query [n, U], v [U]), n <= B,
//   uses the first n rows of features and keys:
//     hidden  = tanh(keys + query[:, None, :])            [n, P, U] (kept for the gradient)
//     weights = softmax_p(hidden . v)                      [n, P]
//     context = sum_p weights[:, p] features[:, p]         [n, E]
//   SatAdditiveAttentionGrad(features, hidden, weights, d_context [n, E], d_weights [n, P],
//                            v, d_keys [B, P, U]):
//     d_score    = weights * (g - sum_p weights g),  g = features . d_context + d_weights
//     d_in       = d_score[..., None] * v * (1 - hidden^2)        (d of keys + query)
//     d_query    = sum_p d_in                                      [n, U]
//     d_v        = sum_{b, p} d_score * hidden                      [U]
//     d_keys_out = d_keys with d_in added to its first n rows (in place when TensorFlow lets
//                  the input buffer be reused, as in a while loop's accumulator)
//   The features' own gradient (sum_t weights d_context) is left to one batched matmul
//   after the time loop.
//
// Each output element is computed by one thread in a fixed order, so results do not
// depend on the thread count or scheduling: training stays repeatable.
#include <algorithm>
#include <initializer_list>
#include <string>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "unsupported/Eigen/CXX11/Tensor"

namespace {

using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShape;
using tensorflow::errors::InvalidArgument;
namespace shape_inference = tensorflow::shape_inference;

using Row = Eigen::Map<Eigen::Array<float, Eigen::Dynamic, 1>>;
using ConstRow = Eigen::Map<const Eigen::Array<float, Eigen::Dynamic, 1>>;

REGISTER_OP("SatAdditiveAttention")
    .Input("features: float")
    .Input("keys: float")
    .Input("query: float")
    .Input("v: float")
    .Output("context: float")
    .Output("weights: float")
    .Output("hidden: float")
    .SetShapeFn([](shape_inference::InferenceContext* c) {
      shape_inference::ShapeHandle features, keys, query, v;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 3, &features));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 3, &keys));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 2, &query));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(3), 1, &v));
      auto n = c->Dim(query, 0), p = c->Dim(keys, 1), u = c->Dim(keys, 2);
      c->set_output(0, c->MakeShape({n, c->Dim(features, 2)}));
      c->set_output(1, c->MakeShape({n, p}));
      c->set_output(2, c->MakeShape({n, p, u}));
      return absl::OkStatus();
    });

REGISTER_OP("SatAdditiveAttentionGrad")
    .Input("features: float")
    .Input("hidden: float")
    .Input("weights: float")
    .Input("d_context: float")
    .Input("d_weights: float")
    .Input("v: float")
    .Input("d_keys: float")
    .Output("d_query: float")
    .Output("d_v: float")
    .Output("d_keys_out: float")
    .SetShapeFn([](shape_inference::InferenceContext* c) {
      shape_inference::ShapeHandle hidden, d_keys;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 3, &hidden));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(6), 3, &d_keys));
      c->set_output(0, c->MakeShape({c->Dim(hidden, 0), c->Dim(hidden, 2)}));
      c->set_output(1, c->MakeShape({c->Dim(hidden, 2)}));
      c->set_output(2, d_keys);
      return absl::OkStatus();
    });

tsl::thread::ThreadPool* Pool(OpKernelContext* ctx) {
  return ctx->device()->tensorflow_cpu_worker_threads()->workers;
}

bool Shaped(const Tensor& t, std::initializer_list<int64_t> dims) {
  if (t.dims() != static_cast<int>(dims.size())) return false;
  int i = 0;
  for (int64_t d : dims) {
    if (d >= 0 && t.dim_size(i) != d) return false;
    ++i;
  }
  return true;
}

std::string Shapes(OpKernelContext* ctx) {
  std::string out;
  for (int i = 0; i < ctx->num_inputs(); ++i) {
    out += (i ? ", " : "") + ctx->input(i).shape().DebugString();
  }
  return out;
}

class AdditiveAttentionOp : public OpKernel {
 public:
  explicit AdditiveAttentionOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& features = ctx->input(0);
    const Tensor& keys = ctx->input(1);
    const Tensor& query = ctx->input(2);
    const Tensor& v = ctx->input(3);
    const int64_t n = query.dims() == 2 ? query.dim_size(0) : -1;
    const int64_t B = keys.dims() == 3 ? keys.dim_size(0) : -1;
    const int64_t P = keys.dims() == 3 ? keys.dim_size(1) : -1;
    const int64_t U = keys.dims() == 3 ? keys.dim_size(2) : -1;
    const int64_t E = features.dims() == 3 ? features.dim_size(2) : -1;
    OP_REQUIRES(ctx, B >= 0 && n >= 0 && n <= B && Shaped(features, {B, P, E}) &&
                         Shaped(query, {n, U}) && Shaped(v, {U}),
                InvalidArgument("SatAdditiveAttention: shapes do not agree (features [B, P, E], "
                                "keys [B, P, U], query [n <= B, U], v [U]): ", Shapes(ctx)));
    Tensor* context = nullptr;
    Tensor* weights = nullptr;
    Tensor* hidden = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({n, E}), &context));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({n, P}), &weights));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, TensorShape({n, P, U}), &hidden));
    const float* f = features.flat<float>().data();
    const float* k = keys.flat<float>().data();
    const float* q = query.flat<float>().data();
    const float* w = v.flat<float>().data();
    float* c = context->flat<float>().data();
    float* a = weights->flat<float>().data();
    float* h = hidden->flat<float>().data();
    Pool(ctx)->ParallelFor(n, 14 * P * U, [&](int64_t start, int64_t end) {
      ConstRow vr(w, U);
      for (int64_t b = start; b < end; ++b) {
        ConstRow qb(q + b * U, U);
        float* ab = a + b * P;
        // scores, then softmax over the P positions (max subtracted), then the context
        for (int64_t p = 0; p < P; ++p) {
          const int64_t r = b * P + p;
          Row hr(h + r * U, U);
          hr = (ConstRow(k + r * U, U) + qb).tanh();
          ab[p] = (hr * vr).sum();
        }
        Row weights_b(ab, P);
        weights_b = (weights_b - weights_b.maxCoeff()).exp();
        weights_b /= weights_b.sum();
        Row cb(c + b * E, E);
        cb.setZero();
        for (int64_t p = 0; p < P; ++p) cb += ab[p] * ConstRow(f + (b * P + p) * E, E);
      }
    });
  }
};

class AdditiveAttentionGradOp : public OpKernel {
 public:
  explicit AdditiveAttentionGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& features = ctx->input(0);
    const Tensor& hidden = ctx->input(1);
    const Tensor& weights = ctx->input(2);
    const Tensor& d_context = ctx->input(3);
    const Tensor& d_weights = ctx->input(4);
    const Tensor& v = ctx->input(5);
    const Tensor& d_keys = ctx->input(6);
    const int64_t n = hidden.dims() == 3 ? hidden.dim_size(0) : -1;
    const int64_t P = hidden.dims() == 3 ? hidden.dim_size(1) : -1;
    const int64_t U = hidden.dims() == 3 ? hidden.dim_size(2) : -1;
    const int64_t B = d_keys.dims() == 3 ? d_keys.dim_size(0) : -1;
    const int64_t E = features.dims() == 3 ? features.dim_size(2) : -1;
    OP_REQUIRES(ctx, n >= 0 && n <= B && Shaped(features, {-1, P, E}) &&
                         features.dim_size(0) >= n && Shaped(weights, {n, P}) &&
                         Shaped(d_context, {n, E}) && Shaped(d_weights, {n, P}) &&
                         Shaped(v, {U}) && Shaped(d_keys, {B, P, U}),
                InvalidArgument("SatAdditiveAttentionGrad: shapes do not agree (features "
                                "[>= n, P, E], hidden [n, P, U], weights [n, P], d_context "
                                "[n, E], d_weights [n, P], v [U], d_keys [B >= n, P, U]): ",
                                Shapes(ctx)));
    Tensor* d_query = nullptr;
    Tensor* d_v = nullptr;
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({n, U}), &d_query));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({U}), &d_v));
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({6}, 2, d_keys.shape(), &out));
    const float* in_keys = d_keys.flat<float>().data();
    float* k = out->flat<float>().data();
    if (k != in_keys) {  // not reusable (still referenced elsewhere): copy, then add
      std::copy_n(in_keys, d_keys.NumElements(), k);
    }
    const float* f = features.flat<float>().data();
    const float* h = hidden.flat<float>().data();
    const float* a = weights.flat<float>().data();
    const float* dc = d_context.flat<float>().data();
    const float* da = d_weights.flat<float>().data();
    const float* w = v.flat<float>().data();
    float* dq = d_query->flat<float>().data();
    // d_v per image row first, summed in row order below: no races, a fixed order.
    std::vector<float> dv_rows(static_cast<size_t>(n * U));
    Pool(ctx)->ParallelFor(n, 12 * P * U, [&](int64_t start, int64_t end) {
      ConstRow vr(w, U);
      Eigen::ArrayXf d_in(U), d_score(P);
      for (int64_t b = start; b < end; ++b) {
        ConstRow dcb(dc + b * E, E);
        const float* ab = a + b * P;
        for (int64_t p = 0; p < P; ++p) {
          d_score[p] = (ConstRow(f + (b * P + p) * E, E) * dcb).sum() + da[b * P + p];
        }
        const float mean = (ConstRow(ab, P) * d_score).sum();
        d_score = ConstRow(ab, P) * (d_score - mean);
        Row qb(dq + b * U, U), vb(dv_rows.data() + b * U, U);
        qb.setZero();
        vb.setZero();
        for (int64_t p = 0; p < P; ++p) {
          const int64_t r = b * P + p;
          ConstRow hr(h + r * U, U);
          const float g = d_score[p];
          d_in = (g * vr) * (1.0f - hr * hr);
          Row(k + r * U, U) += d_in;
          qb += d_in;
          vb += g * hr;
        }
      }
    });
    Row dv(d_v->flat<float>().data(), U);
    dv.setZero();
    for (int64_t b = 0; b < n; ++b) dv += ConstRow(dv_rows.data() + b * U, U);
  }
};

REGISTER_KERNEL_BUILDER(Name("SatAdditiveAttention").Device(tensorflow::DEVICE_CPU),
                        AdditiveAttentionOp);
REGISTER_KERNEL_BUILDER(Name("SatAdditiveAttentionGrad").Device(tensorflow::DEVICE_CPU),
                        AdditiveAttentionGradOp);

}  // namespace
