#include "fewstep.h"

extern "C" const char* fewstep_status_string(fewstep_status status) {
  switch (status) {
    case FEWSTEP_OK: return "ok";
    case FEWSTEP_ERR_INVALID_ARGUMENT: return "invalid argument";
    case FEWSTEP_ERR_OUT_OF_RANGE: return "argument out of range";
    case FEWSTEP_ERR_BUFFER_TOO_SMALL: return "output buffer too small";
    case FEWSTEP_ERR_INTERNAL: return "internal error";
  }
  return "unknown fewstep status";
}
