/* cmd_tokenize.c: `pdserve tokenize --model DIR TEXT`, the ids a completion prompt
 * becomes (as Hugging Face `tokenizer(TEXT)`), space-separated on one line. Other
 * tools and the tests rely on this output format. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli/cli.h"
#include "model/tokenizer.h"
#include "util/util.h"

/* Reads all of standard input, byte for byte. */
static char *read_stdin(size_t *len) {
    size_t cap = 1 << 16, n = 0;
    char *buf = xmalloc(cap);
    for (;;) {
        if (n == cap) buf = xrealloc(buf, cap *= 2);
        ssize_t r = read(0, buf + n, cap - n);
        if (r <= 0) break;
        n += (size_t)r;
    }
    *len = n;
    return buf;
}

/* The tokenizer of --model DIR, or of --tokenizer DIR when given. */
tokenizer *cli_load_tokenizer(const char *model, const char *tok_dir, char *err, size_t errlen) {
    const char *dir = tok_dir ? tok_dir : model;
    if (!dir || !strncmp(dir, "preset:", 7)) {
        pd_errorf(err, errlen, "a preset has no tokenizer: pass --tokenizer DIR");
        return NULL;
    }
    tokenizer *t = NULL;
    if (tokenizer_load(dir, &t, err, errlen) != 0) return NULL;
    return t;
}

int cmd_tokenize(int argc, char **argv) {
    const char *model = NULL, *tok_dir = NULL;
    bool no_special = false;
    cli_opt opts[] = {
        {"model", OPT_STRING, &model, "model directory holding tokenizer.json", "DIR"},
        {"tokenizer", OPT_STRING, &tok_dir, "tokenizer directory (default: --model)", "DIR"},
        {"no-special-tokens", OPT_FLAG, &no_special, "print the raw encoding (no BOS or template tokens)", NULL},
    };
    const char *usage = "usage: pdserve tokenize --model DIR [--no-special-tokens] TEXT\n\n"
                        "Prints the token ids of TEXT, space-separated, on one line: the ids a completion\n"
                        "prompt TEXT becomes (special tokens added as the tokenizer's post-processor does).\n"
                        "TEXT '-' reads the text from standard input, byte for byte.";
    const char *pos[1];
    int n_pos;
    bool help;
    if (cli_parse(argc, argv, opts, (int)PD_ARRAY_LEN(opts), usage, pos, 1, &n_pos, &help) != 0) return 2;
    if (help) return 0;
    if (n_pos != 1 || (!model && !tok_dir)) {
        fprintf(stderr, "pdserve tokenize: needs --model DIR and one TEXT argument (see --help)\n");
        return 2;
    }
    char err[512];
    tokenizer *t = cli_load_tokenizer(model, tok_dir, err, sizeof err);
    if (!t) {
        fprintf(stderr, "pdserve tokenize: %s\n", err);
        return 1;
    }
    size_t len = 0;
    char *text = !strcmp(pos[0], "-") ? read_stdin(&len) : xstrdup(pos[0]);
    if (strcmp(pos[0], "-")) len = strlen(text);
    int32_t *ids = NULL;
    int n = 0, rc = 0;
    if (tokenizer_encode(t, text, len, !no_special, &ids, &n, err, sizeof err) != 0) {
        fprintf(stderr, "pdserve tokenize: %s\n", err);
        rc = 1;
    } else {
        for (int i = 0; i < n; i++) printf(i ? " %d" : "%d", ids[i]);
        printf("\n");
    }
    free(ids);
    free(text);
    tokenizer_free(t);
    return rc;
}
