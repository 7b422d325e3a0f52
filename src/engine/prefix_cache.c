/* prefix_cache.c: the GPU tier of automatic prefix caching (vLLM V1's design): a table
 * from chained content keys to KV blocks, and an LRU list of cached blocks nobody
 * references, evicted only when the pool has no free uncached block left.
 *
 * Tuned for the engine thread's step loop: insert, find, evict and the LRU moves are
 * O(1) expected (open addressing with linear probing at load <= 1/2, backward-shift
 * deletion so there are no tombstones to pile up); a find costs one block's id compare
 * on top. Everything is sized at creation; nothing is allocated afterwards except by
 * the checker. The pool (kv_pool.c) calls the LRU and eviction functions; the
 * scheduler calls insert and find. */
#include <stdlib.h>
#include <string.h>

#include "engine/engine.h"
#include "util/util.h"

uint64_t prefix_cache_key(uint64_t parent, const int32_t *ids, int block_size) {
    return hash_bytes(ids, (size_t)block_size * sizeof(int32_t), parent);
}

prefix_cache *prefix_cache_create(int num_blocks, int block_size) {
    PD_ASSERT(num_blocks >= 0 && block_size > 0);
    prefix_cache *pc = xcalloc(1, sizeof(*pc));
    size_t nb = (size_t)PD_MAX(num_blocks, 1);
    pc->num_blocks = num_blocks;
    pc->block_size = block_size;
    pc->cached = xcalloc(nb, 1);
    pc->block_key = xcalloc(nb, sizeof(uint64_t));
    pc->parent_key = xcalloc(nb, sizeof(uint64_t));
    pc->block_tokens = xcalloc(nb * (size_t)block_size, sizeof(int32_t));
    pc->table_cap = 2;
    while (pc->table_cap < 2 * num_blocks) pc->table_cap *= 2;
    pc->table = xmalloc((size_t)pc->table_cap * sizeof(int32_t));
    for (int i = 0; i < pc->table_cap; i++) pc->table[i] = -1;
    pc->lru_prev = xmalloc(nb * sizeof(int32_t));
    pc->lru_next = xmalloc(nb * sizeof(int32_t));
    for (size_t i = 0; i < nb; i++) pc->lru_prev[i] = pc->lru_next[i] = -1;
    pc->lru_head = pc->lru_tail = -1;
    return pc;
}

void prefix_cache_free(prefix_cache *pc) {
    if (!pc) return;
    free(pc->cached);
    free(pc->block_key);
    free(pc->parent_key);
    free(pc->block_tokens);
    free(pc->table);
    free(pc->lru_prev);
    free(pc->lru_next);
    free(pc);
}

/* ---- the key table ---------------------------------------------------------------- */

static int slot_home(const prefix_cache *pc, uint64_t key) {
    return (int)(key & (uint64_t)(pc->table_cap - 1));
}

static bool block_matches(const prefix_cache *pc, int32_t b, uint64_t key, uint64_t parent,
                          const int32_t *ids) {
    return pc->block_key[b] == key && pc->parent_key[b] == parent &&
           memcmp(pc->block_tokens + (size_t)b * pc->block_size, ids,
                  (size_t)pc->block_size * sizeof(int32_t)) == 0;
}

int32_t prefix_cache_find(const kv_pool *p, uint64_t key, uint64_t parent, const int32_t *ids) {
    const prefix_cache *pc = p->pc;
    PD_ASSERT(pc);
    int mask = pc->table_cap - 1;
    for (int i = slot_home(pc, key);; i = (i + 1) & mask) {
        int32_t b = pc->table[i];
        if (b < 0) return -1;
        if (block_matches(pc, b, key, parent, ids)) return b;
    }
}

bool prefix_cache_insert(kv_pool *p, int32_t block, uint64_t key, uint64_t parent,
                         const int32_t *ids) {
    prefix_cache *pc = p->pc;
    PD_ASSERT(pc && block >= 0 && block < p->num_blocks);
    PD_ASSERT(p->refcount[block] > 0); /* registered by a sequence that holds it */
    if (pc->cached[block]) return false;
    int mask = pc->table_cap - 1;
    int i = slot_home(pc, key);
    for (; pc->table[i] >= 0; i = (i + 1) & mask)
        if (pc->block_key[pc->table[i]] == key) return false; /* someone else's copy */
    pc->table[i] = block;
    pc->cached[block] = 1;
    pc->block_key[block] = key;
    pc->parent_key[block] = parent;
    memcpy(pc->block_tokens + (size_t)block * pc->block_size, ids,
           (size_t)pc->block_size * sizeof(int32_t));
    pc->n_cached++;
    PD_ASSERT(pc->n_cached <= p->num_blocks);
    return true;
}

/* Takes block out of the table (backward-shift deletion keeps every probe run whole). */
static void table_remove(prefix_cache *pc, int32_t block) {
    int mask = pc->table_cap - 1;
    int i = slot_home(pc, pc->block_key[block]);
    while (pc->table[i] != block) {
        PD_ASSERT(pc->table[i] >= 0); /* a cached block is in the table */
        i = (i + 1) & mask;
    }
    for (int j = i;;) {
        j = (j + 1) & mask;
        int32_t b = pc->table[j];
        if (b < 0) break;
        int k = slot_home(pc, pc->block_key[b]);
        /* b stays when its home lies cyclically in (i, j] */
        bool stays = i <= j ? (i < k && k <= j) : (i < k || k <= j);
        if (stays) continue;
        pc->table[i] = b;
        i = j;
    }
    pc->table[i] = -1;
    pc->cached[block] = 0;
    pc->n_cached--;
}

