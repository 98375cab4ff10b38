using Connector.Core.Platform;
using Connector.Protocol;
using Connector.Protocol.Framing;
using Connector.Protocol.Messages;
using Xunit;
using static Connector.Server.Tests.HandlerFixture;

namespace Connector.Server.Tests;

/// <summary>Every rule about what a client may do, against the handler with simulated peers (docs/security.md).</summary>
public sealed class RequestHandlerTests : IDisposable
{
    private readonly HandlerFixture _f = new();

    public void Dispose() => _f.Dispose();

    private static ErrorCode Refusal(Action action)
    {
        Exception ex = Record.Exception(action) ?? throw new Xunit.Sdk.XunitException("the request was not refused");
        Assert.True(RequestHandler.TryMapError(ex, out ErrorCode code, out _), $"unmapped {ex}");
        return code;
    }

    [Fact]
    public void Hello_InstanceHeldByAnotherUid_PermissionDeniedUntilOwnerLeaves()
    {
        RequestHandler owner = _f.Hello(Stranger(uid: 1000), "engine-a");
        RequestHandler thief = _f.Handler(Stranger(uid: 2000));
        Assert.Equal(ErrorCode.PermissionDenied, Refusal(() => thief.Handle(Opcode.Hello, Body(new HelloRequest { ProtocolVersion = 1, InstanceId = "engine-a" }))));
        Assert.False(thief.IsReady);

        owner.Dispose();
        RequestHandler next = _f.Hello(Stranger(uid: 2000), "engine-a");
        Assert.True(next.IsReady);
    }

    [Fact]
    public void Hello_SameUid_SharesTheInstance()
    {
        RequestHandler scheduler = _f.Hello(Stranger(uid: 1000), "engine-a", "scheduler");
        RequestHandler worker = _f.Hello(Stranger(uid: 1000), "engine-a", "worker");
        Assert.True(scheduler.IsReady && worker.IsReady);
        scheduler.Dispose();
        Assert.Equal(ErrorCode.PermissionDenied, Refusal(() => _f.Hello(Stranger(uid: 3000), "engine-a")));
    }

    [Fact]
    public void Hello_TwiceOnOneConnection_BadRequest()
    {
        RequestHandler h = _f.Hello(Self(), "engine-a");
        Assert.Equal(ErrorCode.BadRequest, Refusal(() => h.Handle(Opcode.Hello, Body(new HelloRequest { ProtocolVersion = 1, InstanceId = "engine-b" }))));
        Assert.Equal("engine-a", h.InstanceId);
    }

    [Fact]
    public void Hello_InstanceIdAboveMaxIdBytes_LimitExceeded()
    {
        RequestHandler h = _f.Handler(Self());
        string id = new('x', _f.Options.MaxIdBytes + 1);
        Assert.Equal(ErrorCode.LimitExceeded, Refusal(() => h.Handle(Opcode.Hello, Body(new HelloRequest { ProtocolVersion = 1, InstanceId = id }))));
        Assert.Equal(0, _f.Claims.Count);
    }

    [Fact]
    public void Register_MemoryOfAnotherProcess_PermissionDeniedNothingRegistered()
    {
        RequestHandler h = _f.Hello(Self(), "engine");
        Assert.Equal(ErrorCode.PermissionDenied, Refusal(() => h.Handle(Opcode.Register, Body(_f.Register(pid: 1)))));
        Assert.Null(h.Registration);
        Assert.Equal(0, _f.Cache.GetStats().Registrations);
    }

    [Fact]
    public void Register_ByAnotherProcessNamingOurMemory_PermissionDenied()
    {
        // The peer is a different process: memory of this process is not its own.
        RequestHandler h = _f.Hello(new ProcessIdentity(Environment.ProcessId + 1_000_000, 0, 0, null), "engine");
        Assert.Equal(ErrorCode.PermissionDenied, Refusal(() => h.Handle(Opcode.Register, Body(_f.Register()))));
        Assert.Equal(0, _f.Cache.GetStats().Registrations);
    }

    [Fact]
    public void Register_PidZero_BindsToTheConnectingProcess()
    {
        RequestHandler h = _f.Hello(Self(), "engine");
        h.Handle(Opcode.Register, Body(_f.Register(pid: 0)));
        _f.Pool.Fill(3);
        uint[] tokens = Tokens(ChunkTokens, 1);
        Assert.Equal(1, ((StoreReply)Copy(h, Opcode.Store, Store(tokens, 1, [0, 1, 2, 3]))).Stored);
        Assert.Equal(1, ((LoadReply)Copy(h, Opcode.Load, Load(tokens, 1, [4, 5, 6, 7]))).LoadedChunks);
        Assert.True(_f.Pool.Block(1, 0).SequenceEqual(_f.Pool.Block(1, 4)));
    }

