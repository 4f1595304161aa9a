/* llama.cpp's block-parameter searches, compiled: the same arithmetic as the numpy reference in
 * lowbit/quant/ggml_blocks.py, bit for bit, at C speed.
 *
 * Why this file exists: the numpy searches keep ggml's float order by summing element after element
 * with one vector add per element across all lanes, so each trial costs a few dozen numpy calls;
 * that made lowbit's RTN GGUF 2.5x slower than llama-quantize on a Llama-3-8B shape.
 *
 * Exactness rules (they mirror ggml-quants.c as the numpy module documents):
 *   - float32 everywhere, built with -ffp-contract=off and without fast-math, so each a*b + c rounds
 *     twice and no sum is reassociated;
 *   - every sum runs over the elements in index order;
 *   - nearest_int is ggml's 12582912 trick (round half to even, wrapping outside +-2^22).
 *
 * Layout: lane-major. x is [n_lanes][n] (one lane = one sub-block of n consecutive weights), and so are
 * the weights and the codes. Lanes are independent. Internally G lanes are gathered into
 * structure-of-arrays buffers [n][G] so that the compiler vectorises across lanes while every lane
 * keeps its own sequential sums: the same trick the numpy code plays with its lane axis.
 */
#include <stdint.h>
#include <string.h>
#include <math.h>

#ifndef G
#if defined(__AVX__)
#define G 16         /* lanes processed together: two 256-bit vectors (independent chains for the adds) */
#else
#define G 8          /* two 128-bit vectors (SSE2, NEON) */
#endif
#endif
#define MAXN 32      /* longest lane: legacy blocks of 32 */

static inline int32_t nearest_int(float v) {
    float f = v + 12582912.0f;
    int32_t i;
    memcpy(&i, &f, sizeof i);
    return (i & 0x007fffff) - 0x00400000;
}

static inline int32_t clampi(int32_t v, int32_t lo, int32_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

/* G lanes side by side: GCC/clang vector extensions, so every operation is one IEEE float32 (or int32)
 * operation per lane, exactly as the scalar code, and the compiler emits SIMD for whatever the host has. */
typedef float vf __attribute__((vector_size(4 * G)));
typedef int32_t vi __attribute__((vector_size(4 * G)));

static inline vf splat(float v) { return (vf){0} + v; }
static inline vi splati(int32_t v) { return (vi){0} + v; }
static inline vi vnearest(vf v) { vf f = v + 12582912.0f; vi i = (vi)f; return (i & 0x007fffff) - 0x00400000; }
static inline vi vclamp(vi q, int32_t lo, int32_t hi) {
    vi below = q < lo, above = q > hi;
    q = (q & ~below) | (splati(lo) & below);
    return (q & ~above) | (splati(hi) & above);
}
static inline vf vtof(vi q) { return __builtin_convertvector(q, vf); }
static inline vf vpick(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); }   /* mask ? a : b */
static inline vi vpicki(vi mask, vi a, vi b) { return (a & mask) | (b & ~mask); }
static inline vf vabs(vf v) { return (vf)((vi)v & 0x7fffffff); }

/* Gather lanes [l0, l0+cnt) of a lane-major [N][n] array into S[n] (lane l in slot l); missing lanes are 0. */
static void gather(const float *src, int64_t l0, int cnt, int n, vf S[MAXN]) {
    for (int i = 0; i < n; i++) {
        float tmp[G] = {0};
        for (int l = 0; l < cnt; l++) tmp[l] = src[(l0 + l) * n + i];
        memcpy(&S[i], tmp, sizeof tmp);
    }
}

static void scatter_codes(const vi C[MAXN], int64_t l0, int cnt, int n, int32_t *dst) {
    for (int i = 0; i < n; i++) {
        int32_t tmp[G];
        memcpy(tmp, &C[i], sizeof tmp);
        for (int l = 0; l < cnt; l++) dst[(l0 + l) * n + i] = tmp[l];
    }
}

static inline float lane(vf v, int l) { float t[G]; memcpy(t, &v, sizeof t); return t[l]; }

/* numpy's signed_absmax per lane: the first element of largest magnitude; +0 when all are zero, and 0
 * when the lane holds a NaN (numpy's argmax stops at the first NaN, whose magnitude is not > 0). */
