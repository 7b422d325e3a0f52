/* safetensors.c: the safetensors format (8-byte little-endian header length, a JSON
 * header naming each tensor's dtype, shape and byte range, then the data), read by
 * mapping the files read-only, and written for `pdserve make-model` and for tests.
 *
 * Tuned for start-up: a model is opened once, its headers are parsed once, and the
 * tensor bytes are never copied here (the mapping is handed to the backend, which
 * uploads or converts). Headers come from outside and are checked field by field
 * before any byte range is trusted; the parser is fuzzed (fuzz/fuzz_safetensors.c). */
#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "model/model.h"
#include "util/util.h"

/* The largest header we accept: real ones are a few hundred KB even for 400B models. */
#define ST_MAX_HEADER (100u << 20)
/* JSON numbers are doubles: integers above 2^53 cannot be told apart. */
#define ST_MAX_JSON_INT 9007199254740992.0
#define ST_MAX_NAME 1024

/* ---- header parsing ----------------------------------------------------------------- */

static uint64_t read_le64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

/* Supported element types by safetensors name; *known tells apart a real but
 * unsupported dtype ("I64") from a made-up one. */
static int st_dtype_parse(const char *s, dtype *out, bool *known) {
    static const char *const OTHER[] = {"BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64",
                                        "U64", "F64", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4",
                                        "F6_E2M3", "F6_E3M2", "C64"};
    *known = true;
    if (strcmp(s, "F32") == 0) *out = DTYPE_F32;
    else if (strcmp(s, "F16") == 0) *out = DTYPE_F16;
    else if (strcmp(s, "BF16") == 0) *out = DTYPE_BF16;
    else {
        *known = false;
        for (size_t i = 0; i < PD_ARRAY_LEN(OTHER); i++)
            if (strcmp(s, OTHER[i]) == 0) *known = true;
        return -1;
    }
    return 0;
}

/* A non-negative integral JSON number below 2^53. */
static bool json_u64(const cJSON *it, uint64_t *out) {
    if (!cJSON_IsNumber(it)) return false;
    double v = it->valuedouble;
    if (!isfinite(v) || v < 0 || v != floor(v) || v >= ST_MAX_JSON_INT) return false;
    *out = (uint64_t)v;
    return true;
}

/* Fills t from one header entry {"dtype", "shape", "data_offsets"}; checks everything
 * that does not depend on other tensors. data_size: bytes after the header. */
static int parse_entry(const cJSON *e, const char *file, uint64_t data_size, st_tensor *t, char *err,
                       size_t errlen) {
    const char *name = t->name;
    if (!cJSON_IsObject(e)) {
        pd_errorf(err, errlen, "%s: tensor '%s': entry must be an object", file, name);
        return -1;
    }
    const cJSON *dt = cJSON_GetObjectItemCaseSensitive(e, "dtype");
    const cJSON *shape = cJSON_GetObjectItemCaseSensitive(e, "shape");
    const cJSON *offs = cJSON_GetObjectItemCaseSensitive(e, "data_offsets");
    if (!cJSON_IsString(dt) || !dt->valuestring) {
        pd_errorf(err, errlen, "%s: tensor '%s': field 'dtype' must be a string", file, name);
        return -1;
    }
    bool known;
    if (st_dtype_parse(dt->valuestring, &t->dtype, &known)) {
        pd_errorf(err, errlen, "%s: tensor '%s' has %s dtype '%.32s' (pdserve reads F32, F16, BF16)",
                  file, name, known ? "unsupported" : "unknown", dt->valuestring);
        return -1;
    }
    if (!cJSON_IsArray(shape)) {
        pd_errorf(err, errlen, "%s: tensor '%s': field 'shape' must be a list", file, name);
        return -1;
    }
    uint64_t numel = 1;
    t->ndim = 0;
    for (const cJSON *d = shape->child; d; d = d->next) {
        uint64_t v;
        if (t->ndim == ST_MAX_DIMS) {
            pd_errorf(err, errlen, "%s: tensor '%s' has more than %d dimensions", file, name, ST_MAX_DIMS);
            return -1;
        }
        if (!json_u64(d, &v)) {
            pd_errorf(err, errlen, "%s: tensor '%s': field 'shape' must hold non-negative integers below 2^53",
                      file, name);
            return -1;
        }
        if (__builtin_mul_overflow(numel, v, &numel)) {
            pd_errorf(err, errlen, "%s: tensor '%s': shape is too large", file, name);
            return -1;
        }
        t->shape[t->ndim++] = (int64_t)v;
    }
    uint64_t begin, end;
    if (!cJSON_IsArray(offs) || cJSON_GetArraySize(offs) != 2 || !json_u64(offs->child, &begin) ||
        !json_u64(offs->child->next, &end) || end < begin) {
        pd_errorf(err, errlen, "%s: tensor '%s': field 'data_offsets' must be [begin, end] with 0 <= begin <= end",
                  file, name);
        return -1;
    }
    uint64_t nbytes;
    if (__builtin_mul_overflow(numel, (uint64_t)dtype_size(t->dtype), &nbytes) || end - begin != nbytes) {
        pd_errorf(err, errlen, "%s: tensor '%s': data_offsets [%llu, %llu] hold %llu bytes, but shape and dtype need %llu",
                  file, name, (unsigned long long)begin, (unsigned long long)end,
                  (unsigned long long)(end - begin), (unsigned long long)numel * dtype_size(t->dtype));
        return -1;
    }
    if (end > data_size) {
        pd_errorf(err, errlen, "%s: tensor '%s': data_offsets end %llu is past the end of the data (%llu bytes): file truncated or offsets out of range",
                  file, name, (unsigned long long)end, (unsigned long long)data_size);
        return -1;
    }
    t->offset = begin;
    t->nbytes = nbytes;
    return 0;
}

