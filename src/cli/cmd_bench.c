/* cmd_bench.c: `pdserve bench` (being written). */
#include <stdio.h>

#include "cli/cli.h"

int cmd_bench(int argc, char **argv) {
    (void)argc;
    (void)argv;
    fprintf(stderr, "pdserve bench: not part of this build yet\n");
    return 2;
}