static vf signed_absmax(const vf X[MAXN], int n) {
    float out[G];
    for (int l = 0; l < G; l++) {
        float amax = 0.0f, mx = 0.0f;
        for (int i = 0; i < n; i++) {
            float v = lane(X[i], l), a = fabsf(v);
            if (a != a) { mx = 0.0f; break; }
            if (a > amax) { amax = a; mx = v; }
        }
        out[l] = mx;
    }
    vf r;
    memcpy(&r, out, sizeof r);
    return r;
}

/* ---------------------------------------------------------------- make_qx_quants (rmse_type 1) */

void lb_search_symmetric(const float *x, const float *weights, int64_t N, int n, int nmax,
                         float *scale_out, int32_t *codes_out) {
    vf X[MAXN], W[MAXN], WX[MAXN];
    vi L[MAXN], B[MAXN];
    for (int64_t l0 = 0; l0 < N; l0 += G) {
        int cnt = (int)((N - l0) < G ? (N - l0) : G);
        gather(x, l0, cnt, n, X);
        if (weights) gather(weights, l0, cnt, n, W);
        else for (int i = 0; i < n; i++) W[i] = X[i] * X[i];
        for (int i = 0; i < n; i++) WX[i] = W[i] * X[i];
        vf mx = signed_absmax(X, n), scale = splat(0.0f), best = splat(0.0f);
        for (int step = 0; step < 19; step++) {   /* step 0: the plain trial; then -9..9 without 0 */
            int s = step == 0 ? 0 : (step <= 9 ? step - 10 : step - 9);
            vf iscale = step == 0 ? splat((float)(-nmax)) / mx : -splat((float)nmax + 0.1f * (float)s) / mx;
            vf sumlx = splat(0.0f), suml2 = splat(0.0f);
            for (int i = 0; i < n; i++) {
                L[i] = vclamp(vnearest(iscale * X[i]), -nmax, nmax - 1);
                vf lv = vtof(L[i]);
                sumlx += WX[i] * lv;
                suml2 += W[i] * lv * lv;
            }
            if (step == 0) {
                scale = vpick(suml2 != 0.0f, sumlx / suml2, splat(0.0f));
                best = scale * sumlx;
                memcpy(B, L, sizeof B);
                continue;
            }
            vi better = (suml2 > 0.0f) & (sumlx * sumlx > best * suml2);
            for (int i = 0; i < n; i++) B[i] = vpicki(better, L[i], B[i]);
            scale = vpick(better, sumlx / suml2, scale);
            best = vpick(better, scale * sumlx, best);
        }
        vi zero = vabs(mx) < 1e-15f;
        vf sc = vpick(zero, splat(0.0f), scale);
        for (int i = 0; i < n; i++) B[i] = vpicki(zero, splati(0), B[i] + nmax);
        for (int l = 0; l < cnt; l++) scale_out[l0 + l] = lane(sc, l);
        scatter_codes(B, l0, cnt, n, codes_out);
    }
}

/* ---------------------------------------------------------------- make_qkx2_quants / make_qkx3_quants */

/* Per lane, sum_i w_i * f(scale * L_i + lo - x_i) in index order, f = |.| (use_mad) or square. */
static vf weighted_error(const vf X[MAXN], const vf W[MAXN], const vi L[MAXN], vf scale, vf lo, int n,
                         int use_mad) {
    vf out = splat(0.0f);
    if (use_mad) {
        for (int i = 0; i < n; i++) out += W[i] * vabs(scale * vtof(L[i]) + lo - X[i]);
    } else {
        for (int i = 0; i < n; i++) {
            vf diff = scale * vtof(L[i]) + lo - X[i];
            out += W[i] * (diff * diff);
        }
    }
    return out;
}