    [Fact]
    public void Register_NilLayerEntry_BadRequest()
    {
        RequestHandler h = _f.Hello(Self(), "engine");
        RegisterRequest r = _f.Register();
        r.Layers = [r.Layers![0], null!];
        Assert.Equal(ErrorCode.BadRequest, Refusal(() => h.Handle(Opcode.Register, Body(r))));
    }

    [Theory]
    [InlineData(16 * 1024, 16)]
    [InlineData(16, 16)]
    public void Register_ChunkGeometryOutsideBounds_LimitExceeded(int chunkTokens, int blockTokens)
    {
        // 16k tokens is above MaxChunkTokens; 16 tokens is one 4 KiB block per layer, 8 KiB: below a MinChunkBytes of 64 KiB.
        using var tiny = new HandlerFixture(new SidecarOptions { CapacityBytes = 16L << 20, ExtentBytes = 1L << 20, MinChunkBytes = 64 << 10 });
        RequestHandler h = tiny.Hello(Self(), "engine");
        Assert.Equal(ErrorCode.LimitExceeded, Refusal(() => h.Handle(Opcode.Register, Body(tiny.Register(chunkTokens: chunkTokens, blockTokens: blockTokens)))));
        Assert.Equal(0, tiny.Cache.GetStats().Registrations);
    }

    [Fact]
    public void Register_ChunkAboveAQuarterOfCapacity_LimitExceeded()
    {
        // A 32 KiB chunk against a 64 KiB capacity: it would take half the cache.
        using var small = new HandlerFixture(new SidecarOptions { CapacityBytes = 64 << 10, ExtentBytes = 32 << 10 });
        RequestHandler h = small.Hello(Self(), "engine");
        Assert.Equal(ErrorCode.LimitExceeded, Refusal(() => h.Handle(Opcode.Register, Body(small.Register()))));
    }

    [Fact]
    public void Clear_FromNonAdministrator_PermissionDeniedAndChunksKept()
    {
        RequestHandler w = _f.Worker();
        Copy(w, Opcode.Store, Store(Tokens(ChunkTokens, 2), 1, [0, 1, 2, 3]));
        RequestHandler stranger = _f.Hello(Stranger(uid: 4242), "other");
        Assert.Equal(ErrorCode.PermissionDenied, Refusal(() => stranger.Handle(Opcode.Clear, default)));
        Assert.Equal(1, _f.Cache.GetStats().Chunks);

        Assert.Equal(1, ((ClearReply)w.Handle(Opcode.Clear, default)).RemovedChunks);
    }

    [Fact]
    public void Release_LeaseOfAnotherInstance_UnknownLeaseAndLeaseKept()
    {
        RequestHandler w = _f.Worker("victim");
        uint[] tokens = Tokens(ChunkTokens, 3);
        Copy(w, Opcode.Store, Store(tokens, 1, [0, 1, 2, 3]));
        RequestHandler scheduler = _f.Hello(Self(), "victim", "scheduler");
        var hit = (LookupReply)scheduler.Handle(Opcode.Lookup, Body(new LookupRequest { RequestId = "q", Tokens = WireArrays.FromTokens(tokens), Lease = true }));
        Assert.NotEqual(0UL, hit.LeaseId);

        RequestHandler thief = _f.Hello(Self(), "thief");
        Assert.Equal(ErrorCode.UnknownLease, Refusal(() => thief.Handle(Opcode.Release, Body(new ReleaseRequest { LeaseId = hit.LeaseId }))));
        Assert.Equal(0, ((ReleaseReply)thief.Handle(Opcode.Release, Body(new ReleaseRequest { RequestId = "q" }))).ReleasedChunks);
        Assert.Equal(1, _f.Cache.GetStats().ActiveLeases);

        Assert.Equal(1, ((ReleaseReply)scheduler.Handle(Opcode.Release, Body(new ReleaseRequest { LeaseId = hit.LeaseId }))).ReleasedChunks);
    }

