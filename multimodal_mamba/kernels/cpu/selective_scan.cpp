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

#include "kernel_common.h"

using namespace mm_kernels;

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

constexpr int MAX_STATE = 256;

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

// One unit: all L steps of its W channels, the N states in vector registers from the initial state (or zeros) to
// the final one. NS: the state size if known at compile time (the loop over states is then unrolled and the states
// live in registers), 0 for any N <= MAX_STATE. (Tiles of 16 - 128 steps over all of a thread's units, so that each
// row of token-major input is fetched once per thread instead of once per unit, measured no faster.)
template <int NS>
void scan_unit(const ScanArgs& a, const Unit& w) {
    const int64_t N = NS > 0 ? NS : a.state_size;
    const int width = w.width;
    vf h[NS > 0 ? NS : MAX_STATE];
    vf A2[NS > 0 ? NS : MAX_STATE];  // A log2 e
    for (int64_t n = 0; n < N; ++n) {
        vf an = vf{}, hn = vf{};
        for (int i = 0; i < width; ++i) {
            an[i] = a.A[(w.c0 + i) * N + n] * LOG2_E;
            if (a.h0) hn[i] = a.h0[(w.b * a.dim + w.c0 + i) * N + n];
        }
        A2[n] = an;
        h[n] = hn;
    }
    const vf Dv = a.D ? load(a.D + w.c0, 1, width) : vf{};
    const vf bias = a.delta_bias ? load(a.delta_bias + w.c0, 1, width) : vf{};
    const float* u = a.u + w.b * a.u_sb + w.c0 * a.u_sd;
    const float* delta = a.delta + w.b * a.delta_sb + w.c0 * a.delta_sd;
    const float* z = a.z ? a.z + w.b * a.z_sb + w.c0 * a.z_sd : nullptr;
    const float* B = a.B + w.b * a.B_sb + w.g * a.B_sg;
    const float* C = a.C + w.b * a.C_sb + w.g * a.C_sg;
    float* y = a.y + w.b * a.y_sb + w.c0 * a.y_sd;
    for (int64_t t = 0; t < a.length; ++t) {
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
    if (a.h_last) {
        for (int64_t n = 0; n < N; ++n)
            for (int i = 0; i < width; ++i) a.h_last[(w.b * a.dim + w.c0 + i) * N + n] = h[n][i];
    }
}

void scan_units(const ScanArgs& a, int64_t first, int64_t last) {
    for (int64_t unit = first; unit < last; ++unit) {
        const Unit w = unit_at(a, unit);
        switch (a.state_size) {
            case 16: scan_unit<16>(a, w); break;
            case 8: scan_unit<8>(a, w); break;
            case 4: scan_unit<4>(a, w); break;
            default: scan_unit<0>(a, w); break;
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
    parallel_ranges(units, a.threads, [&a](int64_t first, int64_t last) { scan_units(a, first, last); });
    return 0;
}

}  // extern "C"