void lb_search_affine(const float *x, const float *weights, int64_t N, int n, int nmax, float rmin,
                      float rdelta, int nstep, int use_mad, float *scale_out, float *min_out,
                      int32_t *codes_out) {
    vf X[MAXN], W[MAXN];
    vi L[MAXN], B[MAXN];
    for (int64_t l0 = 0; l0 < N; l0 += G) {
        int cnt = (int)((N - l0) < G ? (N - l0) : G);
        gather(x, l0, cnt, n, X);
        gather(weights, l0, cnt, n, W);
        vf mn = X[0], mxv = X[0], sum_w = W[0], sum_x = W[0] * X[0];
        for (int i = 1; i < n; i++) {
            mn = vpick(X[i] < mn, X[i], mn);
            mxv = vpick(X[i] > mxv, X[i], mxv);
            sum_w += W[i];
            sum_x += W[i] * X[i];
        }
        vf lo0 = vpick(mn < 0.0f, mn, splat(0.0f));   /* np.minimum(min, 0) */
        vf hi = mxv, lo = lo0;
        /* the starting point: the min/max range and the error of its rounding */
        vf iscale0 = splat((float)nmax) / (hi - lo);
        vf scale = splat(1.0f) / iscale0;
        for (int i = 0; i < n; i++) B[i] = vclamp(vnearest(iscale0 * (X[i] - lo)), 0, nmax);
        vf best = weighted_error(X, W, B, scale, lo, n, use_mad);
        for (int step = 0; step <= nstep; step++) {
            vf iscale = splat(rmin + rdelta * (float)step + (float)nmax) / (hi - lo);
            vf sum_l = splat(0.0f), sum_l2 = splat(0.0f), sum_xl = splat(0.0f);
            for (int i = 0; i < n; i++) {
                L[i] = vclamp(vnearest(iscale * (X[i] - lo)), 0, nmax);
                vf lv = vtof(L[i]);
                vf wl = W[i] * lv;
                sum_l += wl;
                sum_l2 += wl * lv;
                sum_xl += wl * X[i];
            }
            vf det = sum_w * sum_l2 - sum_l * sum_l;
            vf this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            vf this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            vi clamp = this_min > 0.0f;
            this_scale = vpick(clamp, sum_xl / sum_l2, this_scale);
            this_min = vpick(clamp, splat(0.0f), this_min);
            vf cur = weighted_error(X, W, L, this_scale, this_min, n, use_mad);
            vi better = (det > 0.0f) & (cur < best);
            for (int i = 0; i < n; i++) B[i] = vpicki(better, L[i], B[i]);
            best = vpick(better, cur, best);
            scale = vpick(better, this_scale, scale);
            lo = vpick(better, this_min, lo);
        }
        vi flat = hi == lo0;
        vf sc = vpick(flat, splat(0.0f), scale), the_min = -vpick(flat, lo0, lo);
        for (int i = 0; i < n; i++) B[i] = vpicki(flat, splati(0), B[i]);
        for (int l = 0; l < cnt; l++) {
            scale_out[l0 + l] = lane(sc, l);
            min_out[l0 + l] = lane(the_min, l);
        }
        scatter_codes(B, l0, cnt, n, codes_out);
    }
}

/* ---------------------------------------------------------------- coordinate descent over the codes */

/* ggml's refinement shared by make_q3_quants (positive == 0) and make_qp_quants (positive == 1), for one
 * lane held in plain arrays. See refine_levels in ggml_blocks.py for the rules. */
static void refine_lane(const float *x, const float *w, float *lv, int n, int nmax, int positive,
                        float *sumlx_out, float *suml2_out) {
    float wx[MAXN];
    float sumlx = 0.0f, suml2 = 0.0f;
    for (int i = 0; i < n; i++) {
        wx[i] = w[i] * x[i];
        sumlx += wx[i] * lv[i];
        suml2 += w[i] * lv[i] * lv[i];
    }
    if (positive)
        for (int i = 0; i < n; i++) lv[i] = (float)(((int32_t)lv[i]) & 0xFF);
    for (int pass = 0; pass < 5; pass++) {
        int changed = 0;
        for (int i = 0; i < n; i++) {
            float old = lv[i];
            float slx = sumlx - wx[i] * old;
            float sl2 = suml2 - w[i] * old * old;
            int32_t q = nearest_int(x[i] * sl2 / slx);
            q = positive ? (q < nmax ? q : nmax) : clampi(q, -nmax, nmax - 1);
            float nf = (float)q;
            float nslx = slx + wx[i] * nf;
            float nsl2 = sl2 + w[i] * nf * nf;
            int ok = (slx > 0.0f) & (positive ? (sl2 > 0.0f) : (nsl2 > 0.0f)) & (nf != old)
                     & (nslx * nslx * suml2 > sumlx * sumlx * nsl2);
            if (ok) {
                changed = 1;
                lv[i] = positive ? (float)(q & 0xFF) : nf;
                sumlx = nslx;
                suml2 = nsl2;
            }
        }
        if (!changed) break;
    }
    *sumlx_out = sumlx;
    *suml2_out = suml2;
}

static float lane_absmax(const float *x, int n) {
    float amax = 0.0f, mx = 0.0f;
    for (int i = 0; i < n; i++) {
        float a = fabsf(x[i]);
        if (a != a) return 0.0f;
        if (a > amax) { amax = a; mx = x[i]; }
    }
    return mx;
}

