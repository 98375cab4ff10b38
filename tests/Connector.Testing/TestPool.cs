using Connector.Protocol;
using Connector.Protocol.Messages;

namespace Connector.Testing;

/// <summary>
/// The KV pool geometry used by the end-to-end tests: blocks-first (B, 2, N, H, D) layers of 16-token
/// blocks, 2 heads of 64-byte rows: 4096 bytes per block, 4 blocks per 64-token chunk.
/// </summary>
public static class TestPool
{
    public const int Layers = 4;
    public const int Blocks = 64;
    public const int BlockTokens = 16;
    public const int Heads = 2;
    public const int RowBytes = 64;
    public const int BlockBytes = 2 * BlockTokens * Heads * RowBytes;
    public const int ChunkTokens = 64;
    public const int BlocksPerChunk = ChunkTokens / BlockTokens;

    public static TestEngineProcess StartEngine() => TestEngineProcess.Start(Layers, Blocks, BlockBytes);

    public static LayoutDescriptor Layout(int numBlocks = Blocks, long strideBlock = BlockBytes) => new()
    {
        ElementSize = 2,
        NumBlocks = numBlocks,
        BlockTokens = BlockTokens,
        NumHeads = Heads,
        RowBytes = RowBytes,
        StrideBlock = strideBlock,
        StrideToken = Heads * RowBytes,
        StrideHead = RowBytes,
        KOffset = 0,
        VOffset = BlockTokens * Heads * RowBytes,
    };

    public static RegisterRequest Register(TestEngineProcess engine, string model = "test/model", int tpSize = 1, int tpRank = 0, LayoutDescriptor? layout = null) => new()
    {
        Namespace = new NamespaceDescriptor
        {
            ModelId = model,
            KvDtype = "bfloat16",
            BlockTokens = BlockTokens,
            ChunkTokens = ChunkTokens,
            TpSize = tpSize,
            TpRank = tpRank,
            KvGroup = 0,
            FormatVersion = 1,
        },
        Layers = engine.Regions.Select((r, i) => new LayerDescriptor
        {
            Name = $"model.layers.{i}.self_attn",
            Memory = new MemoryRefDescriptor { Kind = 1, Pid = engine.Pid, Address = r.Address, Length = r.Length },
            Layout = layout ?? Layout(),
        }).ToArray(),
    };

    public static uint[] Tokens(int count, uint seed)
    {
        var tokens = new uint[count];
        uint x = seed;
        for (int i = 0; i < count; i++)
        {
            x = (x * 1664525) + 1013904223;
            tokens[i] = x % 128_000;
        }

        return tokens;
    }

    public static StoreRequest Store(uint[] tokens, int firstChunk, int numChunks, int[] blockIds, string? salt = null) => new()
    {
        RequestId = "req",
        CacheSalt = salt,
        Tokens = WireArrays.FromTokens(tokens),
        FirstChunk = firstChunk,
        NumChunks = numChunks,
        BlockIds = WireArrays.FromBlockIds(blockIds),
    };

    public static LoadRequest Load(uint[] tokens, int firstChunk, int numChunks, int[] blockIds, string requestId = "req", string? salt = null) => new()
    {
        RequestId = requestId,
        CacheSalt = salt,
        Tokens = WireArrays.FromTokens(tokens),
        FirstChunk = firstChunk,
        NumChunks = numChunks,
        BlockIds = WireArrays.FromBlockIds(blockIds),
    };

    public static LookupRequest Lookup(uint[] tokens, string requestId = "req", string? salt = null, bool lease = true) => new()
    {
        RequestId = requestId,
        CacheSalt = salt,
        Tokens = WireArrays.FromTokens(tokens),
        Lease = lease,
    };
}
