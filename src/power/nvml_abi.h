/* nvml_abi.h (private to src/power/): the slice of NVML's public ABI that pdserve uses,
 * declared here so that nothing links libnvidia-ml or needs nvml.h at build time, and
 * the loaded library's function table shared by nvml.c (reads) and clocks.c (locks).
 *
 * Values and layouts follow NVML's public nvml.h (CUDA 12/13): return codes, clock
 * types, nvmlFieldValue_t and NVML_FI_DEV_POWER_INSTANT = 186 ("current GPU power,
 * supported on all architectures"; 185 is the 1-second average). */
#ifndef PD_POWER_NVML_ABI_H
#define PD_POWER_NVML_ABI_H

#include "power/power.h"

typedef void *nvml_device; /* nvmlDevice_t: an opaque pointer */

enum {
    NVML_OK = 0,
    NVML_ERR_UNINITIALIZED = 1,
    NVML_ERR_INVALID_ARGUMENT = 2,
    NVML_ERR_NOT_SUPPORTED = 3,
    NVML_ERR_NO_PERMISSION = 4,
    NVML_ERR_NOT_FOUND = 6,
    NVML_ERR_INSUFFICIENT_SIZE = 7,
    NVML_ERR_GPU_IS_LOST = 15,
    NVML_ERR_UNKNOWN = 999,
};
enum { NVML_CLK_GRAPHICS = 0, NVML_CLK_SM = 1, NVML_CLK_MEM = 2 };
enum { NVML_TEMP_GPU = 0 };
#define NVML_FIELD_POWER_INSTANT 186u

typedef struct nvml_utilization { unsigned gpu, memory; } nvml_utilization;
typedef union nvml_value {
    double dVal;
    int siVal;
    unsigned uiVal;
    unsigned long ulVal;
    unsigned long long ullVal;
    long long sllVal;
    unsigned short usVal;
} nvml_value;
enum { NVML_VT_DOUBLE = 0, NVML_VT_UINT, NVML_VT_ULONG, NVML_VT_ULLONG, NVML_VT_SLLONG,
       NVML_VT_SINT, NVML_VT_USHORT };
typedef struct nvml_field_value {
    unsigned fieldId;
    unsigned scopeId;
    long long timestamp;   /* us since 1970 */
    long long latencyUsec;
    int valueType;         /* NVML_VT_* */
    int nvmlReturn;
    nvml_value value;
} nvml_field_value;

/* The loaded library. Optional entry points (absent on old drivers) are NULL. */
struct power_nvml {
    void *lib;
    int (*init)(void);
    int (*shutdown)(void);
    const char *(*error_string)(int);
    int (*get_count)(unsigned *);
    int (*get_handle)(unsigned, nvml_device *);
    int (*get_name)(nvml_device, char *, unsigned);
    int (*driver_version)(char *, unsigned);                         /* optional */
    int (*total_energy)(nvml_device, unsigned long long *);          /* optional */
    int (*power_usage)(nvml_device, unsigned *);                     /* optional */
    int (*field_values)(nvml_device, int, nvml_field_value *);       /* optional */
    int (*clock_info)(nvml_device, int, unsigned *);                 /* optional */
    int (*utilization)(nvml_device, nvml_utilization *);             /* optional */
    int (*temperature)(nvml_device, int, unsigned *);                /* optional */
    int (*supported_mem_clocks)(nvml_device, unsigned *, unsigned *);            /* optional */
    int (*supported_gr_clocks)(nvml_device, unsigned, unsigned *, unsigned *);   /* optional */
    int (*set_locked_clocks)(nvml_device, unsigned, unsigned);       /* optional */
    int (*reset_locked_clocks)(nvml_device);                         /* optional */
    int (*applications_clock)(nvml_device, int, unsigned *);         /* optional */
    int (*enforced_power_limit)(nvml_device, unsigned *);            /* optional, mW */
    int (*clock_reasons)(nvml_device, unsigned long long *);         /* optional */

    int n;                              /* devices opened */
    nvml_device dev[POWER_MAX_GPUS];
    char name[POWER_MAX_GPUS][POWER_NAME_LEN];
    bool instant_ok[POWER_MAX_GPUS];    /* field 186 answered at open */
    char driver[80];
};

/* The one checking wrapper every NVML call goes through: evaluates the call, logs a
 * failure at debug level with the statement, file and line (many failures are the
 * expected NOT_SUPPORTED of a feature the card lacks), and yields the return code. */
int power_nvml_check(const struct power_nvml *nv, int rc, const char *what, const char *file,
                     int line);
#define NVML_CALL(nv, call) power_nvml_check((nv), (call), #call, __FILE__, __LINE__)

#endif