/* make_q3_quants with do_rmse (the Q3_K reference path). */
void lb_search_symmetric_rmse(const float *x, int64_t N, int n, int nmax, float *scale_out, int32_t *codes_out) {
    for (int64_t k = 0; k < N; k++) {
        const float *xs = x + k * n;
        float w[MAXN], lv[MAXN], sumlx, suml2;
        float mx = lane_absmax(xs, n);
        float iscale = (float)(-nmax) / mx;
        for (int i = 0; i < n; i++) {
            w[i] = xs[i] * xs[i];
            lv[i] = (float)clampi(nearest_int(iscale * xs[i]), -nmax, nmax - 1);
        }
        refine_lane(xs, w, lv, n, nmax, 0, &sumlx, &suml2);
        int zero = fabsf(mx) < 1e-15f;
        scale_out[k] = zero ? 0.0f : (suml2 > 0.0f ? sumlx / suml2 : 0.0f);
        for (int i = 0; i < n; i++) codes_out[k * n + i] = zero ? 0 : (int32_t)lv[i] + nmax;
    }
}

static float positive_mse(const float *x, const float *w, int n, float scale, const float *lv) {
    float s = 0.0f;
    for (int i = 0; i < n; i++) {
        float diff = x[i] - scale * lv[i];
        s += w[i] * diff * diff;
    }
    return s;
}

/* make_qp_quants: a non-negative scale for non-negative values onto 0..nmax. */
void lb_search_positive(const float *x, const float *weights, int64_t N, int n, int nmax, float *scale_out,
                        int32_t *codes_out) {
    for (int64_t k = 0; k < N; k++) {
        const float *xs = x + k * n, *w = weights + k * n;
        float lv[MAXN], sumlx, suml2;
        float mx = xs[0];
        for (int i = 1; i < n; i++) if (xs[i] > mx) mx = xs[i];
        mx = mx > 0.0f ? mx : 0.0f;
        float iscale = (float)nmax / mx;
        for (int i = 0; i < n; i++) lv[i] = (float)(nearest_int(iscale * xs[i]) & 0xFF);
        float best = positive_mse(xs, w, n, 1.0f / iscale, lv);
        for (int s = -4; s <= 4; s++) {
            if (s == 0) continue;
            float is = (0.1f * (float)s + (float)nmax) / mx;
            for (int i = 0; i < n; i++) {
                int32_t q = nearest_int(is * xs[i]);
                lv[i] = (float)(q < nmax ? q : nmax);
            }
            float cur = positive_mse(xs, w, n, 1.0f / is, lv);
            if (cur < best) { best = cur; iscale = is; }
        }
        for (int i = 0; i < n; i++) {
            int32_t q = nearest_int(iscale * xs[i]);
            lv[i] = (float)(q < nmax ? q : nmax);
        }
        refine_lane(xs, w, lv, n, nmax, 1, &sumlx, &suml2);
        int zero = mx < 1e-15f;
        scale_out[k] = zero ? 0.0f : (suml2 > 0.0f ? sumlx / suml2 : 0.0f);
        for (int i = 0; i < n; i++) codes_out[k * n + i] = zero ? 0 : (int32_t)lv[i];
    }
}

/* ---------------------------------------------------------------- non-linear levels (IQ4_NL / IQ4_XS) */

/* The level best_index_int8 picks for v, per lane: levels[] ascending, nlev >= 2. idx counts the inner levels
 * not above v (as !(v < level), so a NaN lands on the last level like ggml's binary search), lo/hi are the
 * two levels around v, and v goes to lo when (v - lo) < (hi - v) in float32, else to hi. Below the first or
 * above the last level this comparison already picks the end level. */
static inline vf vbest_level(vf v, const float *levels, int nlev) {
    vf lo = splat(levels[0]), hi = splat(levels[1]);
    for (int k = 1; k < nlev - 1; k++) {
        vi m = ~(v < levels[k]);
        lo = vpick(m, splat(levels[k]), lo);
        hi = vpick(m, splat(levels[k + 1]), hi);
    }
    return vpick((v - lo) < (hi - v), lo, hi);
}

