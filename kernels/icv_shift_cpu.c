/* Steering shift (docs/method.md §2 and §7) on the CPU: one C call per decoder layer.
 *
 * The torch path costs ~15 small ops per layer; at decode sizes (tens of
 * tokens) their dispatch, not the arithmetic, is the cost. This is the Triton
 * kernel's algorithm as one loop over tokens: per steered token, one sweep
 * reads x (into fp32 scratch) and its vectors for ||x||, x.v_k, ||v_k||; the
 * next forms y = x/||x|| + sum_k c_k v_k and ||y||; the last writes
 * ||x|| y/||y|| back in the hidden dtype (in place). fp32 throughout, every
 * norm clamped to >= EPS. Columns [0, ICV_COLUMNS) of a row are ICV entries;
 * the rest are add entries (x' += lam v, after the ICV transform); an entry
 * applies at a layer when its bit in the layer-bit table is set.
 *
 * Built at install time as an optional extension (setup.py); without a C
 * compiler the package falls back to the torch path. Pointers come from
 * torch tensors the Python wrapper (icv_shift_cpu.py) has checked; indices
 * read from the tables are range-checked here before anything is written, so
 * bad metadata is an error that leaves hidden untouched, never a wild read.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#define EPS 1e-12f
/* T x D from which a call splits its tokens over threads (~64 tokens at D = 4096) */
#define MIN_PARALLEL_ELEMENTS (1 << 18)
#define ICV_COLUMNS 4
#define ADD_COLUMNS 4
#define ENTRIES (ICV_COLUMNS + ADD_COLUMNS)

enum { DTYPE_FLOAT32 = 0, DTYPE_BFLOAT16 = 1, DTYPE_FLOAT16 = 2 };

/* One build, AVX2+FMA code where the CPU has it (picked at load by ifunc).
 * x86-64-v3 is a feature level (AVX2, FMA, F16C); "arch=<cpu>" clones would
 * be picked only on that CPU model. Twice as fast as the SSE2 default. */
#if defined(ICV_PORTABLE_ONLY) /* tests build the baseline code alone with this */
#define MULTIVERSION
#elif defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#elif defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define MULTIVERSION
#endif

#define ALWAYS_INLINE static inline __attribute__((always_inline))

#ifdef __FLT16_MANT_DIG__
#define HAVE_FLOAT16 1
typedef _Float16 half_t;
#else
#define HAVE_FLOAT16 0
#endif

static inline float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* round to nearest even, NaN kept quiet: what torch's bfloat16 cast does */
static inline uint16_t float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    uint32_t quiet_nan = (u >> 16) | 0x40u;
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded); /* a select: vectorizes */
}

ALWAYS_INLINE void load_row(const void *row, int dtype, Py_ssize_t D, float *out) {
    if (dtype == DTYPE_FLOAT32) {
        memcpy(out, row, (size_t)D * sizeof(float));
    } else if (dtype == DTYPE_BFLOAT16) {
        const uint16_t *h = (const uint16_t *)row;
        for (Py_ssize_t d = 0; d < D; d++) out[d] = bf16_to_float(h[d]);
    }
#if HAVE_FLOAT16
    else {
        const half_t *h = (const half_t *)row;
        for (Py_ssize_t d = 0; d < D; d++) out[d] = (float)h[d];
    }
#endif
}

ALWAYS_INLINE void store_row(void *row, int dtype, Py_ssize_t D, const float *y, float scale) {
    if (dtype == DTYPE_FLOAT32) {
        float *h = (float *)row;
        for (Py_ssize_t d = 0; d < D; d++) h[d] = y[d] * scale;
    } else if (dtype == DTYPE_BFLOAT16) {
        uint16_t *h = (uint16_t *)row;
        for (Py_ssize_t d = 0; d < D; d++) h[d] = float_to_bf16(y[d] * scale);
    }
#if HAVE_FLOAT16
    else {
        half_t *h = (half_t *)row;
        for (Py_ssize_t d = 0; d < D; d++) h[d] = (half_t)(y[d] * scale);
    }
#endif
}

