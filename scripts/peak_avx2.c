// ymm FMA peak per core (AVX2 machines), timed on thread CPU time so a shared core still
// gives its own rate. Build and run: gcc -O2 -march=native scripts/peak_avx2.c -o /tmp/peak_avx2 && /tmp/peak_avx2
#define _GNU_SOURCE
#include <stdio.h>
#include <time.h>
#include <immintrin.h>
static double cpu(void){struct timespec t;clock_gettime(CLOCK_THREAD_CPUTIME_ID,&t);return t.tv_sec+1e-9*t.tv_nsec;}
static double wall(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+1e-9*t.tv_nsec;}
int main(){
  __m256 a=_mm256_set1_ps(1.0001f), b=_mm256_set1_ps(0.9999f);
  __m256 c0=_mm256_setzero_ps(),c1=c0,c2=c0,c3=c0,c4=c0,c5=c0,c6=c0,c7=c0,c8=c0,c9=c0,c10=c0,c11=c0;
  long iters=200000000;
  for(int r=0;r<3;r++){
  double t0=cpu(), w0=wall();
  for(long i=0;i<iters;i++){
    c0=_mm256_fmadd_ps(a,b,c0);c1=_mm256_fmadd_ps(a,b,c1);c2=_mm256_fmadd_ps(a,b,c2);c3=_mm256_fmadd_ps(a,b,c3);
    c4=_mm256_fmadd_ps(a,b,c4);c5=_mm256_fmadd_ps(a,b,c5);c6=_mm256_fmadd_ps(a,b,c6);c7=_mm256_fmadd_ps(a,b,c7);
    c8=_mm256_fmadd_ps(a,b,c8);c9=_mm256_fmadd_ps(a,b,c9);c10=_mm256_fmadd_ps(a,b,c10);c11=_mm256_fmadd_ps(a,b,c11);
    __asm__ volatile("" : "+x"(c0),"+x"(c1),"+x"(c2),"+x"(c3),"+x"(c4),"+x"(c5),"+x"(c6),"+x"(c7),"+x"(c8),"+x"(c9),"+x"(c10),"+x"(c11));
  }
  double t=cpu()-t0, w=wall()-w0;
  double fl=iters*12.0*16;
  printf("ymm vfmadd231ps: %.1f GFLOP/s per core (thread CPU time %.2fs, wall %.2fs)\n", fl/t/1e9, t, w);
  }
  float s[8]; __m256 z=_mm256_add_ps(_mm256_add_ps(c0,c11),c5); _mm256_storeu_ps(s,z); return s[0]>1e30;
}
