using MessagePack;

namespace Connector.Protocol.Messages;

/// <summary>The namespace fields a worker declares (docs/protocol.md, REGISTER).</summary>
[MessagePackObject]
public sealed class NamespaceDescriptor
{
    /// <summary>The model id, e.g. "meta-llama/Meta-Llama-3-8B".</summary>
    [Key(0)] public string? ModelId { get; set; }

    /// <summary>The KV cache dtype, e.g. "bfloat16" or "fp8_e4m3".</summary>
    [Key(1)] public string? KvDtype { get; set; }

    /// <summary>Tokens per engine block.</summary>
    [Key(2)] public int BlockTokens { get; set; }

    /// <summary>Tokens per chunk, a multiple of <see cref="BlockTokens"/>.</summary>
    [Key(3)] public int ChunkTokens { get; set; }

    /// <summary>Tensor-parallel size.</summary>
    [Key(4)] public int TpSize { get; set; }

    /// <summary>Tensor-parallel rank, or -1 for KV replicated on every rank (MLA).</summary>
    [Key(5)] public int TpRank { get; set; }

    /// <summary>The KV cache group (hybrid models); 0 otherwise.</summary>
    [Key(6)] public int KvGroup { get; set; }

    /// <summary>Version of the chunk byte format.</summary>
    [Key(7)] public int FormatVersion { get; set; }
}

/// <summary>Where a layer's memory is.</summary>
[MessagePackObject]
public sealed class MemoryRefDescriptor
{
    /// <summary>1 host memory of a process, 2 CUDA IPC.</summary>
    [Key(0)] public int Kind { get; set; }

    /// <summary>The owning process.</summary>
    [Key(1)] public int Pid { get; set; }

    /// <summary>Virtual address in that process (kind 1).</summary>
    [Key(2)] public ulong Address { get; set; }

    /// <summary>Length in bytes.</summary>
    [Key(3)] public ulong Length { get; set; }

    /// <summary>CUDA IPC memory handle of the allocation base (kind 2).</summary>
    [Key(4)] public byte[]? IpcHandle { get; set; }

    /// <summary>The GPU's UUID (kind 2).</summary>
    [Key(5)] public string? DeviceUuid { get; set; }

    /// <summary>Offset of the layer's memory from the allocation base (kind 2).</summary>
    [Key(6)] public ulong Offset { get; set; }
}

/// <summary>How blocks are laid out in a layer's memory; all offsets and strides in bytes.</summary>
[MessagePackObject]
public sealed class LayoutDescriptor
{
    /// <summary>Bytes per element.</summary>
    [Key(0)] public int ElementSize { get; set; }

    /// <summary>Blocks in the region.</summary>
    [Key(1)] public int NumBlocks { get; set; }

    /// <summary>Tokens per block.</summary>
    [Key(2)] public int BlockTokens { get; set; }

    /// <summary>KV heads.</summary>
    [Key(3)] public int NumHeads { get; set; }

    /// <summary>Contiguous bytes of one (token, head) row of K (or V).</summary>
    [Key(4)] public int RowBytes { get; set; }

    /// <summary>Bytes between consecutive blocks.</summary>
    [Key(5)] public long StrideBlock { get; set; }

    /// <summary>Bytes between consecutive tokens of a block.</summary>
    [Key(6)] public long StrideToken { get; set; }

    /// <summary>Bytes between consecutive heads.</summary>
    [Key(7)] public long StrideHead { get; set; }

    /// <summary>Offset of block 0's K.</summary>
    [Key(8)] public long KOffset { get; set; }

    /// <summary>Offset of block 0's V, or -1 when there is no separate V (MLA).</summary>
    [Key(9)] public long VOffset { get; set; }
}

/// <summary>One registered layer (or shared buffer).</summary>
[MessagePackObject]
public sealed class LayerDescriptor
{
    /// <summary>The engine's layer name.</summary>
    [Key(0)] public string? Name { get; set; }

    /// <summary>Where its memory is.</summary>
    [Key(1)] public MemoryRefDescriptor? Memory { get; set; }

    /// <summary>How its blocks are laid out.</summary>
    [Key(2)] public LayoutDescriptor? Layout { get; set; }
}

/// <summary>REGISTER: a worker's KV memory.</summary>
[MessagePackObject]
public sealed class RegisterRequest
{
    /// <summary>The namespace fields.</summary>
    [Key(0)] public NamespaceDescriptor? Namespace { get; set; }

    /// <summary>The layers, in the engine's order.</summary>
    [Key(1)] public LayerDescriptor[]? Layers { get; set; }

    /// <summary>
    /// CUDA engines: the 64-byte IPC handle of an interprocess event the worker records after each forward pass,
    /// before it sends the step's STOREs; the sidecar's store stream waits on it. Nil: the worker synchronises first.
    /// </summary>
    [Key(2)] public byte[]? StoreEvent { get; set; }
}

/// <summary>The reply to REGISTER.</summary>
[MessagePackObject]
public sealed class RegisterReply
{
    /// <summary>The registration's id.</summary>
    [Key(0)] public ulong RegistrationId { get; set; }

    /// <summary>The layout fingerprint the sidecar computed (part of the namespace).</summary>
    [Key(1)] public string? LayoutFingerprint { get; set; }

    /// <summary>Bytes of one chunk in L1.</summary>
    [Key(2)] public ulong ChunkBytes { get; set; }

    /// <summary>Engine blocks per chunk.</summary>
    [Key(3)] public int BlocksPerChunk { get; set; }
}
