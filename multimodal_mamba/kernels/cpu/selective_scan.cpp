// Selective scan forward (Mamba-1 S6) on the CPU, channels in the SIMD lanes.
//
// Contract: multimodal_mamba.modeling.ops_selective_scan (its docstring); the reference that defines what is correct
// is selective_scan_ref there. This kernel computes, for one (batch, group) and a block of W channels at a time,
//
//   dt_t = softplus(delta_t + delta_bias)            (or delta_t + delta_bias without softplus)
//   h_t[n] = 2^(dt_t A[n] log2 e) h_{t-1}[n] + dt_t u_t B_t[n]
//   y_t = sum_n C_t[n] h_t[n] + D u_t,  y_t *= z_t sigmoid(z_t)  (when z is given)
//
// walking the L steps of the block in order with the N states of its W channels in vector registers. Why this
// layout: with the channels in the lanes every per-step quantity (dt, u, z, y) is one vector load / store of
// token-major memory, B_t[n] and C_t[n] are broadcasts, and the readout sums N vectors vertically; with the states
// in the lanes (what torch.compile generates for the same loop) every step needs a horizontal sum and scalar loads.
// One exp2 per (channel, step, state) is the minimum: A[n] is a free parameter per channel and state.
//
// Built at first use with the system C++ compiler (multimodal_mamba/kernels/cpu/build.py), with -march=native, and
// called through ctypes on float32 tensors of any strides. Forward only: calls that need gradients take the PyTorch
// path.

#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
constexpr int W = 16;  // lanes of one vector: one AVX-512 register of float32
#elif defined(__AVX__) || defined(__aarch64__)
constexpr int W = 8;   // AVX / AVX2: one register; NEON: two (32 registers hold the 16 states of two)
#else
constexpr int W = 4;
#endif

typedef float vf __attribute__((vector_size(W * 4)));
typedef int32_t vi __attribute__((vector_size(W * 4)));

namespace {

constexpr float LOG2_E = 1.4426950408889634f;
constexpr int MAX_STATE = 256;

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

}  // namespace

extern "C" {

// Strides are in elements. u, delta, z, y: (batch, dim, L); B, C: (batch, groups, N, L); A: (dim, N) and h0 /
// h_last: (batch, dim, N), all three contiguous; D, delta_bias: (dim,) contiguous. z, D, delta_bias, h0, h_last may
// be null. Every pointer is float32.
struct ScanArgs {
    const float* u; int64_t u_sb, u_sd, u_st;
    const float* delta; int64_t delta_sb, delta_sd, delta_st;
    const float* z; int64_t z_sb, z_sd, z_st;
    const float* B; int64_t B_sb, B_sg, B_sn, B_st;
    const float* C; int64_t C_sb, C_sg, C_sn, C_st;
    const float* A;
    const float* D;
    const float* delta_bias;
    const float* h0;
    float* y; int64_t y_sb, y_sd, y_st;
    float* h_last;
    int64_t batch, dim, length, state_size, groups;
    int32_t delta_softplus;
    int32_t threads;
};

}  // extern "C"

