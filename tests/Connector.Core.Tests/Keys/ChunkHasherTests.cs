using System.Text.Json;
using Connector.Core.Keys;
using Xunit;

namespace Connector.Core.Tests.Keys;

public sealed class ChunkHasherTests
{
    private static readonly KvNamespace Base = new("m", "bfloat16", "fp", 16, 64, 1, 0, 0, 1, string.Empty);

    public static TheoryData<string> VectorNames => new(Vectors().Select(v => v.GetProperty("name").GetString()!));

    private static JsonElement[] Vectors()
    {
        using JsonDocument doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(AppContext.BaseDirectory, "golden", "hash_vectors.json")));
        return doc.RootElement.GetProperty("vectors").EnumerateArray().Select(v => v.Clone()).ToArray();
    }

    [Theory]
    [MemberData(nameof(VectorNames))]
    public void ComputeKeys_GoldenVector_MatchesIndependentImplementation(string name)
    {
        JsonElement v = Vectors().Single(x => x.GetProperty("name").GetString() == name);
        JsonElement n = v.GetProperty("namespace");
        var ns = new KvNamespace(
            n.GetProperty("model_id").GetString()!, n.GetProperty("kv_dtype").GetString()!, n.GetProperty("layout_fingerprint").GetString()!,
            n.GetProperty("block_tokens").GetInt32(), n.GetProperty("chunk_tokens").GetInt32(), n.GetProperty("tp_size").GetInt32(),
            n.GetProperty("tp_rank").GetInt32(), n.GetProperty("kv_group").GetInt32(), n.GetProperty("format_version").GetInt32(),
            n.GetProperty("cache_salt").GetString()!);
        ns.Validate();
        Assert.Equal(v.GetProperty("namespace_encoding_hex").GetString(), Convert.ToHexStringLower(ns.Encode()));
        ChunkKey root = ChunkHasher.Root(ns);
        Assert.Equal(v.GetProperty("root_hex").GetString(), root.ToString());

        uint[] tokens = v.GetProperty("tokens").EnumerateArray().Select(t => t.GetUInt32()).ToArray();
        var keys = new ChunkKey[tokens.Length + 1];
        int count = ChunkHasher.ComputeKeys(root, v.GetProperty("chunk_tokens").GetInt32(), tokens, keys);
        string[] expected = v.GetProperty("keys_hex").EnumerateArray().Select(k => k.GetString()!).ToArray();
        Assert.Equal(expected, keys.Take(count).Select(k => k.ToString()));
    }

    [Fact]
    public void ComputeKeys_Prefix_EqualsLeadingKeysOfLongerSequence()
    {
        uint[] tokens = Enumerable.Range(0, 640).Select(i => (uint)(i * 7919 % 50000)).ToArray();
        ChunkKey root = ChunkHasher.Root(Base);
        var all = new ChunkKey[10];
        var prefix = new ChunkKey[10];
        Assert.Equal(10, ChunkHasher.ComputeKeys(root, 64, tokens, all));
        Assert.Equal(4, ChunkHasher.ComputeKeys(root, 64, tokens.AsSpan(0, 4 * 64 + 10), prefix));
        Assert.Equal(all.Take(4), prefix.Take(4));
    }

    [Fact]
    public void ComputeKeys_OneTokenChanged_ThatChunkAndAllLaterDiffer()
    {
        uint[] a = Enumerable.Range(0, 256).Select(i => (uint)i).ToArray();
        uint[] b = (uint[])a.Clone();
        b[70] = 99999;
        ChunkKey root = ChunkHasher.Root(Base);
        var ka = new ChunkKey[4];
        var kb = new ChunkKey[4];
        ChunkHasher.ComputeKeys(root, 64, a, ka);
        ChunkHasher.ComputeKeys(root, 64, b, kb);
        Assert.Equal(ka[0], kb[0]);
        Assert.All(Enumerable.Range(1, 3), i => Assert.NotEqual(ka[i], kb[i]));
    }

    [Fact]
    public void Root_DifferentSaltRankOrLayout_Differs()
    {
        ChunkKey[] roots =
        [
            ChunkHasher.Root(Base),
            ChunkHasher.Root(Base.WithSalt("a")),
            ChunkHasher.Root(Base.WithSalt("b")),
            ChunkHasher.Root(Base with { TpSize = 2, TpRank = 1 }),
            ChunkHasher.Root(Base with { LayoutFingerprint = "other" }),
            ChunkHasher.Root(Base with { KvDtype = "fp8_e4m3" }),
            ChunkHasher.Root(Base with { ChunkTokens = 128 }),
        ];
        Assert.Equal(roots.Length, roots.Distinct().Count());
        Assert.Equal(ChunkHasher.Root(Base), ChunkHasher.Root(Base.WithSalt(null)));
    }

    [Fact]
    public void Encode_StringBoundaries_AreUnambiguous()
    {
        KvNamespace a = Base with { ModelId = "ab", KvDtype = "c" };
        KvNamespace b = Base with { ModelId = "a", KvDtype = "bc" };
        Assert.NotEqual(ChunkHasher.Root(a), ChunkHasher.Root(b));
    }

    [Theory]
    [InlineData(16, 40, 1, 0)]
    [InlineData(16, 0, 1, 0)]
    [InlineData(0, 16, 1, 0)]
    [InlineData(16, 64, 2, 2)]
    [InlineData(16, 64, 2, -2)]
    [InlineData(16, 64, 0, 0)]
    public void Validate_BadField_ThrowsWithMessage(int block, int chunk, int tpSize, int tpRank)
    {
        var ex = Assert.Throws<ArgumentException>(() => (Base with { BlockTokens = block, ChunkTokens = chunk, TpSize = tpSize, TpRank = tpRank }).Validate());
        Assert.False(string.IsNullOrWhiteSpace(ex.Message));
    }

    [Fact]
    public void ComputeKeys_LargeChunk_UsesPoolAndMatchesStackPath()
    {
        uint[] tokens = Enumerable.Range(0, 8192).Select(i => (uint)i).ToArray();
        ChunkKey root = ChunkHasher.Root(Base with { ChunkTokens = 4096 });
        var keys = new ChunkKey[2];
        Assert.Equal(2, ChunkHasher.ComputeKeys(root, 4096, tokens, keys));
        using var sha = System.Security.Cryptography.IncrementalHash.CreateHash(System.Security.Cryptography.HashAlgorithmName.SHA256);
        byte[] rootBytes = new byte[32];
        root.CopyTo(rootBytes);
        sha.AppendData(rootBytes);
        sha.AppendData(System.Runtime.InteropServices.MemoryMarshal.AsBytes(tokens.AsSpan(0, 4096)));
        Assert.Equal(Convert.ToHexStringLower(sha.GetHashAndReset()), keys[0].ToString());
    }

    [Fact]
    public void ComputeKeys_Warm_AllocatesNothing()
    {
        uint[] tokens = Enumerable.Range(0, 4096).Select(i => (uint)i).ToArray();
        ChunkKey root = ChunkHasher.Root(Base);
        var keys = new ChunkKey[64];
        ChunkHasher.ComputeKeys(root, 64, tokens, keys);
        long before = GC.GetAllocatedBytesForCurrentThread();
        for (int i = 0; i < 10_000; i++)
        {
            ChunkHasher.ComputeKeys(root, 64, tokens.AsSpan(0, 256), keys);
        }

        Assert.Equal(0, GC.GetAllocatedBytesForCurrentThread() - before);
    }
}

public sealed class Sha256NativeTests
{
    [Theory]
    [InlineData(0)]
    [InlineData(1)]
    [InlineData(55)]
    [InlineData(56)]
    [InlineData(64)]
    [InlineData(1056)]
    [InlineData(65_568)]
    public void Hash_MatchesDotnetSha256(int length)
    {
        Assert.True(Sha256Native.IsAvailable, "libcrypto's low-level SHA-256 should bind on Linux");
        byte[] input = new byte[length];
        new Random(length).NextBytes(input);
        byte[] digest = new byte[32];
        Sha256Native.Hash(input, digest);
        Assert.Equal(System.Security.Cryptography.SHA256.HashData(input), digest);
    }
}