/* 8 fp32 lanes in GCC/clang vector extensions: one AVX register in the
 * x86-64-v3 build, two SSE ones otherwise.
 * Sums run in two such accumulators each, independent FMA chains (one scalar
 * sum would serialize on its latency, and may not be reordered without
 * -ffast-math). */
typedef float vf8 __attribute__((vector_size(32)));
#define LANES 8

/* unaligned, alias-safe vector load/store (memcpy compiles to one vmovups) */
ALWAYS_INLINE vf8 vload(const float *p) {
    vf8 r;
    memcpy(&r, p, sizeof r);
    return r;
}

ALWAYS_INLINE void vstore(float *p, vf8 a) { memcpy(p, &a, sizeof a); }

ALWAYS_INLINE float hsum(vf8 a, vf8 b) {
    vf8 s = a + b;
    float t = 0.0f;
    for (int j = 0; j < LANES; j++) t += s[j];
    return t;
}

/* One token, K ICV entries (a constant after inlining, so loops over k
 * unroll): x (fp32, already in scratch) -> y in scratch; returns the factor
 * ||x||/||y|| that the store applies. Three sweeps of the row, all but the
 * first in L1: sums, y and ||y||, (by the caller) store. */
ALWAYS_INLINE float shift_token_k(float *restrict x, Py_ssize_t D, const float *const *v, const float *lam,
                                  const int K) {
    float xv[ICV_COLUMNS], vv[ICV_COLUMNS];
    vf8 xx0 = {0}, xx1 = {0}, xv0[ICV_COLUMNS] = {{0}}, xv1[ICV_COLUMNS] = {{0}}, vv0[ICV_COLUMNS] = {{0}},
        vv1[ICV_COLUMNS] = {{0}};
    Py_ssize_t d = 0;
    for (; d + 2 * LANES <= D; d += 2 * LANES) { /* ||x||^2, x.v_k, ||v_k||^2 in one sweep */
        vf8 a = vload(x + d), b = vload(x + d + LANES);
        xx0 += a * a;
        xx1 += b * b;
        for (int k = 0; k < K; k++) {
            vf8 p = vload(v[k] + d), q = vload(v[k] + d + LANES);
            xv0[k] += a * p;
            xv1[k] += b * q;
            vv0[k] += p * p;
            vv1[k] += q * q;
        }
    }
    float xx = hsum(xx0, xx1);
    for (int k = 0; k < K; k++) {
        xv[k] = hsum(xv0[k], xv1[k]);
        vv[k] = hsum(vv0[k], vv1[k]);
    }
    for (; d < D; d++) {
        xx += x[d] * x[d];
        for (int k = 0; k < K; k++) {
            xv[k] += x[d] * v[k][d];
            vv[k] += v[k][d] * v[k][d];
        }
    }
    float nx = sqrtf(xx);
    float inv_x = 1.0f / fmaxf(nx, EPS);
    float c[ICV_COLUMNS];
    for (int k = 0; k < K; k++) {
        float inv_v = 1.0f / fmaxf(sqrtf(vv[k]), EPS);
        float cos_neg = -xv[k] * inv_x * inv_v; /* cos(x, -v_k) */
        c[k] = lam[k] * (1.0f + fmaxf(cos_neg, 0.0f)) * inv_v / (float)K;
    }
    /* y = x/||x|| + sum_k c_k v_k, kept in the scratch row; ||y||^2 from the
     * stored y itself, so ||x'|| == ||x|| holds even where y nearly cancels */
    vf8 yy0 = {0}, yy1 = {0};
    for (d = 0; d + 2 * LANES <= D; d += 2 * LANES) {
        vf8 y = vload(x + d) * inv_x, z = vload(x + d + LANES) * inv_x;
        for (int k = 0; k < K; k++) {
            y += c[k] * vload(v[k] + d);
            z += c[k] * vload(v[k] + d + LANES);
        }
        vstore(x + d, y);
        vstore(x + d + LANES, z);
        yy0 += y * y;
        yy1 += z * z;
    }
    float yy = hsum(yy0, yy1);
    for (; d < D; d++) {
        float y = x[d] * inv_x;
        for (int k = 0; k < K; k++) y += c[k] * v[k][d];
        x[d] = y;
        yy += y * y;
    }
    return nx / fmaxf(sqrtf(yy), EPS);
}

