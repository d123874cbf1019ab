// The name of a status the C ABI returned (portable.h: NL_OK, NL_BAD_ARGUMENT, or a CUDA error
// code in the CUDA build), for the one-line error Python raises.
#include "errors.h"

#include "portable.h"

extern "C" const char* nl_status_name(int status) {
    if (status == NL_OK) return "ok";
    if (status == NL_BAD_ARGUMENT) return "bad arguments (sizes or dtype the kernels cannot take)";
#if defined(__CUDACC__)
    return cudaGetErrorString(static_cast<cudaError_t>(status));
#else
    return "unknown status";
#endif
}
