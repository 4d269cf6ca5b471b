// illmrec's AVX-512 kernels as a ggml backend of two operations: flash attention
// (GGML_OP_FLASH_ATTN_EXT) and the GEGLU activation (GGML_OP_GLU, GEGLU), for the default build
// whose ggml CPU code is compiled for AVX2 only. The kernels carry target("avx512f,fma,f16c")
// attributes and run only where the CPU has them; src/engine/kernels.rs registers the backend (an
// "ACCEL" device, as ggml's BLAS backend is) when it does. llama.cpp then puts it before the CPU
// backend, and ggml's scheduler moves every such operation it supports here (same host buffers,
// so nothing is copied). What it does not support (ALiBi, logit soft-capping, attention sinks,
// quantized K/V, head sizes not a multiple of 64, other GLU kinds, non-f32 tensors) stays on
// ggml's CPU code.
//
// Attention computes softmax(scale * Q K^T + mask) V in f32: K and V are converted to f32 once
// per call (ggml's tiled kernel converts them again for every 64-query tile and head), K
// transposed so 16 cells fill a vector; each group of 4 query rows of one head is computed
// whole by one thread (OpenMP, the threads ggml uses), so results do not depend on the thread
// count. 64-cell blocks that the mask hides from all 4 rows are skipped. GEGLU computes
// gelu(x) * g with GELU's tanh approximation in f32 (ggml's CPU code looks GELU up in an f16
// table, one element at a time), rows split across threads.

#include "ggml.h"
#include "ggml-backend.h"
#include "ggml-backend-impl.h"

#include <immintrin.h>
#include <omp.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int ROWS = 4;   // query rows per work item
constexpr int CELLS = 64; // KV cells per block (4 vectors of 16)

struct KernelContext {
    int n_threads = 1;
    std::vector<float> kt; // K^T in f32: [DK][cells rounded up to CELLS]
    std::vector<float> v;  // V in f32: [cells][DV]
    std::vector<float> scratch; // per thread: masks [ROWS][cells], scores [ROWS][cells], one K row
};

std::atomic<uint64_t> g_attention_calls{0};
std::atomic<uint64_t> g_geglu_calls{0};

struct Params {
    float scale, max_bias, softcap;
};

Params params_of(const ggml_tensor * op) {
    Params p;
    std::memcpy(&p.scale, (const float *) op->op_params + 0, sizeof(float));
    std::memcpy(&p.max_bias, (const float *) op->op_params + 1, sizeof(float));
    std::memcpy(&p.softcap, (const float *) op->op_params + 2, sizeof(float));
    return p;
}

bool attention_supported(const ggml_tensor * op) {
    const ggml_tensor * q = op->src[0];
    const ggml_tensor * k = op->src[1];
    const ggml_tensor * v = op->src[2];
    const ggml_tensor * mask = op->src[3];
    const ggml_tensor * sinks = op->src[4];
    if (!q || !k || !v || sinks) {
        return false;
    }
    const Params p = params_of(op);
    if (p.max_bias != 0.0f || p.softcap != 0.0f) {
        return false;
    }
    if (q->type != GGML_TYPE_F32 || op->type != GGML_TYPE_F32 || k->type != v->type ||
        (k->type != GGML_TYPE_F16 && k->type != GGML_TYPE_F32)) {
        return false;
    }
    if (mask && mask->type != GGML_TYPE_F16 && mask->type != GGML_TYPE_F32) {
        return false;
    }
    const int64_t DK = k->ne[0], DV = v->ne[0];
    if (DK % 16 != 0 || DV % CELLS != 0 || q->ne[0] != DK || op->ne[0] != DV) {
        return false;
    }
    if (q->nb[0] != sizeof(float) || k->nb[0] != ggml_type_size(k->type) ||
        v->nb[0] != ggml_type_size(v->type) || op->nb[0] != sizeof(float) ||
        op->nb[1] != (size_t) DV * sizeof(float)) {
        return false;
    }
    // broadcasts as ggml's kernel allows them
    if (q->ne[2] % k->ne[2] != 0 || q->ne[3] % k->ne[3] != 0 || k->ne[2] != v->ne[2] ||
        k->ne[3] != v->ne[3] || k->ne[1] != v->ne[1]) {
        return false;
    }
    if (mask && (mask->ne[0] < k->ne[1] || mask->ne[1] < q->ne[1])) {
        return false;
    }
    return true;
}

