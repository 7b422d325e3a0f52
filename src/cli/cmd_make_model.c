/* cmd_make_model.c: `pdserve make_model` (being written). */
#include <stdio.h>

#include "cli/cli.h"

int cmd_make_model(int argc, char **argv) {
    (void)argc;
    (void)argv;
    fprintf(stderr, "pdserve make_model: not part of this build yet\n");
    return 2;
}
