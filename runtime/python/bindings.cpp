// fewstep._C: Python bindings over the public C API (fewstep.h) only.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "fewstep.h"

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
}
