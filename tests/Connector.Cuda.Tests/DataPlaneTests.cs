using Xunit;
using Connector.Core.Caching;
using Connector.Core.Memory;
using Connector.Core.Platform;
using Connector.Core.Storage;
using Connector.CudaInterop.Driver;
using Microsoft.Extensions.Time.Testing;

namespace Connector.Cuda.Tests;

/// <summary>
/// The CUDA data plane against the driver double: a stand-in engine process exports "device" memory, the
/// sidecar's cache core opens it through the CUDA IPC provider, stores and loads chunks, and the bytes are checked
/// in the engine's own memory.
/// </summary>
public sealed class DataPlaneTests : IDisposable
{
    private const int Blocks = 32;
    private const int BlockTokens = 16;
    private const int Heads = 2;
    private const int RowBytes = 64;
    private const int ChunkTokens = 32;
    private const long BlockBytes = BlockTokens * Heads * RowBytes;
    private const long LayerBytes = 2 * Blocks * BlockBytes;
    private const int Layers = 2;
    private const string Uuid = "GPU-facecda0-0000-0000-0000-000000000000";

    private static readonly Lazy<CudaDataPlane> SharedPlane = new(() => CreatePlane(new CudaDataPlaneOptions { DriverLibrary = DriverDouble.Path }));

    private readonly string _library;
    private readonly Exporter _engine;
    private readonly HostMemoryTier _tier;
    private readonly KvCacheService _cache;
    private readonly ulong _kv;
    private readonly byte[] _handle;

    public DataPlaneTests()
    {
        _library = DriverDouble.Use();
        _engine = new Exporter(_library);
        (_kv, _handle) = _engine.Alloc(Layers * LayerBytes);
        _engine.Fill(_kv, 0, Layers * LayerBytes, seed: 1);
        _tier = new HostMemoryTier(new HostTierOptions { CapacityBytes = 64L << 20, ExtentBytes = 4L << 20, Pinner = Plane.Pinner }, new FakeTimeProvider());
        _cache = new KvCacheService(_tier, [Plane.Provider]);
    }

    private static CudaDataPlane Plane => SharedPlane.Value;

    public void Dispose()
    {
        _cache.OnSessionClosed(1);
        _cache.Dispose();
        _engine.Dispose();
        DriverDouble.Reset();
    }

    [Fact]
    public void StoreThenLoad_IntoOtherBlocks_EveryByteArrives()
    {
        long opensBefore = Plane.IpcOpens;
        EngineRegistration reg = Register(_cache, _engine, _kv, _handle);
        Assert.Equal(opensBefore + 1, Plane.IpcOpens); // two layers in one allocation: one open
        uint[] tokens = Tokens(2 * ChunkTokens);

        StoreResult stored = _cache.Store(reg, "r1", null, ChunkSource.FromTokens(tokens), 0, 2, [0, 1, 2, 3], CopyDeadline.None);
        Assert.Equal(2, stored.Stored);
        int loaded = _cache.Load(reg, "r1", null, ChunkSource.FromTokens(tokens), 0, 2, [10, 11, 12, 13], CopyDeadline.None);

        Assert.Equal(2, loaded);
        AssertBlocksEqual(_engine, _kv, [0, 1, 2, 3], [10, 11, 12, 13]);
        Assert.Equal(opensBefore + 1, Plane.IpcOpens); // nothing opened on the hot path
    }

    [Fact]
    public void SecondRegistrationOfOneAllocation_SharesTheMapping_AndTheLastUnregisterClosesIt()
    {
        long opens = Plane.IpcOpens;
        EngineRegistration a = Register(_cache, _engine, _kv, _handle);
        EngineRegistration b = Register(_cache, _engine, _kv, _handle);
        Assert.Equal(opens + 1, Plane.IpcOpens);
        Assert.Equal(1, DriverDouble.Counter("open_mappings"));

        _cache.Unregister(a);
        Assert.Equal(1, DriverDouble.Counter("open_mappings"));
        _cache.Unregister(b);
        Assert.Equal(0, DriverDouble.Counter("open_mappings"));
        Assert.Equal(0, Plane.OpenMappings);
    }

