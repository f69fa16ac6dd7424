// What the C++ CPU kernels of this folder share: float32 vectors of the width the CPU offers (GCC / Clang vector
// extensions, so the same code compiles to AVX-512, AVX2, NEON or SSE), loads and stores of W channels at any stride,
// the elementwise functions the kernels need (2^x, softplus, SiLU) with NaN passed through, and the split of their
// units of work over threads.

#pragma once

#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace mm_kernels {

#if defined(__AVX512F__)
constexpr int W = 16;  // lanes of one vector: one AVX-512 register of float32
#elif defined(__AVX__) || defined(__aarch64__)
constexpr int W = 8;   // AVX / AVX2: one register; NEON: two (32 registers hold the 16 states of two)
#else
constexpr int W = 4;
#endif

typedef float vf __attribute__((vector_size(W * 4)));
typedef int32_t vi __attribute__((vector_size(W * 4)));

constexpr float LOG2_E = 1.4426950408889634f;

inline vf splat(float x) { return vf{} + x; }

inline vf vmax(vf a, vf b) { return a > b ? a : b; }

// The fraction's polynomial: 2^f for f in [-0.5, 0.5], degree 5 (about 2 ulp; the compiled PyTorch path's too).
inline vf exp2_fraction(vf f) {
    vf p = splat(1.32647e-3f);
    p = p * f + 9.67151e-3f;
    p = p * f + 5.550734e-2f;
    p = p * f + 2.4022242e-1f;
    p = p * f + 6.9314698e-1f;
    return p * f + 1.0f;
}

#if defined(__AVX512F__)
// 2^x = 2^f 2^k with k = round(x): vrndscaleps rounds, vscalefps multiplies by 2^k with IEEE overflow to inf and
// underflow to 0, so the only clamp needed is the one that keeps +-inf (k = +-inf, f = NaN) out: [-200, 200]. The
// clamps take x as their second operand, which vmaxps / vminps return when it is NaN: NaN stays NaN.
inline vf exp2v(vf x) {
    __m512 v = _mm512_min_ps(_mm512_set1_ps(200.0f), _mm512_max_ps(_mm512_set1_ps(-200.0f), (__m512)x));
    __m512 k = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    vf p = exp2_fraction((vf)(v - k));
    return (vf)_mm512_scalef_ps((__m512)p, k);
}
#else
// 2^x with the integer part put into the exponent field. x is clamped to [-127, 128] first (NaN passes through both
// comparisons unchanged and stays NaN): below -127 the result is 0 (the float32 exponent field cannot hold it), at 128
// the exponent field is all ones, i.e. +inf.
inline vf exp2v(vf x) {
    x = x < -127.0f ? splat(-127.0f) : x;
    x = x > 128.0f ? splat(128.0f) : x;
    // x + (1.5 2^23 + 127) rounds x to an integer k held in the low mantissa bits, 127 already added
    const vf shifter = splat(12583039.0f);
    vf t = x + shifter;
    vf p = exp2_fraction(x - (t - shifter));
    vi bits;
    std::memcpy(&bits, &t, sizeof(bits));
    bits = bits << 23;  // the bits of 1.5 2^23 shift out; (k + 127) lands in the exponent field
    vf scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    return p * scale;
}
#endif

// log(1 + e) for e in [0, 1]: 2 atanh(s) with s = e / (2 + e) <= 1/3, odd series to s^15 (relative error < 1e-8,
// exact for tiny e, where log(1 + e) would round 1 + e).
inline vf log1p_unit(vf e) {
    vf s = e / (e + 2.0f);
    vf s2 = s * s;
    vf p = splat(1.0f / 15.0f);
    p = p * s2 + 1.0f / 13.0f;
    p = p * s2 + 1.0f / 11.0f;
    p = p * s2 + 1.0f / 9.0f;
    p = p * s2 + 1.0f / 7.0f;
    p = p * s2 + 1.0f / 5.0f;
    p = p * s2 + 1.0f / 3.0f;
    p = p * s2 + 1.0f;
    return 2.0f * s * p;
}

// softplus(x) = log(1 + e^x) as torch.nn.functional.softplus (beta 1, threshold 20: x itself above 20), written
// max(x, 0) + log(1 + e^-|x|) so that nothing overflows. -inf gives 0, NaN stays NaN.
inline vf softplus(vf x) {
    vf ax = x < 0.0f ? -x : x;
    vf r = vmax(x, splat(0.0f)) + log1p_unit(exp2v(-ax * LOG2_E));
    return x > 20.0f ? x : r;
}

inline vf silu(vf z) { return z / (1.0f + exp2v(-z * LOG2_E)); }

// W channels at c (stride cs between channels) into a vector; lanes at or past `width` read 0.
inline vf load(const float* p, int64_t cs, int width) {
    vf v;
    if (cs == 1 && width == W) {
        std::memcpy(&v, p, sizeof(v));
    } else {
        v = vf{};
        for (int i = 0; i < width; ++i) v[i] = p[i * cs];
    }
    return v;
}

inline void store(float* p, int64_t cs, int width, vf v) {
    if (cs == 1 && width == W) {
        std::memcpy(p, &v, sizeof(v));
    } else {
        for (int i = 0; i < width; ++i) p[i * cs] = v[i];
    }
}

// Runs run(first, last) on `threads` contiguous ranges of [0, units) in parallel.
//
// Built with -fopenmp, the library links libgomp.so.1, which in a torch process is the libgomp torch loaded: the work
// runs on torch's own OpenMP workers. (Threads of our own competed with those workers, which spin for a while after
// each parallel op: a 2-thread forward of 4 layers lost ~18 ms to it.) Without OpenMP, std::thread.
template <class Run>
void parallel_ranges(int64_t units, int64_t threads, Run run) {
    if (threads > units) threads = units;
    if (threads < 1) threads = 1;
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int64_t i = 0; i < threads; ++i) run(units * i / threads, units * (i + 1) / threads);
#else
    std::vector<std::thread> pool;
    pool.reserve(threads - 1);
    for (int64_t i = 1; i < threads; ++i) pool.emplace_back(run, units * i / threads, units * (i + 1) / threads);
    run(int64_t{0}, units / threads);
    for (auto& th : pool) th.join();
#endif
}

}  // namespace mm_kernels
