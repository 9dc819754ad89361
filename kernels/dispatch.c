/* CPU feature detection and the run-time dispatch table. */
#include "dl_internal.h"
#include <stdlib.h>
#include <string.h>
#if DL_NEON && defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1UL << 20)   /* <asm/hwcap.h>, Linux 4.15+ */
#endif
#endif

dl_kernels dl_k;
int dl_isa_active = -1;

#define DL_FILL(k, sfx) do { \
    (k)->quantize_q80 = dl_quantize_q80_##sfx; \
    (k)->matmul_q40_q80_rows = dl_matmul_q40_q80_rows_##sfx; \
    (k)->matmul_f32_rows = dl_matmul_f32_rows_##sfx; \
    (k)->rmsnorm = dl_rmsnorm_##sfx; \
    (k)->silu_mul = dl_silu_mul_##sfx; \
    (k)->add = dl_add_##sfx; \
    (k)->add_q80 = dl_add_q80_##sfx; \
    (k)->dot = dl_dot_##sfx; \
    (k)->axpy = dl_axpy_##sfx; \
    (k)->gelu_mul = dl_gelu_mul_##sfx; \
    (k)->scale = dl_scale_##sfx; \
    (k)->matmul_q80_q80_rows = dl_matmul_q80_q80_rows_##sfx; \
    (k)->matmul_f16_rows = dl_matmul_f16_rows_##sfx; \
    (k)->softmax = dl_softmax_##sfx; \
    (k)->dot_rows = dl_dot_rows_##sfx; \
    (k)->axpy_rows = dl_axpy_rows_##sfx; \
    (k)->sample_me_chunk = dl_sample_me_chunk_##sfx; \
    (k)->argmax_f32 = dl_argmax_f32_##sfx; \
} while (0)

void dl_fill_table(dl_kernels *k, int isa) {
    memset(k, 0, sizeof(*k));
    switch (isa) {
#if DL_X86
    case DL_ISA_AVX2:   DL_FILL(k, avx2);   k->needs_xprep = 1; break;
    case DL_ISA_AVX512:
        DL_FILL(k, avx512);
        k->dot_rows2 = dl_dot_rows2_avx512;
        k->axpy_rows2 = dl_axpy_rows2_avx512;
        k->needs_xprep = 1;
        break;
#endif
#if DL_NEON
    case DL_ISA_NEON:   DL_FILL(k, neon);   k->needs_xprep = 0; break;
    case DL_ISA_NEON_DOTPROD:
        DL_FILL(k, neon);
#if DL_HAVE_DOTPROD
        k->matmul_q40_q80_rows = dl_matmul_q40_q80_rows_neon_dotprod;
        k->matmul_q80_q80_rows = dl_matmul_q80_q80_rows_neon_dotprod;
#endif
        k->needs_xprep = 0;
        break;
#endif
    default:            DL_FILL(k, scalar); k->needs_xprep = 0; break;
    }
}

int dl_isa_supported(int isa) {
    switch (isa) {
    case DL_ISA_SCALAR: return 1;
#if DL_X86
    case DL_ISA_AVX2:
        __builtin_cpu_init();
#if defined(__clang__) && __clang_major__ < 17
        /* older clang cannot query f16c; every AVX2 CPU (Haswell, Zen and later) has it */
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
               __builtin_cpu_supports("f16c");
#endif
    case DL_ISA_AVX512:
        __builtin_cpu_init();
        return dl_isa_supported(DL_ISA_AVX2) && __builtin_cpu_supports("avx512f") &&
               __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
               __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vnni");
#endif
#if DL_NEON
    case DL_ISA_NEON: return 1;   /* Advanced SIMD is mandatory on AArch64 */
    case DL_ISA_NEON_DOTPROD:
#if !DL_HAVE_DOTPROD
        return 0;   /* this compiler cannot build the sdot paths */
#elif defined(__linux__)
        return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#elif defined(__APPLE__)
        return 1;   /* every Apple arm64 core (M1 = ARMv8.5) has it */
#else
        return 0;
#endif
#endif
    default: return 0;
    }
}

static int dl_best_isa(void) {
    const char *env = getenv("DLLAMA_ISA");   /* optional override: scalar, avx2, avx512, neon, neon-dotprod */
    if (env) {
        for (int i = 0; i <= DL_ISA_NEON_DOTPROD; i++)
            if (strcmp(env, dl_isa_name(i)) == 0 && dl_isa_supported(i)) return i;
    }
    if (dl_isa_supported(DL_ISA_AVX512)) return DL_ISA_AVX512;
    if (dl_isa_supported(DL_ISA_AVX2)) return DL_ISA_AVX2;
    if (dl_isa_supported(DL_ISA_NEON_DOTPROD)) return DL_ISA_NEON_DOTPROD;
    if (dl_isa_supported(DL_ISA_NEON)) return DL_ISA_NEON;
    return DL_ISA_SCALAR;
}

__attribute__((constructor)) static void dl_dispatch_init(void) {
    if (dl_isa_active < 0) {
        int isa = dl_best_isa();
        dl_fill_table(&dl_k, isa);
        dl_isa_active = isa;
    }
}

int dl_get_isa(void) {
    if (dl_isa_active < 0) dl_dispatch_init();
    return dl_isa_active;
}

int dl_set_isa(int isa) {
    if (!dl_isa_supported(isa)) return 0;
    dl_fill_table(&dl_k, isa);
    dl_isa_active = isa;
    return 1;
}

const char *dl_isa_name(int isa) {
    switch (isa) {
    case DL_ISA_SCALAR: return "scalar";
    case DL_ISA_AVX2:   return "avx2";
    case DL_ISA_AVX512: return "avx512";
    case DL_ISA_NEON:   return "neon";
    case DL_ISA_NEON_DOTPROD: return "neon-dotprod";
    default:            return "unknown";
    }
}
