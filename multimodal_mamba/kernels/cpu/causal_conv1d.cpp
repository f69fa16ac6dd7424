// Causal depthwise conv (+ bias, + SiLU) on the CPU in one pass, channels in the SIMD lanes.
//
// Contract: causal_conv1d_ref in multimodal_mamba/modeling/ops_selective_scan.py (the reference):
//
//   out[b, c, t] = act(bias[c] + sum_k weight[c, k] x[b, c, t - (W - 1) + k]),
//
// where steps before 0 read initial_state[b, c, W - 1 + s] (zeros without one). The PyTorch path does W + 1 passes
// over (batch, L, dim) memory (W shifted multiply-adds and the activation); this kernel reads each input once and
// writes each output once. Work is split over (batch, 64-step tiles).
//
// Built at first use with the system C++ compiler (build.py) and called through ctypes on float32 tensors of any
// strides; forward only.

#include <cstdint>

#include "kernel_common.h"

using namespace mm_kernels;

namespace {

constexpr int64_t TILE = 64;  // steps per unit of work
constexpr int MAX_WIDTH = 16;  // the Python wrapper takes no wider kernel

}  // namespace

extern "C" {

// Strides in elements. x, out: (batch, dim, L); initial_state: (batch, dim, width - 1) or null; taps: the weight
// transposed, (width, dim) contiguous; bias: (dim,) contiguous or null. All float32.
struct ConvArgs {
    const float* x; int64_t x_sb, x_sd, x_st;
    const float* taps;
    const float* bias;
    const float* initial_state; int64_t s_sb, s_sd, s_st;
    float* out; int64_t o_sb, o_sd, o_st;
    int64_t batch, dim, length, width;
    int32_t silu;
    int32_t threads;
};

}  // extern "C"

namespace {

// Steps [t0, t1) of batch row b, all channels. Row by row (each row of token-major x read front to back, so the
// hardware prefetcher streams it); walking one block of channels down the steps instead reads one cache line per 4 KB
// row and ran ~4x slower.
void conv_tile(const ConvArgs& a, int64_t b, int64_t t0, int64_t t1) {
    const int64_t K = a.width;
    const float* x = a.x + b * a.x_sb;
    float* out = a.out + b * a.o_sb;
    for (int64_t t = t0; t < t1; ++t) {
        for (int64_t c0 = 0; c0 < a.dim; c0 += W) {
            const int width = static_cast<int>(a.dim - c0 < W ? a.dim - c0 : W);
            vf acc = a.bias ? load(a.bias + c0, 1, width) : vf{};
            for (int64_t k = 0; k < K; ++k) {
                const int64_t s = t - (K - 1) + k;  // the input step tap k reads
                vf v;
                if (s >= 0) {
                    v = load(x + c0 * a.x_sd + s * a.x_st, a.x_sd, width);
                } else if (a.initial_state) {
                    v = load(a.initial_state + b * a.s_sb + c0 * a.s_sd + (K - 1 + s) * a.s_st, a.s_sd, width);
                } else {
                    continue;
                }
                acc += load(a.taps + k * a.dim + c0, 1, width) * v;
            }
            if (a.silu) acc = silu(acc);
            store(out + c0 * a.o_sd + t * a.o_st, a.o_sd, width, acc);
        }
    }
}

void conv_units(const ConvArgs& a, int64_t first, int64_t last) {
    const int64_t tiles = (a.length + TILE - 1) / TILE;
    for (int64_t unit = first; unit < last; ++unit) {
        const int64_t b = unit / tiles, t0 = (unit % tiles) * TILE;
        conv_tile(a, b, t0, t0 + TILE < a.length ? t0 + TILE : a.length);
    }
}

}  // namespace

extern "C" {

int mm_conv_abi_version() { return 1; }

// Runs the conv; returns 0, or 1 when the arguments are out of range (the Python wrapper checks them first).
int mm_causal_conv1d_fwd(const ConvArgs* args) {
    const ConvArgs& a = *args;
    if (a.width < 1 || a.width > MAX_WIDTH || a.length < 1) return 1;
    const int64_t units = a.batch * ((a.length + TILE - 1) / TILE);
    parallel_ranges(units, a.threads, [&a](int64_t first, int64_t last) { conv_units(a, first, last); });
    return 0;
}

}  // extern "C"
