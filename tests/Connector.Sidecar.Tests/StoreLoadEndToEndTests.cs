using Connector.Client;
using Connector.Protocol.Framing;
using Connector.Protocol.Messages;
using Connector.Testing;
using Xunit;

namespace Connector.Sidecar.Tests;

/// <summary>The real sidecar process serving real engine processes over the real socket.</summary>
public sealed class StoreLoadEndToEndTests
{
    [Fact]
    public void StoreThenLoad_IntoAnotherProcess_BytesAreIdentical()
    {
        using var sidecar = SidecarProcess.Start();
        using var producer = TestPool.StartEngine();
        using var consumer = TestPool.StartEngine();
        producer.Command("fill 7");
        consumer.Command("zero");
        using var p = producer.Connect(sidecar.SocketPath, "engine-a", "worker");
        using var c = consumer.Connect(sidecar.SocketPath, "engine-b", "worker");
        using var scheduler = SidecarClient.Connect(sidecar.SocketPath, "engine-b", "scheduler");
        p.Call<RegisterReply>(Opcode.Register, TestPool.Register(producer));
        c.Call<RegisterReply>(Opcode.Register, TestPool.Register(consumer));

        uint[] tokens = TestPool.Tokens(4 * TestPool.ChunkTokens + 10, seed: 1);
        int[] producerBlocks = [40, 3, 17, 9, 0, 63, 21, 22, 5, 6, 7, 8, 50, 49, 48, 47];
        StoreReply stored = p.Call<StoreReply>(Opcode.Store, TestPool.Store(tokens, 0, 4, producerBlocks));
        Assert.Equal(4, stored.Stored);

        LookupReply hit = scheduler.Call<LookupReply>(Opcode.Lookup, TestPool.Lookup(tokens, "r1"));
        Assert.Equal(4, hit.HitChunks);
        Assert.Equal(4 * TestPool.ChunkTokens, hit.HitTokens);
        Assert.NotEqual(0UL, hit.LeaseId);

        int[] consumerBlocks = [1, 2, 3, 4, 60, 59, 58, 57, 30, 31, 32, 33, 10, 12, 14, 16];
        LoadReply loaded = c.Call<LoadReply>(Opcode.Load, TestPool.Load(tokens, 0, 4, consumerBlocks, "r1"));
        Assert.Equal(4, loaded.LoadedChunks);

        for (int layer = 0; layer < TestPool.Layers; layer++)
        {
            for (int i = 0; i < producerBlocks.Length; i++)
            {
                string expected = producer.Hash(layer, (long)producerBlocks[i] * TestPool.BlockBytes, TestPool.BlockBytes);
                string actual = consumer.Hash(layer, (long)consumerBlocks[i] * TestPool.BlockBytes, TestPool.BlockBytes);
                Assert.Equal(expected, actual);
            }
        }

        // Blocks the load did not name stay untouched (zero).
        string zeroBlock = consumer.Hash(0, 0, TestPool.BlockBytes);
        Assert.Equal(zeroBlock, consumer.Hash(0, 20L * TestPool.BlockBytes, TestPool.BlockBytes));
        Assert.NotEqual(zeroBlock, consumer.Hash(0, 1L * TestPool.BlockBytes, TestPool.BlockBytes));
    }

    [Fact]
    public void Load_SkippedBlocks_AreNotWritten()
    {
        using var sidecar = SidecarProcess.Start();
        using var engine = TestPool.StartEngine();
        engine.Command("fill 3");
        using var w = engine.Connect(sidecar.SocketPath, "e", "worker");
        w.Call<RegisterReply>(Opcode.Register, TestPool.Register(engine));
        uint[] tokens = TestPool.Tokens(TestPool.ChunkTokens, seed: 2);
        Assert.Equal(1, w.Call<StoreReply>(Opcode.Store, TestPool.Store(tokens, 0, 1, [0, 1, 2, 3])).Stored);

        engine.Command("zero");
        string zero = engine.Hash(0, 0, TestPool.BlockBytes);
        Assert.Equal(1, w.Call<LoadReply>(Opcode.Load, TestPool.Load(tokens, 0, 1, [-1, -1, 12, 13])).LoadedChunks);
        Assert.Equal(zero, engine.Hash(0, 0, TestPool.BlockBytes));
        Assert.Equal(zero, engine.Hash(0, 1L * TestPool.BlockBytes, TestPool.BlockBytes));
        Assert.NotEqual(zero, engine.Hash(0, 12L * TestPool.BlockBytes, TestPool.BlockBytes));
    }

    [Fact]
    public void Store_ExistingChunks_AreSkippedWithoutCopy()
    {
        using var sidecar = SidecarProcess.Start();
        using var engine = TestPool.StartEngine();
        engine.Command("fill 1");
        using var w = engine.Connect(sidecar.SocketPath, "e", "worker");
        w.Call<RegisterReply>(Opcode.Register, TestPool.Register(engine));
        uint[] tokens = TestPool.Tokens(2 * TestPool.ChunkTokens, seed: 5);
        Assert.Equal(2, w.Call<StoreReply>(Opcode.Store, TestPool.Store(tokens, 0, 2, [0, 1, 2, 3, 4, 5, 6, 7])).Stored);
        StoreReply again = w.Call<StoreReply>(Opcode.Store, TestPool.Store(tokens, 0, 2, [0, 1, 2, 3, 4, 5, 6, 7]));
        Assert.Equal(0, again.Stored);
        Assert.Equal(2, again.AlreadyPresent);
        StatsReply stats = w.Call<StatsReply>(Opcode.Stats, null);
        Assert.Equal(2UL, stats.StoredChunks);
        Assert.Equal(2UL, stats.Chunks);
    }