static int cmp_offset(const void *a, const void *b) {
    const st_tensor *x = a, *y = b;
    if (x->offset != y->offset) return x->offset < y->offset ? -1 : 1;
    return x->nbytes < y->nbytes ? -1 : x->nbytes > y->nbytes;
}

static int cmp_name(const void *a, const void *b) {
    return strcmp(((const st_tensor *)a)->name, ((const st_tensor *)b)->name);
}

/* No two non-empty byte ranges overlap; no name appears twice. Sorts t by name. */
static int check_layout(st_tensor *t, int n, const char *file, char *err, size_t errlen) {
    qsort(t, (size_t)n, sizeof *t, cmp_offset);
    uint64_t reach = 0;
    int owner = -1;
    for (int i = 0; i < n; i++) {
        if (t[i].nbytes == 0) continue;
        if (owner >= 0 && t[i].offset < reach) {
            pd_errorf(err, errlen, "%s: tensor '%s' overlaps tensor '%s': its data starts at byte %llu, before the other's ends at %llu",
                      file, t[i].name, t[owner].name, (unsigned long long)t[i].offset,
                      (unsigned long long)reach);
            return -1;
        }
        reach = t[i].offset + t[i].nbytes;
        owner = i;
    }
    qsort(t, (size_t)n, sizeof *t, cmp_name);
    for (int i = 1; i < n; i++) {
        if (strcmp(t[i - 1].name, t[i].name) == 0) {
            pd_errorf(err, errlen, "%s: tensor '%s' appears twice in the header", file, t[i].name);
            return -1;
        }
    }
    return 0;
}

/* Length of the header and the whole-file checks that come before the JSON. */
static int header_bounds(const uint8_t *buf, size_t len, uint64_t file_size, const char *file,
                         uint64_t *hlen, char *err, size_t errlen) {
    if (len < 8 || file_size < 8) {
        pd_errorf(err, errlen, "%s: file truncated: %llu bytes, too short for the 8-byte header length",
                  file, (unsigned long long)PD_MIN((uint64_t)len, file_size));
        return -1;
    }
    *hlen = read_le64(buf);
    if (*hlen > ST_MAX_HEADER) {
        pd_errorf(err, errlen, "%s: header length %llu is above the limit of %u bytes (not a safetensors file?)",
                  file, (unsigned long long)*hlen, ST_MAX_HEADER);
        return -1;
    }
    if (*hlen > file_size - 8) {
        pd_errorf(err, errlen, "%s: header length %llu runs past the end of the file (%llu bytes): file truncated",
                  file, (unsigned long long)*hlen, (unsigned long long)file_size);
        return -1;
    }
    if (*hlen > len - 8) {
        pd_errorf(err, errlen, "%s: header of %llu bytes not fully read (%zu bytes available)", file,
                  (unsigned long long)*hlen, len);
        return -1;
    }
    if (*hlen < 2) {
        pd_errorf(err, errlen, "%s: header is empty", file);
        return -1;
    }
    return 0;
}

