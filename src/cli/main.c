/* main.c: the pdserve program: dispatches to one subcommand. */
#include <stdio.h>
#include <string.h>

#include "cli/cli.h"

typedef struct command {
    const char *name;
    int (*fn)(int argc, char **argv);
    const char *summary;
} command;

static const command COMMANDS[] = {
    {"generate", cmd_generate, "run one prompt through the engine (greedy or sampled)"},
    {"tokenize", cmd_tokenize, "print the token ids of a text"},
    {"make-model", cmd_make_model, "write a small random model (config, weights, tokenizer)"},
    {"serve", cmd_serve, "serve the OpenAI API from one instance"},
    {"up", cmd_up, "start a whole deployment (router + instances) from a named setup"},
    {"bench", cmd_bench, "load generator against any OpenAI-compatible endpoint"},
    {"sweep", cmd_sweep, "run a study plan (setups x loads x clocks) into a results database"},
    {"demo", cmd_demo, "the study on this machine end to end: small model, every setup, report"},
    {"report", cmd_report, "Pareto frontiers, tables, plots and HTML from a results database"},
    {"profile", cmd_profile, "measure step costs on the real backend for the simulator"},
    {"sim", cmd_sim, "simulate a plan with the real scheduler on a calibrated cost model"},
};

static void usage(FILE *f) {
    fprintf(f, "pdserve %s: serve LLMs with prefill and decode colocated or disaggregated,\n"
               "and measure what that choice costs in latency and energy.\n\n"
               "usage: pdserve COMMAND [options]   (pdserve COMMAND --help for its options)\n\n"
               "commands:\n", PDSERVE_VERSION);
    for (size_t i = 0; i < sizeof COMMANDS / sizeof COMMANDS[0]; i++)
        fprintf(f, "  %-12s %s\n", COMMANDS[i].name, COMMANDS[i].summary);
}

int main(int argc, char **argv) {
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
        usage(stdout);
        return argc < 2 ? 2 : 0;
    }
    if (!strcmp(argv[1], "--version") || !strcmp(argv[1], "version")) {
        printf("pdserve %s\n", PDSERVE_VERSION);
        return 0;
    }
    for (size_t i = 0; i < sizeof COMMANDS / sizeof COMMANDS[0]; i++)
        if (!strcmp(argv[1], COMMANDS[i].name)) return COMMANDS[i].fn(argc - 1, argv + 1);
    fprintf(stderr, "pdserve: unknown command '%s'\n\n", argv[1]);
    usage(stderr);
    return 2;
}