__attribute__((target("avx512f,fma,f16c"))) inline __m512 exp512(__m512 x) {
    // e^x (attention: scores minus their maximum, <= 0; GEGLU: either sign), clamped to
    // [-104, 88]: Cody-Waite reduction, degree-6 polynomial, scaling by 2^n with vscalefps
    // (which flushes the most negative inputs to 0).
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.0f)), _mm512_set1_ps(88.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 y = _mm512_set1_ps(1.0f / 720.0f);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0f / 120.0f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0f / 24.0f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0f / 6.0f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(0.5f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(y, n);
}

__attribute__((target("avx512f,fma,f16c"))) void load_row_f32(const ggml_tensor * t, const char * src,
                                                               float * dst, int64_t n) {
    if (t->type == GGML_TYPE_F16) {
        const ggml_fp16_t * s = (const ggml_fp16_t *) src;
        int64_t i = 0;
        for (; i + 16 <= n; i += 16) {
            _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *) (s + i))));
        }
        for (; i < n; i++) {
            dst[i] = _cvtsh_ss(s[i]);
        }
    } else {
        std::memcpy(dst, src, n * sizeof(float));
    }
}

// One work item: rows [i1, i1 + nr) of head h (and batch i3), against the f32 K^T / V of its KV
// head. `mrow` and `s` are this thread's scratch, ROWS x ld floats each.
__attribute__((target("avx512f,fma,f16c"))) void attend(const ggml_tensor * dst, const KernelContext & c,
                                                         int64_t h, int64_t i3, int64_t i1, int nr,
                                                         int64_t n_kv, int64_t ld, float * mrow,
                                                         float * s, const Params & p) {
    const ggml_tensor * q = dst->src[0];
    const ggml_tensor * mask = dst->src[3];
    const int64_t DK = q->ne[0];
    const int64_t DV = dst->ne[0];
    const float * kt = c.kt.data();
    const float * vv = c.v.data();
    const __m512 neg_inf = _mm512_set1_ps(-INFINITY);

    const float * qr[ROWS];
    for (int r = 0; r < ROWS; r++) {
        const int64_t row = i1 + (r < nr ? r : nr - 1);
        qr[r] = (const float *) ((const char *) q->data + row * q->nb[1] + h * q->nb[2] + i3 * q->nb[3]);
        float * m = mrow + r * ld;
        if (mask) {
            const char * mr = (const char *) mask->data + row * mask->nb[1] +
                              (h % mask->ne[2]) * mask->nb[2] + (i3 % mask->ne[3]) * mask->nb[3];
            load_row_f32(mask, mr, m, n_kv);
        } else {
            std::memset(m, 0, n_kv * sizeof(float));
        }
        for (int64_t j = n_kv; j < ld; j++) {
            m[j] = -INFINITY;
        }
    }

    // scores, block by block
    for (int64_t cb = 0; cb < ld; cb += CELLS) {
        bool visible = false;
        for (int r = 0; r < nr && !visible; r++) {
            for (int j = 0; j < CELLS / 16; j++) {
                const __m512 m = _mm512_loadu_ps(mrow + r * ld + cb + 16 * j);
                if (_mm512_cmp_ps_mask(m, neg_inf, _CMP_NEQ_UQ)) {
                    visible = true;
                    break;
                }
            }
        }
        if (!visible) {
            for (int r = 0; r < ROWS; r++) {
                for (int j = 0; j < CELLS / 16; j++) {
                    _mm512_storeu_ps(s + r * ld + cb + 16 * j, neg_inf);
                }
            }
            continue;
        }
        __m512 acc[ROWS][4];
        for (int r = 0; r < ROWS; r++) {
            for (int j = 0; j < 4; j++) {
                acc[r][j] = _mm512_setzero_ps();
            }
        }
        const float * kd = kt + cb;
        for (int64_t d = 0; d < DK; d++, kd += ld) {
            const __m512 k0 = _mm512_loadu_ps(kd);
            const __m512 k1 = _mm512_loadu_ps(kd + 16);
            const __m512 k2 = _mm512_loadu_ps(kd + 32);
            const __m512 k3 = _mm512_loadu_ps(kd + 48);
            for (int r = 0; r < ROWS; r++) {
                const __m512 qd = _mm512_set1_ps(qr[r][d]);
                acc[r][0] = _mm512_fmadd_ps(qd, k0, acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(qd, k1, acc[r][1]);
                acc[r][2] = _mm512_fmadd_ps(qd, k2, acc[r][2]);
                acc[r][3] = _mm512_fmadd_ps(qd, k3, acc[r][3]);
            }
        }
        const __m512 sc = _mm512_set1_ps(p.scale);
        for (int r = 0; r < ROWS; r++) {
            for (int j = 0; j < 4; j++) {
                const __m512 m = _mm512_loadu_ps(mrow + r * ld + cb + 16 * j);
                const __mmask16 hidden = _mm512_cmp_ps_mask(m, neg_inf, _CMP_EQ_OQ);
                const __m512 x = _mm512_fmadd_ps(acc[r][j], sc, m);
                _mm512_storeu_ps(s + r * ld + cb + 16 * j, _mm512_mask_mov_ps(x, hidden, neg_inf));
            }
        }
    }

    // softmax numerators in place; sums
    float inv[ROWS];
    for (int r = 0; r < ROWS; r++) {
        float * sr = s + r * ld;
        __m512 mx = neg_inf;
        for (int64_t j = 0; j < ld; j += 16) {
            mx = _mm512_max_ps(mx, _mm512_loadu_ps(sr + j));
        }
        const float m = _mm512_reduce_max_ps(mx);
        if (m == -INFINITY) {
            std::memset(sr, 0, ld * sizeof(float));
            inv[r] = 0.0f;
            continue;
        }
        const __m512 mv = _mm512_set1_ps(m);
        __m512 sum = _mm512_setzero_ps();
        for (int64_t j = 0; j < ld; j += 16) {
            const __m512 x = _mm512_loadu_ps(sr + j);
            const __mmask16 hidden = _mm512_cmp_ps_mask(x, neg_inf, _CMP_EQ_OQ);
            const __m512 e = _mm512_maskz_mov_ps((__mmask16) ~hidden, exp512(_mm512_sub_ps(x, mv)));
            _mm512_storeu_ps(sr + j, e);
            sum = _mm512_add_ps(sum, e);
        }
        const float total = _mm512_reduce_add_ps(sum);
        inv[r] = total > 0.0f ? 1.0f / total : 0.0f;
    }

    // weighted sum of V, 64 output columns at a time
    for (int64_t dv = 0; dv < DV; dv += 64) {
        __m512 acc[ROWS][4];
        for (int r = 0; r < ROWS; r++) {
            for (int j = 0; j < 4; j++) {
                acc[r][j] = _mm512_setzero_ps();
            }
        }
        for (int64_t cb = 0; cb < n_kv; cb += 16) {
            bool any = false;
            for (int r = 0; r < nr && !any; r++) {
                any = _mm512_cmp_ps_mask(_mm512_loadu_ps(s + r * ld + cb), _mm512_setzero_ps(), _CMP_NEQ_UQ) != 0;
            }
            if (!any) {
                continue;
            }
            const int64_t end = cb + 16 < n_kv ? cb + 16 : n_kv;
            for (int64_t cell = cb; cell < end; cell++) {
                const float * vr = vv + cell * DV + dv;
                const __m512 v0 = _mm512_loadu_ps(vr);
                const __m512 v1 = _mm512_loadu_ps(vr + 16);
                const __m512 v2 = _mm512_loadu_ps(vr + 32);
                const __m512 v3 = _mm512_loadu_ps(vr + 48);
                for (int r = 0; r < ROWS; r++) {
                    const __m512 pr = _mm512_set1_ps(s[r * ld + cell]);
                    acc[r][0] = _mm512_fmadd_ps(pr, v0, acc[r][0]);
                    acc[r][1] = _mm512_fmadd_ps(pr, v1, acc[r][1]);
                    acc[r][2] = _mm512_fmadd_ps(pr, v2, acc[r][2]);
                    acc[r][3] = _mm512_fmadd_ps(pr, v3, acc[r][3]);
                }
            }
        }
        for (int r = 0; r < nr; r++) {
            // dst is permuted (0, 2, 1, 3): row (i3, i1 + r, h)
            float * out = (float *) ((char *) dst->data +
                                     (i3 * dst->ne[2] * dst->ne[1] + (i1 + r) * dst->ne[1] + h) * dst->nb[1]) + dv;
            const __m512 iv = _mm512_set1_ps(inv[r]);
            for (int j = 0; j < 4; j++) {
                _mm512_storeu_ps(out + 16 * j, _mm512_mul_ps(acc[r][j], iv));
            }
        }
    }
}

void flash_attn(KernelContext & c, ggml_tensor * dst) {
    const ggml_tensor * q = dst->src[0];
    const ggml_tensor * k = dst->src[1];
    const ggml_tensor * v = dst->src[2];
    const Params p = params_of(dst);
    const int64_t DK = k->ne[0], DV = v->ne[0];
    const int64_t n_kv = k->ne[1];
    const int64_t ld = (n_kv + CELLS - 1) / CELLS * CELLS;
    const int64_t N = q->ne[1], H = q->ne[2], B = q->ne[3];
    const int64_t rk2 = H / k->ne[2], rk3 = B / k->ne[3];
    const int nth = c.n_threads > 0 ? c.n_threads : 1;

    c.kt.resize(DK * ld);
    c.v.resize(n_kv * DV);
    const size_t per_thread = 2 * ROWS * ld + DK;
    c.scratch.resize((size_t) nth * per_thread);
    const int64_t groups = (N + ROWS - 1) / ROWS;

    for (int64_t k3 = 0; k3 < k->ne[3]; k3++) {
        for (int64_t kh = 0; kh < k->ne[2]; kh++) {
#pragma omp parallel num_threads(nth)
            {
                float * mine = c.scratch.data() + (size_t) omp_get_thread_num() * per_thread;
                float * kr = mine + 2 * ROWS * ld;
                // K^T and V in f32 (cells split across threads; padding cells are zero)
#pragma omp for schedule(static)
                for (int64_t cell = 0; cell < ld; cell++) {
                    if (cell < n_kv) {
                        load_row_f32(k, (const char *) k->data + cell * k->nb[1] + kh * k->nb[2] + k3 * k->nb[3], kr, DK);
                        for (int64_t d = 0; d < DK; d++) {
                            c.kt[d * ld + cell] = kr[d];
                        }
                        load_row_f32(v, (const char *) v->data + cell * v->nb[1] + kh * v->nb[2] + k3 * v->nb[3],
                                     c.v.data() + cell * DV, DV);
                    } else {
                        for (int64_t d = 0; d < DK; d++) {
                            c.kt[d * ld + cell] = 0.0f;
                        }
                    }
                }
                // every (batch, head of this KV head, 4-row group) whole on one thread
                const int64_t items = rk3 * rk2 * groups;
#pragma omp for schedule(dynamic, 1)
                for (int64_t it = 0; it < items; it++) {
                    const int64_t i3 = k3 * rk3 + it / (rk2 * groups);
                    const int64_t h = kh * rk2 + (it / groups) % rk2;
                    const int64_t i1 = (it % groups) * ROWS;
                    const int nr = (int) (N - i1 < ROWS ? N - i1 : ROWS);
                    attend(dst, c, h, i3, i1, nr, n_kv, ld, mine, mine + ROWS * ld, p);
                }
            }
        }
    }
    g_attention_calls.fetch_add(1, std::memory_order_relaxed);
}

// ---- GEGLU: gelu(x) * g, GELU with the tanh approximation (Gemma's gelu_pytorch_tanh) ----

bool glu_supported(const ggml_tensor * op) {
    const ggml_tensor * a = op->src[0];
    const ggml_tensor * b = op->src[1];
    if (!a || ggml_get_glu_op(op) != GGML_GLU_OP_GEGLU) {
        return false;
    }
    if (a->type != GGML_TYPE_F32 || op->type != GGML_TYPE_F32 || (b && b->type != GGML_TYPE_F32)) {
        return false;
    }
    if (!ggml_is_contiguous_1(a) || !ggml_is_contiguous_1(op) || (b && !ggml_is_contiguous_1(b))) {
        return false;
    }
    const int64_t nc = b ? a->ne[0] : a->ne[0] / 2;
    return op->ne[0] == nc && ggml_nrows(op) == ggml_nrows(a) && (!b || ggml_nrows(b) == ggml_nrows(a));
}

__attribute__((target("avx512f,fma,f16c"))) void geglu_row(int64_t n, float * y, const float * x, const float * g) {
    // gelu(x) = 0.5 x (1 + tanh(u)) = x / (1 + e^(-2u)), u = sqrt(2/pi) (x + 0.044715 x^3)
    const __m512 c1 = _mm512_set1_ps(-2.0f * 0.7978845608028654f);
    const __m512 c3 = _mm512_set1_ps(-2.0f * 0.7978845608028654f * 0.044715f);
    const __m512 one = _mm512_set1_ps(1.0f);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 xv = _mm512_loadu_ps(x + i);
        const __m512 x2 = _mm512_mul_ps(xv, xv);
        const __m512 m2u = _mm512_mul_ps(xv, _mm512_fmadd_ps(x2, c3, c1));
        const __m512 gelu = _mm512_div_ps(xv, _mm512_add_ps(one, exp512(m2u)));
        _mm512_storeu_ps(y + i, _mm512_mul_ps(gelu, _mm512_loadu_ps(g + i)));
    }
    for (; i < n; i++) {
        const float u = 0.7978845608028654f * (x[i] + 0.044715f * x[i] * x[i] * x[i]);
        y[i] = x[i] / (1.0f + std::exp(-2.0f * u)) * g[i];
    }
}

