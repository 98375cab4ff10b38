using System.Buffers.Binary;
using System.Security.Cryptography;
using System.Text;

namespace Connector.Core.Memory;

/// <summary>
/// How one registration's chunks map between engine blocks and L1 bytes. A chunk is stored layer-major
/// as <c>[layer][run][block-in-chunk][run bytes]</c> (docs/formats.md): for a kv-first NHD layout that is
/// exactly <c>[layer][K|V][token][head*dim]</c>, so one layer can be loaded while another computes.
/// </summary>
/// <remarks>Immutable and thread-safe.</remarks>
public sealed class ChunkGeometry
{
    private readonly BlockTemplate[] _templates;
    private readonly long[] _layerBase;
    private readonly long[][] _runBase;

    private ChunkGeometry(BlockTemplate[] templates, int blocksPerChunk)
    {
        _templates = templates;
        BlocksPerChunk = blocksPerChunk;
        NumBlocks = templates.Min(t => t.Layout.NumBlocks);
        _layerBase = new long[templates.Length];
        _runBase = new long[templates.Length][];
        long offset = 0;
        int ops = 0;
        for (int l = 0; l < templates.Length; l++)
        {
            _layerBase[l] = offset;
            IReadOnlyList<ByteRun> runs = templates[l].Runs;
            _runBase[l] = new long[runs.Count];
            long within = 0;
            for (int r = 0; r < runs.Count; r++)
            {
                _runBase[l][r] = within;
                within += runs[r].Length * blocksPerChunk;
            }

            offset += within;
            ops += runs.Count * blocksPerChunk;
        }

        ChunkBytes = offset;
        MaxCopyOpsPerChunk = ops;
        Fingerprint = ComputeFingerprint(templates);
    }

    /// <summary>Bytes of one chunk in L1.</summary>
    public long ChunkBytes { get; }

    /// <summary>Engine blocks per chunk.</summary>
    public int BlocksPerChunk { get; }

    /// <summary>Valid block ids are [0, NumBlocks) (the smallest layer's count).</summary>
    public int NumBlocks { get; }

    /// <summary>Number of layers (registered regions).</summary>
    public int LayerCount => _templates.Length;

    /// <summary>The most copy ops one chunk needs.</summary>
    public int MaxCopyOpsPerChunk { get; }

    /// <summary>
    /// Hex digest of everything that decides where each byte of a chunk comes from (element size, row
    /// size, and per layer the rows of each run in order); independent of addresses and pool sizes, so
    /// engines with the same model and layout share cache.
    /// </summary>
    public string Fingerprint { get; }

    /// <summary>Validates every layer's layout against its region and builds the geometry.</summary>
    /// <exception cref="LayoutException">A layout is invalid or does not fit.</exception>
    public static ChunkGeometry Create(IReadOnlyList<(string Name, KvLayout Layout, long RegionLength)> layers, int blocksPerChunk)
    {
        ArgumentNullException.ThrowIfNull(layers);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(blocksPerChunk);
        if (layers.Count == 0)
        {
            throw new LayoutException("(none)", "no layers");
        }

        var templates = new BlockTemplate[layers.Count];
        for (int i = 0; i < layers.Count; i++)
        {
            templates[i] = BlockTemplate.Create(layers[i].Layout, layers[i].RegionLength, layers[i].Name);
        }

        return new ChunkGeometry(templates, blocksPerChunk);
    }

    /// <summary>Writes the copy list of one chunk between the engine blocks it names and an L1 slab.</summary>
    /// <param name="blockIds">The chunk's <see cref="BlocksPerChunk"/> engine block ids.</param>
    /// <param name="slab">The chunk's L1 bytes (<see cref="ChunkBytes"/> long).</param>
    /// <param name="ops">Receives the ops; at least <see cref="MaxCopyOpsPerChunk"/> long.</param>
    /// <param name="skipNegativeIds">Whether -1 means "leave this block alone" (loads into blocks the engine already holds).</param>
    /// <returns>The number of ops written.</returns>
    /// <exception cref="EngineMemoryException">With <see cref="EngineMemoryError.OutOfRange"/> for a block id outside [0, NumBlocks).</exception>
    public int BuildCopyOps(ReadOnlySpan<int> blockIds, nint slab, Span<CopyOp> ops, bool skipNegativeIds = false)
    {
        if (blockIds.Length != BlocksPerChunk)
        {
            throw new EngineMemoryException(EngineMemoryError.OutOfRange, $"{blockIds.Length} block ids for a chunk of {BlocksPerChunk} blocks");
        }

        foreach (int id in blockIds)
        {
            if ((uint)id >= (uint)NumBlocks && !(skipNegativeIds && id == -1))
            {
                throw new EngineMemoryException(EngineMemoryError.OutOfRange, $"block id {id} is outside [0, {NumBlocks})");
            }
        }

        if (ops.Length < MaxCopyOpsPerChunk)
        {
            throw new ArgumentException($"ops holds {ops.Length}, a chunk needs up to {MaxCopyOpsPerChunk}", nameof(ops));
        }

        int n = 0;
        for (int l = 0; l < _templates.Length; l++)
        {
            BlockTemplate t = _templates[l];
            long stride = t.Layout.StrideBlock;
            IReadOnlyList<ByteRun> runs = t.Runs;
            for (int r = 0; r < runs.Count; r++)
            {
                ByteRun run = runs[r];
                nint host = slab + (nint)(_layerBase[l] + _runBase[l][r]);
                for (int j = 0; j < blockIds.Length; j++)
                {
                    int id = blockIds[j];
                    if (id >= 0)
                    {
                        ops[n++] = new CopyOp(l, (id * stride) + run.Offset, host + (nint)(j * run.Length), run.Length);
                    }
                }
            }
        }

        return n;
    }

    private static string ComputeFingerprint(BlockTemplate[] templates)
    {
        using var hash = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        byte[] four = new byte[4];
        void Int(int v)
        {
            BinaryPrimitives.WriteInt32LittleEndian(four, v);
            hash.AppendData(four);
        }

        hash.AppendData(Encoding.ASCII.GetBytes("kvsidecar/layout/v1"));
        Int(templates.Length);
        foreach (BlockTemplate t in templates)
        {
            Int(t.Layout.ElementSize);
            Int(t.Layout.RowBytes);
            Int(t.Layout.BlockTokens);
            Int(t.Layout.NumHeads);
            Int(t.Runs.Count);
            foreach (ByteRun run in t.Runs)
            {
                Int(run.RowCount);
                for (int i = run.FirstRow; i < run.FirstRow + run.RowCount; i++)
                {
                    RowId row = t.Rows[i];
                    Int(row.Plane);
                    Int(row.Token);
                    Int(row.Head);
                }
            }
        }

        return Convert.ToHexStringLower(hash.GetHashAndReset())[..32];
    }
}