    [Fact]
    public void FreedAllocation_StaleHandle_RefusedWithoutLeakingAMapping()
    {
        _engine.Free(_kv);
        var ex = Assert.Throws<CacheException>(() => Register(_cache, _engine, _kv, _handle));
        Assert.Equal(CacheError.MemoryFault, ex.Code);
        Assert.Contains("cannot be opened", ex.Message, StringComparison.Ordinal);
        Assert.Equal(0, Plane.OpenMappings);
        Assert.Equal(0, DriverDouble.Counter("open_mappings"));
    }

    [Fact]
    public void ForeignHandle_Refused()
    {
        byte[] foreign = new byte[64];
        Random.Shared.NextBytes(foreign);
        var ex = Assert.Throws<CacheException>(() => Register(_cache, _engine, _kv, foreign));
        Assert.Equal(CacheError.MemoryFault, ex.Code);
        Assert.Equal(0, Plane.OpenMappings);
    }

    [Fact]
    public void HandleOfADeadProcess_Refused()
    {
        using ProcessIdentity owner = _engine.Identity();
        _engine.Kill();
        var ex = Assert.Throws<CacheException>(() => Register(_cache, _engine, _kv, _handle, owner: owner));
        Assert.Equal(CacheError.MemoryFault, ex.Code);
        Assert.Equal(0, Plane.OpenMappings);
    }

