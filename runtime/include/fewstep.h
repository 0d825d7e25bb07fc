/* fewstep C API. */
#ifndef FEWSTEP_H
#define FEWSTEP_H
#ifdef __cplusplus
extern "C" {
#endif
/* Library version, "MAJOR.MINOR.PATCH". Never NULL. */
const char* fewstep_version(void);
#ifdef __cplusplus
}
#endif
#endif
