// The one place where biasfast's operator schemas are declared.
// Kernels are found by the op's name: csrc/cpu/<op>.cpp (or csrc/cpu/<op>/) registers the CPU kernel,
// csrc/cuda/<op>.cu or kernels/<op>.py (Triton, registered from Python) the CUDA kernel; the public wrapper,
// fake and autograd formula are in biasfast/ops/<op>.py (see ARCHITECTURE.md).
#include <Python.h>
#include <torch/library.h>
#include <torch/version.h>

#include <stdexcept>
#include <string>

#include "common/isa.h"

#ifndef BIASFAST_TORCH_VERSION
#define BIASFAST_TORCH_VERSION "unknown"
#endif

namespace {

std::string build_info_json() {
  std::string cuda = "false";
#ifdef BIASFAST_WITH_CUDA
  cuda = "true";
#endif
  std::string openmp = "false";
#ifdef _OPENMP
  openmp = "true";
#endif
  std::string native = "portable";
#ifdef __AVX512F__
  native = "avx512";
#elif defined(__AVX2__)
  native = "avx2";
#endif
  return std::string("{\"torch_version\": \"") + BIASFAST_TORCH_VERSION + "\", \"cuda\": " + cuda +
         ", \"openmp\": " + openmp + ", \"compiled_isa\": \"" + native + "\", \"compiler\": \"" + __VERSION__ + "\"}";
}

PyObject* build_info(PyObject*, PyObject*) {
  return PyUnicode_FromString(build_info_json().c_str());
}

// The CPU kernel variant BIASFAST_CPU_ISA selects now (common/isa.h); a ValueError naming BIASFAST_CPU_ISA for a value it cannot honour.
PyObject* cpu_isa(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(biasfast::cpu_isa());
  } catch (const std::invalid_argument& error) {
    PyErr_SetString(PyExc_ValueError, error.what());
    return nullptr;
  }
}

// Each op's CPU kernel variant on its last call, {op name: "avx2" | "generic"} (ops not yet called are absent).
PyObject* cpu_variants_ran(PyObject*, PyObject*) {
  PyObject* ran = PyDict_New();
  if (ran == nullptr) return nullptr;
  std::lock_guard<std::mutex> lock(biasfast::variants_mutex());
  for (const auto& [op, variant] : biasfast::variants_ran()) {
    PyObject* value = PyUnicode_FromString(variant);
    if (value == nullptr || PyDict_SetItemString(ran, op.c_str(), value) != 0) {
      Py_XDECREF(value);
      Py_DECREF(ran);
      return nullptr;
    }
    Py_DECREF(value);
  }
  return ran;
}

// The AVX2 bodies that ran since the last call (common/isa.h), as a sorted list of names; clears them.
PyObject* take_avx2_bodies_ran(PyObject*, PyObject*) {
  const std::vector<std::string> names = biasfast::take_avx2_bodies_ran();
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(names.size()));
  if (list == nullptr) return nullptr;
  for (size_t i = 0; i < names.size(); ++i) {
    PyObject* name = PyUnicode_FromString(names[i].c_str());
    if (name == nullptr) {
      Py_DECREF(list);
      return nullptr;
    }
    PyList_SET_ITEM(list, static_cast<Py_ssize_t>(i), name);
  }
  return list;
}

PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS, "JSON description of how this extension was compiled."},
    {"cpu_isa", cpu_isa, METH_NOARGS, "The CPU kernel variant BIASFAST_CPU_ISA selects now: 'avx2' or 'generic'."},
    {"cpu_variants_ran", cpu_variants_ran, METH_NOARGS, "Each op's CPU kernel variant on its last call."},
    {"take_avx2_bodies_ran", take_avx2_bodies_ran, METH_NOARGS,
     "The CPU kernels' AVX2 bodies that ran since the last call (sorted names); clears them."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "biasfast compiled operators", -1, methods};

}  // namespace

