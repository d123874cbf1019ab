// The C ABI of errors.cu: a status code's name. Conventions of every csrc/ ABI in portable.h.
#pragma once

#ifdef __cplusplus
extern "C" {
#endif

const char* nl_status_name(int status);

#ifdef __cplusplus
}
#endif
