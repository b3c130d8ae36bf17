// AMX micro-benchmark: how fast the prefill kernels' tile loop can run on this host, with no weights from
// memory, no unpack, no folds, no epilogue. Each thread loops on one of: 4 tile products (tdpbsud) of 4
// independent accumulators; the same with the 4 tile loads of a K step (2 weight tiles, 2 activation tiles,
// from L1); 4 tile stores; a group of 128 values of K (128 / K steps, then the 4 stores and zeroes that end a
// group). K = bytes of K a tile product covers: 64 (int4 and int8 with groups >= 64), 32 (int8 group 32).
// Prints a markdown row per (threads, K, loop): ns an iteration and int8 multiply-adds a second.
//
//   gcc -O2 -mamx-tile -mamx-int8 -o .carry/amxmb/amxmb bench/amx_tile_loop.c -lpthread    # here
//   .carry/amxmb/amxmb 1 8 16                                                             # the AMX host
#include <immintrin.h>
#include <stdio.h>
#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <pthread.h>
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
typedef struct { uint8_t palette, start; uint8_t r[14]; uint16_t colsb[16]; uint8_t rows[16]; } cfg_t;
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
static void config(int kb) {
  cfg_t c; memset(&c, 0, sizeof c); c.palette = 1;
  for (int i = 0; i < 4; i++) { c.colsb[i] = 64; c.rows[i] = 16; }       // C
  for (int i = 4; i < 6; i++) { c.colsb[i] = kb; c.rows[i] = 16; }       // A: 16 rows x K bytes
  for (int i = 6; i < 8; i++) { c.colsb[i] = 64; c.rows[i] = kb / 4; }   // B: K/4 rows x 64 bytes
  _tile_loadconfig(&c);
}
// one K step of the kernels' tile loop: 2 weight tiles, 2 activation tiles, the 4 products of a 32 x 32 block
static inline void k_step(const int8_t *A) {
  _tile_loadd(4, A, 128); _tile_loadd(5, A + 2048, 128); _tile_loadd(6, A + 4096, 64);
  _tile_dpbsud(0, 4, 6); _tile_dpbsud(1, 5, 6);
  _tile_loadd(7, A + 5120, 64);
  _tile_dpbsud(2, 4, 7); _tile_dpbsud(3, 5, 7);
}
typedef struct { int mode, kb; long n; double t; int8_t *a; int32_t *c; } job_t;
static void run(job_t *j) {
  int8_t *A = j->a; int32_t *C = j->c; long n = j->n;
  config(j->kb);
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  _tile_loadd(4, A, 128); _tile_loadd(5, A + 2048, 128); _tile_loadd(6, A + 4096, 64); _tile_loadd(7, A + 5120, 64);
  double t0 = now();
  for (long i = 0; i < n; i++) {
    if (j->mode == 0) {
      _tile_dpbsud(0, 4, 6); _tile_dpbsud(1, 5, 6); _tile_dpbsud(2, 4, 7); _tile_dpbsud(3, 5, 7);
    } else if (j->mode == 1) {
      k_step(A);
    } else if (j->mode == 2) {
      _tile_stored(0, C, 64); _tile_stored(1, C + 256, 64); _tile_stored(2, C + 512, 64); _tile_stored(3, C + 768, 64);
    } else {   // a group of 128 values of K: 128 / K steps of (4 loads + 4 products), then 4 stores and 4 zeroes
      for (int ks = 0; ks < 128 / j->kb; ks++) k_step(A);
      _tile_stored(0, C, 64); _tile_stored(1, C + 256, 64); _tile_stored(2, C + 512, 64); _tile_stored(3, C + 768, 64);
      _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    }
  }
  _tile_stored(0, C + 1024, 64);
  j->t = now() - t0;
  _tile_release();
}
static void *worker(void *p) {
  job_t *j = p;
  syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA);
  j->a = aligned_alloc(64, 8192); j->c = aligned_alloc(64, 8192);
  for (int i = 0; i < 8192; i++) j->a[i] = (int8_t)(i * 7);
  run(j);
  return 0;
}
int main(int argc, char **argv) {
  const char *names[] = {"4 products", "4 tile loads + 4 products", "4 tile stores", "group of 128: steps + 4 stores"};
  for (int a = 1; a < argc; a++) {
    int nth = atoi(argv[a]);
    for (int kb = 64; kb >= 32; kb -= 32)
      for (int mode = 0; mode < 4; mode++) {
        if (mode == 2 && kb == 32) continue;
        long n = mode == 3 ? 200000 : 1000000;
        pthread_t th[64]; job_t jobs[64];
        for (int t = 0; t < nth; t++) { jobs[t].mode = mode; jobs[t].kb = kb; jobs[t].n = n; pthread_create(&th[t], 0, worker, &jobs[t]); }
        double tmax = 0;
        for (int t = 0; t < nth; t++) { pthread_join(th[t], 0); if (jobs[t].t > tmax) tmax = jobs[t].t; }
        double macs = mode == 2 ? 0 : mode == 3 ? 4.0 * 16 * 16 * 128 : 4.0 * 16 * 16 * kb;
        printf("| %2d | K %2d | %-32s | %8.1f ns | %6.3f T MAC/s a thread | %6.2f T MAC/s all |\n", nth, kb, names[mode],
               tmax / n * 1e9, macs * n / tmax / 1e12, macs * n * nth / tmax / 1e12);
      }
  }
  return 0;
}
