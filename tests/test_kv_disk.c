/* test_kv_disk.c: the disk medium (files with O_DIRECT through io_uring, or pread/pwrite).
 * Two real processes (tests/test_kv_rig.h): whole and layerwise verified byte for byte, a
 * stalled sender, a killed one and an abort (a store hears nothing from the sender: the
 * reservation ends at its deadline and the half-written files are removed). In one
 * process: the capacity cap refuses a put, a file that cannot be created fails it, a
 * corrupted block file is detected, never served and becomes a miss, the pread fallback
 * moves the same bytes. No file is left. */
#include <sys/resource.h>
#include <sys/stat.h>

#include "test_kv_rig.h"

static void store_dir(rig_opts *o) {
    if (!o->tag[0]) rig_tag(o);
    snprintf(o->dir, sizeof o->dir, "%s/kvtest-%s", test_build_dir(), o->tag);
}

static void run_staging(kv_transfer_mode mode, rig_scenario sc, kv_status expect, double timeout,
                        size_t staging) {
    rig_opts o = {.medium = KV_MEDIUM_DISK, .mode = mode, .scenario = sc, .expect = expect,
                  .timeout_s = timeout, .staging = staging};
    store_dir(&o);
    CHECK(rig_run(&o) == 0);
    CHECK(!util_is_dir(o.dir));
}
static void run(kv_transfer_mode mode, rig_scenario sc, kv_status expect, double timeout) {
    run_staging(mode, sc, expect, timeout, 0);
}

static void test_disk_whole(void) { run(KV_TRANSFER_WHOLE, RIG_OK, KV_OK, 10); }
static void test_disk_layerwise(void) { run(KV_TRANSFER_LAYERWISE, RIG_OK, KV_OK, 10); }
/* Staging of one block file: the 13 blocks go in 13 batches (whole: one file each;
 * layer by layer: a few blocks' pieces each), the put's two buffers taking turns, so
 * the batch filled while another is on its way to the disk is checked byte for byte,
 * and the get reads them back one file per batch. */
static void test_disk_double_buffered(void) {
    run_staging(KV_TRANSFER_WHOLE, RIG_OK, KV_OK, 10, 1);
    run_staging(KV_TRANSFER_LAYERWISE, RIG_OK, KV_OK, 10, 1);
}
static void test_disk_stall_deadline(void) {
    run(KV_TRANSFER_LAYERWISE, RIG_STALL, KV_ERR_DEADLINE, 0.8);
}
static void test_disk_dead_sender(void) {
    run(KV_TRANSFER_LAYERWISE, RIG_KILL, KV_ERR_DEADLINE, 0.8);
}
static void test_disk_abort(void) { run(KV_TRANSFER_LAYERWISE, RIG_ABORT, KV_ERR_DEADLINE, 0.8); }

typedef struct disk_fixture {
    rig_opts o;
    rig g;
    kv_connector *dc, *pc;
    int32_t pre[8];
} disk_fixture;

static void fixture_open(disk_fixture *f, size_t capacity, bool force_pread, size_t staging) {
    char err[512];
    memset(&f->o, 0, sizeof f->o);
    f->o.medium = KV_MEDIUM_DISK;
    f->o.mode = KV_TRANSFER_WHOLE;
    f->o.staging = staging;
    store_dir(&f->o);
    rig_open(&f->g, false, NULL);
    for (int l = 0; l < f->g.kv->n_layers; l++) {
        size_t n = 8 * f->g.kv->block_bytes / 4;
        f->g.be->ops->fill_random(f->g.be, f->g.kv->k[l], DTYPE_F32, n, 30 + (uint64_t)l, 1);
        f->g.be->ops->fill_random(f->g.be, f->g.kv->v[l], DTYPE_F32, n, 40 + (uint64_t)l, 1);
    }
    PD_ASSERT(kv_pool_alloc(&f->g.pool, 8, f->pre) == 0);
    kv_config dcfg, pcfg;
    rig_config(&f->o, KV_ROLE_DECODE, &dcfg);
    rig_config(&f->o, KV_ROLE_PREFILL, &pcfg);
    if (capacity) dcfg.capacity_bytes = pcfg.capacity_bytes = capacity;
    dcfg.disk_force_pread = pcfg.disk_force_pread = force_pread;
    kv_block_allocator al = kv_pool_allocator_get(f->g.pa);
    f->dc = kv_connector_create(&dcfg, f->g.kv, &al, err, sizeof err);
    if (!f->dc) fprintf(stderr, "%s\n", err);
    PD_ASSERT(f->dc);
    f->pc = kv_connector_create(&pcfg, f->g.kv, NULL, err, sizeof err);
    PD_ASSERT(f->pc);
}

