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

/// <summary>
/// Registered engine memory and the engine that copies it: the seam between "where the engine's KV is"
/// and everything above it. The host implementation uses process_vm_readv/writev; a CUDA implementation
/// (IPC-mapped device memory, batched async copies) fits the same interface.
/// </summary>
/// <remarks>Thread-safe: several copies may run at once. Every op is checked against its region's bounds.</remarks>
public interface IEngineMemory : IDisposable
{
    /// <summary>Number of registered regions.</summary>
    int RegionCount { get; }

    /// <summary>Length in bytes of a region.</summary>
    long RegionLength(int region);

    /// <summary>Copies engine memory into host memory (a gather into L1).</summary>
    /// <exception cref="EngineMemoryException">An op is out of range, or the engine's memory cannot be read.</exception>
    void Read(ReadOnlySpan<CopyOp> ops);

    /// <summary>Copies host memory into engine memory (a scatter from L1).</summary>
    /// <exception cref="EngineMemoryException">An op is out of range, or the engine's memory cannot be written.</exception>
    void Write(ReadOnlySpan<CopyOp> ops);
}

/// <summary>Opens engine memory of one kind.</summary>
public interface IEngineMemoryProvider
{
    /// <summary>The kind of memory this provider opens.</summary>
    EngineMemoryKind Kind { get; }

    /// <summary>Opens the regions of one registration.</summary>
    /// <param name="regions">The regions, as the engine described them.</param>
    /// <param name="owner">The process the regions belong to, pinned by a pidfd: copies stop once it exits. Null: trust the pids as given (tests and tools).</param>
    /// <exception cref="EngineMemoryException">The regions cannot be opened; the message says why and what to change.</exception>
    IEngineMemory Open(IReadOnlyList<EngineMemoryRef> regions, Platform.ProcessIdentity? owner = null);
}

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