    [Fact]
    public void DeviceTheSidecarCannotSee_RefusedNamingTheDevicesItSees()
    {
        var ex = Assert.Throws<CacheException>(() => Register(_cache, _engine, _kv, _handle, uuid: "GPU-00000000-1111-2222-3333-444444444444"));
        Assert.Equal(CacheError.Unsupported, ex.Code);
        Assert.Contains(Uuid, ex.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void RegionBeyondTheAllocation_OutOfRange()
    {
        var ex = Assert.Throws<CacheException>(() => Register(_cache, _engine, _kv, _handle, offset: LayerBytes + 4096));
        Assert.Equal(CacheError.OutOfRange, ex.Code);
        Assert.Equal(0, Plane.OpenMappings);
    }

    [Fact]
    public void EngineKilledWhileMapped_CopiesRefused_AndUnregisterClosesTheMapping()
    {
        using ProcessIdentity owner = _engine.Identity();
        EngineRegistration reg = Register(_cache, _engine, _kv, _handle, owner: owner);
        Assert.Equal(1, DriverDouble.Counter("open_mappings"));
        _engine.Kill();

        var ex = Assert.Throws<CacheException>(() => _cache.Store(reg, "r", null, ChunkSource.FromTokens(Tokens(ChunkTokens)), 0, 1, [0, 1], CopyDeadline.None));
        Assert.Contains("exited", ex.Message, StringComparison.Ordinal);
        Assert.Equal(0, _cache.GetStats().Chunks);
        _cache.Unregister(reg);
        Assert.Equal(0, DriverDouble.Counter("open_mappings"));
    }

    [Theory]
    [InlineData("cuMemcpyBatchAsync_v2", CuResult.InvalidValue)]
    [InlineData("cuEventSynchronize", CuResult.IllegalAddress)]
    public void DriverErrorDuringAStore_CommitsNothing_AndTheNextStoreWorks(string symbol, CuResult error)
    {
        EngineRegistration reg = Register(_cache, _engine, _kv, _handle);
        uint[] tokens = Tokens(2 * ChunkTokens);
        DriverDouble.Inject(symbol, error, skip: 0, count: 1);

        var ex = Assert.Throws<CacheException>(() => _cache.Store(reg, "r", null, ChunkSource.FromTokens(tokens), 0, 2, [0, 1, 2, 3], CopyDeadline.None));
        Assert.Equal(CacheError.MemoryFault, ex.Code);
        Assert.Equal(0, _cache.GetStats().Chunks);
        Assert.Equal(0, _cache.Lookup(1, "engine", "r", null, tokens, lease: false).HitChunks);

        Assert.Equal(2, _cache.Store(reg, "r", null, ChunkSource.FromTokens(tokens), 0, 2, [0, 1, 2, 3], CopyDeadline.None).Stored);
    }

    [Fact]
    public void DriverWithoutBatchedCopy_CopiesOneCallPerPiece()
    {
        DriverDouble.SetBatchAvailable(false);
        using CudaDataPlane plane = CreatePlane(new CudaDataPlaneOptions { DriverLibrary = _library, PinHostMemory = false });
        Assert.Equal("none", plane.BatchMode);
        using var tier = new HostMemoryTier(new HostTierOptions { CapacityBytes = 64L << 20, ExtentBytes = 4L << 20 }, new FakeTimeProvider());
        using var cache = new KvCacheService(tier, [plane.Provider]);
        EngineRegistration reg = Register(cache, _engine, _kv, _handle);
        long batches = DriverDouble.Counter("batch_calls");
        long copies = DriverDouble.Counter("copy_calls");

        uint[] tokens = Tokens(ChunkTokens);
        Assert.Equal(1, cache.Store(reg, "r", null, ChunkSource.FromTokens(tokens), 0, 1, [5, 6], CopyDeadline.None).Stored);
        Assert.Equal(1, cache.Load(reg, "r", null, ChunkSource.FromTokens(tokens), 0, 1, [20, 21], CopyDeadline.None));

        AssertBlocksEqual(_engine, _kv, [5, 6], [20, 21]);
        Assert.Equal(batches, DriverDouble.Counter("batch_calls"));
        Assert.True(DriverDouble.Counter("copy_calls") > copies);
        cache.Unregister(reg);
    }

    [Fact]
    public void Store_WaitsForTheEnginesEvent_BeforeReadingItsBlocks()
    {
        byte[] storeEvent = _engine.CreateEvent();
        EngineRegistration reg = Register(_cache, _engine, _kv, _handle, storeEvent: storeEvent);
        // The engine's "forward pass" rewrites blocks 0 and 1 of layer 0 (K) 200 ms from now, then records its event.
        _engine.WriteAfter(200_000, _kv, 0, 2 * BlockBytes, seed: 99);

        uint[] tokens = Tokens(ChunkTokens);
        Assert.Equal(1, _cache.Store(reg, "r", null, ChunkSource.FromTokens(tokens), 0, 1, [0, 1], CopyDeadline.None).Stored);
        _engine.Sync();
        Assert.Equal(1, _cache.Load(reg, "r", null, ChunkSource.FromTokens(tokens), 0, 1, [8, 9], CopyDeadline.None));

        // Equal only if the store read the blocks after the delayed write.
        Assert.Equal(_engine.Hash(_kv, 0, 2 * BlockBytes), _engine.Hash(_kv, 8 * BlockBytes, 2 * BlockBytes));
    }

    [Fact]
    public void L1Extents_ArePinned_AndAPinRefusalFallsBackToPageable()
    {
        long pinnedBefore = Plane.Pinner!.PinnedBytes;
        EngineRegistration reg = Register(_cache, _engine, _kv, _handle); // may pin the first extent in the background
        Assert.Equal(1, _cache.Store(reg, "r", null, ChunkSource.FromTokens(Tokens(ChunkTokens)), 0, 1, [0, 1], CopyDeadline.None).Stored);
        Assert.True(Plane.Pinner.PinnedBytes >= pinnedBefore + (4L << 20));

        DriverDouble.SetPinLimit(0);
        long failures = Plane.Pinner.Failures;
        using var tier = new HostMemoryTier(new HostTierOptions { CapacityBytes = 64L << 20, ExtentBytes = 4L << 20, Pinner = Plane.Pinner }, new FakeTimeProvider());
        using var cache = new KvCacheService(tier, [Plane.Provider]);
        EngineRegistration other = Register(cache, _engine, _kv, _handle);
        uint[] tokens = Tokens(ChunkTokens, seed: 7);
        Assert.Equal(1, cache.Store(other, "r", null, ChunkSource.FromTokens(tokens), 0, 1, [2, 3], CopyDeadline.None).Stored);
        Assert.True(Plane.Pinner.Failures > failures);
        Assert.Equal(1, cache.Load(other, "r", null, ChunkSource.FromTokens(tokens), 0, 1, [30, 31], CopyDeadline.None));
        AssertBlocksEqual(_engine, _kv, [2, 3], [30, 31]);
        cache.Unregister(other);
    }

    [Fact]
    public void LoadPastItsDeadline_WritesNothing()
    {
        EngineRegistration reg = Register(_cache, _engine, _kv, _handle);
        uint[] tokens = Tokens(ChunkTokens);
        Assert.Equal(1, _cache.Store(reg, "r", null, ChunkSource.FromTokens(tokens), 0, 1, [0, 1], CopyDeadline.None).Stored);
        string before = _engine.Hash(_kv, 0, Layers * LayerBytes);

        int loaded = _cache.Load(reg, "r", null, ChunkSource.FromTokens(tokens), 0, 1, [12, 13], new CopyDeadline(MonotonicClock.NowNs - 1, CancellationToken.None));

        Assert.Equal(0, loaded);
        Assert.Equal(before, _engine.Hash(_kv, 0, Layers * LayerBytes));
    }

    [Fact]
    public async Task DeviceToDevice_BetweenTwoEnginesOnOneGpu_MovesTheBytes()
    {
        using var other = new Exporter(_library);
        (ulong otherKv, byte[] otherHandle) = other.Alloc(LayerBytes);
        using IEngineMemory source = Plane.Provider.Open([Ref(_engine.Pid, _handle, 0, LayerBytes)]);
        using IEngineMemory target = Plane.Provider.Open([Ref(other.Pid, otherHandle, 0, LayerBytes)]);

        await ((CudaEngineMemory)source).CopyTo((CudaEngineMemory)target, [(0, 3 * BlockBytes, 0, 7 * BlockBytes, 2 * BlockBytes)]);

        Assert.Equal(_engine.Hash(_kv, 3 * BlockBytes, 2 * BlockBytes), other.Hash(otherKv, 7 * BlockBytes, 2 * BlockBytes));
    }

    private static CudaDataPlane CreatePlane(CudaDataPlaneOptions options)
    {
        CudaDataPlane? plane = CudaDataPlane.TryCreate(options, null, out string reason);
        Assert.True(plane is not null, reason);
        return plane!;
    }

    private static EngineMemoryRef Ref(int pid, byte[] handle, long offset, long length, string uuid = Uuid) =>
        new(EngineMemoryKind.CudaIpc, pid, 0, (ulong)length, handle, uuid, (ulong)offset);

    private static EngineRegistration Register(KvCacheService cache, Exporter engine, ulong kv, byte[] handle, long offset = 0, string uuid = Uuid, byte[]? storeEvent = null, ProcessIdentity? owner = null)
    {
        _ = kv;
        var layers = new List<LayerSpec>();
        for (int l = 0; l < Layers; l++)
        {
            layers.Add(new LayerSpec(
                $"layer{l}",
                Ref(owner is null ? engine.Pid : 0, handle, offset + (l * LayerBytes), LayerBytes, uuid),
                new KvLayout(2, Blocks, BlockTokens, Heads, RowBytes, BlockBytes, Heads * RowBytes, RowBytes, 0, Blocks * BlockBytes)));
        }

        var ns = new NamespaceSpec("test-model", "bfloat16", BlockTokens, ChunkTokens, 1, 0, 0, 1);
        return cache.Register(1, "engine", ns, layers, owner, storeEvent is null ? null : new EngineSignals(storeEvent));
    }

    private static uint[] Tokens(int count, int seed = 1) => Enumerable.Range(seed * 1000, count).Select(i => (uint)i).ToArray();

    /// <summary>K and V of each source block equal those of its target block, in every layer.</summary>
    private static void AssertBlocksEqual(Exporter engine, ulong kv, int[] sources, int[] targets)
    {
        for (int l = 0; l < Layers; l++)
        {
            foreach (long plane in new[] { 0L, Blocks * BlockBytes })
            {
                for (int i = 0; i < sources.Length; i++)
                {
                    long layer = l * LayerBytes;
                    Assert.Equal(engine.Hash(kv, layer + plane + (sources[i] * BlockBytes), BlockBytes), engine.Hash(kv, layer + plane + (targets[i] * BlockBytes), BlockBytes));
                }
            }
        }
    }
}