/* The same choice as an index, for a flat array of values. */
void lb_best_index(const float *v, int64_t count, const float *levels, int nlev, int32_t *out) {
    for (int64_t k0 = 0; k0 < count; k0 += G) {
        int cnt = (int)((count - k0) < G ? (count - k0) : G);
        float tmp[G] = {0};
        memcpy(tmp, v + k0, sizeof(float) * cnt);
        vf x;
        memcpy(&x, tmp, sizeof x);
        vf lo = splat(levels[0]), hi = splat(levels[1]);
        vi idx = splati(1);
        for (int k = 1; k < nlev - 1; k++) {
            vi m = ~(x < levels[k]);
            lo = vpick(m, splat(levels[k]), lo);
            hi = vpick(m, splat(levels[k + 1]), hi);
            idx -= m;   /* a true mask is -1 */
        }
        idx += (x - lo) < (hi - x);
        int32_t r[G];
        memcpy(r, &idx, sizeof r);
        memcpy(out + k0, r, sizeof(int32_t) * cnt);
    }
}

/* quantize_row_iq4_nl_impl's search for one group per lane: the float32 scale (0 for groups whose largest
 * |x| is below GROUP_MAX_EPS). weights NULL means x^2. See search_iq4 in ggml_blocks.py. */
void lb_search_nonlinear(const float *x, const float *weights, int64_t N, int n, const float *levels, int nlev,
                         int ntry, float *scale_out) {
    vf X[MAXN], W[MAXN];
    for (int64_t l0 = 0; l0 < N; l0 += G) {
        int cnt = (int)((N - l0) < G ? (N - l0) : G);
        gather(x, l0, cnt, n, X);
        if (weights) gather(weights, l0, cnt, n, W);
        else for (int i = 0; i < n; i++) W[i] = X[i] * X[i];
        vf mx = signed_absmax(X, n);
        vf d = splat(0.0f), best = splat(0.0f);
        for (int t = -1; t <= 2 * ntry; t++) {   /* t = -1: the first scale, then itry = t - ntry */
            vf inv = t < 0 ? splat(1.0f) / (-mx / levels[0]) : splat((float)(t - ntry + (int)levels[0])) / mx;
            vf sumqx = splat(0.0f), sumq2 = splat(0.0f);
            for (int i = 0; i < n; i++) {
                vf q = vbest_level(inv * X[i], levels, nlev);
                vf wq = W[i] * q;
                sumqx += wq * X[i];
                sumq2 += wq * q;
            }
            if (t < 0) {
                d = vpick(sumq2 > 0.0f, sumqx / sumq2, splat(0.0f));
                best = d * sumqx;
                continue;
            }
            vi better = (sumq2 > 0.0f) & (sumqx * sumqx > best * sumq2);
            d = vpick(better, sumqx / sumq2, d);
            best = vpick(better, d * sumqx, best);
        }
        vf sc = vpick(vabs(mx) < 1e-15f, splat(0.0f), d);
        for (int l = 0; l < cnt; l++) scale_out[l0 + l] = lane(sc, l);
    }
}

/* ---------------------------------------------------------------- sums */

/* Each row of a [N][n] array summed in index order: from 0 (first == 0) or starting at its first element. */
void lb_row_sum(const float *a, int64_t N, int n, int first, float *out) {
    for (int64_t k = 0; k < N; k++) {
        const float *r = a + k * n;
        float s = first ? r[0] : 0.0f + r[0];
        for (int i = 1; i < n; i++) s += r[i];
        out[k] = s;
    }
}

/* ---------------------------------------------------------------- grid i-quants: IQ2_XXS/XS/S, IQ3_XXS/S */

/* The grid a search rounds onto, as ggml's iq2xs_init_impl / iq3xs_init_impl keep it: points [G][group] are the
 * grid's 2L+1 as float; kmap[u] (u packs the group's levels, `bits` each) is the grid index of u, or
 * -(offset + 1) where lists[offset] = count and the next count entries are u's neighbour indices. */
typedef struct {
    int group, bits, top;           /* weights per point, bits per level in u, highest level rounded to */
    const float *points;
    const int32_t *kmap;
    const uint16_t *lists;
} grid_t;

/* iq2_find_best_neighbour / iq3_find_best_neighbour: among u's listed points, the first of the smallest
 * sum_i w_i (scale q_i - x_i)^2 over one group. */
static int grid_best_neighbour(const grid_t *g, const uint16_t *list, const float *x, const float *w, float scale) {
    float best = 3.402823466e+38f;
    int index = -1;
    for (int j = 1; j <= list[0]; j++) {
        const float *q = g->points + g->group * (int)list[j];
        float d2 = 0.0f;
        for (int i = 0; i < g->group; i++) {
            float diff = scale * q[i] - x[i];
            d2 += w[i] * diff * diff;
        }
        if (d2 < best) { best = d2; index = list[j]; }
    }
    return index;
}