/* x = x * scale + sum_j lam_j a_j (add entries, raw vectors) */
ALWAYS_INLINE void add_vectors(float *restrict x, Py_ssize_t D, float scale, const float *const *a,
                               const float *lam, int A) {
    Py_ssize_t d = 0;
    for (; d + LANES <= D; d += LANES) {
        vf8 y = vload(x + d) * scale;
        for (int j = 0; j < A; j++) y += lam[j] * vload(a[j] + d);
        vstore(x + d, y);
    }
    for (; d < D; d++) {
        float y = x[d] * scale;
        for (int j = 0; j < A; j++) y += lam[j] * a[j][d];
        x[d] = y;
    }
}

/* K ICV entries (0..4), then A add entries (0..4; K + A > 0) */
MULTIVERSION
static void shift_token(void *row, int dtype, Py_ssize_t D, float *x, const float *const *v,
                        const float *lam, int K, const float *const *a, const float *alam, int A) {
    load_row(row, dtype, D, x);
    float scale = 1.0f;
    switch (K) {
    case 0: break;
    case 1: scale = shift_token_k(x, D, v, lam, 1); break;
    case 2: scale = shift_token_k(x, D, v, lam, 2); break;
    case 3: scale = shift_token_k(x, D, v, lam, 3); break;
    default: scale = shift_token_k(x, D, v, lam, 4); break;
    }
    if (A > 0) {
        add_vectors(x, D, scale, a, alam, A);
        scale = 1.0f;
    }
    store_row(row, dtype, D, x, scale);
}

/* shift(hidden, num_tokens, dim, row_stride, dtype, token_rows, entry_slots,
 *       slots_stride, entry_scales, scales_stride, entry_layer_bits,
 *       bits_row_stride, bits_entry_stride, bit_words, num_rows, bank,
 *       num_slots, num_layers, layer, threads) -- pointers as integers,
 * strides in elements. Returns the number of tokens shifted. */
