/* test_waiter.h: what the engine tests' event collectors share: a count of finished
 * requests under a mutex, bumped by the engine thread's callback, waited for by the
 * test. Each test embeds it in its own collector beside its own result records. */
#ifndef PD_TEST_WAITER_H
#define PD_TEST_WAITER_H

#include <pthread.h>

typedef struct test_waiter {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int n_done;
} test_waiter;

static inline void test_waiter_init(test_waiter *w) {
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->cv, NULL);
    w->n_done = 0;
}

/* Under w->mu: one more request finished. */
static inline void test_waiter_done_locked(test_waiter *w) {
    w->n_done++;
    pthread_cond_broadcast(&w->cv);
}

/* Blocks until n requests have finished. */
static inline void test_waiter_wait(test_waiter *w, int n) {
    pthread_mutex_lock(&w->mu);
    while (w->n_done < n) pthread_cond_wait(&w->cv, &w->mu);
    pthread_mutex_unlock(&w->mu);
}

static inline void test_waiter_destroy(test_waiter *w) {
    pthread_mutex_destroy(&w->mu);
    pthread_cond_destroy(&w->cv);
}

#endif