static bool json_space(const char *p, const char *end) {
    for (; p < end; p++)
        if (*p != ' ' && *p != '\t' && *p != '\n' && *p != '\r') return false;
    return true;
}

int st_parse_header(const uint8_t *buf, size_t len, uint64_t file_size, const char *filename,
                    st_tensor **out, int *n, char *err, size_t errlen) {
    const char *file = filename ? filename : "model.safetensors";
    uint64_t hlen;
    *out = NULL;
    *n = 0;
    if (header_bounds(buf, len, file_size, file, &hlen, err, errlen)) return -1;
    const char *json = (const char *)buf + 8, *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(json, (size_t)hlen, &end, 0);
    if (!root || !end || !json_space(end, json + hlen)) {
        pd_errorf(err, errlen, "%s: header is not valid JSON (at byte %ld of the header)", file,
                  end && end >= json ? (long)(end - json) : 0L);
        cJSON_Delete(root);
        return -1;
    }
    int rc = -1, count = 0;
    st_tensor *t = NULL;
    if (!cJSON_IsObject(root)) {
        pd_errorf(err, errlen, "%s: header must be a JSON object", file);
        goto done;
    }
    int cap = cJSON_GetArraySize(root); /* entries, bounded by the header's size */
    t = xcalloc((size_t)(cap > 0 ? cap : 1), sizeof *t);
    uint64_t data_size = file_size - 8 - hlen;
    for (const cJSON *e = root->child; e; e = e->next) {
        if (!e->string) continue;
        if (strcmp(e->string, "__metadata__") == 0) continue;
        size_t nl = strlen(e->string);
        if (nl == 0 || nl > ST_MAX_NAME) {
            pd_errorf(err, errlen, "%s: a tensor name is empty or longer than %d bytes", file, ST_MAX_NAME);
            goto done;
        }
        PD_ASSERT(count < cap);
        st_tensor *ti = &t[count++];
        ti->name = xstrdup(e->string);
        if (parse_entry(e, file, data_size, ti, err, errlen)) goto done;
    }
    if (check_layout(t, count, file, err, errlen)) goto done;
    rc = 0;
done:
    cJSON_Delete(root);
    if (rc) {
        st_tensors_free(t, count);
        return -1;
    }
    *out = t;
    *n = count;
    return 0;
}

void st_tensors_free(st_tensor *t, int n) {
    if (!t) return;
    for (int i = 0; i < n; i++) free(t[i].name);
    free(t);
}

/* ---- the index of a sharded checkpoint ---------------------------------------------- */

static bool plain_file_name(const char *s) {
    size_t n = strlen(s);
    return n > 0 && n < 256 && !strchr(s, '/') && strcmp(s, ".") != 0 && strcmp(s, "..") != 0;
}

void st_index_free(st_index *ix) {
    if (!ix) return;
    for (int i = 0; i < ix->n_shards; i++) free(ix->shards[i]);
    for (int i = 0; i < ix->n_tensors; i++) free(ix->tensors[i]);
    free(ix->shards);
    free(ix->tensors);
    free(ix->shard_of);
    memset(ix, 0, sizeof *ix);
}

/* Index of shard `name` in ix, adding it when new. Shards are few (tens), so a linear
 * search costs nothing next to opening them. */
static int index_shard(st_index *ix, const char *name) {
    for (int i = 0; i < ix->n_shards; i++)
        if (strcmp(ix->shards[i], name) == 0) return i;
    ix->shards[ix->n_shards] = xstrdup(name);
    return ix->n_shards++;
}