    [Fact]
    public void Lookup_LeaseIds_AreNotSequential()
    {
        RequestHandler w = _f.Worker();
        uint[] tokens = Tokens(ChunkTokens, 4);
        Copy(w, Opcode.Store, Store(tokens, 1, [0, 1, 2, 3]));
        ulong[] ids = Enumerable.Range(0, 8)
            .Select(i => ((LookupReply)w.Handle(Opcode.Lookup, Body(new LookupRequest { RequestId = $"q{i}", Tokens = WireArrays.FromTokens(tokens), Lease = true }))).LeaseId)
            .ToArray();
        Assert.All(ids, id => Assert.NotEqual(0UL, id));
        Assert.Equal(ids.Length, ids.Distinct().Count());
        Assert.False(ids.Zip(ids.Skip(1)).All(p => p.Second == p.First + 1), "lease ids must not be guessable from one another");
    }

    [Fact]
    public void Lookup_ManyMisses_LeaveNoLeaseRecords()
    {
        RequestHandler w = _f.Worker();
        for (int i = 0; i < 2000; i++)
        {
            w.Handle(Opcode.Lookup, Body(new LookupRequest { RequestId = $"miss-{i}", Tokens = WireArrays.FromTokens(Tokens(ChunkTokens, (uint)(100 + i))), Lease = true }));
        }

        Assert.Equal(0, _f.Cache.RequestLeases);
        Assert.Equal(0, _f.Cache.GetStats().ActiveLeases);
    }

    [Fact]
    public void Lookup_LeasesAboveConnectionLimit_LimitExceeded()
    {
        using var f = new HandlerFixture(new SidecarOptions { CapacityBytes = 16L << 20, ExtentBytes = 1L << 20, MaxLeasesPerConnection = 2 });
        RequestHandler w = f.Worker();
        uint[] tokens = Tokens(ChunkTokens, 5);
        Copy(w, Opcode.Store, Store(tokens, 1, [0, 1, 2, 3]));
        LookupRequest Lease(string id) => new() { RequestId = id, Tokens = WireArrays.FromTokens(tokens), Lease = true };
        w.Handle(Opcode.Lookup, Body(Lease("a")));
        w.Handle(Opcode.Lookup, Body(Lease("b")));
        Assert.Equal(ErrorCode.LimitExceeded, Refusal(() => w.Handle(Opcode.Lookup, Body(Lease("c")))));
        w.Handle(Opcode.Lookup, Body(Lease("a")));
        Assert.Equal(2, f.Cache.RequestLeases);
    }

    [Fact]
    public void Lookup_SaltOrTokensAboveLimits_LimitExceeded()
    {
        using var f = new HandlerFixture(new SidecarOptions { CapacityBytes = 16L << 20, ExtentBytes = 1L << 20, MaxTokensPerRequest = 1000 });
        RequestHandler w = f.Worker();
        string salt = new('s', f.Options.MaxSaltBytes + 1);
        Assert.Equal(ErrorCode.LimitExceeded, Refusal(() => w.Handle(Opcode.Lookup, Body(new LookupRequest { RequestId = "q", CacheSalt = salt, Tokens = WireArrays.FromTokens(Tokens(ChunkTokens, 1)) }))));
        Assert.Equal(ErrorCode.LimitExceeded, Refusal(() => w.Handle(Opcode.Lookup, Body(new LookupRequest { RequestId = "q", Tokens = WireArrays.FromTokens(Tokens(1001, 1)) }))));
        Assert.Equal(ErrorCode.LimitExceeded, Refusal(() => Copy(w, Opcode.Store, Store(Tokens(ChunkTokens, 1), 1, [0, 1, 2, 3], salt: salt))));
    }

    [Fact]
    public void Lookup_ThousandsOfSalts_RootCacheStaysBounded()
    {
        RequestHandler w = _f.Worker();
        for (int i = 0; i < 1000; i++)
        {
            w.Handle(Opcode.Lookup, Body(new LookupRequest { RequestId = "q", CacheSalt = $"tenant-{i}", Tokens = WireArrays.FromTokens(Tokens(ChunkTokens, 1)) }));
        }

        Assert.True(w.Registration!.CachedRoots <= _f.Options.MaxCachedSaltsPerRegistration, $"{w.Registration.CachedRoots} roots cached");
    }

    [Fact]
    public void StoreOrLoad_WithClientKeys_BadRequest()
    {
        RequestHandler w = _f.Worker();
        StoreRequest s = Store(Tokens(ChunkTokens, 6), 1, [0, 1, 2, 3]);
        s.Keys = new byte[32];
        Assert.Equal(ErrorCode.BadRequest, Refusal(() => Copy(w, Opcode.Store, s)));
        LoadRequest l = Load(Tokens(ChunkTokens, 6), 1, [0, 1, 2, 3]);
        l.Keys = new byte[32];
        l.Tokens = null;
        Assert.Equal(ErrorCode.BadRequest, Refusal(() => Copy(w, Opcode.Load, l)));
    }

