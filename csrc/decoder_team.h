/* decoder_team.h: what the two fused decoder steps share (decoder.c for W4A4KV4 models,
 * decoder_wq.c for weight-only ones): the OpenMP team's work counters, the float steps of a layer
 * (RoPE, and the residual adds and RMSNorm of norm.c: the same float32 operations as
 * offq/model/ops.py) and saturating scratch-size arithmetic. */
#ifndef OFFQ_DECODER_TEAM_H
#define OFFQ_DECODER_TEAM_H

#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>

#include "kernels.h"

#define SPIN_LIMIT 2000 /* pause loops (~50 us) before a waiting thread yields its core */

/* ---- the team's work -------------------------------------------------------------------------
 * Every phase is a list of independent items (chunks of rows, blocks of output columns, heads).
 * Items of all phases are numbered in one sequence; threads claim them from a shared counter and
 * count them done in another. A phase starts once every item before it is done. No thread waits
 * for another thread as such, only for claimed work: on a shared machine a descheduled thread
 * that holds no item delays nobody, and when it runs again it skips the phases already done. */
typedef struct {
    atomic_llong claimed, done;
} team_work;

static inline void cpu_relax(void)
{
#ifdef OFFQ_X86
    __builtin_ia32_pause();
#endif
}

/* Claim up to `step` items of the current phase (its items are base .. base + n - 1):
 * [*lo, *hi) relative to the phase, or 0 when none is left. */
static inline int claim(team_work *w, int64_t base, int64_t n, int64_t step, int64_t *lo,
                        int64_t *hi)
{
    long long c = atomic_load_explicit(&w->claimed, memory_order_relaxed);
    for (;;) {
        if (c >= base + n) {
            return 0;
        }
        const long long e = c + step < base + n ? c + step : base + n;
        if (atomic_compare_exchange_weak_explicit(&w->claimed, &c, e, memory_order_relaxed,
                                                  memory_order_relaxed)) {
            *lo = c - base;
            *hi = e - base;
            return 1;
        }
    }
}

/* Count items done (their writes become visible to whoever sees the count). */
static inline void finish(team_work *w, int64_t count)
{
    atomic_fetch_add_explicit(&w->done, count, memory_order_release);
}

/* End of a phase of n items: wait until all are done, then move *base past them. */
static inline void phase_end(team_work *w, int64_t *base, int64_t n)
{
    *base += n;
    for (int spins = 0; atomic_load_explicit(&w->done, memory_order_acquire) < *base; spins++) {
        if (spins < SPIN_LIMIT) {
            cpu_relax();
        } else {
            sched_yield();
        }
    }
}


/* HF rotate_half RoPE of one head vector in place. */
static inline void rope_row(float *x, int64_t hd, const float *cs, const float *sn)
{
    const int64_t half = hd / 2;
    for (int64_t i = 0; i < half; i++) {
        const float x1 = x[i], x2 = x[i + half];
        x[i] = x1 * cs[i] - x2 * sn[i];
        x[i + half] = x2 * cs[i] + x1 * sn[i];
    }
}


/* Rows [r0, r1) of the residual stream h [rows][d]: h += y when `add` (the previous product's
 * output), then RMSNorm(h) into x (norm.c). */
static inline void residual_norm_rows(float *h, const float *y, int add, const float *norm, int64_t d,
                               float eps, int64_t r0, int64_t r1, float *x)
{
    offq_residual_rms_norm(h + r0 * d, add ? y + r0 * d : NULL, norm, r1 - r0, d, eps, x + r0 * d);
}


/* Scratch sizes saturate at INT64_MAX instead of wrapping: dimensions the plan accepts (up to
 * 2^20) times positions (up to 2^40) can exceed int64, and a wrapped size would pass the check
 * against a small buffer. No buffer of INT64_MAX bytes exists, so a saturated size is refused. */
static inline int64_t sz_mul(int64_t a, int64_t b)
{
    int64_t r;
    return __builtin_mul_overflow(a, b, &r) ? INT64_MAX : r;
}

static inline int64_t sz_add(int64_t a, int64_t b)
{
    int64_t r;
    return __builtin_add_overflow(a, b, &r) ? INT64_MAX : r;
}

static inline int64_t align64(int64_t n) { return n > INT64_MAX - 63 ? INT64_MAX : (n + 63) / 64 * 64; }

/* The widest product input and output of a decoder layer: max(d, H hd, ffn) and
 * max((H + 2 Hkv) hd, d, 2 ffn) (the fused q/k/v and gate/up products). */
static inline void layer_widths(int64_t d, int64_t ffn, int64_t H, int64_t Hkv, int64_t hd,
                                int64_t *max_k, int64_t *max_n)
{
    const int64_t qd = H * hd, qkv_n = (H + 2 * Hkv) * hd;
    *max_k = d > qd ? d : qd;
    *max_k = *max_k > ffn ? *max_k : ffn;
    *max_n = qkv_n > d ? qkv_n : d;
    *max_n = *max_n > 2 * ffn ? *max_n : 2 * ffn;
}

#endif