int st_index_parse(const char *json, size_t len, const char *filename, st_index *out, char *err,
                   size_t errlen) {
    const char *file = filename ? filename : "model.safetensors.index.json", *end = NULL;
    memset(out, 0, sizeof *out);
    cJSON *root = json ? cJSON_ParseWithLengthOpts(json, len, &end, 0) : NULL;
    if (!root || !end || !json_space(end, json + len)) {
        pd_errorf(err, errlen, "%s: not valid JSON", file);
        cJSON_Delete(root);
        return -1;
    }
    int rc = -1;
    const cJSON *map = cJSON_IsObject(root) ? cJSON_GetObjectItemCaseSensitive(root, "weight_map") : NULL;
    if (!cJSON_IsObject(map) || !map->child) {
        pd_errorf(err, errlen, "%s: field 'weight_map' must be a non-empty object", file);
        goto done;
    }
    int cap = cJSON_GetArraySize(map);
    out->shards = xcalloc((size_t)cap, sizeof *out->shards);
    out->tensors = xcalloc((size_t)cap, sizeof *out->tensors);
    out->shard_of = xcalloc((size_t)cap, sizeof *out->shard_of);
    for (const cJSON *e = map->child; e; e = e->next) {
        if (!e->string || !e->string[0] || !cJSON_IsString(e) || !e->valuestring ||
            !plain_file_name(e->valuestring)) {
            pd_errorf(err, errlen, "%s: field 'weight_map': entry '%.200s' must name a file in the same directory",
                      file, e->string ? e->string : "");
            goto done;
        }
        PD_ASSERT(out->n_tensors < cap);
        out->shard_of[out->n_tensors] = index_shard(out, e->valuestring);
        out->tensors[out->n_tensors++] = xstrdup(e->string);
    }
    rc = 0;
done:
    cJSON_Delete(root);
    if (rc) st_index_free(out);
    return rc;
}

/* ---- a set of mapped files ------------------------------------------------------------ */

typedef struct st_file {
    char *name;       /* file name without directory, for messages */
    const uint8_t *map; /* whole file, PROT_READ */
    size_t size;
} st_file;

struct st_set {
    st_file *files;
    int n_files;
    st_tensor *tensors; /* sorted by name; data points into files[file_index].map */
    int n;
    bool sharded;       /* opened through model.safetensors.index.json */
};

/* Maps dir/name and parses its header into fresh tensors with data pointers set. */
static int st_map_one(const char *dir, const char *name, int index, st_file *f, st_tensor **t,
                      int *n, char *err, size_t errlen) {
    char path[4096];
    if (dir) path_join(path, sizeof path, dir, name);
    else snprintf(path, sizeof path, "%s", name);
    const char *base = strrchr(name, '/') ? strrchr(name, '/') + 1 : name;
    f->name = xstrdup(base);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        pd_errorf(err, errlen, "%s: cannot open: %s", path, strerror(errno));
        return -1;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        pd_errorf(err, errlen, "%s: not a regular file", path);
        close(fd);
        return -1;
    }
    if (st.st_size < 8) {
        pd_errorf(err, errlen, "%s: file truncated: %lld bytes, too short for the 8-byte header length",
                  f->name, (long long)st.st_size);
        close(fd);
        return -1;
    }
    void *m = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd); /* the mapping keeps the file */
    if (m == MAP_FAILED) {
        pd_errorf(err, errlen, "%s: mmap of %lld bytes failed: %s", path, (long long)st.st_size,
                  strerror(errno));
        return -1;
    }
    f->map = m;
    f->size = (size_t)st.st_size;
    if (st_parse_header(f->map, f->size, f->size, f->name, t, n, err, errlen)) return -1;
    uint64_t data_start = 8 + read_le64(f->map);
    for (int i = 0; i < *n; i++) {
        (*t)[i].data = f->map + data_start + (*t)[i].offset;
        (*t)[i].file_index = index;
    }
    return 0;
}

void st_close(st_set *s) {
    if (!s) return;
    for (int i = 0; i < s->n_files; i++) {
        if (s->files[i].map) munmap((void *)s->files[i].map, s->files[i].size);
        free(s->files[i].name);
    }
    free(s->files);
    st_tensors_free(s->tensors, s->n);
    free(s);
}

