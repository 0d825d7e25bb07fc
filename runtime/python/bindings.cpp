// fewstep._C: Python bindings over the public C API (fewstep.h) and its C++ wrapper (fewstep.hpp) only.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <limits>
#include <string>
#include <vector>

#include "fewstep.h"
#include "fewstep.hpp"

namespace py = pybind11;

namespace {

// A Python int in [0, 2^64) -> uint64_t; anything else is a ValueError naming the argument
// (pybind11's own casts would give a TypeError and accept floats / bools in some versions).
// Integers with __index__ (numpy integers) are accepted, like numbers.Integral in noise.py.
uint64_t to_u64(const py::handle& v, const char* name) {
  if (PyBool_Check(v.ptr()) || !PyIndex_Check(v.ptr()))
    throw py::value_error(std::string(name) + " must be an integer, got " + std::string(py::str(py::type::of(v))));
  const py::object i = py::reinterpret_steal<py::object>(PyNumber_Index(v.ptr()));
  if (!i) {
    PyErr_Clear();
    throw py::value_error(std::string(name) + " must be an integer, got " + std::string(py::repr(v)));
  }
  const unsigned long long x = PyLong_AsUnsignedLongLong(i.ptr());
  if (x == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
    PyErr_Clear();
    throw py::value_error(std::string(name) + " must be in [0, 2**64), got " + std::string(py::repr(v)));
  }
  return x;
}

// Same checks and wording as runtime/noise.py.
int64_t to_positive(const py::handle& v, const char* name) {
  const uint64_t x = to_u64(v, name);
  if (x < 1 || x > uint64_t(std::numeric_limits<int64_t>::max()))
    throw py::value_error(std::string(name) + " must be a positive integer, got " + std::string(py::repr(v)));
  return int64_t(x);
}

py::array_t<float> randn(const py::object& seed, const py::object& batch, const py::object& shape,
                         const py::object& stream, const py::object& first_sample) {
  const uint64_t s = to_u64(seed, "seed"), st = to_u64(stream, "stream"), first = to_u64(first_sample, "first_sample");
  const int64_t b = to_positive(batch, "batch");
  std::vector<py::ssize_t> dims{py::ssize_t(b)};
  int64_t per_sample = 1;
  const bool scalar_shape = !py::isinstance<py::sequence>(shape) && PyIndex_Check(shape.ptr()) && !PyBool_Check(shape.ptr());
  if (!scalar_shape && !py::isinstance<py::sequence>(shape))
    throw py::value_error("shape must be a sequence of positive integers, got " + std::string(py::repr(shape)));
  for (const py::handle d : scalar_shape ? py::tuple(py::make_tuple(shape)) : py::tuple(shape)) {
    const int64_t n = to_positive(d, "shape entries");
    if (n > std::numeric_limits<int64_t>::max() / per_sample) throw py::value_error("shape: too many elements");
    per_sample *= n;
    dims.push_back(py::ssize_t(n));
  }
  if (st >= (uint64_t(1) << 32)) throw py::value_error("stream must be in [0, 2**32), got " + std::to_string(st));
  if (first > (uint64_t(1) << 32) || uint64_t(b) > (uint64_t(1) << 32) - first)
    throw py::value_error("first_sample + batch must be <= 2**32 (sample indices are 32-bit)");

  py::array_t<float> out(dims);
  float* data = out.mutable_data();
  const size_t len = size_t(out.size());
  fewstep_status status;
  {
    py::gil_scoped_release release;  // pure C over a buffer we own: other Python threads may run
    status = fewstep_randn(s, st, first, b, per_sample, data, len);
  }
  if (status != FEWSTEP_OK) throw py::value_error(std::string("fewstep_randn: ") + fewstep_status_string(status));
  return out;
}

py::tuple philox4x32_10(const py::sequence& counter, const py::sequence& key) {
  if (py::len(counter) != 4 || py::len(key) != 2) throw py::value_error("philox4x32_10: counter needs 4 words, key 2");
  uint32_t c[4], k[2], o[4];
  for (int i = 0; i < 4; ++i) {
    const uint64_t v = to_u64(counter[i], "counter word");
    if (v >> 32) throw py::value_error("philox4x32_10: counter words must be < 2**32");
    c[i] = uint32_t(v);
  }
  for (int i = 0; i < 2; ++i) {
    const uint64_t v = to_u64(key[i], "key word");
    if (v >> 32) throw py::value_error("philox4x32_10: key words must be < 2**32");
    k[i] = uint32_t(v);
  }
  const fewstep_status status = fewstep_philox4x32_10(c, k, o);
  if (status != FEWSTEP_OK) throw py::value_error(fewstep_status_string(status));
  return py::make_tuple(o[0], o[1], o[2], o[3]);
}

// ---- Engine ------------------------------------------------------------------------------

// libonnxruntime.so of the installed onnxruntime / onnxruntime-gpu package (same import name),
// found without importing it; "" if none is installed (then the C side tries FEWSTEP_ORT_LIBRARY
// and the loader's search path).
std::string find_ort_library() {
  const char* env = std::getenv("FEWSTEP_ORT_LIBRARY");
  if (env && *env) return env;
  const py::object spec = py::module_::import("importlib.util").attr("find_spec")("onnxruntime");
  if (spec.is_none() || spec.attr("submodule_search_locations").is_none()) return "";
  for (const py::handle loc : spec.attr("submodule_search_locations")) {
    const py::object capi = py::module_::import("pathlib").attr("Path")(loc) / py::str("capi");
    const py::list libs = py::module_::import("builtins").attr("sorted")(capi.attr("glob")("libonnxruntime.so*"));
    if (py::len(libs)) return py::str(libs[0]);
  }
  return "";
}

// Python exceptions for the C status codes: bad input is a ValueError (the fewstep convention),
// an unreadable file an OSError, ONNX Runtime failures a RuntimeError.
[[noreturn]] void raise(const fewstep::Error& e) {
  switch (e.status()) {
    case FEWSTEP_ERR_IO: throw py::value_error(e.what());  // FileNotFoundError-like but a ValueError for the CLI
    case FEWSTEP_ERR_BACKEND:
    case FEWSTEP_ERR_INTERNAL: throw std::runtime_error(e.what());
    case FEWSTEP_ERR_NONFINITE: {  // fewstep.errors.NonFiniteError: the CLI exits 3 and writes nothing
      const py::object cls = py::module_::import("fewstep.errors").attr("NonFiniteError");
      PyErr_SetString(cls.ptr(), e.what());
      throw py::error_already_set();
    }
    default: throw py::value_error(e.what());
  }
}

class PyEngine {
 public:
  PyEngine(const std::string& path, int threads, const std::string& provider, int device_id, bool cuda_graph,
           const py::object& cache_dir, const py::object& ort_library) {
    fewstep::EngineOptions o;
    o.intra_op_threads = threads;
    if (provider == "cpu") o.provider = FEWSTEP_PROVIDER_CPU;
    else if (provider == "cuda") o.provider = FEWSTEP_PROVIDER_CUDA;
    else if (provider == "tensorrt") o.provider = FEWSTEP_PROVIDER_TENSORRT;
    else if (provider == "openvino") o.provider = FEWSTEP_PROVIDER_OPENVINO;
    else throw py::value_error("provider must be 'cpu', 'cuda', 'tensorrt' or 'openvino', got '" + provider + "'");
    o.device_id = device_id;
    o.cuda_graph = cuda_graph;
    if (!cache_dir.is_none()) o.engine_cache_dir = py::str(cache_dir);
    o.ort_library = ort_library.is_none() ? find_ort_library() : std::string(py::str(ort_library));
    try {
      py::gil_scoped_release release;  // session creation can take a while (TensorRT: minutes)
      engine_ = std::make_unique<fewstep::Engine>(path, o);
    } catch (const fewstep::Error& e) {
      raise(e);
    }
  }

