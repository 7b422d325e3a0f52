#!/usr/bin/env python3
"""kv_sum_reference.py: an independent model of the cpu store's checksum (src/kv/kv_sum.h),
written from its definition, which produced the vectors in tests/test_kv_cpu.c
(test_cpu_sum_vectors). Run it to print them again."""
M = (1 << 64) - 1
POS, MUL, FIN = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def word(w, j):
    x = (w ^ (j * POS)) & M
    x ^= x >> 31
    x = (x * MUL) & M
    return x ^ (x >> 29)


def final(s, n):
    x = (s ^ (n * POS)) & M
    x ^= x >> 33
    x = (x * FIN) & M
    x ^= x >> 29
    x = (x * MUL) & M
    return x ^ (x >> 32)


def kv_sum(b):
    s = 0
    for j in range((len(b) + 7) // 8):
        s = (s + word(int.from_bytes(b[8 * j:8 * j + 8].ljust(8, b"\0"), "little"), j)) & M
    return final(s, len(b))


buf = bytes((i * 7 + 3) & 255 for i in range(1000))
print("kv_sum_word(1, 0) = %#018x" % word(1, 0))
print("kv_sum(buf, 1000) = %#018x" % kv_sum(buf))
print("kv_sum(buf, 13)   = %#018x" % kv_sum(buf[:13]))