namespace {

// Where one unit of work sits: batch row b, channels [c0, c0 + width) of group g.
struct Unit {
    int64_t b, g, c0;
    int width;
};

Unit unit_at(const ScanArgs& a, int64_t unit) {
    const int64_t per_group = a.dim / a.groups;
    const int64_t blocks = (per_group + W - 1) / W;
    const int64_t block = unit % blocks, bg = unit / blocks;
    const int64_t rest = per_group - block * W;
    return Unit{bg / a.groups, bg % a.groups, (bg % a.groups) * per_group + block * W,
                static_cast<int>(rest < W ? rest : W)};
}

// Steps [t0, t1) of one unit. state: its N state vectors, then its N vectors of A log2 e; read and updated.
// NS: the state size if known at compile time (the loop over states is then unrolled and the states live in
// registers), 0 for any N <= MAX_STATE.
template <int NS>
void scan_steps(const ScanArgs& a, const Unit& w, int64_t t0, int64_t t1, vf* state) {
    const int64_t N = NS > 0 ? NS : a.state_size;
    const int width = w.width;
    vf h[NS > 0 ? NS : MAX_STATE];
    const vf* A2 = state + N;
    for (int64_t n = 0; n < N; ++n) h[n] = state[n];
    const vf Dv = a.D ? load(a.D + w.c0, 1, width) : vf{};
    const vf bias = a.delta_bias ? load(a.delta_bias + w.c0, 1, width) : vf{};
    const float* u = a.u + w.b * a.u_sb + w.c0 * a.u_sd;
    const float* delta = a.delta + w.b * a.delta_sb + w.c0 * a.delta_sd;
    const float* z = a.z ? a.z + w.b * a.z_sb + w.c0 * a.z_sd : nullptr;
    const float* B = a.B + w.b * a.B_sb + w.g * a.B_sg;
    const float* C = a.C + w.b * a.C_sb + w.g * a.C_sg;
    float* y = a.y + w.b * a.y_sb + w.c0 * a.y_sd;
    for (int64_t t = t0; t < t1; ++t) {
        vf dt = load(delta + t * a.delta_st, a.delta_sd, width) + bias;
        if (a.delta_softplus) dt = softplus(dt);
        const vf ut = load(u + t * a.u_st, a.u_sd, width);
        const vf x = dt * ut;
        vf yt = Dv * ut;
        const float* Bt = B + t * a.B_st;
        const float* Ct = C + t * a.C_st;
#pragma GCC unroll 16
        for (int64_t n = 0; n < N; ++n) {
            h[n] = exp2v(dt * A2[n]) * h[n] + x * Bt[n * a.B_sn];
            yt += h[n] * Ct[n * a.C_sn];
        }
        if (z) yt *= silu(load(z + t * a.z_st, a.z_sd, width));
        store(y + t * a.y_st, a.y_sd, width, yt);
    }
    for (int64_t n = 0; n < N; ++n) state[n] = h[n];
}

// Each unit walks all L steps before the next starts. (Tiles of 16 - 128 steps over all of a thread's units, so that
// each row of token-major input is fetched once per thread instead of once per unit, measured no faster.)
void scan_units(const ScanArgs& a, int64_t first, int64_t last) {
    const int64_t N = a.state_size;
    std::vector<vf> state(2 * N);  // the unit's N state vectors, then its N vectors of A log2 e
    for (int64_t unit = first; unit < last; ++unit) {
        const Unit w = unit_at(a, unit);
        for (int64_t n = 0; n < N; ++n) {
            vf an = vf{}, hn = vf{};
            for (int i = 0; i < w.width; ++i) {
                an[i] = a.A[(w.c0 + i) * N + n] * LOG2_E;
                if (a.h0) hn[i] = a.h0[(w.b * a.dim + w.c0 + i) * N + n];
            }
            state[n] = hn;
            state[N + n] = an;
        }
        switch (N) {
            case 16: scan_steps<16>(a, w, 0, a.length, state.data()); break;
            case 8: scan_steps<8>(a, w, 0, a.length, state.data()); break;
            case 4: scan_steps<4>(a, w, 0, a.length, state.data()); break;
            default: scan_steps<0>(a, w, 0, a.length, state.data()); break;
        }
        if (a.h_last) {
            for (int64_t n = 0; n < N; ++n)
                for (int i = 0; i < w.width; ++i) a.h_last[(w.b * a.dim + w.c0 + i) * N + n] = state[n][i];
        }
    }
}

}  // namespace

extern "C" {

int mm_scan_abi_version() { return 1; }
int mm_scan_lanes() { return W; }
#ifdef _OPENMP
int mm_scan_openmp() { return 1; }
#else
int mm_scan_openmp() { return 0; }
#endif

// Runs the scan; returns 0, or 1 when the arguments are out of range (the Python wrapper checks them first).
int mm_selective_scan_fwd(const ScanArgs* args) {
    const ScanArgs& a = *args;
    if (a.state_size < 1 || a.state_size > MAX_STATE || a.groups < 1 || a.dim % a.groups != 0) return 1;
    const int64_t per_group = a.dim / a.groups;
    const int64_t units = a.batch * a.groups * ((per_group + W - 1) / W);
    int64_t threads = a.threads < 1 ? 1 : a.threads;
    if (threads > units) threads = units;
    // Contiguous ranges of blocks, one per thread.
#ifdef _OPENMP
    // Built with -fopenmp, this library links libgomp.so.1, which in a torch process is the libgomp torch loaded: the
    // scan runs on torch's own OpenMP workers. (Threads of our own competed with those workers, which spin for a
    // while after each parallel op: a 2-thread forward of 4 layers lost ~18 ms to it.)
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int64_t i = 0; i < threads; ++i) scan_units(a, units * i / threads, units * (i + 1) / threads);
#else
    if (threads <= 1) {
        scan_units(a, 0, units);
        return 0;
    }
    std::vector<std::thread> pool;
    pool.reserve(threads - 1);
    for (int64_t i = 1; i < threads; ++i)
        pool.emplace_back(scan_units, std::cref(a), units * i / threads, units * (i + 1) / threads);
    scan_units(a, 0, units / threads);
    for (auto& th : pool) th.join();
#endif
    return 0;
}

}  // extern "C"