  // numpy in / out without copies: inputs must already be C-contiguous with the right dtype
  // (forcecast would copy silently otherwise, which is fine but we avoid it for float32/int64),
  // the output is allocated here and written by ONNX Runtime in place.
  py::array_t<float> sample(const py::object& seed, const py::object& batch, const py::object& labels,
                            const py::object& guidance, const py::object& z, const py::object& inputs) const {
    const uint64_t s = to_u64(seed, "seed");
    const int64_t b = to_positive(batch, "batch");
    if (!inputs.is_none()) return sample_named(s, b, labels, guidance, z, inputs);
    const fewstep_engine_info& info = engine_->info();
    using i64arr = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
    using f32arr = py::array_t<float, py::array::c_style | py::array::forcecast>;
    i64arr l;
    f32arr g, zz;
    if (!labels.is_none()) {
      l = i64arr::ensure(labels);
      if (!l || l.ndim() != 1 || l.shape(0) != b) throw py::value_error("labels must be an int array of shape [batch]");
    }
    if (!guidance.is_none()) {
      g = f32arr::ensure(guidance);
      if (!g || g.ndim() != 1 || g.shape(0) != b) throw py::value_error("guidance must be a float array of shape [batch]");
    }
    std::vector<py::ssize_t> zdims{py::ssize_t(b)};
    zdims.insert(zdims.end(), info.sample_shape, info.sample_shape + info.ndim);
    if (!z.is_none()) {
      zz = f32arr::ensure(z);
      if (!zz || std::vector<py::ssize_t>(zz.shape(), zz.shape() + zz.ndim()) != zdims)
        throw py::value_error("z must be a float32 array of shape [batch, *sample_shape]");
    }
    py::array_t<float> out(output_dims(b));
    float* o = out.mutable_data();
    const size_t n = size_t(out.size());
    const int64_t* lp = labels.is_none() ? nullptr : l.data();
    const float* gp = guidance.is_none() ? nullptr : g.data();
    const float* zp = z.is_none() ? nullptr : zz.data();
    try {
      py::gil_scoped_release release;  // other Python threads run while ONNX Runtime samples
      engine_->sample(s, b, lp, gp, o, n, zp);
    } catch (const fewstep::Error& e) {
      raise(e);
    }
    return out;
  }