static void fixture_close(disk_fixture *f) {
    kv_connector_free(f->pc);
    kv_connector_free(f->dc);
    kv_pool_release(&f->g.pool, f->pre, 8);
    CHECK_EQ_INT(kv_pool_allocator_used(f->g.pa), 0);
    rig_close(&f->g);
    CHECK(!util_is_dir(f->o.dir));
}

/* Decode reserves for 5 blocks of tokens; prefill puts them from blocks 0..4. */
static kv_status transfer(disk_fixture *f, kv_ticket *t, bool wait, char *err, size_t errlen) {
    int32_t tok[80], src[5] = {0, 1, 2, 3, 4};
    rig_tokens(tok, 80);
    kv_status st = kv_reserve(f->dc, 5, tok, 80, 5, t, err, errlen);
    if (st != KV_OK) return st;
    kv_send *s = kv_send_begin(f->pc, t, src, 5, tok, 80, &st, err, errlen);
    if (!s) return st;
    if ((st = kv_send_finish(s, err, errlen)) != KV_OK) return st;
    if (!wait) return KV_OK;
    st = kv_ticket_wait(f->dc, t, 5, err, errlen);
    if (st == KV_OK) {
        int32_t blocks[8];
        int n = kv_ticket_take(f->dc, t, blocks, 8);
        CHECK_EQ_INT(n, 5);
        for (int l = 0; l < f->g.kv->n_layers && n == 5; l++)
            CHECK(rig_layer_sum(f->g.kv, blocks, 5, l) == rig_layer_sum(f->g.kv, src, 5, l));
        if (n > 0) kv_pool_release(&f->g.pool, blocks, n);
    }
    return st;
}

static void test_disk_full(void) {
    disk_fixture f;
    /* room for 3 block files of 5 */
    size_t file = 4096 + (size_t)2 * ((2 * 2048 + 4095) / 4096 * 4096);
    fixture_open(&f, 3 * file, false, 0);
    char err[512];
    kv_ticket t;
    CHECK_EQ_INT(transfer(&f, &t, false, err, sizeof err), KV_ERR_FULL);
    CHECK_STR_CONTAINS(err, "full");
    kv_ticket_cancel(f.dc, &t);
    CHECK_EQ_INT(rig_files_left(f.o.dir), 0);
    fixture_close(&f);
}

/* A tmp file that cannot be created (here: the process's file limit, which holds for
 * root too) fails the put with a message saying so; the files made before it are removed,
 * the reservation is cancelled, and the next put, with the limit back, goes through. */
