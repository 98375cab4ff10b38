namespace Connector.Core.Memory;

/// <summary>How an engine's KV memory is reached.</summary>
public enum EngineMemoryKind
{
    /// <summary>Host memory of the engine process, read and written with process_vm_readv/writev.</summary>
    HostProcess = 1,

    /// <summary>GPU memory exported with a CUDA IPC handle (a later data plane).</summary>
    CudaIpc = 2,
}

/// <summary>A reference to one region of engine memory, as the engine described it.</summary>
/// <param name="Kind">How the memory is reached.</param>
/// <param name="Pid">The owning process.</param>
/// <param name="Address">Virtual address in that process (host memory).</param>
/// <param name="Length">Length in bytes.</param>
/// <param name="IpcHandle">CUDA IPC handle of the allocation base (CUDA).</param>
/// <param name="DeviceUuid">The GPU's UUID (CUDA).</param>
/// <param name="Offset">Offset from the allocation base (CUDA).</param>
public sealed record EngineMemoryRef(EngineMemoryKind Kind, int Pid, ulong Address, ulong Length, byte[]? IpcHandle, string? DeviceUuid, ulong Offset);

/// <summary>One piece of a copy between engine memory and host memory.</summary>
/// <param name="Region">Index of the engine region.</param>
/// <param name="RegionOffset">Byte offset into that region.</param>
/// <param name="Host">Host address of the other side (an L1 slab).</param>
/// <param name="Length">Bytes to copy.</param>
public readonly record struct CopyOp(int Region, long RegionOffset, nint Host, long Length);

/// <summary>Which way a copy goes.</summary>
public enum CopyDirection
{
    /// <summary>Engine memory into host memory (a store gathers blocks into an L1 slab).</summary>
    EngineToHost,

    /// <summary>Host memory into engine memory (a load scatters an L1 slab into blocks).</summary>
    HostToEngine,
}

/// <summary>
/// Registered engine memory and the engine that copies it: the seam between "where the engine's KV is"
/// and everything above it. Copies are submitted, and complete later: the host implementation
/// (process_vm_readv/writev) finishes them inside <see cref="Submit"/>; the CUDA implementation queues them
/// on a stream and completes them when the stream's event fires, so no thread waits on a GPU copy.
/// </summary>
/// <remarks>Thread-safe: several requests may submit at once. Every op is checked against its region's bounds when submitted.</remarks>
public interface IEngineMemory : IDisposable
{
    /// <summary>Number of registered regions.</summary>
    int RegionCount { get; }

    /// <summary>Whether <see cref="Submit"/> finishes the copy before it returns (host memory): then a large
    /// request gains from spreading its chunks over several threads.</summary>
    bool CopiesOnSubmit { get; }

    /// <summary>Length in bytes of a region.</summary>
    long RegionLength(int region);

    /// <summary>Submits copies between engine memory and host memory (L1 slabs).</summary>
    /// <param name="direction">Which way.</param>
    /// <param name="ops">The pieces; the host side of each must stay valid until <see cref="Completion"/> completes.</param>
    /// <exception cref="EngineMemoryException">An op is out of range, or the memory cannot be used; nothing of this call was submitted after the failing op.</exception>
    void Submit(CopyDirection direction, ReadOnlySpan<CopyOp> ops);

    /// <summary>Completes when every copy submitted in <paramref name="direction"/> before this call has run.</summary>
    /// <exception cref="EngineMemoryException">A submitted copy failed (the awaited task faults with it).</exception>
    ValueTask Completion(CopyDirection direction);
}

/// <summary>Blocking helpers over <see cref="IEngineMemory"/> for tools, tests and benchmarks.</summary>
public static class EngineMemoryExtensions
{
    /// <summary>Copies engine memory into host memory and waits for it.</summary>
    public static void Read(this IEngineMemory memory, ReadOnlySpan<CopyOp> ops) => CopyAndWait(memory, CopyDirection.EngineToHost, ops);

    /// <summary>Copies host memory into engine memory and waits for it.</summary>
    public static void Write(this IEngineMemory memory, ReadOnlySpan<CopyOp> ops) => CopyAndWait(memory, CopyDirection.HostToEngine, ops);

    private static void CopyAndWait(IEngineMemory memory, CopyDirection direction, ReadOnlySpan<CopyOp> ops)
    {
        ArgumentNullException.ThrowIfNull(memory);
        memory.Submit(direction, ops);
        ValueTask done = memory.Completion(direction);
        if (done.IsCompletedSuccessfully)
        {
            return;
        }

        done.AsTask().GetAwaiter().GetResult();
    }
}

/// <summary>Opens engine memory of one kind.</summary>
public interface IEngineMemoryProvider
{
    /// <summary>The kind of memory this provider opens.</summary>
    EngineMemoryKind Kind { get; }

    /// <summary>Opens the regions of one registration.</summary>
    /// <param name="regions">The regions, as the engine described them.</param>
    /// <param name="owner">The process the regions belong to, pinned by a pidfd: copies stop once it exits. Null: trust the pids as given (tests and tools).</param>
    /// <param name="signals">How the engine orders its compute with the sidecar's copies (GPU engines); null for none.</param>
    /// <exception cref="EngineMemoryException">The regions cannot be opened; the message says why and what to change.</exception>
    IEngineMemory Open(IReadOnlyList<EngineMemoryRef> regions, Platform.ProcessIdentity? owner = null, EngineSignals? signals = null);
}

/// <summary>How a GPU engine orders its compute with the sidecar's copies.</summary>
/// <param name="StoreEvent">A CUDA IPC event handle (64 bytes) the engine records after the forward pass that
/// wrote the KV of a store: the sidecar's store stream waits on its latest record before copying. Null: the engine
/// synchronises before it sends STORE.</param>
public sealed record EngineSignals(byte[]? StoreEvent);

/// <summary>Why engine memory could not be used.</summary>
public enum EngineMemoryError
{
    /// <summary>An offset, length or block id outside the registered memory.</summary>
    OutOfRange,

    /// <summary>The kernel refused access (ptrace permission).</summary>
    AccessDenied,

    /// <summary>The memory is gone or unmapped.</summary>
    Fault,

    /// <summary>This build cannot use that kind of memory.</summary>
    Unsupported,

    /// <summary>The layout does not fit the memory.</summary>
    BadLayout,

    /// <summary>The memory belongs to a process other than the one that registered it, or that process is gone.</summary>
    NotOwner,
}

/// <summary>A failure to use engine memory.</summary>
public sealed class EngineMemoryException : Exception
{
    /// <summary>Creates the exception.</summary>
    public EngineMemoryException(EngineMemoryError code, string message)
        : base(message) => Code = code;

    /// <summary>The machine-readable reason.</summary>
    public EngineMemoryError Code { get; }
}

/// <summary>A layout descriptor that is inconsistent or does not fit its region.</summary>
public sealed class LayoutException : Exception
{
    /// <summary>Creates the exception.</summary>
    public LayoutException(string layerName, string message)
        : base($"layer '{layerName}': {message}") => LayerName = layerName;

    /// <summary>The layer whose layout is wrong.</summary>
    public string LayerName { get; }
}
