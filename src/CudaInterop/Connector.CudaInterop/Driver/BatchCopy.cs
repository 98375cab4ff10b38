namespace Connector.CudaInterop.Driver;

/// <summary>Which way a list of copies goes.</summary>
public enum CopyKind
{
    /// <summary>Device memory to host memory.</summary>
    DeviceToHost,

    /// <summary>Host memory to device memory.</summary>
    HostToDevice,

    /// <summary>Device memory to device memory (two engines' mappings on one machine).</summary>
    DeviceToDevice,
}

/// <summary>
/// Enqueues a list of copies on a stream with as few driver calls as the driver allows: one
/// <c>cuMemcpyBatchAsync</c> (CUDA 12.8+, resolved by version because its ABI changed in 13.0), or one
/// <c>cuMemcpy*Async</c> per copy where the driver has no batched copy or refuses it.
/// </summary>
/// <remarks>Thread-safe. A driver that fails the batched call with NOT_SUPPORTED or UNKNOWN loses the batched path for the process.</remarks>
public sealed unsafe class BatchCopy
{
    private readonly delegate* unmanaged<ulong*, ulong*, nuint*, nuint, MemcpyAttributes*, nuint*, nuint, nint, int> _batch13;
    private readonly delegate* unmanaged<ulong*, ulong*, nuint*, nuint, MemcpyAttributes*, nuint*, nuint, nuint*, nint, int> _batch128;
    private volatile bool _batchUsable;

    private BatchCopy(void* batch13, void* batch128)
    {
        _batch13 = (delegate* unmanaged<ulong*, ulong*, nuint*, nuint, MemcpyAttributes*, nuint*, nuint, nint, int>)batch13;
        _batch128 = (delegate* unmanaged<ulong*, ulong*, nuint*, nuint, MemcpyAttributes*, nuint*, nuint, nuint*, nint, int>)batch128;
        _batchUsable = batch13 is not null || batch128 is not null;
    }

    /// <summary>Which batched-copy ABI is in use: "13.0", "12.8", or "none" (one call per copy).</summary>
    public string Mode => !_batchUsable ? "none" : _batch13 is not null ? "13.0" : "12.8";

    /// <summary>Resolves the batched copy the driver offers.</summary>
    /// <param name="allowBatch">False to always copy one call per piece (a setting, and the fallback's tests).</param>
    public static BatchCopy Resolve(bool allowBatch = true)
    {
        if (!allowBatch)
        {
            return new BatchCopy(null, null);
        }

        void* v13 = Lookup(13000);
        return v13 is not null ? new BatchCopy(v13, null) : new BatchCopy(null, Lookup(12080));
    }

    /// <summary>Enqueues <paramref name="count"/> copies on <paramref name="stream"/>.</summary>
    /// <param name="stream">A created stream (the batched call refuses the legacy default stream).</param>
    /// <param name="kind">The direction of every copy.</param>
    /// <param name="destinations">Destination addresses (device pointers, or host addresses as integers).</param>
    /// <param name="sources">Source addresses.</param>
    /// <param name="sizes">Bytes per copy.</param>
    /// <param name="count">Copies.</param>
    /// <returns>The driver calls made.</returns>
    /// <exception cref="CudaException">A copy was refused; the copies before it may be queued.</exception>
    public int Enqueue(CudaStream stream, CopyKind kind, ulong* destinations, ulong* sources, nuint* sizes, int count)
    {
        ArgumentNullException.ThrowIfNull(stream);
        if (count <= 0)
        {
            return 0;
        }

        stream.Context.MakeCurrent();
        if (_batchUsable && count > 1)
        {
            int r = EnqueueBatch(stream.Value, kind, destinations, sources, sizes, count);
            if (r == 0)
            {
                return 1;
            }

            if (r is not ((int)CuResult.NotSupported or (int)CuResult.Unknown or 998))
            {
                throw CudaDriver.Error(r, "cuMemcpyBatchAsync");
            }

            // Some drivers and CUDA-compatible stacks export the symbol but do not implement it (cuda.md A.4).
            _batchUsable = false;
        }

        for (int i = 0; i < count; i++)
        {
            int r = kind switch
            {
                CopyKind.DeviceToHost => CudaNative.cuMemcpyDtoHAsync((void*)destinations[i], sources[i], sizes[i], stream.Value),
                CopyKind.HostToDevice => CudaNative.cuMemcpyHtoDAsync(destinations[i], (void*)sources[i], sizes[i], stream.Value),
                _ => CudaNative.cuMemcpyDtoDAsync(destinations[i], sources[i], sizes[i], stream.Value),
            };
            if (r != 0)
            {
                throw CudaDriver.Error(r, kind switch
                {
                    CopyKind.DeviceToHost => "cuMemcpyDtoHAsync_v2",
                    CopyKind.HostToDevice => "cuMemcpyHtoDAsync_v2",
                    _ => "cuMemcpyDtoDAsync_v2",
                });
            }
        }

        return count;
    }

    private int EnqueueBatch(nint stream, CopyKind kind, ulong* destinations, ulong* sources, nuint* sizes, int count)
    {
        // One attribute entry for every copy: sources are read in stream order, so a copy waits for the work
        // queued before it (the engine's event) and nothing is read early.
        MemcpyAttributes attributes = default;
        attributes.SrcAccessOrder = MemcpyAttributes.SrcAccessOrderStream;
        attributes.SrcLocHint.Type = kind == CopyKind.HostToDevice ? 2 : 1;
        attributes.DstLocHint.Type = kind == CopyKind.DeviceToHost ? 2 : 1;
        nuint index = 0;
        if (_batch13 is not null)
        {
            return _batch13(destinations, sources, sizes, (nuint)count, &attributes, &index, 1, stream);
        }

        nuint failed = nuint.MaxValue;
        return _batch128(destinations, sources, sizes, (nuint)count, &attributes, &index, 1, &failed, stream);
    }

    private static void* Lookup(int version)
    {
        void* pfn = null;
        int status = 0;
        fixed (byte* name = "cuMemcpyBatchAsync\0"u8)
        {
            try
            {
                int r = CudaNative.cuGetProcAddress(name, &pfn, version, CudaConstants.GetProcAddressDefault, &status);
                return r == 0 && status == 0 ? pfn : null;
            }
            catch (EntryPointNotFoundException)
            {
                // A driver older than CUDA 12 has no cuGetProcAddress_v2, and no batched copy either.
                return null;
            }
        }
    }
}