void geglu(const KernelContext & c, ggml_tensor * dst) {
    const ggml_tensor * a = dst->src[0];
    const ggml_tensor * b = dst->src[1];
    const int64_t nc = dst->ne[0];
    const int64_t nr = ggml_nrows(a);
    const int32_t swapped = ((const int32_t *) dst->op_params)[1];
    const int nth = c.n_threads > 0 ? c.n_threads : 1;
    // as ggml's CPU code: with two tensors, gelu of the first times the second; with one, its
    // halves (`swapped` picks which half goes through gelu)
#pragma omp parallel for num_threads(nth) schedule(static)
    for (int64_t r = 0; r < nr; r++) {
        const float * x = (const float *) ((const char *) a->data + r * a->nb[1]);
        const float * g = b ? (const float *) ((const char *) b->data + r * b->nb[1]) : x;
        if (!b) {
            x += swapped ? nc : 0;
            g += swapped ? 0 : nc;
        }
        geglu_row(nc, (float *) ((char *) dst->data + r * dst->nb[1]), x, g);
    }
    g_geglu_calls.fetch_add(1, std::memory_order_relaxed);
}

// ---- ggml backend plumbing (the pattern of ggml-blas.cpp) ----

const char * backend_name(ggml_backend_t) { return "illmrec-avx512"; }

