/* Runs the AoT-compiled TritonLookUp kernel (fp32 table): out[i, :] = table[ids[i], :].
 * Usage: harness_lookup N V D in.bin out.bin   (in.bin: N int32 ids, then V*D float32) */
#include <stdlib.h>

#include "harness_common.h"

#include "lookup_fp32.h"

int main(int argc, char **argv) {
    if (argc != 6) { fprintf(stderr, "usage: %s N V D in.bin out.bin\n", argv[0]); return 2; }
    int n = atoi(argv[1]), v = atoi(argv[2]), d = atoi(argv[3]);
    size_t ids_bytes = (size_t)n * 4, table_bytes = (size_t)v * d * 4, out_bytes = (size_t)n * d * 4;
    char *host = (char *)malloc(ids_bytes + table_bytes + out_bytes);
    FILE *f = fopen(argv[4], "rb");
    if (!f || fread(host, 1, ids_bytes + table_bytes, f) != ids_bytes + table_bytes) { fprintf(stderr, "bad input\n"); return 1; }
    fclose(f);
    if (use_primary_context() != 0) return 1;
    CUdeviceptr ids, table, out;
    CHECK(cuMemAlloc(&ids, ids_bytes));
    CHECK(cuMemAlloc(&table, table_bytes));
    CHECK(cuMemAlloc(&out, out_bytes));
    CHECK(cuMemcpyHtoD(ids, host, ids_bytes));
    CHECK(cuMemcpyHtoD(table, host + ids_bytes, table_bytes));
    load_lookup_fp32();
    /* the fp32 dispatcher (one per table dtype) */
    CHECK(lookup_fp32(NULL, ids, table, out, n, v, d, 0));
    CHECK(cuCtxSynchronize());
    CHECK(cuMemcpyDtoH(host + ids_bytes + table_bytes, out, out_bytes));
    unload_lookup_fp32();
    unload_lookup_fp32();
    f = fopen(argv[5], "wb");
    fwrite(host + ids_bytes + table_bytes, 1, out_bytes, f);
    fclose(f);
    printf("lookup ran: %d ids, table %dx%d\n", n, v, d);
    return 0;
}
