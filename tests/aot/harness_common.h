/* What the AoT test harnesses share: a driver-call check and the device's primary context. */
#ifndef HARNESS_COMMON_H
#define HARNESS_COMMON_H

#include <cuda.h>
#include <stdio.h>

#define CHECK(call) do { CUresult r_ = (call); if (r_ != CUDA_SUCCESS) { \
    const char *s_; cuGetErrorString(r_, &s_); fprintf(stderr, "%s failed: %s\n", #call, s_); return 1; } } while (0)

/* Makes device 0's primary context current; returns 0 on success. */
static int use_primary_context(void) {
    CUdevice dev;
    CUcontext ctx;
    CHECK(cuInit(0));
    CHECK(cuDeviceGet(&dev, 0));
    CHECK(cuDevicePrimaryCtxRetain(&ctx, dev));
    CHECK(cuCtxSetCurrent(ctx));
    return 0;
}

#endif