void backend_free(ggml_backend_t backend) {
    delete (KernelContext *) backend->context;
    delete backend;
}

ggml_status graph_compute(ggml_backend_t backend, ggml_cgraph * g) {
    KernelContext * c = (KernelContext *) backend->context;
    for (int i = 0; i < ggml_graph_n_nodes(g); i++) {
        ggml_tensor * node = ggml_graph_node(g, i);
        if ((node->flags & GGML_TENSOR_FLAG_COMPUTE) == 0) {
            continue;
        }
        switch (node->op) {
            case GGML_OP_FLASH_ATTN_EXT:
                flash_attn(*c, node);
                break;
            case GGML_OP_GLU:
                geglu(*c, node);
                break;
            case GGML_OP_NONE:
            case GGML_OP_RESHAPE:
            case GGML_OP_VIEW:
            case GGML_OP_PERMUTE:
            case GGML_OP_TRANSPOSE:
                break;
            default:
                return GGML_STATUS_FAILED;
        }
    }
    return GGML_STATUS_SUCCESS;
}

ggml_backend_i backend_iface = {
    /* .get_name                = */ backend_name,
    /* .free                    = */ backend_free,
    /* .set_tensor_async        = */ NULL,
    /* .get_tensor_async        = */ NULL,
    /* .set_tensor_2d_async     = */ NULL,
    /* .get_tensor_2d_async     = */ NULL,
    /* .cpy_tensor_async        = */ NULL,
    /* .synchronize             = */ NULL,
    /* .graph_plan_create       = */ NULL,
    /* .graph_plan_free         = */ NULL,
    /* .graph_plan_update       = */ NULL,
    /* .graph_plan_compute      = */ NULL,
    /* .graph_compute           = */ graph_compute,
    /* .event_record            = */ NULL,
    /* .event_wait              = */ NULL,
    /* .graph_optimize          = */ NULL,
};