  // The generic path (fewstep_sample_inputs): `inputs` {name: array} plus labels / guidance / z as the
  // inputs class_labels / guidance / z when given (a name given both ways is refused by the C side as
  // given twice). Floating arrays are passed as float32, integer arrays as int64; the C side checks
  // each against the engine's declared dtype and shape.
  py::array_t<float> sample_named(uint64_t s, int64_t b, const py::object& labels, const py::object& guidance,
                                  const py::object& z, const py::object& inputs) const {
    if (!py::isinstance<py::dict>(inputs)) throw py::value_error("inputs must be a dict {name: array}");
    std::vector<std::pair<std::string, py::array>> arrays;
    for (const auto& kv : py::reinterpret_borrow<py::dict>(inputs)) {
      if (!py::isinstance<py::str>(kv.first)) throw py::value_error("inputs: names must be strings");
      arrays.emplace_back(py::str(kv.first), py::array(py::module_::import("numpy").attr("asarray")(kv.second)));
    }
    if (!z.is_none()) arrays.emplace_back("z", py::array(py::module_::import("numpy").attr("asarray")(z)));
    if (!labels.is_none()) arrays.emplace_back("class_labels", py::array(py::module_::import("numpy").attr("asarray")(labels)));
    if (!guidance.is_none()) arrays.emplace_back("guidance", py::array(py::module_::import("numpy").attr("asarray")(guidance)));
    using i64arr = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
    using f32arr = py::array_t<float, py::array::c_style | py::array::forcecast>;
    std::vector<py::array> keep;  // the converted arrays, alive until the run is over
    std::vector<fewstep::Input> in;
    for (auto& [name, a] : arrays) {
      const char kind = a.dtype().kind();
      std::vector<int64_t> shape(a.shape(), a.shape() + a.ndim());
      if (kind == 'f') {
        f32arr f = f32arr::ensure(a);
        if (!f) throw py::value_error("input '" + name + "': cannot be read as float32");
        in.emplace_back(name, shape, f.data());
        keep.push_back(f);
      } else if (kind == 'i' || kind == 'u') {
        i64arr l = i64arr::ensure(a);
        if (!l) throw py::value_error("input '" + name + "': cannot be read as int64");
        in.emplace_back(name, shape, l.data());
        keep.push_back(l);
      } else {
        throw py::value_error("input '" + name + "': expected a float or integer array, got dtype " +
                              std::string(py::str(a.dtype())));
      }
    }
    py::array_t<float> out(output_dims(b));
    float* o = out.mutable_data();
    const size_t n = size_t(out.size());
    try {
      py::gil_scoped_release release;
      engine_->sample_inputs(s, b, in, o, n);
    } catch (const fewstep::Error& e) {
      raise(e);
    }
    return out;
  }

