/* cmd_generate.c: `pdserve generate` (being written). */
#include <stdio.h>

#include "cli/cli.h"

int cmd_generate(int argc, char **argv) {
    (void)argc;
    (void)argv;
    fprintf(stderr, "pdserve generate: not part of this build yet\n");
    return 2;
}
