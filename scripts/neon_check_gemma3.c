/* NEON gelu_mul and scale vs the scalar reference (bit for bit, as tests/test_kernels.py checks the
 * x86 paths), cross-built and run under qemu:
 *   aarch64-linux-gnu-gcc -O2 -std=c11 -pthread -ffp-contract=off -Ikernels $(ls kernels/[a-z]*.c) \
 *       scripts/neon_check_gemma3.c -lm -o /tmp/neon_gemma3 && qemu-aarch64 -L /usr/aarch64-linux-gnu /tmp/neon_gemma3
 * (on an aarch64 host tests/test_kernels.py runs the same comparisons natively). */
#include "dllama.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
static float frand(void) { return (float)rand() / RAND_MAX * 2 - 1; }
int main(void) {
    int bad = 0;
    const int sizes[] = {1, 3, 4, 5, 8, 17, 2053};
    for (int s = 0; s < 7; s++) {
        const int n = sizes[s];
        float *g = malloc(4 * n), *u = malloc(4 * n), *a = malloc(4 * n), *b = malloc(4 * n);
        for (int i = 0; i < n; i++) { g[i] = frand() * 12; u[i] = frand(); }
        const float special[] = {-100, 100, 0, -10, 10, -3.5f, 1e-30f, -60};
        for (int i = 0; i < n && i < 8; i++) g[i] = special[i];
        dl_set_isa(0); dl_gelu_mul(a, g, u, n);
        if (!dl_set_isa(3)) { printf("no neon\n"); return 1; }
        dl_gelu_mul(b, g, u, n);
        for (int i = 0; i < n; i++) if (memcmp(a + i, b + i, 4)) { bad++; if (bad < 5) printf("gelu %d: %g %g\n", i, a[i], b[i]); }
        memcpy(a, g, 4 * n); memcpy(b, g, 4 * n);
        dl_set_isa(0); dl_scale(a, 25.298f, n);
        dl_set_isa(3); dl_scale(b, 25.298f, n);
        for (int i = 0; i < n; i++) if (memcmp(a + i, b + i, 4)) { bad++; if (bad < 5) printf("scale %d: %g %g\n", i, a[i], b[i]); }
        free(g); free(u); free(a); free(b);
    }
    printf(bad ? "FAIL %d\n" : "neon gelu_mul and scale: bit-identical to scalar\n", bad);
    return bad != 0;
}