/* Appends tensors t[0..n) (taking ownership of the names) to s. */
static void set_append(st_set *s, st_tensor *t, int n) {
    s->tensors = xrealloc(s->tensors, (size_t)(s->n + n + 1) * sizeof *s->tensors);
    memcpy(s->tensors + s->n, t, (size_t)n * sizeof *t);
    s->n += n;
    free(t);
}

/* Opens files names[0..n) under dir (dir NULL: names are paths) into one set. */
static int st_open_files(const char *dir, char *const *names, int n, st_set **out, char *err,
                         size_t errlen) {
    st_set *s = xcalloc(1, sizeof *s);
    s->files = xcalloc((size_t)n, sizeof *s->files);
    for (int i = 0; i < n; i++) {
        st_tensor *t = NULL;
        int nt = 0;
        s->n_files++;
        if (st_map_one(dir, names[i], i, &s->files[i], &t, &nt, err, errlen)) goto fail;
        set_append(s, t, nt);
    }
    qsort(s->tensors, (size_t)s->n, sizeof *s->tensors, cmp_name);
    for (int i = 1; i < s->n; i++) {
        if (strcmp(s->tensors[i - 1].name, s->tensors[i].name) == 0) {
            pd_errorf(err, errlen, "%s: tensor '%s' is also in %s", s->files[s->tensors[i].file_index].name,
                      s->tensors[i].name, s->files[s->tensors[i - 1].file_index].name);
            goto fail;
        }
    }
    *out = s;
    return 0;
fail:
    st_close(s);
    *out = NULL;
    return -1;
}

int st_open_file(const char *path, st_set **out, char *err, size_t errlen) {
    char *names[1] = {(char *)path};
    return st_open_files(NULL, names, 1, out, err, errlen);
}

/* Every tensor the index names is in the shard it names. */
static int check_index(const st_set *s, const st_index *ix, const char *file, char *err, size_t errlen) {
    for (int i = 0; i < ix->n_tensors; i++) {
        const st_tensor *t = st_find(s, ix->tensors[i]);
        const char *want = ix->shards[ix->shard_of[i]];
        if (!t) {
            pd_errorf(err, errlen, "%s: tensor '%s' is listed in weight_map but missing from %s", file,
                      ix->tensors[i], want);
            return -1;
        }
        if (strcmp(s->files[t->file_index].name, want) != 0) {
            pd_errorf(err, errlen, "%s: tensor '%s' is listed in %s but found in %s", file,
                      ix->tensors[i], want, s->files[t->file_index].name);
            return -1;
        }
    }
    return 0;
}

int st_open_dir(const char *dir, st_set **out, char *err, size_t errlen) {
    char path[4096];
    *out = NULL;
    path_join(path, sizeof path, dir, "model.safetensors.index.json");
    if (util_file_exists(path)) {
        size_t len;
        char *text = util_read_file(path, &len, err, errlen);
        if (!text) return -1;
        st_index ix;
        int rc = st_index_parse(text, len, "model.safetensors.index.json", &ix, err, errlen);
        free(text);
        if (rc) return -1;
        rc = st_open_files(dir, ix.shards, ix.n_shards, out, err, errlen);
        if (!rc) (*out)->sharded = true;
        if (!rc && check_index(*out, &ix, "model.safetensors.index.json", err, errlen)) {
            st_close(*out);
            *out = NULL;
            rc = -1;
        }
        st_index_free(&ix);
        return rc;
    }
    path_join(path, sizeof path, dir, "model.safetensors");
    if (!util_file_exists(path)) {
        pd_errorf(err, errlen, "%s: no model.safetensors or model.safetensors.index.json (use --load-format dummy for random weights)",
                  dir);
        return -1;
    }
    char *names[1] = {"model.safetensors"};
    return st_open_files(dir, names, 1, out, err, errlen);
}

const st_tensor *st_find(const st_set *s, const char *name) {
    int lo = 0, hi = s->n - 1;
    while (lo <= hi) {
        int mid = lo + (hi - lo) / 2, c = strcmp(s->tensors[mid].name, name);
        if (c == 0) return &s->tensors[mid];
        if (c < 0) lo = mid + 1;
        else hi = mid - 1;
    }
    return NULL;
}