ggml_guid_t guid() {
    static ggml_guid g = {0x69, 0x6c, 0x6c, 0x6d, 0x72, 0x65, 0x63, 0x2d, 0x61, 0x74, 0x74, 0x6e, 0x2d, 0x76, 0x30, 0x31};
    return &g;
}

ggml_backend_reg_t reg();

ggml_backend_t backend_init() {
    return new ggml_backend{
        /* .guid    = */ guid(),
        /* .iface   = */ backend_iface,
        /* .device  = */ ggml_backend_reg_dev_get(reg(), 0),
        /* .context = */ new KernelContext,
    };
}

void set_n_threads(ggml_backend_t backend, int n) {
    if (backend && ggml_guid_matches(backend->guid, guid())) {
        ((KernelContext *) backend->context)->n_threads = n;
    }
}

const char * dev_name(ggml_backend_dev_t) { return "illmrec-avx512"; }
const char * dev_description(ggml_backend_dev_t) { return "AVX-512 attention and GEGLU (illmrec)"; }
void dev_memory(ggml_backend_dev_t, size_t * free, size_t * total) { *free = 0; *total = 0; }
enum ggml_backend_dev_type dev_type(ggml_backend_dev_t) { return GGML_BACKEND_DEVICE_TYPE_ACCEL; }

