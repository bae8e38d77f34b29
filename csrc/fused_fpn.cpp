// fused_fpn._C: the operator schemas (written once, here) and the Python module stub.
//
// Backends implement these schemas in their own files, each ending in
// TORCH_LIBRARY_IMPL(fused_fpn, <DispatchKey>, m): csrc/cpu/ (CPU) and csrc/cuda/ (CUDA).
// Autograd: csrc/autograd.cpp (the Autograd key). Fake (meta) kernels: fused_fpn/_ops.py.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(fused_fpn, m) {
  // y[n, co, h, w] = sum_ci x[n, ci, h, w] * weight[co, ci] + bias[co]
  //                  + top[n, co, src(h; Ht, H), src(w; Wt, W)]
  // x [N, Cin, H, W] (any strides), weight [Cout, Cin], bias [Cout], top [N, Cout, Ht, Wt];
  // src(d; in, out) = min(floor(float(d) * (float(in) / float(out))), in - 1)  (ATen's nearest).
  // The output is channels_last when x.stride(1) < x.stride(3), else contiguous NCHW.
  m.def("lateral(Tensor x, Tensor weight, Tensor? bias, Tensor? top) -> Tensor");
  // One pass over dy = grad_out [N, C, H, W]:
  //   grad_bias[c] = sum_{n,h,w} dy[n, c, h, w]
  //   grad_top[n, c, i, j] = sum over {(h, w): src(h; top_h, H) = i, src(w; top_w, W) = j} of dy[n, c, h, w]
  // top_h == top_w == 0 means "no top": grad_top is then [N, C, 0, 0].
  // grad_top's memory format follows grad_out by the same rule as lateral's output.
  m.def("lateral_grad_bias_top(Tensor grad_out, SymInt top_h, SymInt top_w) -> (Tensor, Tensor)");
  // (dx, dW) of y = conv1x1(x, weight [Cout, Cin]), lateral's backward step for x and weight;
  // undefined (None) where need_x / need_weight is false. ATen's convolution_backward on CPU tensors,
  // GEMMs on other devices, GEMMs everywhere with use_gemm (csrc/autograd.cpp).
  m.def("conv1x1_backward(Tensor grad, Tensor x, Tensor weight, bool need_x, bool need_weight, bool use_gemm) "
        "-> (Tensor, Tensor)");
}

#ifndef FUSED_FPN_WITH_CUDA
#define FUSED_FPN_WITH_CUDA 0
#endif

static struct PyModuleDef fused_fpn_module = {
    PyModuleDef_HEAD_INIT, "_C",
    "fused_fpn native kernels; the ops live in torch.ops.fused_fpn", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&fused_fpn_module);
  if (m == nullptr) return nullptr;
  // with_cuda: 1 when the CUDA kernels of csrc/cuda/ were compiled into this binary.
  PyModule_AddIntConstant(m, "with_cuda", FUSED_FPN_WITH_CUDA);
  return m;
}
