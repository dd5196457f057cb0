// Convolution geometry and the im2col / col2im building blocks shared by im2col.cpp (the
// unfolding kernels) and conv.cpp (the whole-op convolution).
//
//   cols[(c*kh + i)*kw + j, oh*OW + ow] = x[c, oh*sh - ph + i*dh, ow*sw - pw + j*dw]
//   (0 where the tap falls in the padding); col2im is the adjoint (a scatter-add).
#pragma once

#include "common.h"

#include <cstring>

namespace gpudiff {

struct ConvGeom {
    index_t H, W, kh, kw, sh, sw, ph, pw, dh, dw, OH, OW;
};

// Tap (i, j) of one input plane x (H, W) -> one row of cols, OH*OW long (0 in padding).
template <typename T>
inline void im2col_tap(const T* x, T* row, index_t i, index_t j, const ConvGeom& g) {
    const index_t woff = j * g.dw - g.pw;
    index_t lo, hi;
    output_range(woff, g.sw, g.W, g.OW, lo, hi);
    for (index_t oh = 0; oh < g.OH; ++oh) {
        T* out = row + oh * g.OW;
        const index_t ih = oh * g.sh - g.ph + i * g.dh;
        if (ih < 0 || ih >= g.H) {
            std::fill(out, out + g.OW, T(0));
            continue;
        }
        const T* in = x + ih * g.W;  // in[ow*sw + woff] is the tap of column ow
        std::fill(out, out + lo, T(0));
        if (g.sw == 1) {
            if (hi > lo) std::memcpy(out + lo, in + lo + woff, sizeof(T) * (hi - lo));
        } else {
            for (index_t ow = lo; ow < hi; ++ow) out[ow] = in[ow * g.sw + woff];
        }
        std::fill(out + hi, out + g.OW, T(0));
    }
}

// The adjoint: adds one row of cols (tap (i, j)) into the input plane x (H, W).
template <typename T>
inline void col2im_tap(const T* row, T* x, index_t i, index_t j, const ConvGeom& g) {
    const index_t woff = j * g.dw - g.pw;
    index_t lo, hi;
    output_range(woff, g.sw, g.W, g.OW, lo, hi);
    for (index_t oh = 0; oh < g.OH; ++oh) {
        const index_t ih = oh * g.sh - g.ph + i * g.dh;
        if (ih < 0 || ih >= g.H) continue;
        const T* in = row + oh * g.OW;
        T* out = x + ih * g.W;  // out[ow*sw + woff] receives column ow
        if (g.sw == 1) {
            for (index_t ow = lo; ow < hi; ++ow) out[ow + woff] += in[ow];
        } else {
            for (index_t ow = lo; ow < hi; ++ow) out[ow * g.sw + woff] += in[ow];
        }
    }
}

// (N, C*kh*kw, L) layout: one (n, c) plane -> its kh*kw consecutive rows.
template <typename T>
inline void im2col_plane(const T* x, T* rows, const ConvGeom& g) {
    const index_t L = g.OH * g.OW;
    for (index_t i = 0; i < g.kh; ++i)
        for (index_t j = 0; j < g.kw; ++j) im2col_tap(x, rows + (i * g.kw + j) * L, i, j, g);
}

template <typename T>
inline void col2im_plane(const T* rows, T* x, const ConvGeom& g) {
    const index_t L = g.OH * g.OW;
    std::fill(x, x + g.H * g.W, T(0));
    for (index_t i = 0; i < g.kh; ++i)
        for (index_t j = 0; j < g.kw; ++j) col2im_tap(rows + (i * g.kw + j) * L, x, i, j, g);
}

inline ConvGeom make_geom(index_t H, index_t W, int kh, int kw, int sh, int sw, int ph, int pw, int dh,
                   int dw, const char* name) {
    if (kh <= 0 || kw <= 0 || sh <= 0 || sw <= 0 || dh <= 0 || dw <= 0 || ph < 0 || pw < 0)
        throw py::value_error(std::string(name) +
                              ": kernel size, stride and dilation must be positive and "
                              "padding non-negative");
    ConvGeom g{H, W, kh, kw, sh, sw, ph, pw, dh, dw, 0, 0};
    g.OH = (H + 2 * ph - dh * (kh - 1) - 1) / sh + 1;
    g.OW = (W + 2 * pw - dw * (kw - 1) - 1) / sw + 1;
    if (H + 2 * ph - dh * (kh - 1) - 1 < 0 || W + 2 * pw - dw * (kw - 1) - 1 < 0)
        throw py::value_error(std::string(name) +
                              ": kernel size (with dilation) larger than the padded input");
    return g;
}

}  // namespace gpudiff