void dev_props(ggml_backend_dev_t dev, ggml_backend_dev_props * props) {
    props->name = dev_name(dev);
    props->description = dev_description(dev);
    props->type = dev_type(dev);
    dev_memory(dev, &props->memory_free, &props->memory_total);
    props->caps = {
        /* .async                 = */ false,
        /* .host_buffer           = */ false,
        /* .buffer_from_host_ptr  = */ true,
        /* .events                = */ false,
        /* .mmap_support          = */ true,
    };
}

ggml_backend_t dev_init(ggml_backend_dev_t, const char *) { return backend_init(); }
ggml_backend_buffer_type_t dev_buffer_type(ggml_backend_dev_t) { return ggml_backend_cpu_buffer_type(); }
ggml_backend_buffer_t dev_buffer_from_host_ptr(ggml_backend_dev_t, void * ptr, size_t size, size_t) {
    return ggml_backend_cpu_buffer_from_ptr(ptr, size);
}

bool dev_supports_op(ggml_backend_dev_t, const ggml_tensor * op) {
    switch (op->op) {
        case GGML_OP_NONE:
        case GGML_OP_RESHAPE:
        case GGML_OP_VIEW:
        case GGML_OP_PERMUTE:
        case GGML_OP_TRANSPOSE:
            return true;
        case GGML_OP_FLASH_ATTN_EXT:
            return attention_supported(op);
        case GGML_OP_GLU:
            return glu_supported(op);
        default:
            return false;
    }
}