// Importing biasfast._C runs the static TORCH_LIBRARY initialisers below.
extern "C" PyObject* PyInit__C(void) {
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(biasfast, m) {
  // ---- distances ----
  // Exact squared Euclidean distances by direct differences: x (n, d), y (m, d) -> (n, m).
  m.def("sqdist(Tensor x, Tensor y) -> Tensor");

  // ---- SNR-weighted loss (Unmasking Bias: any per-timestep weighting, fused forward and backward) ----
  // loss = reduce_b(weights[timesteps[b]] * mean_i (pred[b,i] - target[b,i])^2), the unweighted per-sample MSE (B,),
  // and, when compute_grad, d loss / d pred (same shape and dtype as pred; backward only rescales it).
  m.def("snr_loss(Tensor pred, Tensor target, Tensor timesteps, Tensor weights, str reduction, bool compute_grad) "
        "-> (Tensor loss, Tensor mse, Tensor grad)");

  // ---- learned-variance hybrid loss (Improved DDPM / guided-diffusion RESCALED_MSE, fused forward and backward) ----
  // model_output (B, 2C, ...) = [prediction | v]; per sample weights[t]·mean (target − prediction)² + vb, vb the
  // L_vlb term in bits per dim × T/1000 on the stop-gradient mean (KL for t > 0, decoder NLL at t = 0);
  // table (T, 8) float64 per-timestep coefficients (biasfast.ops.hybrid_loss.hybrid_loss_table). Returns the
  // reduced loss, the per-sample unweighted mse and vb (B,), and, when compute_grad, d loss / d model_output.
  m.def("hybrid_loss(Tensor model_output, Tensor x_start, Tensor noise, Tensor timesteps, Tensor table, "
        "Tensor weights, str prediction, str reduction, bool compute_grad) "
        "-> (Tensor loss, Tensor mse, Tensor vb, Tensor grad)");

  // ---- sampling: the fused DDPM/DDIM/CFG step ----
  // One fused step x_t -> (x_{t'}, x̂0) with per-sample t, t_prev (-1 = final step) gathered from alphas_cumprod;
  // the final step goes to ᾱ = final_alpha_cumprod (diffusers' DDIMScheduler: 1, or ᾱ_0 with set_alpha_to_one=False);
  // uncond_output with guidance_scale fuses CFG; x̂0 is empty unless return_x0. variance "fixed_small", or
  // "learned_range": model outputs are (B, 2C, ...), prediction then variance interpolation v (DDPM's σ from v).
  m.def(
      "sampler_step(Tensor x_t, Tensor model_output, Tensor? uncond_output, Tensor? noise, Tensor t, Tensor t_prev, "
      "Tensor alphas_cumprod, str method, str prediction, float eta, float? guidance_scale, float? clip_sample, "
      "bool return_x0, str variance=\"fixed_small\", float final_alpha_cumprod=1.0) -> (Tensor, Tensor)");
  // The same step written into preallocated out (may be x_t itself: in place) and x0_out (empty: not written).
  m.def(
      "sampler_step.out(Tensor x_t, Tensor model_output, Tensor? uncond_output, Tensor? noise, Tensor t, "
      "Tensor t_prev, Tensor alphas_cumprod, str method, str prediction, float eta, float? guidance_scale, "
      "float? clip_sample, Tensor(a!) out, Tensor(b!) x0_out, str variance=\"fixed_small\", "
      "float final_alpha_cumprod=1.0) -> ()");

  // ---- hierarchical model: exact belief propagation on the binary tree ----
  // Leaf posteriors (B, L, q) and log partition (B,) of a k-filtered tree model with uniform root: leaf
  // log-potentials scale[b]·evidence[b] (B, L = 2^depth, q; -inf allowed), grammar M[a,b,c] = P(b,c | a) (q,q,q),
  // top (2^k, q, q) = P(depth-k node j = b | root = a) (the identity for the full model).
  m.def("tree_bp(Tensor evidence, Tensor scale, Tensor grammar, Tensor top) -> (Tensor, Tensor)");

  // ---- exact k-nearest neighbours ----
  // k smallest distances from each query row to the reference rows, exact (re-ranked, certified); indices are
  // index_offset + row in ref, ties broken by the lower index; rows with fewer than k eligible references are
  // padded with (inf, -1). metric: l2, sqeuclidean, cosine, pearson.
  m.def("knn(Tensor query, Tensor ref, int k, str metric, int index_offset, bool exclude_self, int workspace_mb)"
        " -> (Tensor, Tensor)");
  // Same for integer token rows under the hamming distance (number of differing positions, as float32).
  m.def("knn_hamming(Tensor query, Tensor ref, int k, int index_offset, bool exclude_self) -> (Tensor, Tensor)");

  // ---- memorization metrics ----
  // 64-bit hash of each row of a 2-D tensor of any dtype (-0.0 == 0.0): rows (n, d) -> int64 (n,).
  // Equal rows hash equally; bias_score uses it to find rows shared by two training sets.
  m.def("row_hash(Tensor rows) -> Tensor");
}
