#include "fewstep.h"
extern "C" const char* fewstep_version(void) { return FEWSTEP_VERSION; }