bool dev_supports_buft(ggml_backend_dev_t, ggml_backend_buffer_type_t buft) { return ggml_backend_buft_is_host(buft); }

const ggml_backend_device_i device_iface = {
    /* .get_name             = */ dev_name,
    /* .get_description      = */ dev_description,
    /* .get_memory           = */ dev_memory,
    /* .get_type             = */ dev_type,
    /* .get_props            = */ dev_props,
    /* .init_backend         = */ dev_init,
    /* .get_buffer_type      = */ dev_buffer_type,
    /* .get_host_buffer_type = */ NULL,
    /* .buffer_from_host_ptr = */ dev_buffer_from_host_ptr,
    /* .supports_op          = */ dev_supports_op,
    /* .supports_buft        = */ dev_supports_buft,
    /* .offload_op           = */ NULL,
    /* .event_new            = */ NULL,
    /* .event_free           = */ NULL,
    /* .event_synchronize    = */ NULL,
};

const char * reg_name(ggml_backend_reg_t) { return "illmrec-avx512"; }
size_t reg_device_count(ggml_backend_reg_t) { return 1; }

ggml_backend_dev_t reg_device(ggml_backend_reg_t r, size_t) {
    static ggml_backend_device device = {
        /* .iface   = */ device_iface,
        /* .reg     = */ r,
        /* .context = */ nullptr,
    };
    return &device;
}

void * reg_proc_address(ggml_backend_reg_t, const char * name) {
    if (std::strcmp(name, "ggml_backend_set_n_threads") == 0) {
        return (void *) set_n_threads;
    }
    return NULL;
}

const ggml_backend_reg_i reg_iface = {
    /* .get_name         = */ reg_name,
    /* .get_device_count = */ reg_device_count,
    /* .get_device       = */ reg_device,
    /* .get_proc_address = */ reg_proc_address,
};

ggml_backend_reg_t reg() {
    static ggml_backend_reg r = {
        /* .api_version = */ GGML_BACKEND_API_VERSION,
        /* .iface       = */ reg_iface,
        /* .context     = */ NULL,
    };
    return &r;
}

} // namespace

extern "C" {

// Adds the backend to ggml's registry. The caller (src/engine/kernels.rs) calls it once, and only on a
// CPU with AVX-512F, FMA and F16C: the kernels below are compiled for them.
void illmrec_kernels_register(void) { ggml_backend_register(reg()); }

// Attention operations computed here so far (all contexts of the process).
uint64_t illmrec_kernels_attention_calls(void) { return g_attention_calls.load(std::memory_order_relaxed); }

// GEGLU operations computed here so far (all contexts of the process).
uint64_t illmrec_kernels_geglu_calls(void) { return g_geglu_calls.load(std::memory_order_relaxed); }

}