  // The output's shape at batch b: [b, *sample_shape], or [b, 3, H, W] for a --decode engine; refused past the
  // runtime's 2^31 values per run before numpy allocates it.
  std::vector<py::ssize_t> output_dims(int64_t b) const {
    const fewstep::OutputInfo o = engine_->output();
    if (uint64_t(b) > (uint64_t(1) << 31) / uint64_t(o.per_sample))
      throw py::value_error("batch " + std::to_string(b) + " x " + std::to_string(o.per_sample) +
                            " values per sample is more than the 2^31 values one run may hold");
    const std::vector<int64_t> s = engine_->output_shape(b);
    return std::vector<py::ssize_t>(s.begin(), s.end());
  }

  // The engine's output: {name, shape ("batch" for the batch), dtype, per_sample}.
  py::dict output() const {
    const fewstep::OutputInfo o = engine_->output();
    py::list shape;
    for (const int64_t d : o.shape) shape.append(d < 0 ? py::object(py::str("batch")) : py::object(py::int_(d)));
    py::dict d;
    d["name"] = o.name;
    d["shape"] = py::tuple(shape);
    d["dtype"] = "float32";
    d["per_sample"] = o.per_sample;
    return d;
  }

  // The engine's inputs: [{name, shape ("batch" for the batch), dtype, source}], the contract's order.
  py::list inputs() const {
    py::list l;
    for (const fewstep::InputInfo& ii : engine_->inputs()) {
      py::list shape;
      for (const int64_t d : ii.shape) shape.append(d < 0 ? py::object(py::str("batch")) : py::object(py::int_(d)));
      py::dict d;
      d["name"] = ii.name;
      d["shape"] = py::tuple(shape);
      d["dtype"] = ii.dtype == FEWSTEP_DTYPE_INT64 ? "int64" : "float32";
      d["source"] = ii.source == FEWSTEP_INPUT_SEED ? "seed" : ii.source == FEWSTEP_INPUT_SEED_ONLY ? "seed_only" : "required";
      l.append(d);
    }
    return l;
  }

  py::dict info() const {
    const fewstep_engine_info& i = engine_->info();
    py::dict d;
    d["sample_shape"] = py::tuple(py::cast(engine_->sample_shape()));
    d["per_sample"] = i.per_sample;
    d["fixed_batch"] = i.fixed_batch ? py::object(py::int_(i.fixed_batch)) : py::object(py::none());
    d["nfe"] = i.nfe;
    d["n_stochastic"] = i.n_stochastic;
    d["num_classes"] = i.num_classes ? py::object(py::int_(i.num_classes)) : py::object(py::none());
    d["null_label"] = i.null_label >= 0 ? py::object(py::int_(i.null_label)) : py::object(py::none());
    d["guidance_input"] = bool(i.guidance_input);
    d["sigma_init"] = i.sigma_init;
    d["compute_dtype"] = i.compute_dtype;
    return d;
  }