    /// <summary>A worker with one chunk stored from blocks 0-3, and the engine memory zeroed afterwards.</summary>
    private (RequestHandler Worker, uint[] Tokens) StoredThenZeroed(uint seed)
    {
        RequestHandler w = _f.Worker();
        _f.Pool.Fill((int)seed);
        uint[] tokens = Tokens(ChunkTokens, seed);
        Assert.Equal(1, ((StoreReply)Copy(w, Opcode.Store, Store(tokens, 1, [0, 1, 2, 3]))).Stored);
        _f.Pool.Zero();
        return (w, tokens);
    }

    private bool PoolIsZero() => _f.Pool.Layer(0).IndexOfAnyExcept((byte)0) < 0 && _f.Pool.Layer(1).IndexOfAnyExcept((byte)0) < 0;

    [Fact]
    public void Load_DeadlineAlreadyPassed_WritesNothingAndCountsLateLoad()
    {
        (RequestHandler w, uint[] tokens) = StoredThenZeroed(7);
        ulong past = (ulong)(MonotonicClock.NowNs - 1_000_000);
        Assert.Equal(0, ((LoadReply)Copy(w, Opcode.Load, Load(tokens, 1, [4, 5, 6, 7], deadlineNs: past))).LoadedChunks);
        Assert.True(PoolIsZero(), "a late load wrote into engine memory");
        Assert.Equal(1, _f.Cache.GetStats().LateLoads);

        ulong future = (ulong)(MonotonicClock.NowNs + 10_000_000_000);
        Assert.Equal(1, ((LoadReply)Copy(w, Opcode.Load, Load(tokens, 1, [4, 5, 6, 7], deadlineNs: future))).LoadedChunks);
    }

    [Fact]
    public void Store_DeadlineAlreadyPassed_CommitsNothing()
    {
        RequestHandler w = _f.Worker();
        uint[] tokens = Tokens(2 * ChunkTokens, 8);
        var r = (StoreReply)Copy(w, Opcode.Store, Store(tokens, 2, [0, 1, 2, 3, 4, 5, 6, 7], deadlineNs: (ulong)(MonotonicClock.NowNs - 1)));
        Assert.Equal((0, 2), (r.Stored, r.Failed));
        Assert.Equal(0, _f.Cache.GetStats().Chunks);
    }

    [Fact]
    public void PrepareCopy_NoOrDistantDeadline_CappedByDefaultCopyTimeout()
    {
        RequestHandler w = _f.Worker();
        long before = MonotonicClock.NowNs;
        CopyJob none = w.PrepareCopy(Opcode.Load, Body(Load(Tokens(ChunkTokens, 1), 1, [0, 1, 2, 3])), CancellationToken.None);
        CopyJob far = w.PrepareCopy(Opcode.Store, Body(Store(Tokens(ChunkTokens, 1), 1, [0, 1, 2, 3], deadlineNs: ulong.MaxValue)), CancellationToken.None);
        long cap = MonotonicClock.NowNs + (long)_f.Options.DefaultCopyTimeout.TotalNanoseconds;
        Assert.InRange(none.Deadline.DeadlineNs, before, cap);
        Assert.InRange(far.Deadline.DeadlineNs, before, cap);
    }

    [Fact]
    public void Load_ConnectionCancelled_WritesNothing()
    {
        (RequestHandler w, uint[] tokens) = StoredThenZeroed(9);
        using var closed = new CancellationTokenSource();
        closed.Cancel();
        var loaded = (LoadReply)w.RunCopy(w.PrepareCopy(Opcode.Load, Body(Load(tokens, 1, [4, 5, 6, 7])), closed.Token));
        Assert.Equal(0, loaded.LoadedChunks);
        Assert.True(PoolIsZero(), "a cancelled load wrote into engine memory");
    }

    [Fact]
    public void Stats_CountRefusalsByCode()
    {
        RequestHandler stranger = _f.Hello(Stranger(), "x");
        Record.Exception(() => stranger.Handle(Opcode.Clear, default));
        var stats = (StatsReply)stranger.Handle(Opcode.Stats, default);
        Assert.Equal(0UL, stats.PermissionDenied); // the handler maps; the connection counts what it answers
        _f.Counters.ProtocolError(ErrorCode.PermissionDenied);
        _f.Counters.ProtocolError(ErrorCode.LimitExceeded);
        stats = (StatsReply)stranger.Handle(Opcode.Stats, default);
        Assert.Equal((1UL, 1UL), (stats.PermissionDenied, stats.LimitsExceeded));
    }
}
