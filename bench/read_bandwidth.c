// The CPU read bandwidth a single-token MoE call could reach (issue 5's roofline), on the GPU
// machine's host: persistent spinning threads read, per call, a few random multi-MB chunks of a
// pool much larger than L3 (the ~5 CPU experts a token activates), split into contiguous shares;
// once as one phase, once as two (2/3 then 1/3 of each chunk, like gate/up then down) with a
// barrier between. Also a 1 GiB stream. 30 us of idle spinning precede each call (the GPU's part
// of a layer). Medians of 200 calls.
//
//     gcc -O3 -mavx2 -pthread -o /tmp/read_bw bench/read_bandwidth.c && /tmp/read_bw 16
//     (argument: pool size in GiB; thread counts 4 8 12 15: the calling thread spins too)
#define _GNU_SOURCE
#include <immintrin.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAXR 64
typedef struct { const char *p; size_t n; } Range;
static int T, phases = 1;
static _Atomic int gen = 0, done = 0, mid = 0;
static Range work[2][128][MAXR];
static int nwork[2][128];
static volatile int64_t sink[128 * 8];

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }

static int64_t read_range(const char *p, size_t n) {
    __m256i a = _mm256_setzero_si256(), b = _mm256_setzero_si256();
    for (size_t i = 0; i + 64 <= n; i += 64) {
        a = _mm256_add_epi64(a, _mm256_load_si256((const __m256i *)(p + i)));
        b = _mm256_add_epi64(b, _mm256_load_si256((const __m256i *)(p + i + 32)));
    }
    a = _mm256_add_epi64(a, b);
    return _mm256_extract_epi64(a, 0) + _mm256_extract_epi64(a, 3);
}

static void *worker(void *arg) {
    int id = (int)(intptr_t)arg, seen = 0;
    cpu_set_t s; CPU_ZERO(&s); CPU_SET(id, &s); pthread_setaffinity_np(pthread_self(), sizeof s, &s);
    for (;;) {
        int g;
        while ((g = atomic_load_explicit(&gen, memory_order_acquire)) == seen) _mm_pause();
        if (g < 0) return 0;
        seen = g;
        int64_t acc = 0;
        for (int ph = 0; ph < phases; ph++) {
            if (ph) { atomic_fetch_add(&mid, 1); while (atomic_load(&mid) < T * g) _mm_pause(); }
            for (int r = 0; r < nwork[ph][id]; r++) acc += read_range(work[ph][id][r].p, work[ph][id][r].n);
        }
        sink[id * 8] = acc;
        atomic_fetch_add_explicit(&done, 1, memory_order_release);
    }
}

// the bytes of nc chunks of csz bytes, in T contiguous shares (64-byte aligned)
static void split(int ph, char **chunks, int nc, size_t csz) {
    size_t total = (size_t)nc * csz, share = (total / T + 63) & ~(size_t)63, off = 0;
    for (int t = 0; t < T; t++) {
        nwork[ph][t] = 0;
        size_t lo = off, hi = off + share < total ? off + share : total;
        off = hi;
        while (lo < hi && nwork[ph][t] < MAXR) {
            int c = (int)(lo / csz); size_t o = lo % csz, n = csz - o;
            if (n > hi - lo) n = hi - lo;
            work[ph][t][nwork[ph][t]++] = (Range){chunks[c] + o, n};
            lo += n;
        }
    }
}

static int cmp(const void *a, const void *b) { double x = *(const double *)a, y = *(const double *)b; return (x > y) - (x < y); }

static double call(int *g) {
    double t0 = now();
    atomic_store(&done, 0);
    ++*g;
    atomic_store(&mid, T * (*g - 1));
    atomic_store_explicit(&gen, *g, memory_order_release);
    while (atomic_load(&done) < T) _mm_pause();
    return now() - t0;
}

int main(int argc, char **argv) {
    size_t pool = (size_t)(argc > 1 ? atol(argv[1]) : 16) << 30;
    char *P = aligned_alloc(1 << 21, pool);
    memset(P, 1, pool);
    const size_t csz = 4771840 & ~(size_t)4095;   // one Qwen3-30B-A3B int8 g128 expert, ~4.77 MB
    const int nc = 5;                               // experts a token sends to the CPU (24 GiB plan)
    const size_t nchunks = pool / csz;
    int counts[] = {4, 8, 12, 15};
    for (int ci = 0; ci < 4; ci++) {
        T = counts[ci];
        pthread_t th[128];
        int g = 0;
        atomic_store(&gen, 0);
        for (int i = 0; i < T; i++) pthread_create(&th[i], 0, worker, (void *)(intptr_t)i);
        char *whole[1] = {P};
        phases = 1;
        split(0, whole, 1, (size_t)1 << 30);
        double best = 1e9;
        for (int it = 0; it < 5; it++) { double d = call(&g); if (d < best) best = d; }
        double res[2];
        for (int mode = 0; mode < 2; mode++) {
            double ts[200];
            for (int it = 0; it < 200; it++) {
                char *cs[8], *c2[8];
                for (int c = 0; c < nc; c++) cs[c] = P + (size_t)(rand() % nchunks) * csz;
                if (mode == 0) { phases = 1; split(0, cs, nc, csz); }
                else {
                    size_t a = (csz * 2 / 3) & ~(size_t)4095;
                    for (int c = 0; c < nc; c++) c2[c] = cs[c] + a;
                    phases = 2; split(0, cs, nc, a); split(1, c2, nc, csz - a);
                }
                double t1 = now();
                while (now() - t1 < 30e-6) _mm_pause();
                ts[it] = call(&g);
            }
            qsort(ts, 200, sizeof ts[0], cmp);
            res[mode] = ts[100];
        }
        double bytes = (double)nc * csz;
        printf("threads %2d | 1 GiB stream %6.1f GB/s | 5 random experts, one phase %.3f ms %6.1f GB/s | two phases %.3f ms %6.1f GB/s\n",
               T, (1 << 30) / best / 1e9, res[0] * 1e3, bytes / res[0] / 1e9, res[1] * 1e3, bytes / res[1] / 1e9);
        fflush(stdout);
        atomic_store(&gen, -1);
        for (int i = 0; i < T; i++) pthread_join(th[i], 0);
    }
    return 0;
}