static void test_disk_create_fails(void) {
    disk_fixture f;
    fixture_open(&f, 0, false, 0);
    char err[512];
    kv_ticket t;
    struct rlimit was, low;
    PD_ASSERT(getrlimit(RLIMIT_NOFILE, &was) == 0);
    int next = dup(0); /* the lowest free descriptor: two more files fit, not five */
    PD_ASSERT(next >= 0);
    close(next);
    low = was;
    low.rlim_cur = (rlim_t)next + 2;
    PD_ASSERT(setrlimit(RLIMIT_NOFILE, &low) == 0);
    kv_status st = transfer(&f, &t, false, err, sizeof err);
    PD_ASSERT(setrlimit(RLIMIT_NOFILE, &was) == 0);
    CHECK_EQ_INT(st, KV_ERR_IO);
    CHECK_STR_CONTAINS(err, "creating a block file");
    CHECK_STR_CONTAINS(err, "Too many open files");
    CHECK_EQ_INT(rig_files_left(f.o.dir), 0);
    kv_ticket_cancel(f.dc, &t);
    CHECK_EQ_INT(transfer(&f, &t, true, err, sizeof err), KV_OK);
    fixture_close(&f);
}

/* The decode side's reads run for its waiter, outside the connector's lock: the tick
 * (the instance's ticker, expiring reservations) reads nothing, however much has
 * arrived; the ticket's own wait then reads it all. */
static void test_disk_tick_never_reads(void) {
    disk_fixture f;
    fixture_open(&f, 0, false, 0);
    char err[512];
    kv_ticket t;
    CHECK_EQ_INT(transfer(&f, &t, false, err, sizeof err), KV_OK); /* all 5 files stored */
    kv_store_stats a;
    kv_connector_tick(f.dc);
    kv_store_get_stats(f.dc, &a);
    CHECK_EQ_INT(a.hits, 0);
    CHECK_EQ_INT(kv_connector_active(f.dc), 1);
    CHECK_EQ_INT(kv_ticket_wait(f.dc, &t, 5, err, sizeof err), KV_OK);
    kv_store_get_stats(f.dc, &a);
    CHECK_EQ_INT(a.hits, 5);
    int32_t blocks[8];
    int n = kv_ticket_take(f.dc, &t, blocks, 8);
    CHECK_EQ_INT(n, 5);
    if (n > 0) kv_pool_release(&f.g.pool, blocks, n);
    fixture_close(&f);
}

static void corrupt_one_file(const char *dir) {
    DIR *d = opendir(dir);
    struct dirent *e;
    char path[600];
    while ((e = readdir(d)))
        if (strstr(e->d_name, ".kvb")) break;
    PD_ASSERT(e);
    snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
    closedir(d);
    FILE *fp = fopen(path, "r+b");
    PD_ASSERT(fp);
    fseek(fp, 4096 + 100, SEEK_SET); /* a byte of layer 0's k block */
    int ch = fgetc(fp);
    fseek(fp, 4096 + 100, SEEK_SET);
    fputc(ch ^ 0x40, fp);
    fclose(fp);
}

/* With staging of one file the bad file is a batch of its own: the get stops there,
 * the batches before it served, the one read beside it (double buffering) not. */
static void corrupt_block(size_t staging) {
    disk_fixture f;
    fixture_open(&f, 0, false, staging);
    char err[512];
    kv_ticket t;
    int32_t tok[80];
    rig_tokens(tok, 80);
    CHECK_EQ_INT(transfer(&f, &t, true, err, sizeof err), KV_OK); /* first time: fine */
    CHECK_EQ_INT(kv_store_match(f.dc, tok, 80), 5);
    corrupt_one_file(f.o.dir);
    CHECK_EQ_INT(transfer(&f, &t, true, err, sizeof err), KV_ERR_CORRUPT);
    CHECK_STR_CONTAINS(err, "corrupt");
    CHECK(kv_store_match(f.dc, tok, 80) < 5); /* a miss now */
    kv_store_stats st;
    kv_store_get_stats(f.dc, &st);
    CHECK_EQ_INT(st.corrupt, 1);
    CHECK_EQ_INT(transfer(&f, &t, true, err, sizeof err), KV_OK); /* put again, served */
    fixture_close(&f);
}
static void test_disk_corrupt_block(void) {
    corrupt_block(0);
    corrupt_block(1);
}

