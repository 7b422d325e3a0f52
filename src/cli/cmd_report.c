/* cmd_report.c: `pdserve report results.db -o DIR`: tables, Pareto frontiers, plots
 * (gnuplot, SVG + PNG), one HTML page and CSV files from a results database alone;
 * a plain-text comparison table on standard output. The work is in src/study/report.c. */
#include <stdio.h>

#include "cli/cli.h"
#include "study/study.h"
#include "util/util.h"

static const char USAGE[] =
    "usage: pdserve report results.db -o DIR [options]\n\n"
    "Writes DIR/index.html (tables per setup and load, energy by component, Pareto\n"
    "frontiers of latency and throughput vs J/token, latency-vs-load plots), the plots as\n"
    "SVG and PNG (drawn by gnuplot), and DIR/summaries.csv and DIR/runs.csv; prints a\n"
    "comparison table. Values that were not measured read 'not measured', never 0.";

int cmd_report(int argc, char **argv) {
    const char *out = NULL, *gnuplot = NULL;
    bool no_plots = false, quiet = false;
    const cli_opt opts[] = {
        {"o", OPT_STRING, &out, "output folder (created)", "DIR"},
        {"output", OPT_STRING, &out, "same as -o", "DIR"},
        {"gnuplot", OPT_STRING, &gnuplot, "gnuplot program (default: gnuplot on PATH)", "PROG"},
        {"no-plots", OPT_FLAG, &no_plots, "tables and CSV only (no gnuplot needed)", NULL},
        {"quiet", OPT_FLAG, &quiet, "do not print the comparison table", NULL},
    };
    /* "-o DIR" is a short option; the shared parser knows long ones: map it. */
    for (int i = 1; i < argc; i++)
        if (argv[i][0] == '-' && argv[i][1] == 'o' && argv[i][2] == 0) argv[i] = "--o";
    const char *pos[1];
    int n_pos;
    bool help;
    if (cli_parse(argc, argv, opts, (int)PD_ARRAY_LEN(opts), USAGE, pos, 1, &n_pos, &help) != 0) return 2;
    if (help) return 0;
    if (n_pos != 1 || !out) {
        fprintf(stderr, "pdserve report: give a results database and -o DIR (see --help)\n");
        return 2;
    }
    study_report_opts o = {.db_path = pos[0], .out_dir = out, .gnuplot = gnuplot, .no_plots = no_plots,
                           .table = quiet ? NULL : stdout};
    char err[1024];
    if (study_report(&o, err, sizeof err) != 0) {
        fprintf(stderr, "pdserve report: %s\n", err);
        return 1;
    }
    fprintf(stderr, "pdserve report: wrote %s/index.html\n", out);
    return 0;
}
