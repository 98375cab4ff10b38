using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

namespace Connector.CudaInterop.Driver;

/// <summary>Process-wide driver calls: initialisation, version, devices, and turning results into exceptions.</summary>
public static unsafe class CudaDriver
{
    private static readonly Lock InitGate = new();
    private static bool _initialized;

    /// <summary>Throws a <see cref="CudaException"/> unless <paramref name="result"/> is CUDA_SUCCESS.</summary>
    /// <param name="result">The CUresult of a call.</param>
    /// <param name="function">The entry point, for the message.</param>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static void Check(int result, string function)
    {
        if (result != 0)
        {
            ThrowFor(result, function);
        }
    }

    /// <summary>Builds the exception for a failed call, with the driver's name and text of the code.</summary>
    public static CudaException Error(int result, string function)
    {
        string name = Describe(result, name: true) ?? $"CUresult {result}";
        string text = Describe(result, name: false) ?? "unknown error code";
        return new CudaException(function, result, name, text);
    }

    /// <summary>Initialises the driver once (<c>cuInit(0)</c>).</summary>
    /// <exception cref="CudaException">The driver refused (no device, a stub library, a driver/kernel mismatch).</exception>
    /// <exception cref="DllNotFoundException">The library cannot be loaded.</exception>
    public static void Initialize()
    {
        lock (InitGate)
        {
            if (!_initialized)
            {
                Check(CudaNative.cuInit(0), "cuInit");
                _initialized = true;
            }
        }
    }

    /// <summary>The driver's CUDA version, e.g. 13000 for 13.0.</summary>
    public static int DriverVersion()
    {
        int version;
        Check(CudaNative.cuDriverGetVersion(&version), "cuDriverGetVersion");
        return version;
    }

    /// <summary>The devices this process can see, with their UUIDs.</summary>
    public static IReadOnlyList<CudaDeviceInfo> Devices()
    {
        int count;
        Check(CudaNative.cuDeviceGetCount(&count), "cuDeviceGetCount");
        var devices = new List<CudaDeviceInfo>(count);
        byte* name = stackalloc byte[256];
        for (int ordinal = 0; ordinal < count; ordinal++)
        {
            int device;
            Check(CudaNative.cuDeviceGet(&device, ordinal), "cuDeviceGet");
            CuUuid uuid;
            Check(CudaNative.cuDeviceGetUuid(&uuid, device), "cuDeviceGetUuid_v2");
            Check(CudaNative.cuDeviceGetName(name, 256, device), "cuDeviceGetName");
            name[255] = 0;
            devices.Add(new CudaDeviceInfo(device, DeviceUuid.Format(uuid), Marshal.PtrToStringUTF8((nint)name) ?? string.Empty));
        }

        return devices;
    }

    [MethodImpl(MethodImplOptions.NoInlining)]
    private static void ThrowFor(int result, string function) => throw Error(result, function);

    private static string? Describe(int result, bool name)
    {
        try
        {
            byte* text = null;
            int r = name ? CudaNative.cuGetErrorName(result, &text) : CudaNative.cuGetErrorString(result, &text);
            return r == 0 && text is not null ? Marshal.PtrToStringUTF8((nint)text) : null;
        }
        catch (Exception ex) when (ex is DllNotFoundException or EntryPointNotFoundException)
        {
            return null;
        }
    }
}

/// <summary>A device as the driver enumerates it in this process.</summary>
/// <param name="Device">The CUdevice (an ordinal under this process's CUDA_VISIBLE_DEVICES).</param>
/// <param name="Uuid">"GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx", the same in every process.</param>
/// <param name="Name">The product name.</param>
public sealed record CudaDeviceInfo(int Device, string Uuid, string Name);

/// <summary>Formats and parses device UUIDs; engines may send them with or without the "GPU-" prefix nvidia-smi prints.</summary>
public static class DeviceUuid
{
    /// <summary>"GPU-" and the 16 bytes as 8-4-4-4-12 hex digits.</summary>
    public static string Format(ReadOnlySpan<byte> uuid)
    {
        string hex = Convert.ToHexStringLower(uuid);
        return $"GPU-{hex[..8]}-{hex[8..12]}-{hex[12..16]}-{hex[16..20]}-{hex[20..]}";
    }

    /// <summary>The canonical form of a UUID an engine sent, or null when it is not a UUID.</summary>
    public static string? Normalize(string? uuid)
    {
        if (string.IsNullOrWhiteSpace(uuid) || uuid.Length > 64)
        {
            return null;
        }

        string s = uuid.Trim();
        if (s.StartsWith("GPU-", StringComparison.OrdinalIgnoreCase))
        {
            s = s[4..];
        }

        s = s.Replace("-", string.Empty, StringComparison.Ordinal);
        if (s.Length != 32)
        {
            return null;
        }

        Span<byte> bytes = stackalloc byte[16];
        return Convert.FromHexString(s, bytes, out _, out int written) == System.Buffers.OperationStatus.Done && written == 16 ? Format(bytes) : null;
    }
}
