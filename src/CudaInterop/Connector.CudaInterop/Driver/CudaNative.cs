using System.Runtime.InteropServices;

namespace Connector.CudaInterop.Driver;

/// <summary>
/// The CUDA driver entry points kvsidecar uses, bound by their exported (versioned) symbol names
/// (cuda.md A.1). Blittable signatures only: handles are <see cref="nint"/>, device pointers <see cref="ulong"/>,
/// and every call returns a CUresult that <see cref="CudaDriver.Check"/> turns into a <see cref="CudaException"/>.
/// </summary>
/// <remarks>
/// <c>cuMemcpyBatchAsync</c> is not bound by name: its ABI changed between CUDA 12.8 and 13.0 under the same
/// name, so <see cref="BatchCopy"/> resolves it with <c>cuGetProcAddress_v2</c> and a version.
/// </remarks>
internal static unsafe partial class CudaNative
{
    /// <summary>The driver's soname; never the unversioned libcuda.so, which is only in the toolkit's stub directory.</summary>
    public const string Library = "libcuda.so.1";

    [LibraryImport(Library)] public static partial int cuInit(uint flags);
    [LibraryImport(Library)] public static partial int cuDriverGetVersion(int* version);
    [LibraryImport(Library)] public static partial int cuGetErrorName(int result, byte** name);
    [LibraryImport(Library)] public static partial int cuGetErrorString(int result, byte** text);
    [LibraryImport(Library, EntryPoint = "cuGetProcAddress_v2")] public static partial int cuGetProcAddress(byte* symbol, void** pfn, int cudaVersion, ulong flags, int* status);

    [LibraryImport(Library)] public static partial int cuDeviceGetCount(int* count);
    [LibraryImport(Library)] public static partial int cuDeviceGet(int* device, int ordinal);
    [LibraryImport(Library, EntryPoint = "cuDeviceGetUuid_v2")] public static partial int cuDeviceGetUuid(CuUuid* uuid, int device);
    [LibraryImport(Library)] public static partial int cuDeviceGetName(byte* name, int length, int device);
    [LibraryImport(Library)] public static partial int cuDevicePrimaryCtxRetain(nint* context, int device);
    [LibraryImport(Library, EntryPoint = "cuDevicePrimaryCtxRelease_v2")] public static partial int cuDevicePrimaryCtxRelease(int device);
    [LibraryImport(Library)] public static partial int cuCtxSetCurrent(nint context);

    [LibraryImport(Library)] public static partial int cuStreamCreate(nint* stream, uint flags);
    [LibraryImport(Library, EntryPoint = "cuStreamDestroy_v2")] public static partial int cuStreamDestroy(nint stream);
    [LibraryImport(Library)] public static partial int cuStreamSynchronize(nint stream);
    [LibraryImport(Library)] public static partial int cuStreamWaitEvent(nint stream, nint cuEvent, uint flags);

    [LibraryImport(Library)] public static partial int cuEventCreate(nint* cuEvent, uint flags);
    [LibraryImport(Library, EntryPoint = "cuEventDestroy_v2")] public static partial int cuEventDestroy(nint cuEvent);
    [LibraryImport(Library)] public static partial int cuEventRecord(nint cuEvent, nint stream);
    [LibraryImport(Library)] public static partial int cuEventQuery(nint cuEvent);
    [LibraryImport(Library)] public static partial int cuEventSynchronize(nint cuEvent);
    [LibraryImport(Library)] public static partial int cuIpcGetEventHandle(IpcHandle* handle, nint cuEvent);
    [LibraryImport(Library)] public static partial int cuIpcOpenEventHandle(nint* cuEvent, IpcHandle handle);

    [LibraryImport(Library)] public static partial int cuIpcGetMemHandle(IpcHandle* handle, ulong pointer);
    [LibraryImport(Library, EntryPoint = "cuIpcOpenMemHandle_v2")] public static partial int cuIpcOpenMemHandle(ulong* pointer, IpcHandle handle, uint flags);
    [LibraryImport(Library)] public static partial int cuIpcCloseMemHandle(ulong pointer);
    [LibraryImport(Library, EntryPoint = "cuMemGetAddressRange_v2")] public static partial int cuMemGetAddressRange(ulong* baseAddress, nuint* size, ulong pointer);
    [LibraryImport(Library)] public static partial int cuPointerGetAttribute(void* data, int attribute, ulong pointer);

    [LibraryImport(Library, EntryPoint = "cuMemAlloc_v2")] public static partial int cuMemAlloc(ulong* pointer, nuint size);
    [LibraryImport(Library, EntryPoint = "cuMemFree_v2")] public static partial int cuMemFree(ulong pointer);
    [LibraryImport(Library, EntryPoint = "cuMemHostRegister_v2")] public static partial int cuMemHostRegister(void* pointer, nuint size, uint flags);
    [LibraryImport(Library)] public static partial int cuMemHostUnregister(void* pointer);

    [LibraryImport(Library, EntryPoint = "cuMemcpyDtoHAsync_v2")] public static partial int cuMemcpyDtoHAsync(void* destination, ulong source, nuint size, nint stream);
    [LibraryImport(Library, EntryPoint = "cuMemcpyHtoDAsync_v2")] public static partial int cuMemcpyHtoDAsync(ulong destination, void* source, nuint size, nint stream);
    [LibraryImport(Library, EntryPoint = "cuMemcpyDtoDAsync_v2")] public static partial int cuMemcpyDtoDAsync(ulong destination, ulong source, nuint size, nint stream);
    [LibraryImport(Library)] public static partial int cuMemcpyAsync(ulong destination, ulong source, nuint size, nint stream);
}