  py::object metadata(const std::string& key) const {
    const char* v = fewstep_engine_metadata(engine_->get(), key.c_str());
    return v ? py::object(py::str(v)) : py::object(py::none());
  }
  std::string plan_json() const { return engine_->info().plan_json; }

 private:
  std::unique_ptr<fewstep::Engine> engine_;
};

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fewstep native runtime (bindings over the C API in fewstep.h)";
  m.def("version", &fewstep_version, "Library version, equal to fewstep.__version__.");
  m.def("randn", &randn, py::arg("seed"), py::arg("batch"), py::arg("shape"), py::arg("stream") = 0,
        py::arg("first_sample") = 0,
        "Standard-normal float32 [batch, *shape] from the Philox noise spec (same values as "
        "fewstep.runtime.noise.randn); raises ValueError on bad arguments.");
  m.def("philox4x32_10", &philox4x32_10, py::arg("counter"), py::arg("key"),
        "Philox4x32-10 block function on 4 counter words and 2 key words; returns 4 words.");
  m.def("find_ort_library", &find_ort_library,
        "Path of the installed onnxruntime package's libonnxruntime.so ($FEWSTEP_ORT_LIBRARY first), or ''.");
  py::class_<PyEngine>(m, "Engine", "An exported fewstep sampler (.onnx) run by the C++ runtime over ONNX Runtime.")
      .def(py::init<const std::string&, int, const std::string&, int, bool, const py::object&, const py::object&>(),
           py::arg("path"), py::arg("threads") = 0, py::arg("provider") = "cpu", py::arg("device_id") = 0,
           py::arg("cuda_graph") = false, py::arg("cache_dir") = py::none(), py::arg("ort_library") = py::none(),
           "Load an engine. threads: ONNX Runtime intra-op threads (0 = its default). ort_library: "
           "libonnxruntime.so to use (default: the installed onnxruntime package's). Raises ValueError "
           "for a bad file or argument, RuntimeError when ONNX Runtime fails.")
      .def("sample", &PyEngine::sample, py::arg("seed"), py::arg("batch"), py::arg("labels") = py::none(),
           py::arg("guidance") = py::none(), py::arg("z") = py::none(), py::arg("inputs") = py::none(),
           "float32 of the output's shape (.output: [batch, *sample_shape], or [batch, 3, H, W] for a --decode "
           "engine): z and noise from the Philox seed (or the given z), as "
           "`fewstep sample --seed`. inputs: {name: array} of the engine's named inputs (see .inputs); with it, "
           "every required input must be given (labels / guidance / z count as class_labels / guidance / z). "
           "Releases the GIL while ONNX Runtime runs.")
      .def_property_readonly("inputs", &PyEngine::inputs,
                             "The engine's inputs: [{name, shape, dtype, source}] ('batch' marks the batch; "
                             "source 'required', 'seed' (z: from the seed unless given) or 'seed_only' (noise)).")
      .def_property_readonly("output", &PyEngine::output,
                             "The engine's output: {name, shape, dtype, per_sample} ('batch' marks the batch): "
                             "'sample' (the latents, [batch, *sample_shape]) or 'image' ([batch, 3, H, W], an "
                             "engine exported with --decode). sample() returns arrays of this shape.")
      .def_property_readonly("info", &PyEngine::info, "The input contract (dict).")
      .def_property_readonly("plan_json", &PyEngine::plan_json)
      .def("metadata", &PyEngine::metadata, py::arg("key"), "A metadata_props value, or None.");
}
