/* kv_sum.h: the cpu store's entry checksum, an order-independent 64-bit sum that a
 * copy kernel can build while it moves the bytes (CTAs in any order, combined with
 * atomic adds) and the host computes the same way (kv_sum_add below, its CPU twin).
 * Included by src/kv/ (C) and by the CUDA backend's batched copy (kv_ipc.cu), so the
 * two definitions cannot drift; tests/test_kv_msg.c pins it to known vectors.
 *
 * Definition. An object of n bytes is read as little-endian 64-bit words w_j,
 * j = 0 .. ceil(n / 8) - 1 (the last one zero-padded). Its sum is
 *     S = sum over j of kv_sum_word(w_j, j)   (mod 2^64)
 * and its checksum kv_sum_final(S, n). kv_sum_word mixes the word with its position
 * through a bijection, so one corrupted word always changes S, and moved or swapped
 * words change it with probability 1 - 2^-64; S of a part starting at word j0 is the
 * same terms, so parts summed anywhere add up to S. Not cryptographic (like
 * kv_checksum): it catches torn, stale and misplaced bytes, not an adversary.
 *
 * Load: ~1 multiply per 8 bytes; on the GPU it hides under the copy's memory traffic. */
#ifndef PD_KV_SUM_H
#define PD_KV_SUM_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#ifdef __CUDACC__
#define KV_SUM_FN __host__ __device__ static inline
#else
#define KV_SUM_FN static inline
#endif

#define KV_SUM_POS 0x9E3779B97F4A7C15ull /* position key: j * this */
#define KV_SUM_MUL 0xBF58476D1CE4E5B9ull
#define KV_SUM_FIN 0x94D049BB133111EBull

/* Term of word w at word index j (a bijection of w for each j). */
KV_SUM_FN uint64_t kv_sum_word(uint64_t w, uint64_t j) {
    uint64_t x = w ^ (j * KV_SUM_POS);
    x ^= x >> 31;
    x *= KV_SUM_MUL;
    x ^= x >> 29;
    return x;
}

/* The checksum of an object of n bytes whose terms add up to s. */
KV_SUM_FN uint64_t kv_sum_final(uint64_t s, uint64_t n) {
    uint64_t x = s ^ (n * KV_SUM_POS);
    x ^= x >> 33;
    x *= KV_SUM_FIN;
    x ^= x >> 29;
    x *= KV_SUM_MUL;
    x ^= x >> 32;
    return x;
}

#ifndef __CUDACC__
/* Terms of the n bytes at p, which start at byte `at` of the object (at % 8 == 0):
 * words j = at / 8 ... The CPU twin of the copy kernel's sum; add the parts of an
 * object in any order, then kv_sum_final. */
static inline uint64_t kv_sum_add(const void *p, size_t n, uint64_t at) {
    const uint8_t *b = (const uint8_t *)p;
    uint64_t j = at / 8, s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    size_t i = 0;
    for (; i + 32 <= n; i += 32, j += 4) { /* four lanes: independent multiplies */
        uint64_t w[4];
        memcpy(w, b + i, 32);
        s0 += kv_sum_word(w[0], j);
        s1 += kv_sum_word(w[1], j + 1);
        s2 += kv_sum_word(w[2], j + 2);
        s3 += kv_sum_word(w[3], j + 3);
    }
    for (; i < n; i += 8, j++) {
        uint64_t w = 0;
        memcpy(&w, b + i, n - i < 8 ? n - i : 8); /* zero-padded; little-endian hosts */
        s0 += kv_sum_word(w, j);
    }
    return s0 + s1 + s2 + s3;
}

/* kv_sum_add of the n bytes at src while copying them to dst (non-overlapping): one pass
 * over the bytes where a memcpy and then a kv_sum_add make two. The sum's arithmetic,
 * not the memory, bounds it (bench_kv_tiers: 0.15 ms for a 1.75 MiB image, where the
 * memcpy and the sum take 0.09 + 0.14 ms). */
static inline uint64_t kv_sum_copy(void *dst, const void *src, size_t n, uint64_t at) {
    const uint8_t *b = (const uint8_t *)src;
    uint8_t *o = (uint8_t *)dst;
    uint64_t j = at / 8, s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    size_t i = 0;
    for (; i + 32 <= n; i += 32, j += 4) {
        uint64_t w[4];
        memcpy(w, b + i, 32);
        memcpy(o + i, w, 32);
        s0 += kv_sum_word(w[0], j);
        s1 += kv_sum_word(w[1], j + 1);
        s2 += kv_sum_word(w[2], j + 2);
        s3 += kv_sum_word(w[3], j + 3);
    }
    memcpy(o + i, b + i, n - i);
    return s0 + s1 + s2 + s3 + kv_sum_add(b + i, n - i, j * 8);
}

/* The checksum of the n bytes at p (one object). */
static inline uint64_t kv_sum(const void *p, size_t n) { return kv_sum_final(kv_sum_add(p, n, 0), n); }
#endif

#endif