int st_count(const st_set *s) { return s->n; }

const st_tensor *st_get(const st_set *s, int i) {
    PD_ASSERT(i >= 0 && i < s->n);
    return &s->tensors[i];
}

int st_file_count(const st_set *s) { return s->n_files; }

const char *st_source_name(const st_set *s) {
    return s->sharded || s->n_files != 1 ? "model.safetensors.index.json" : s->files[0].name;
}

const char *st_file_name(const st_set *s, int file_index) {
    PD_ASSERT(file_index >= 0 && file_index < s->n_files);
    return s->files[file_index].name;
}

/* ---- conversions: byte-wise loads, since mapped data need not be aligned ------------ */

void st_convert_f32(float *dst, const void *src, dtype src_type, size_t n) {
    const uint8_t *p = src;
    for (size_t i = 0; i < n; i++) {
        uint16_t h;
        int32_t v;
        switch (src_type) {
        case DTYPE_F32: memcpy(&dst[i], p + 4 * i, 4); break;
        case DTYPE_F16: memcpy(&h, p + 2 * i, 2); dst[i] = f16_to_f32(h); break;
        case DTYPE_BF16: memcpy(&h, p + 2 * i, 2); dst[i] = bf16_to_f32(h); break;
        case DTYPE_I32: memcpy(&v, p + 4 * i, 4); dst[i] = (float)v; break;
        default: PD_ASSERT(!"st_convert_f32: bad dtype");
        }
    }
}

void st_convert_bf16(uint16_t *dst, const void *src, dtype src_type, size_t n) {
    if (src_type == DTYPE_BF16) {
        memcpy(dst, src, n * 2);
        return;
    }
    float tmp[256];
    for (size_t i = 0; i < n; i += 256) {
        size_t m = PD_MIN((size_t)256, n - i);
        st_convert_f32(tmp, (const uint8_t *)src + i * dtype_size(src_type), src_type, m);
        for (size_t j = 0; j < m; j++) dst[i + j] = f32_to_bf16(tmp[j]);
    }
}

/* ---- writing --------------------------------------------------------------------------- */

typedef struct sbuf {
    char *p;
    size_t len, cap;
} sbuf;

