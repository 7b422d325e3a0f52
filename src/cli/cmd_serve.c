/* cmd_serve.c: `pdserve serve`, one instance serving the OpenAI API. */
#include <stdio.h>

#include "cli/cli.h"

int cmd_serve(int argc, char **argv) {
    (void)argc;
    (void)argv;
    fprintf(stderr, "pdserve serve: the server is not part of this build yet\n");
    return 2;
}