    [Fact]
    public async Task StoresAndLoads_ManyInFlight_AllRepliesArriveMatched()
    {
        using var sidecar = SidecarProcess.Start();
        using var engine = TestPool.StartEngine();
        engine.Command("fill 11");
        using var w = engine.Connect(sidecar.SocketPath, "e", "worker");
        w.Call<RegisterReply>(Opcode.Register, TestPool.Register(engine));
        var sequences = Enumerable.Range(0, 16).Select(i => TestPool.Tokens(TestPool.ChunkTokens, seed: (uint)(100 + i))).ToArray();
        Task<StoreReply>[] stores = sequences
            .Select((t, i) => w.CallAsync<StoreReply>(Opcode.Store, TestPool.Store(t, 0, 1, [i * 4, (i * 4) + 1, (i * 4) + 2, (i * 4) + 3])))
            .ToArray();
        StoreReply[] storeReplies = await Task.WhenAll(stores);
        Assert.All(storeReplies, r => Assert.Equal(1, r.Stored));

        engine.Command("zero");
        Task<LoadReply>[] loads = sequences
            .Select((t, i) => w.CallAsync<LoadReply>(Opcode.Load, TestPool.Load(t, 0, 1, [i * 4, (i * 4) + 1, (i * 4) + 2, (i * 4) + 3], $"r{i}")))
            .ToArray();
        LoadReply[] loadReplies = await Task.WhenAll(loads);
        Assert.All(loadReplies, r => Assert.Equal(1, r.LoadedChunks));

        // Every block came back to where it was stored from: compare with a fresh engine filled the same way.
        using var reference = TestPool.StartEngine();
        reference.Command("fill 11");
        for (int b = 0; b < 64; b++)
        {
            Assert.Equal(reference.Hash(2, (long)b * TestPool.BlockBytes, TestPool.BlockBytes), engine.Hash(2, (long)b * TestPool.BlockBytes, TestPool.BlockBytes));
        }
    }

    [Fact]
    public void Lookup_DifferentSalt_Misses()
    {
        using var sidecar = SidecarProcess.Start();
        using var engine = TestPool.StartEngine();
        engine.Command("fill 1");
        using var w = engine.Connect(sidecar.SocketPath, "e", "worker");
        using var s = SidecarClient.Connect(sidecar.SocketPath, "e", "scheduler");
        w.Call<RegisterReply>(Opcode.Register, TestPool.Register(engine));
        uint[] tokens = TestPool.Tokens(TestPool.ChunkTokens + 1, seed: 9);
        w.Call<StoreReply>(Opcode.Store, TestPool.Store(tokens, 0, 1, [0, 1, 2, 3], salt: "tenant-a"));
        Assert.Equal(1, s.Call<LookupReply>(Opcode.Lookup, TestPool.Lookup(tokens, salt: "tenant-a")).HitChunks);
        Assert.Equal(0, s.Call<LookupReply>(Opcode.Lookup, TestPool.Lookup(tokens, salt: "tenant-b")).HitChunks);
        Assert.Equal(0, s.Call<LookupReply>(Opcode.Lookup, TestPool.Lookup(tokens, salt: null)).HitChunks);
    }

    [Fact]
    public void Lookup_TwoRanks_CountsOnlyChunksEveryRankHas()
    {
        using var sidecar = SidecarProcess.Start();
        using var rank0 = TestPool.StartEngine();
        using var rank1 = TestPool.StartEngine();
        rank0.Command("fill 1");
        rank1.Command("fill 2");
        using var w0 = rank0.Connect(sidecar.SocketPath, "tp", "worker", 0);
        using var w1 = rank1.Connect(sidecar.SocketPath, "tp", "worker", 1);
        using var s = SidecarClient.Connect(sidecar.SocketPath, "tp", "scheduler");
        w0.Call<RegisterReply>(Opcode.Register, TestPool.Register(rank0, tpSize: 2, tpRank: 0));
        w1.Call<RegisterReply>(Opcode.Register, TestPool.Register(rank1, tpSize: 2, tpRank: 1));
        uint[] tokens = TestPool.Tokens(3 * TestPool.ChunkTokens, seed: 4);
        w0.Call<StoreReply>(Opcode.Store, TestPool.Store(tokens, 0, 3, Enumerable.Range(0, 12).ToArray()));
        w1.Call<StoreReply>(Opcode.Store, TestPool.Store(tokens, 0, 2, Enumerable.Range(0, 8).ToArray()));
        Assert.Equal(2, s.Call<LookupReply>(Opcode.Lookup, TestPool.Lookup(tokens)).HitChunks);
    }

    [Fact]
    public void Lookup_BeforeAnyRegistration_ReportsNotRegistered()
    {
        using var sidecar = SidecarProcess.Start();
        using var s = SidecarClient.Connect(sidecar.SocketPath, "nobody", "scheduler");
        LookupReply reply = s.Call<LookupReply>(Opcode.Lookup, TestPool.Lookup(TestPool.Tokens(500, 1)));
        Assert.Equal(LookupState.NotRegistered, reply.State);
        Assert.Equal(0, reply.HitTokens);
    }
}
