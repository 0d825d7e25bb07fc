// fewstep._C: Python bindings over the public C API.
#include <pybind11/pybind11.h>
#include "fewstep.h"
namespace py = pybind11;
PYBIND11_MODULE(_C, m) {
  m.doc() = "fewstep native runtime";
  m.def("version", &fewstep_version, "Library version");
}
