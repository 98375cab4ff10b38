using System.Runtime.InteropServices;

namespace Connector.CudaInterop.Driver;

/// <summary>A driver object owned by kvsidecar, released on its context's thread state whatever thread disposes it.</summary>
public abstract class CudaHandle : SafeHandle
{
    /// <summary>Creates an empty handle bound to a context.</summary>
    protected CudaHandle(CudaContext context)
        : base(0, ownsHandle: true) => Context = context;

    /// <summary>The context the object belongs to.</summary>
    public CudaContext Context { get; }

    /// <inheritdoc/>
    public override bool IsInvalid => handle == 0;

    /// <summary>The raw value.</summary>
    public nint Value => handle;

    internal void Set(nint value) => SetHandle(value);

    /// <inheritdoc/>
    protected sealed override bool ReleaseHandle()
    {
        try
        {
            Context.MakeCurrent();
            return Release(handle) == 0;
        }
        catch (CudaException)
        {
            return false;
        }
    }

    /// <summary>Frees the object; returns the CUresult.</summary>
    protected abstract int Release(nint value);
}

/// <summary>A CUstream created non-blocking, so it never waits for the legacy default stream.</summary>
public sealed unsafe class CudaStream : CudaHandle
{
    private CudaStream(CudaContext context)
        : base(context)
    {
    }

    /// <summary>Creates a stream on a context.</summary>
    public static CudaStream Create(CudaContext context)
    {
        context.MakeCurrent();
        nint value;
        CudaDriver.Check(CudaNative.cuStreamCreate(&value, CudaConstants.StreamNonBlocking), "cuStreamCreate");
        var stream = new CudaStream(context);
        stream.Set(value);
        return stream;
    }

    /// <summary>Makes the stream wait (on the device) until <paramref name="cuEvent"/>'s latest record completes.</summary>
    public void Wait(nint cuEvent)
    {
        Context.MakeCurrent();
        CudaDriver.Check(CudaNative.cuStreamWaitEvent(Value, cuEvent, 0), "cuStreamWaitEvent");
    }

    /// <summary>Blocks until everything queued on the stream ran.</summary>
    public void Synchronize()
    {
        Context.MakeCurrent();
        CudaDriver.Check(CudaNative.cuStreamSynchronize(Value), "cuStreamSynchronize");
    }

    /// <inheritdoc/>
    protected override int Release(nint value) => CudaNative.cuStreamDestroy(value);
}

/// <summary>A CUevent without timing (cheap), optionally interprocess.</summary>
public sealed unsafe class CudaEvent : CudaHandle
{
    private CudaEvent(CudaContext context)
        : base(context)
    {
    }

    /// <summary>Creates an event.</summary>
    /// <param name="context">Its context.</param>
    /// <param name="interprocess">Whether another process may open it through <see cref="GetIpcHandle"/>.</param>
    public static CudaEvent Create(CudaContext context, bool interprocess = false)
    {
        context.MakeCurrent();
        nint value;
        uint flags = CudaConstants.EventDisableTiming | (interprocess ? CudaConstants.EventInterprocess : 0);
        CudaDriver.Check(CudaNative.cuEventCreate(&value, flags), "cuEventCreate");
        var ev = new CudaEvent(context);
        ev.Set(value);
        return ev;
    }

    /// <summary>Opens an event another process exported.</summary>
    /// <exception cref="CudaException">The handle is stale, foreign or malformed.</exception>
    public static CudaEvent OpenIpc(CudaContext context, in IpcHandle handle)
    {
        context.MakeCurrent();
        nint value;
        CudaDriver.Check(CudaNative.cuIpcOpenEventHandle(&value, handle), "cuIpcOpenEventHandle");
        var ev = new CudaEvent(context);
        ev.Set(value);
        return ev;
    }

    /// <summary>Records the event at the current end of <paramref name="stream"/>.</summary>
    public void Record(CudaStream stream)
    {
        ArgumentNullException.ThrowIfNull(stream);
        Context.MakeCurrent();
        CudaDriver.Check(CudaNative.cuEventRecord(Value, stream.Value), "cuEventRecord");
    }