/* Round the groups of one lane at 1/inv onto the grid: every wanted group gets the grid index of its rounded
 * levels, or, off the grid, of its best neighbour at `scale`; on[k] says which it was. */
static void grid_snap(const grid_t *g, const float *x, const float *waux, int ng, float inv, float scale,
                      const int *want, int *index, int *on) {
    for (int k = 0; k < ng; k++) {
        if (!want[k]) continue;
        const float *xk = x + g->group * k;
        int u = 0;
        for (int i = 0; i < g->group; i++)
            u |= clampi(nearest_int(0.5f * (inv * xk[i] - 1.0f)), 0, g->top) << (g->bits * i);
        int32_t m = g->kmap[u];
        on[k] = m >= 0;
        index[k] = m >= 0 ? m : grid_best_neighbour(g, g->lists - m - 1, xk, waux + g->group * k, scale);
    }
}

static void grid_sums(const grid_t *g, const float *x, const float *w, int n, const int *index, float *sumqx,
                      float *sumq2) {
    float sx = 0.0f, s2 = 0.0f;
    for (int i = 0; i < n; i++) {
        float q = g->points[g->group * index[i / g->group] + i % g->group];
        sx += w[i] * x[i] * q;
        s2 += w[i] * q * q;
    }
    *sumqx = sx;
    *sumq2 = s2;
}

/* The trials and last pass of ggml's quantize_row_{iq2_xxs,iq2_xs,iq2_s,iq3_xxs,iq3_s}_impl over lanes [N][n]
 * (one sub-block each, n <= 32) of sign-folded magnitudes x and weights w. Trial scales base / (center +
 * step * is), is = -ntrial..ntrial, starting from `start`; a lane no trial improves keeps start and counts its
 * groups as on the grid when start_on_grid. The last pass, at the best scale, redoes the groups off the grid
 * (redo 0), every group when one is off (redo 1, IQ3_S), or every group (redo 2, IQ2_XXS). Writes the signed
 * scale and the grid index of every group. Lanes with !(base > 0) are the caller's. */
void lb_search_grid(const float *x, const float *weights, const float *base, const float *start, int64_t N, int n,
                    int group, int bits, int top, float center, float step, int ntrial, int start_on_grid, int redo,
                    const float *points, const int32_t *kmap, const uint16_t *lists, float *scale_out,
                    int32_t *index_out) {
    const grid_t g = {group, bits, top, points, kmap, lists};
    const int ng = n / group;
    for (int64_t k = 0; k < N; k++) {
        const float *xs = x + k * n, *w = weights + k * n;
        float waux[MAXN];
        for (int i = 0; i < n; i++) waux[i] = sqrtf(w[i]);
        int index[MAXN] = {0}, on[MAXN], aux[MAXN], aux_on[MAXN], want[MAXN];
        for (int j = 0; j < ng; j++) { on[j] = start_on_grid; want[j] = 1; }
        float scale = start[k], best = 0.0f, sumqx, sumq2;
        for (int is = -ntrial; is <= ntrial; is++) {
            float inv = (center + (float)is * step) / base[k];
            grid_snap(&g, xs, waux, ng, inv, 1.0f / inv, want, aux, aux_on);
            grid_sums(&g, xs, w, n, aux, &sumqx, &sumq2);
            if (sumq2 > 0.0f && sumqx * sumqx > best * sumq2) {
                scale = sumqx / sumq2;
                best = scale * sumqx;
                for (int j = 0; j < ng; j++) { index[j] = aux[j]; on[j] = aux_on[j]; }
            }
        }
        int off = 0;
        for (int j = 0; j < ng; j++) off |= !on[j];
        if ((off || redo == 2) && scale > 0.0f) {
            for (int j = 0; j < ng; j++) want[j] = redo ? 1 : !on[j];
            grid_snap(&g, xs, waux, ng, 1.0f / scale, scale, want, index, aux_on);
            grid_sums(&g, xs, w, n, index, &sumqx, &sumq2);
            if (sumq2 > 0.0f) scale = sumqx / sumq2;
        }
        scale_out[k] = scale;
        for (int j = 0; j < ng; j++) index_out[k * ng + j] = index[j];
    }
}