static PyObject *shift(PyObject *self, PyObject *args) {
    unsigned long long hidden_p, rows_p, slots_p, scales_p, bits_p, bank_p;
    Py_ssize_t T, D, row_stride, slots_stride, scales_stride, bits_row_stride, bits_entry_stride, bit_words,
        num_rows, num_slots, num_layers, layer, threads;
    int dtype;
    if (!PyArg_ParseTuple(args, "KnnniKKnKnKnnnnKnnnn", &hidden_p, &T, &D, &row_stride, &dtype, &rows_p,
                          &slots_p, &slots_stride, &scales_p, &scales_stride, &bits_p, &bits_row_stride,
                          &bits_entry_stride, &bit_words, &num_rows, &bank_p, &num_slots, &num_layers, &layer,
                          &threads))
        return NULL;
    if (dtype != DTYPE_FLOAT32 && dtype != DTYPE_BFLOAT16 && !(dtype == DTYPE_FLOAT16 && HAVE_FLOAT16)) {
        PyErr_Format(PyExc_ValueError, "icv_shift_cpu: unsupported dtype code %d", dtype);
        return NULL;
    }
    if (D <= 0 || layer < 0 || layer >= num_layers || layer / 32 >= bit_words) {
        PyErr_Format(PyExc_ValueError, "icv_shift_cpu: bad shape (dim %zd, layer %zd of %zd, %zd layer-bit words)",
                     D, layer, num_layers, bit_words);
        return NULL;
    }
    const int32_t *rows = (const int32_t *)(uintptr_t)rows_p;
    const int32_t *slots = (const int32_t *)(uintptr_t)slots_p;
    const float *scales = (const float *)(uintptr_t)scales_p;
    const int32_t *bits = (const int32_t *)(uintptr_t)bits_p;
    const Py_ssize_t word = layer / 32;
    const int bit = (int)(layer % 32);
    const float *bank = (const float *)(uintptr_t)bank_p;
    size_t elem = dtype == DTYPE_FLOAT32 ? 4 : 2;
    char *hidden = (char *)(uintptr_t)hidden_p;

    /* check every index first: bad tables are refused with hidden untouched */
    Py_ssize_t bad_token = -1, bad_row = -1, bad_slot = -1;
    for (Py_ssize_t t = 0; t < T && bad_token < 0; t++) {
        int32_t r = rows[t];
        if (r < 0) continue;
        if (r >= num_rows) bad_token = t, bad_row = r;
        else
            for (int e = 0; e < ENTRIES; e++)
                if (slots[r * slots_stride + e] >= num_slots) {
                    bad_token = t, bad_row = r, bad_slot = slots[r * slots_stride + e];
                    break;
                }
    }
    if (bad_slot >= 0) {
        PyErr_Format(PyExc_IndexError, "icv_shift_cpu: token %zd, row %zd names slot %zd; the bank has %zd",
                     bad_token, bad_row, bad_slot, num_slots);
        return NULL;
    }
    if (bad_token >= 0) {
        PyErr_Format(PyExc_IndexError, "icv_shift_cpu: token %zd names row %zd; the tables have %zd",
                     bad_token, bad_row, num_rows);
        return NULL;
    }
    /* threads: the caller passes torch's intra-op thread count; the OpenMP
     * runtime is torch's own (same soname, loaded by torch first; see
     * icv_shift_cpu.py). Small steps stay on one thread: a parallel region
     * costs a few microseconds. */
    int nthreads = threads > 1 && (size_t)T * (size_t)D >= MIN_PARALLEL_ELEMENTS ? (int)threads : 1;
    float *scratch = malloc((size_t)nthreads * (size_t)D * sizeof(float));
    if (scratch == NULL) return PyErr_NoMemory();
    Py_ssize_t shifted = 0;
    Py_BEGIN_ALLOW_THREADS
#ifdef _OPENMP
#pragma omp parallel for num_threads(nthreads) schedule(static) reduction(+ : shifted) if (nthreads > 1)
#endif
    for (Py_ssize_t t = 0; t < T; t++) {
        int32_t r = rows[t];
        if (r < 0) continue;
        const float *v[ENTRIES];
        float lam[ENTRIES];
        int K = 0, A = 0;
        for (int e = 0; e < ENTRIES; e++) {
            int32_t s = slots[r * slots_stride + e];
            if (s < 0 || !((uint32_t)bits[r * bits_row_stride + e * bits_entry_stride + word] >> bit & 1u)) continue;
            int n = e < ICV_COLUMNS ? K++ : ICV_COLUMNS + A++;
            v[n] = bank + ((size_t)s * num_layers + layer) * D;
            lam[n] = scales[r * scales_stride + e];
        }
        if (K + A == 0) continue;
#ifdef _OPENMP
        float *x = scratch + (size_t)omp_get_thread_num() * D;
#else
        float *x = scratch;
#endif
        shift_token(hidden + (size_t)t * row_stride * elem, dtype, D, x, v, lam, K, v + ICV_COLUMNS,
                    lam + ICV_COLUMNS, A);
        shifted++;
    }
    Py_END_ALLOW_THREADS
    free(scratch);
    return PyLong_FromSsize_t(shifted);
}

static PyMethodDef methods[] = {
    {"shift", shift, METH_VARARGS, "ICV shift of a [T, D] hidden-state block in place (see icv_shift_cpu.py)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_icv_shift_cpu", NULL, -1, methods};

PyMODINIT_FUNC PyInit__icv_shift_cpu(void) {
    PyObject *m = PyModule_Create(&module);
#ifdef _OPENMP
    const int have_openmp = 1;
    /* where this module's OpenMP calls go: compared in Python with torch's */
    const unsigned long long omp_entry = (unsigned long long)(uintptr_t)&omp_get_max_threads;
#else
    const int have_openmp = 0;
    const unsigned long long omp_entry = 0;
#endif
    if (m != NULL && (PyModule_AddIntConstant(m, "HAVE_FLOAT16", HAVE_FLOAT16) < 0 ||
                      PyModule_AddIntConstant(m, "HAVE_OPENMP", have_openmp) < 0 ||
                      PyModule_AddIntConstant(m, "MIN_PARALLEL_ELEMENTS", MIN_PARALLEL_ELEMENTS) < 0 ||
                      PyModule_AddObject(m, "OMP_ENTRY", PyLong_FromUnsignedLongLong(omp_entry)) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
