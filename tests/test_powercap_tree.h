/* test_powercap_tree.h: writing a stand-in RAPL powercap tree (PDSERVE_POWERCAP_ROOT)
 * under a test's temporary folder. */
#ifndef PDSERVE_TEST_POWERCAP_TREE_H
#define PDSERVE_TEST_POWERCAP_TREE_H

#include <stdio.h>

/* Writes text to root/rel through a rename, so that a sampler never reads half a file. */
static inline void powercap_put(const char *root, const char *rel, const char *text) {
    char path[512], tmp[520];
    snprintf(path, sizeof path, "%s/%s", root, rel);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (!f) return;
    fputs(text, f);
    fclose(f);
    rename(tmp, path);
}

#endif