static void sbuf_put(sbuf *b, const char *s, size_t n) {
    if (b->len + n + 1 > b->cap) {
        b->cap = PD_MAX(b->cap * 2, b->len + n + 1 + 256);
        b->p = xrealloc(b->p, b->cap);
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = 0;
}

static void sbuf_printf(sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sbuf_printf(sbuf *b, const char *fmt, ...) {
    char tmp[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    PD_ASSERT(n >= 0 && (size_t)n < sizeof tmp);
    sbuf_put(b, tmp, (size_t)n);
}

/* A JSON string literal of s. */
static void sbuf_json_string(sbuf *b, const char *s) {
    sbuf_put(b, "\"", 1);
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\') {
            char esc[2] = {'\\', (char)ch};
            sbuf_put(b, esc, 2);
        } else if (ch < 0x20) {
            sbuf_printf(b, "\\u%04x", ch);
        } else {
            sbuf_put(b, (const char *)&ch, 1);
        }
    }
    sbuf_put(b, "\"", 1);
}

/* Bytes of one tensor from its shape, or -1 with err when it cannot be written. */
static int tensor_bytes(const st_tensor *t, uint64_t *nbytes, char *err, size_t errlen) {
    if (!t->name || !t->name[0] || (t->dtype != DTYPE_F32 && t->dtype != DTYPE_F16 &&
                                     t->dtype != DTYPE_BF16) || t->ndim < 0 || t->ndim > ST_MAX_DIMS) {
        pd_errorf(err, errlen, "tensor '%s': needs a name, dtype F32/F16/BF16 and at most %d dims",
                  t->name ? t->name : "", ST_MAX_DIMS);
        return -1;
    }
    uint64_t n = dtype_size(t->dtype);
    for (int d = 0; d < t->ndim; d++) {
        if (t->shape[d] < 0 || __builtin_mul_overflow(n, (uint64_t)t->shape[d], &n)) {
            pd_errorf(err, errlen, "tensor '%s': bad shape", t->name);
            return -1;
        }
    }
    if (t->nbytes && t->nbytes != n) {
        pd_errorf(err, errlen, "tensor '%s': nbytes %llu does not match its shape (%llu)", t->name,
                  (unsigned long long)t->nbytes, (unsigned long long)n);
        return -1;
    }
    if (n && !t->data) {
        pd_errorf(err, errlen, "tensor '%s': no data", t->name);
        return -1;
    }
    *nbytes = n;
    return 0;
}

/* The header JSON for t[0..n) laid out in `order`, padded with spaces to a multiple of
 * 8 bytes as Hugging Face does, so that the data that follows starts aligned. */
static int build_header(const st_tensor *t, int n, const int *order, sbuf *h, char *err, size_t errlen) {
    uint64_t *begin = xcalloc((size_t)n + 1, sizeof *begin), at = 0;
    for (int k = 0; k < n; k++) {
        uint64_t nb;
        if (tensor_bytes(&t[order[k]], &nb, err, errlen)) {
            free(begin);
            return -1;
        }
        begin[order[k]] = at;
        at += nb;
    }
    sbuf_put(h, "{\"__metadata__\":{\"format\":\"pt\"}", 32);
    for (int i = 0; i < n; i++) {
        uint64_t nb;
        tensor_bytes(&t[i], &nb, NULL, 0);
        sbuf_put(h, ",", 1);
        sbuf_json_string(h, t[i].name);
        sbuf_printf(h, ":{\"dtype\":\"%s\",\"shape\":[", dtype_name(t[i].dtype));
        for (int d = 0; d < t[i].ndim; d++) sbuf_printf(h, "%s%lld", d ? "," : "", (long long)t[i].shape[d]);
        sbuf_printf(h, "],\"data_offsets\":[%llu,%llu]}", (unsigned long long)begin[i],
                    (unsigned long long)(begin[i] + nb));
    }
    sbuf_put(h, "}", 1);
    while (h->len % 8) sbuf_put(h, " ", 1);
    free(begin);
    return 0;
}

int st_write_file(const char *path, const st_tensor *t, int n, char *err, size_t errlen) {
    /* Data in order of falling element size (stable), so every tensor is aligned to its
     * element size when the data section is (as Hugging Face lays it out). */
    int *order = xcalloc((size_t)n + 1, sizeof *order), k = 0;
    for (int pass = 0; pass < 3; pass++) {
        for (int i = 0; i < n; i++) {
            size_t sz = dtype_size(t[i].dtype);
            if ((sz == 4 ? 0 : sz == 2 ? 1 : 2) == pass) order[k++] = i;
        }
    }
    sbuf h = {0};
    int rc = build_header(t, n, order, &h, err, errlen);
    char tmp[4200];
    snprintf(tmp, sizeof tmp, "%s.tmp.%d", path, (int)getpid());
    FILE *f = rc ? NULL : fopen(tmp, "wb");
    if (!rc && !f) {
        pd_errorf(err, errlen, "%s: cannot create: %s", tmp, strerror(errno));
        rc = -1;
    }
    if (f) {
        uint8_t len8[8];
        for (int i = 0; i < 8; i++) len8[i] = (uint8_t)((uint64_t)h.len >> (8 * i));
        bool ok = fwrite(len8, 1, 8, f) == 8 && fwrite(h.p, 1, h.len, f) == h.len;
        for (int j = 0; ok && j < n; j++) {
            uint64_t nb;
            tensor_bytes(&t[order[j]], &nb, NULL, 0);
            ok = nb == 0 || fwrite(t[order[j]].data, 1, nb, f) == nb;
        }
        ok = (fclose(f) == 0) && ok;
        if (!ok || rename(tmp, path) != 0) {
            pd_errorf(err, errlen, "%s: write failed: %s", path, strerror(errno));
            unlink(tmp);
            rc = -1;
        }
    }
    free(h.p);
    free(order);
    return rc;
}
