/* Loads the AoT-compiled add kernel, runs it on inputs read from a file, writes the output, and checks
 * the two launcher fixes: a call that matches no specialisation returns an error, and a second unload
 * is harmless.  Usage: harness_add N in.bin out.bin   (in.bin: x then y, N float32 each) */
#include <stdlib.h>

#include "harness_common.h"

#include "add_f32.h"

int main(int argc, char **argv) {
    if (argc != 4) { fprintf(stderr, "usage: %s N in.bin out.bin\n", argv[0]); return 2; }
    int n = atoi(argv[1]);
    size_t bytes = (size_t)n * sizeof(float);
    float *host = (float *)malloc(3 * bytes);
    FILE *f = fopen(argv[2], "rb");
    if (!f || fread(host, 1, 2 * bytes, f) != 2 * bytes) { fprintf(stderr, "cannot read %s\n", argv[2]); return 1; }
    fclose(f);
    if (use_primary_context() != 0) return 1;
    CUdeviceptr x, y, out;
    CHECK(cuMemAlloc(&x, bytes + 64));
    CHECK(cuMemAlloc(&y, bytes));
    CHECK(cuMemAlloc(&out, bytes));
    CHECK(cuMemcpyHtoD(x, host, bytes));
    CHECK(cuMemcpyHtoD(y, host + n, bytes));
    load_add_f32();
    CHECK(add_f32_default(NULL, x, y, out, n));
    CHECK(cuCtxSynchronize());
    CHECK(cuMemcpyDtoH(host + 2 * n, out, bytes));
    /* x + 4 bytes is not 16-byte aligned: no specialisation matches, so the dispatcher must say so. */
    CUresult miss = add_f32_default(NULL, x + 4, y, out, n);
    printf("misaligned call returned %d (CUDA_ERROR_INVALID_VALUE is %d)\n", (int)miss, (int)CUDA_ERROR_INVALID_VALUE);
    CUresult empty = add_f32_default(NULL, x, y, out, 0);
    printf("empty grid returned %d\n", (int)empty);
    unload_add_f32();
    unload_add_f32();
    printf("unloaded twice\n");
    f = fopen(argv[3], "wb");
    fwrite(host + 2 * n, 1, bytes, f);
    fclose(f);
    return (miss == CUDA_ERROR_INVALID_VALUE && empty == CUDA_SUCCESS) ? 0 : 3;
}