    /// <summary>Whether everything before the latest record ran; throws the error of a failed copy.</summary>
    public bool IsComplete()
    {
        Context.MakeCurrent();
        int r = CudaNative.cuEventQuery(Value);
        if (r == (int)CuResult.NotReady)
        {
            return false;
        }

        CudaDriver.Check(r, "cuEventQuery");
        return true;
    }

    /// <summary>Blocks until the latest record completed.</summary>
    public void Synchronize()
    {
        Context.MakeCurrent();
        CudaDriver.Check(CudaNative.cuEventSynchronize(Value), "cuEventSynchronize");
    }

    /// <summary>The 64-byte handle another process opens this event with.</summary>
    public IpcHandle GetIpcHandle()
    {
        Context.MakeCurrent();
        IpcHandle handle;
        CudaDriver.Check(CudaNative.cuIpcGetEventHandle(&handle, Value), "cuIpcGetEventHandle");
        return handle;
    }

    /// <inheritdoc/>
    protected override int Release(nint value) => CudaNative.cuEventDestroy(value);
}

/// <summary>Another process's device allocation mapped into this one through its IPC memory handle.</summary>
/// <remarks>
/// One close unmaps the allocation for every user in the process (cuda.md A.3 pitfall 3), so a process must keep
/// one of these per allocation and share it (see the data plane's mapping cache), never open twice.
/// </remarks>
public sealed unsafe class IpcMapping : CudaHandle
{
    private IpcMapping(CudaContext context, ulong size)
        : base(context) => Size = size;

    /// <summary>The base of the allocation in this process.</summary>
    public ulong Address => (ulong)Value;

    /// <summary>The allocation's size, as the driver reports it.</summary>
    public ulong Size { get; }

    /// <summary>Opens a handle in the context of the device that owns the allocation.</summary>
    /// <exception cref="CudaException">The handle is stale, from a dead process, from this process, or malformed.</exception>
    public static IpcMapping Open(CudaContext context, in IpcHandle handle)
    {
        context.MakeCurrent();
        ulong pointer;
        CudaDriver.Check(CudaNative.cuIpcOpenMemHandle(&pointer, handle, CudaConstants.IpcMemLazyEnablePeerAccess), "cuIpcOpenMemHandle_v2");
        ulong start;
        nuint size;
        int r = CudaNative.cuMemGetAddressRange(&start, &size, pointer);
        if (r != 0)
        {
            _ = CudaNative.cuIpcCloseMemHandle(pointer);
            throw CudaDriver.Error(r, "cuMemGetAddressRange_v2");
        }

        var mapping = new IpcMapping(context, (ulong)size - (pointer - start));
        mapping.Set((nint)pointer);
        return mapping;
    }

    /// <inheritdoc/>
    protected override int Release(nint value) => CudaNative.cuIpcCloseMemHandle((ulong)value);
}

/// <summary>A range of host memory page-locked for DMA with <c>cuMemHostRegister</c>.</summary>
public sealed unsafe class HostRegistration : CudaHandle
{
    private HostRegistration(CudaContext context, long bytes)
        : base(context) => Bytes = bytes;

    /// <summary>Bytes registered.</summary>
    public long Bytes { get; }

    /// <summary>Pins a range for every context (PORTABLE).</summary>
    /// <exception cref="CudaException">The driver refused (out of memory, already registered, RLIMIT_MEMLOCK).</exception>
    public static HostRegistration Register(CudaContext context, nint address, long bytes)
    {
        context.MakeCurrent();
        CudaDriver.Check(CudaNative.cuMemHostRegister((void*)address, (nuint)bytes, CudaConstants.HostRegisterPortable), "cuMemHostRegister_v2");
        var registration = new HostRegistration(context, bytes);
        registration.Set(address);
        return registration;
    }

    /// <inheritdoc/>
    protected override int Release(nint value) => CudaNative.cuMemHostUnregister((void*)value);
}
