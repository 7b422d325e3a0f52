/* kv_pool.c: the paged KV cache's block allocator: a fixed array of reference counts
 * and a stack of free block ids, and, with prefix caching, cached blocks at refcount 0
 * kept on the prefix cache's LRU list until evicted (prefix_cache.c). Tuned for the
 * engine thread's step loop: alloc and release are O(blocks touched), no allocation
 * after init, no locks. */
#include <stdlib.h>
#include <string.h>

#include "engine/engine.h"
#include "util/util.h"

void kv_pool_init(kv_pool *p, int num_blocks, int block_size) {
    PD_ASSERT(num_blocks >= 0 && block_size > 0);
    p->num_blocks = num_blocks;
    p->block_size = block_size;
    p->refcount = xcalloc((size_t)PD_MAX(num_blocks, 1), sizeof(int32_t));
    p->free_list = xmalloc((size_t)PD_MAX(num_blocks, 1) * sizeof(int32_t));
    /* Stack top is the end: push ids high to low so block 0 is handed out first. */
    for (int i = 0; i < num_blocks; i++) p->free_list[i] = num_blocks - 1 - i;
    p->n_free = num_blocks;
    p->pc = NULL;
}

void kv_pool_enable_prefix_cache(kv_pool *p) {
    PD_ASSERT(!p->pc && p->n_free == p->num_blocks);
    p->pc = prefix_cache_create(p->num_blocks, p->block_size);
}

void kv_pool_destroy(kv_pool *p) {
    if (!p) return;
    prefix_cache_free(p->pc);
    free(p->refcount);
    free(p->free_list);
    memset(p, 0, sizeof(*p));
}

int kv_pool_alloc(kv_pool *p, int n, int32_t *out) {
    PD_ASSERT(n >= 0);
    if (n > kv_pool_available(p)) return -1;
    for (int i = 0; i < n; i++) {
        int32_t b = p->n_free > 0 ? p->free_list[--p->n_free] : prefix_cache_evict(p);
        PD_ASSERT(p->refcount[b] == 0);
        p->refcount[b] = 1;
        out[i] = b;
    }
    return 0;
}

void kv_pool_ref(kv_pool *p, int32_t block) {
    PD_ASSERT(block >= 0 && block < p->num_blocks);
    if (p->refcount[block] == 0) {
        /* only a cached block, from the evictable list, can gain a first reference */
        PD_ASSERT(p->pc && p->pc->cached[block]);
        prefix_cache_lru_remove(p->pc, block);
    }
    p->refcount[block]++;
}

/* Last block first: a cached tail block joins the LRU list before the blocks its key
 * chains from (it is evicted first), and free blocks land on the stack so that the
 * next alloc pops them in the table's order: a request's run of consecutive blocks
 * comes back as a run (a KV transfer moves a run as one item; popped in reverse, the
 * gpu medium's warm request on the H200s was 28,672 one-block copies, not 7,168 runs). */
void kv_pool_release(kv_pool *p, const int32_t *blocks, int n) {
    for (int k = 0; k < n; k++) {
        int32_t b = blocks[n - 1 - k];
        PD_ASSERT(b >= 0 && b < p->num_blocks);
        PD_ASSERT(p->refcount[b] > 0); /* double free */
        if (--p->refcount[b] == 0) {
            if (p->pc && p->pc->cached[b]) {
                prefix_cache_lru_push(p->pc, b);
            } else {
                PD_ASSERT(p->n_free < p->num_blocks);
                p->free_list[p->n_free++] = b;
            }
        }
    }
}

int kv_pool_available(const kv_pool *p) { return p->n_free + (p->pc ? p->pc->n_evictable : 0); }

int kv_pool_used(const kv_pool *p) { return p->num_blocks - kv_pool_available(p); }

void kv_pool_check(const kv_pool *p) {
    PD_ASSERT(p->n_free >= 0 && p->n_free <= p->num_blocks);
    int zero = 0;
    for (int b = 0; b < p->num_blocks; b++) {
        PD_ASSERT(p->refcount[b] >= 0);
        if (p->refcount[b] == 0) zero++;
    }
    PD_ASSERT(zero == kv_pool_available(p));
    /* Each free-list entry is a distinct block at refcount 0: mark them with -1 in a
     * copy of the counts (this check may allocate; it is not on the hot path). */
    int32_t *seen = xcalloc((size_t)PD_MAX(p->num_blocks, 1), sizeof(int32_t));
    for (int i = 0; i < p->n_free; i++) {
        int32_t b = p->free_list[i];
        PD_ASSERT(b >= 0 && b < p->num_blocks);
        PD_ASSERT(p->refcount[b] == 0);
        PD_ASSERT(!seen[b]);
        seen[b] = 1;
    }
    free(seen);
    if (p->pc) prefix_cache_check(p);
}