/* ---- the LRU list of evictable blocks ------------------------------------------------ */

void prefix_cache_lru_push(prefix_cache *pc, int32_t b) {
    PD_ASSERT(pc->cached[b] && pc->lru_prev[b] < 0 && pc->lru_next[b] < 0 && pc->lru_head != b);
    pc->lru_prev[b] = pc->lru_tail;
    if (pc->lru_tail >= 0) pc->lru_next[pc->lru_tail] = b;
    else pc->lru_head = b;
    pc->lru_tail = b;
    pc->n_evictable++;
}

void prefix_cache_lru_remove(prefix_cache *pc, int32_t b) {
    PD_ASSERT(pc->n_evictable > 0);
    int32_t prev = pc->lru_prev[b], next = pc->lru_next[b];
    if (prev >= 0) pc->lru_next[prev] = next;
    else { PD_ASSERT(pc->lru_head == b); pc->lru_head = next; }
    if (next >= 0) pc->lru_prev[next] = prev;
    else { PD_ASSERT(pc->lru_tail == b); pc->lru_tail = prev; }
    pc->lru_prev[b] = pc->lru_next[b] = -1;
    pc->n_evictable--;
}

int32_t prefix_cache_evict(kv_pool *p) {
    prefix_cache *pc = p->pc;
    int32_t b = pc->lru_head;
    PD_ASSERT(b >= 0 && p->refcount[b] == 0);
    prefix_cache_lru_remove(pc, b);
    if (pc->hooks.on_evict) pc->hooks.on_evict(pc->hooks.evict_user, b, pc->block_key[b]);
    if (pc->hooks.on_offload) /* a lower tier keeps it: its KV is intact until the taker writes */
        pc->hooks.on_offload(pc->hooks.evict_user, b, pc->block_key[b], pc->parent_key[b],
                             pc->block_tokens + (size_t)b * pc->block_size);
    table_remove(pc, b);
    pc->evictions++;
    return b;
}

void prefix_cache_flush(kv_pool *p) {
    prefix_cache *pc = p->pc;
    if (pc && pc->hooks.on_offload_flush) pc->hooks.on_offload_flush(pc->hooks.evict_user);
}

void prefix_cache_flush_step(kv_pool *p) {
    prefix_cache *pc = p->pc;
    if (pc && pc->hooks.on_offload_flush_step) pc->hooks.on_offload_flush_step(pc->hooks.evict_user);
    else prefix_cache_flush(p);
}

int prefix_cache_reset(kv_pool *p) {
    prefix_cache *pc = p->pc;
    if (!pc) return 0;
    int dropped = pc->n_cached;
    for (int32_t b = 0; b < p->num_blocks; b++) {
        if (!pc->cached[b]) continue;
        if (p->refcount[b] == 0) {
            prefix_cache_lru_remove(pc, b);
            p->free_list[p->n_free++] = b;
        }
        pc->cached[b] = 0;
    }
    for (int i = 0; i < pc->table_cap; i++) pc->table[i] = -1;
    pc->n_cached = 0;
    PD_ASSERT(pc->n_evictable == 0 && pc->lru_head < 0 && pc->lru_tail < 0);
    return dropped;
}

/* ---- invariants -------------------------------------------------------------------- */

void prefix_cache_check(const kv_pool *p) {
    const prefix_cache *pc = p->pc;
    PD_ASSERT(pc && pc->num_blocks == p->num_blocks && pc->block_size == p->block_size);
    /* the table holds exactly the cached blocks, each found by its own key */
    int in_table = 0;
    for (int i = 0; i < pc->table_cap; i++) {
        int32_t b = pc->table[i];
        if (b < 0) continue;
        PD_ASSERT(b < p->num_blocks && pc->cached[b]);
        in_table++;
    }
    int cached = 0, cached_zero = 0;
    for (int32_t b = 0; b < p->num_blocks; b++) {
        if (!pc->cached[b]) {
            PD_ASSERT(pc->lru_prev[b] < 0 && pc->lru_next[b] < 0);
            continue;
        }
        cached++;
        if (p->refcount[b] == 0) cached_zero++;
        PD_ASSERT(prefix_cache_find(p, pc->block_key[b], pc->parent_key[b],
                                    pc->block_tokens + (size_t)b * pc->block_size) == b);
    }
    PD_ASSERT(cached == pc->n_cached && in_table == cached);
    /* the LRU list holds exactly the cached blocks at refcount 0, linked both ways */
    int n = 0;
    int32_t prev = -1;
    for (int32_t b = pc->lru_head; b >= 0; b = pc->lru_next[b]) {
        PD_ASSERT(b < p->num_blocks && n < p->num_blocks); /* no cycle */
        PD_ASSERT(pc->cached[b] && p->refcount[b] == 0);
        PD_ASSERT(pc->lru_prev[b] == prev);
        prev = b;
        n++;
    }
    PD_ASSERT(pc->lru_tail == prev);
    PD_ASSERT(n == pc->n_evictable && n == cached_zero);
    /* free uncached blocks are never cached */
    for (int i = 0; i < p->n_free; i++) PD_ASSERT(!pc->cached[p->free_list[i]]);
}
