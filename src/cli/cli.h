/* cli.h: the subcommands of the pdserve program and the option parser they share.
 * Each command is `int cmd_NAME(int argc, char **argv)` with argv[0] the command's
 * name; it returns the process exit status. Options are GNU long options
 * (--name value or --name=value); unknown options are an error naming them. */
#ifndef PD_CLI_H
#define PD_CLI_H

#include <stdbool.h>
#include <stddef.h>

typedef enum opt_kind { OPT_STRING, OPT_INT, OPT_DOUBLE, OPT_FLAG, OPT_SIZE } opt_kind;

typedef struct cli_opt {
    const char *name;      /* without the leading dashes */
    opt_kind kind;
    void *dst;             /* const char **, int *, double *, bool *, or size_t * (OPT_SIZE accepts 4GiB, 512MB ...) */
    const char *help;
    const char *metavar;
} cli_opt;

/* Parses argv[1..] against opts; positional arguments are collected into pos (up to
 * max_pos). --help prints usage (summary + every option) and sets *help.
 * Returns 0, or -1 after printing an error naming the option. */
int cli_parse(int argc, char **argv, const cli_opt *opts, int n_opts, const char *usage,
              const char **pos, int max_pos, int *n_pos, bool *help);
void cli_print_help(const char *usage, const cli_opt *opts, int n_opts);
/* --device: "cpu" or "-1" (the CPU: *gpu = -1), "cuda" (GPU 0), "cuda:N" or "N" (GPU
 * N). 0, or -1 when the text is none of these. */
int cli_parse_device(const char *s, int *gpu);
/* --cpus: pins this process (compute_only: its compute threads, util_pin_compute) to a
 * CPU list ("2-3,6") or, for "auto", to `threads` CPUs of their own (util_cpus_auto:
 * distinct physical cores, the first core left out); logs the CPUs as `who: ... pinned
 * to CPUs ...`. 0, or -1 with the reason. */
int cli_pin_cpus(const char *spec, int threads, bool compute_only, const char *who, char *err, size_t errlen);
/* Parses "512MiB", "4GiB", "1e9", "100000" into bytes; -1 on error. */
long long cli_parse_size(const char *s);

struct tokenizer;
/* The tokenizer of --model DIR, or of --tokenizer DIR when given; NULL with err. */
struct tokenizer *cli_load_tokenizer(const char *model, const char *tok_dir, char *err, size_t errlen);

int cmd_generate(int argc, char **argv);
int cmd_tokenize(int argc, char **argv);
int cmd_make_model(int argc, char **argv);
int cmd_serve(int argc, char **argv);
int cmd_up(int argc, char **argv);
int cmd_bench(int argc, char **argv);
int cmd_sweep(int argc, char **argv);
int cmd_report(int argc, char **argv);
int cmd_demo(int argc, char **argv);
int cmd_profile(int argc, char **argv);
int cmd_sim(int argc, char **argv);

#endif
