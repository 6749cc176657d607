// Marks the inline functions the CPU codec shares with its CUDA kernels, so
// both compute the bitstream's arithmetic from one definition.
#ifndef KVCACHE_CODEC_HD_H_
#define KVCACHE_CODEC_HD_H_

#if defined(__CUDACC__)
#define KVCACHE_HD __host__ __device__
#else
#define KVCACHE_HD
#endif

#endif  // KVCACHE_CODEC_HD_H_
