/* NEON q80 x q80 and f16 x f32 paths vs the scalar reference, cross-built and run under qemu:
 *   aarch64-linux-gnu-gcc -O2 [-march=armv8.2-a+dotprod] -std=c11 -pthread -ffp-contract=off -Ikernels \
 *       kernels/*.c scripts/neon_check_q80_f16.c -lm -o /tmp/neon_check && qemu-aarch64 -L /usr/aarch64-linux-gnu /tmp/neon_check
 * (tests/test_kernels.py runs the same comparisons natively on an aarch64 host). */
#include "dllama.h"
#include <stdio.h>
#include <stdlib.h>
#include <math.h>
static float frand(void){ return (float)rand()/RAND_MAX*2-1; }
int main(void){
  int bad=0;
  int shapes[][3]={{1,32,1},{17,96,3},{33,2080,7},{5,64,32}};
  for(int s=0;s<4;s++){
    int rows=shapes[s][0], cols=shapes[s][1], batch=shapes[s][2];
    float *wf=malloc(sizeof(float)*rows*cols), *xf=malloc(sizeof(float)*batch*cols);
    for(int i=0;i<rows*cols;i++) wf[i]=frand();
    for(int i=0;i<batch*cols;i++) xf[i]=frand()*3;
    dl_block_q80 *w=malloc(sizeof(dl_block_q80)*rows*cols/32), *x=malloc(sizeof(dl_block_q80)*batch*cols/32);
    uint16_t *wh=malloc(sizeof(uint16_t)*(size_t)rows*cols);
    for(int i=0;i<rows*cols;i++) wh[i]=dl_f32_to_f16(wf[i]);
    float *o1=malloc(4*rows*batch), *o2=malloc(4*rows*batch), *o3=malloc(4*rows*batch);
    for(int isa=0; isa<=3; isa+=3){
      dl_set_isa(isa);
      dl_quantize_q80(w,wf,rows*cols); dl_quantize_q80(x,xf,batch*cols);
      for(int th=1; th<=2; th++){
        dl_pool_init(th);
        dl_set_isa(0); dl_matmul_q80_q80(o1,w,x,rows,cols,batch); dl_matmul_f16_f32(o2,wh,xf,rows,cols,batch);
        if(!dl_set_isa(3)){printf("no neon\n");return 1;}
        dl_matmul_q80_q80(o3,w,x,rows,cols,batch);
        for(int i=0;i<rows*batch;i++) if(o1[i]!=o3[i]) {bad++; if(bad<5) printf("q80 %d: %g vs %g\n",i,o1[i],o3[i]);}
        dl_matmul_f16_f32(o3,wh,xf,rows,cols,batch);
        for(int i=0;i<rows*batch;i++) if(fabsf(o2[i]-o3[i])>1e-4f*(1+fabsf(o2[i]))) {bad++; if(bad<5) printf("f16 %d: %g vs %g\n",i,o2[i],o3[i]);}
      }
    }
  }
  printf("isa %s, %s\n", dl_isa_name(dl_get_isa()), bad?"FAIL":"neon q80/f16 == scalar");
  return bad!=0;
}
