// Internal: error plumbing of the C API boundary. No C++ exception may cross fewstep.h, so every
// exported function body runs inside FEWSTEP_GUARD, which maps exceptions to status codes.
#pragma once
#include <new>
#include <stdexcept>
#include <string>

#include "fewstep.h"

namespace fewstep_impl {

// Record `message` as this thread's fewstep_last_error and return `status`.
fewstep_status set_error(fewstep_status status, const std::string& message);

// An error carrying its status code, thrown inside the library and caught at the boundary.
struct Error : std::runtime_error {
  fewstep_status status;
  Error(fewstep_status s, const std::string& m) : std::runtime_error(m), status(s) {}
};

}  // namespace fewstep_impl

#define FEWSTEP_GUARD(body)                                                                        \
  try {                                                                                            \
    body                                                                                           \
  } catch (const fewstep_impl::Error& e) {                                                              \
    return fewstep_impl::set_error(e.status, e.what());                                                 \
  } catch (const std::bad_alloc&) {                                                                \
    return fewstep_impl::set_error(FEWSTEP_ERR_INTERNAL, "out of memory");                              \
  } catch (const std::exception& e) {                                                              \
    return fewstep_impl::set_error(FEWSTEP_ERR_INTERNAL, std::string("internal error: ") + e.what());  \
  } catch (...) {                                                                                  \
    return fewstep_impl::set_error(FEWSTEP_ERR_INTERNAL, "internal error: unknown exception");         \
  }
