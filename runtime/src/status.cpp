// Status strings and the thread-local last-error message of the C API.
#include <string>

#include "error.hpp"
#include "fewstep.h"

namespace {
thread_local std::string g_last_error;  // one per thread: concurrent calls never see each other's message
}

namespace fewstep_impl {
fewstep_status set_error(fewstep_status status, const std::string& message) {
  g_last_error = message;
  return status;
}
}  // namespace fewstep_impl

extern "C" const char* fewstep_last_error(void) { return g_last_error.c_str(); }

extern "C" const char* fewstep_status_string(fewstep_status status) {
  switch (status) {
    case FEWSTEP_OK: return "ok";
    case FEWSTEP_ERR_INVALID_ARGUMENT: return "invalid argument";
    case FEWSTEP_ERR_OUT_OF_RANGE: return "argument out of range";
    case FEWSTEP_ERR_BUFFER_TOO_SMALL: return "output buffer too small";
    case FEWSTEP_ERR_INTERNAL: return "internal error";
    case FEWSTEP_ERR_IO: return "file cannot be read";
    case FEWSTEP_ERR_INVALID_ENGINE: return "not a valid fewstep engine";
    case FEWSTEP_ERR_BACKEND: return "ONNX Runtime error";
    case FEWSTEP_ERR_UNSUPPORTED: return "unsupported execution provider";
    case FEWSTEP_ERR_NONFINITE: return "result not finite";
  }
  return "unknown fewstep status";
}
