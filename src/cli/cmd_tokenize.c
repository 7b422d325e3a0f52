/* cmd_tokenize.c: `pdserve tokenize` (being written). */
#include <stdio.h>

#include "cli/cli.h"

int cmd_tokenize(int argc, char **argv) {
    (void)argc;
    (void)argv;
    fprintf(stderr, "pdserve tokenize: not part of this build yet\n");
    return 2;
}
