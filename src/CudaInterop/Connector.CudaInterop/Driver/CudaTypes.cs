using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

namespace Connector.CudaInterop.Driver;

/// <summary>CUipcMemHandle / CUipcEventHandle: 64 opaque bytes, passed by value to the open calls.</summary>
[InlineArray(Size)]
public struct IpcHandle
{
    /// <summary>CU_IPC_HANDLE_SIZE.</summary>
    public const int Size = 64;

    private byte _element0;

    /// <summary>A handle from its 64 bytes.</summary>
    /// <exception cref="ArgumentException">Not exactly 64 bytes.</exception>
    public static IpcHandle FromBytes(ReadOnlySpan<byte> bytes)
    {
        if (bytes.Length != Size)
        {
            throw new ArgumentException($"a CUDA IPC handle is {Size} bytes, not {bytes.Length}", nameof(bytes));
        }

        IpcHandle handle = default;
        bytes.CopyTo(handle);
        return handle;
    }
}

/// <summary>CUuuid: a device's 16-byte UUID.</summary>
[InlineArray(16)]
public struct CuUuid
{
    private byte _element0;
}

/// <summary>CUmemLocation.</summary>
[StructLayout(LayoutKind.Sequential)]
public struct MemLocation
{
    /// <summary>CUmemLocationType: 0 invalid, 1 device, 2 host.</summary>
    public int Type;

    /// <summary>The device ordinal for a device location.</summary>
    public int Id;
}

/// <summary>CUmemcpyAttributes (v1), one entry per group of copies in <c>cuMemcpyBatchAsync</c>.</summary>
[StructLayout(LayoutKind.Sequential)]
public struct MemcpyAttributes
{
    /// <summary>CU_MEMCPY_SRC_ACCESS_ORDER_STREAM: the source is read in stream order.</summary>
    public const int SrcAccessOrderStream = 1;

    /// <summary>CUmemcpySrcAccessOrder.</summary>
    public int SrcAccessOrder;

    /// <summary>Where the source is expected to be.</summary>
    public MemLocation SrcLocHint;

    /// <summary>Where the destination is expected to be.</summary>
    public MemLocation DstLocHint;

    /// <summary>CUmemcpyFlags.</summary>
    public uint Flags;
}

/// <summary>Flag values and attribute ids of the driver API that kvsidecar uses (cuda.h).</summary>
public static class CudaConstants
{
    /// <summary>CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS.</summary>
    public const uint IpcMemLazyEnablePeerAccess = 1;

    /// <summary>CU_STREAM_NON_BLOCKING: no implicit synchronisation with the legacy default stream.</summary>
    public const uint StreamNonBlocking = 1;

    /// <summary>CU_EVENT_DISABLE_TIMING.</summary>
    public const uint EventDisableTiming = 2;

    /// <summary>CU_EVENT_INTERPROCESS (requires DISABLE_TIMING).</summary>
    public const uint EventInterprocess = 4;

    /// <summary>CU_MEMHOSTREGISTER_PORTABLE: pinned for every context.</summary>
    public const uint HostRegisterPortable = 1;

    /// <summary>CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL.</summary>
    public const int PointerAttributeDeviceOrdinal = 9;

    /// <summary>CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE.</summary>
    public const int PointerAttributeIsLegacyIpcCapable = 10;

    /// <summary>CU_GET_PROC_ADDRESS_DEFAULT.</summary>
    public const ulong GetProcAddressDefault = 0;
}