/* A put's time by part (kv_store_get_put_times, /metrics): counted on the side that
 * puts, every part non-negative, the layers' write timed, and the parts within the
 * put's own time; the decode side, which puts nothing, counts none; and the get's
 * likewise on the decode side. */
static void test_disk_put_parts(void) {
    disk_fixture f;
    fixture_open(&f, 0, false, 0);
    char err[512];
    kv_ticket t;
    kv_store_stats a;
    kv_store_get_put_times(f.pc, &a);
    CHECK(a.sends == 0);
    double t0 = time_now_s();
    CHECK_EQ_INT(transfer(&f, &t, false, err, sizeof err), KV_OK);
    double put = time_now_s() - t0;
    kv_store_get_put_times(f.pc, &a);
    CHECK(a.sends == 1);
    double sum = 0;
    for (int k = 0; k < KV_PUT_PARTS; k++) {
        CHECKF(a.put_s[k] >= 0, "%s: %g s", kv_put_part_names[k], a.put_s[k]);
        sum += a.put_s[k];
    }
    CHECKF(a.put_s[KV_PUT_WRITE] > 0 && a.put_s[KV_PUT_OPEN] > 0 && a.put_s[KV_PUT_PUBLISH] > 0,
           "write %g, open %g, publish %g s", a.put_s[KV_PUT_WRITE], a.put_s[KV_PUT_OPEN], a.put_s[KV_PUT_PUBLISH]);
    CHECKF(sum <= put, "parts %g s, the whole put and its reservation %g s", sum, put);
    kv_store_stats b;
    kv_store_get_stats(f.pc, &b); /* the full stats carry the same counters */
    CHECK(b.sends == 1 && b.put_s[KV_PUT_WRITE] == a.put_s[KV_PUT_WRITE]);
    kv_store_get_put_times(f.dc, &b);
    CHECK(b.sends == 0 && b.gets == 0);
    CHECK_EQ_INT(kv_ticket_wait(f.dc, &t, 5, err, sizeof err), KV_OK);
    /* the get's polls by part on the decode side: one get, its reads, checks and copies
     * timed; the prefill side, which gets nothing, counts none */
    kv_store_get_put_times(f.dc, &b);
    CHECK(b.gets == 1);
    for (int k = 0; k < KV_GET_PARTS; k++) CHECKF(b.get_s[k] >= 0, "%s: %g s", kv_get_part_names[k], b.get_s[k]);
    CHECKF(b.get_s[KV_GET_OPEN] > 0 && b.get_s[KV_GET_CHECK] > 0 && b.get_s[KV_GET_COPY] > 0,
           "open %g, check %g, copy %g s", b.get_s[KV_GET_OPEN], b.get_s[KV_GET_CHECK], b.get_s[KV_GET_COPY]);
    kv_store_get_put_times(f.pc, &a);
    CHECK(a.gets == 0);
    int32_t blocks[8];
    int n = kv_ticket_take(f.dc, &t, blocks, 8);
    if (n > 0) kv_pool_release(&f.g.pool, blocks, n);
    fixture_close(&f);
}

static void test_disk_pread_fallback(void) {
    disk_fixture f;
    fixture_open(&f, 0, true, 0);
    char err[512];
    kv_ticket t;
    CHECK_EQ_INT(transfer(&f, &t, true, err, sizeof err), KV_OK);
    fixture_close(&f);
}

int main(void) {
    TEST_RUN(test_disk_full);
    TEST_RUN(test_disk_create_fails);
    TEST_RUN(test_disk_put_parts);
    TEST_RUN(test_disk_corrupt_block);
    TEST_RUN(test_disk_tick_never_reads);
    TEST_RUN(test_disk_pread_fallback);
    TEST_RUN(test_disk_whole);
    TEST_RUN(test_disk_layerwise);
    TEST_RUN(test_disk_double_buffered);
    TEST_RUN(test_disk_stall_deadline);
    TEST_RUN(test_disk_dead_sender);
    TEST_RUN(test_disk_abort);
    return TEST_END();
}
