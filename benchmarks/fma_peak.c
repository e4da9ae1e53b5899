/* The machine's float32 FMA peak, to read the benchmark's GEMM peak against: every thread runs 12
 * independent chains of 512-bit FMAs (more than latency x throughput, so the FMA pipes never wait).
 *   gcc -O3 -march=native -fopenmp benchmarks/fma_peak.c -o /tmp/fma_peak
 *   OMP_NUM_THREADS=1 /tmp/fma_peak; OMP_NUM_THREADS=2 /tmp/fma_peak
 * Needs AVX-512F (the project machine has it; on an AVX2-only CPU use 256-bit intrinsics instead). */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

#define F(x) x = _mm512_fmadd_ps(x, b, c)

int main(void) {
  const long iters = 50000000;
  double t0 = now();
  float out = 0;
#pragma omp parallel reduction(+ : out)
  {
    const __m512 b = _mm512_set1_ps(1.0000001f), c = _mm512_set1_ps(1e-7f);
    __m512 a0 = _mm512_set1_ps(0), a1 = _mm512_set1_ps(1), a2 = _mm512_set1_ps(2), a3 = _mm512_set1_ps(3);
    __m512 a4 = _mm512_set1_ps(4), a5 = _mm512_set1_ps(5), a6 = _mm512_set1_ps(6), a7 = _mm512_set1_ps(7);
    __m512 a8 = _mm512_set1_ps(8), a9 = _mm512_set1_ps(9), a10 = _mm512_set1_ps(10), a11 = _mm512_set1_ps(11);
    for (long i = 0; i < iters; i++) {
      F(a0); F(a1); F(a2); F(a3); F(a4); F(a5); F(a6); F(a7); F(a8); F(a9); F(a10); F(a11);
    }
    __m512 s = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)),
                             _mm512_add_ps(_mm512_add_ps(a4, a5), _mm512_add_ps(a6, a7)));
    s = _mm512_add_ps(s, _mm512_add_ps(_mm512_add_ps(a8, a9), _mm512_add_ps(a10, a11)));
    out += _mm512_reduce_add_ps(s);  /* keeps the chains alive */
  }
  const double t = now() - t0;
  const int threads = omp_get_max_threads();
  printf("threads %d: %.1f GFLOP/s float32 FMA peak (checksum %g)\n", threads,
         (double)threads * iters * 12 * 32 / t / 1e9, out);
  return 0;
}
