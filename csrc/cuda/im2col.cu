// im2col / col2im for the explicit-GEMM convolution path (cuda_cnn.py: im2col, then
// cupy.matmul, i.e. cuBLAS) and for the kernel-table entries of the same names.
//
//   x (N, C, H, W)  <->  cols (N, C*KH*KW, OH*OW),  cols[n, (c*KH + i)*KW + j, oh*OW + ow]
//                                                   = x[n, c, oh*SH - PH + i*DH, ow*SW - PW + j*DW]
//                                                   (0 where that is padding)
//
// im2col: one thread per cols element, consecutive threads along oh*OW + ow: the stores are
// coalesced and, for stride 1, so are the loads.
// col2im: one thread per x element gathers the (i, j, oh, ow) entries that map onto it, in a
// fixed order: the sum of overlapping taps needs no atomics and is bitwise reproducible.
#include "common.cuh"

// x (N, C, H, W) -> cols (N, C*KH*KW, OH*OW)
template <typename T>
__global__ void im2col_kernel(gptr<const T> x, gptr<T> cols, int N, int C, int H, int W, int OH,
                              int OW, int KH, int KW, int SH, int SW, int PH, int PW, int DH,
                              int DW) {
    const int OHW = OH * OW, KHW = KH * KW;
    const long long total = (long long)N * C * KHW * OHW;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        const int p = (int)(e % OHW);
        const long long t = e / OHW;  // n * C*KHW + r
        const int r = (int)(t % ((long long)C * KHW));
        const long long n = t / ((long long)C * KHW);
        const int c = r / KHW, ij = r - c * KHW;
        const int i = ij / KW, j = ij - i * KW;
        const int oh = p / OW, ow = p - oh * OW;
        const int ih = oh * SH - PH + i * DH, iw = ow * SW - PW + j * DW;
        cols[e] = (ih >= 0 && ih < H && iw >= 0 && iw < W)
                      ? x[((n * C + c) * H + ih) * W + iw]
                      : T(0);
    }
}

// cols (N, C*KH*KW, OH*OW) -> x (N, C, H, W): x[n, c, ih, iw] = sum over the taps (i, j) and
// outputs (oh, ow) with oh*SH - PH + i*DH == ih, ow*SW - PW + j*DW == iw, in (i, j) order.
template <typename T>
__global__ void col2im_kernel(gptr<const T> cols, gptr<T> x, int N, int C, int H, int W, int OH,
                              int OW, int KH, int KW, int SH, int SW, int PH, int PW, int DH,
                              int DW) {
    const int OHW = OH * OW, KHW = KH * KW;
    const long long total = (long long)N * C * H * W;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        const int iw = (int)(e % W);
        const long long t = e / W;
        const int ih = (int)(t % H);
        const long long nc = t / H;  // n * C + c
        const long long base = nc * KHW * OHW;  // cols offset of (n, c*KHW, 0)
        T s = T(0);
        for (int i = 0; i < KH; ++i) {
            const int th = ih + PH - i * DH;  // = oh * SH
            if (th < 0) break;
            const int oh = th / SH;
            if (oh * SH != th || oh >= OH) continue;
            for (int j = 0; j < KW; ++j) {
                const int tw = iw + PW - j * DW;
                if (tw < 0) break;
                const int ow = tw / SW;
                if (ow * SW != tw || ow >= OW) continue;
                s += cols[base + (long long)(i * KW + j) * OHW + oh * OW + ow];
            }
        }
        x[e] = s;
    }
}

GPUDIFF_KERNEL(im2col_kernel<float>)
GPUDIFF_KERNEL(im2col_kernel<double>)
GPUDIFF_KERNEL(col2im_kernel<float>)
GPUDIFF_KERNEL(col2im_kernel<double>)
