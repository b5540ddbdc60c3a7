/* Test-only stand-in for the NVIDIA driver library (libcuda.so.1) on machines without a GPU.
 *
 * mooncake-transfer-engine's engine.so links libcuda.so.1 directly, so on a CPU-only machine
 * `from mooncake.engine import TransferEngine` fails at load time although the TCP transport
 * never needs a GPU. This library satisfies that link and answers every driver call with
 * CUDA_ERROR_NO_DEVICE, which is exactly what a machine without a GPU would report: mooncake
 * then treats registered memory as host memory. It is built by ci/mooncake_env.py into the
 * test cache and only ever put on LD_LIBRARY_PATH of test processes; it is never installed.
 *
 * The symbol list is the union of the cu* driver symbols that the wheel's shared objects
 * (engine.so, store.so, libmooncake_pg.so, nvlink_allocator.so, _ep*.so) import. A missing one
 * would only fail when called (lazy binding), but ci/mooncake_env.py checks the list against
 * the installed wheel with `nm` so that a new wheel version cannot slip past silently.
 * Every function takes its real arguments in the real ABI; the stubs ignore them, which is
 * safe with the System V calling convention because the caller owns the argument registers.
 */
typedef int CUresult;
#define CUDA_ERROR_NO_DEVICE 100

#define NO_DEVICE(name) CUresult name(void) { return CUDA_ERROR_NO_DEVICE; }

NO_DEVICE(cuInit)
NO_DEVICE(cuDriverGetVersion)
NO_DEVICE(cuDeviceGet)
NO_DEVICE(cuDeviceGetCount)
NO_DEVICE(cuDeviceGetAttribute)
NO_DEVICE(cuDevicePrimaryCtxRetain)
NO_DEVICE(cuDevicePrimaryCtxRelease_v2)
NO_DEVICE(cuCtxGetDevice)
NO_DEVICE(cuCtxSetCurrent)
NO_DEVICE(cuMemAddressFree)
NO_DEVICE(cuMemAddressReserve)
NO_DEVICE(cuMemCreate)
NO_DEVICE(cuMemExportToShareableHandle)
NO_DEVICE(cuMemGetAddressRange_v2)
NO_DEVICE(cuMemGetAllocationGranularity)
NO_DEVICE(cuMemGetHandleForAddressRange)
NO_DEVICE(cuMemImportFromShareableHandle)
NO_DEVICE(cuMemMap)
NO_DEVICE(cuMemRelease)
NO_DEVICE(cuMemRetainAllocationHandle)
NO_DEVICE(cuMemSetAccess)
NO_DEVICE(cuMemUnmap)
NO_DEVICE(cuPointerGetAttribute)
NO_DEVICE(cuPointerSetAttribute)

/* These two write a message pointer that callers print: give them real strings. */
static const char NO_DEVICE_NAME[] = "CUDA_ERROR_NO_DEVICE";
static const char NO_DEVICE_TEXT[] = "no CUDA-capable device is detected (ds-plugins test stub of libcuda.so.1)";

CUresult cuGetErrorName(CUresult error, const char **out) {
    (void)error;
    if (out) *out = NO_DEVICE_NAME;
    return 0;
}

CUresult cuGetErrorString(CUresult error, const char **out) {
    (void)error;
    if (out) *out = NO_DEVICE_TEXT;
    return 0;
}
