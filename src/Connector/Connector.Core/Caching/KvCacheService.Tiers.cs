using System.Collections.Concurrent;
using Connector.Core.Keys;
using Connector.Core.Platform;
using Connector.Core.Storage;
using Connector.Core.Storage.Tiers;

namespace Connector.Core.Caching;

/// <summary>Settings of promotion from the tiers below L1.</summary>
public sealed record TieringOptions
{
    /// <summary>How long a LOOKUP answers "pending" while chunks are promoted; after it the answer is what L1 holds. Default 500 ms.</summary>
    public TimeSpan PromotionTimeout { get; init; } = TimeSpan.FromMilliseconds(500);

    /// <summary>Most requests promoted at once; a lookup beyond it is answered from L1 alone. Default 256.</summary>
    public int MaxPromotions { get; init; } = 256;
}

/// <summary>
/// Promotion: a LOOKUP whose prompt continues in a lower tier answers <see cref="LookupOutcome.Pending"/> (vLLM's "not
/// yet") and starts copying those chunks into L1; the request's next LOOKUP finds them there, leases them, and its
/// LOAD copies them from memory. A promotion runs off the lookup path (async I/O, the L1 lock taken only to reserve
/// and commit each slab), is bounded by <see cref="TieringOptions.PromotionTimeout"/>, and keeps what it promoted
/// pinned until the next lookup leases it (or the promotion expires).
/// </summary>
public sealed partial class KvCacheService
{
    private readonly TierChain? _chain;
    private readonly TieringOptions _tiering;
    /// <summary>How long a finished promotion's outcome stops the same request from being promoted again (10 s).</summary>
    private const long SettledForNs = 10_000_000_000;

    private readonly ConcurrentDictionary<(string Instance, string Request), Promotion> _promotions = new();
    private readonly ConcurrentDictionary<(string Instance, string Request), (int Hit, long AtNs)> _settled = new();
    private long _promotionsStarted;
    private long _promotionsSkipped;

    /// <summary>The tiers below L1 (null: none).</summary>
    public TierChain? Tiers => _chain;

    /// <summary>Requests whose chunks are being promoted now.</summary>
    public int ActivePromotions => _promotions.Count;

    /// <summary>Promotions started, and lookups answered from L1 alone because too many promotions were running.</summary>
    public (long Started, long Skipped) PromotionCounts => (Interlocked.Read(ref _promotionsStarted), Interlocked.Read(ref _promotionsSkipped));

    /// <summary>
    /// Whether the lookup must answer "pending": a promotion of the request is running, or lower tiers hold chunks
    /// past what L1 holds and one was started now. A finished promotion is handed back (<paramref name="finished"/>)
    /// so its pins are released after the lookup leased the chunks.
    /// </summary>
    private bool WaitForPromotion(string instanceId, string requestId, string? cacheSalt, EngineRegistration[] ranks, ChunkKey[] keys, int wanted, int[] rankHits, int hit, out Promotion? finished)
    {
        finished = null;
        var id = (instanceId, requestId);
        if (_promotions.TryGetValue(id, out Promotion? running))
        {
            if (!running.IsDone && !running.IsExpired(_tiering.PromotionTimeout))
            {
                return true;
            }

            if (_promotions.TryRemove(new KeyValuePair<(string, string), Promotion>(id, running)))
            {
                running.Cancel();
                finished = running;
                // Remembered so that asking again (vLLM re-asks a request it could not schedule) does not promote
                // again, while what L1 holds of the prompt stays the same.
                if (_settled.Count < 16 * _tiering.MaxPromotions)
                {
                    _settled[id] = (hit, MonotonicClock.NowNs);
                }
            }

            return false;
        }

        if (hit >= wanted)
        {
            return false;
        }

        if (_settled.TryGetValue(id, out (int Hit, long AtNs) settled))
        {
            if (settled.Hit == hit && MonotonicClock.NowNs - settled.AtNs < SettledForNs)
            {
                return false;
            }

            _settled.TryRemove(id, out _);
        }

        // Is there anything below L1 worth waiting for? Local indexes answer now; a remote tier can only be asked.
        bool remote = false;
        int candidate = wanted;
        long chunkBytes = ranks[0].Geometry.ChunkBytes;
        var tierKeys = new TierKey[wanted];
        for (int r = 0; r < ranks.Length; r++)
        {
            ulong tag = ranks[r].RootKey(cacheSalt).Tag;
            ReadOnlySpan<ChunkKey> rankKeys = keys.AsSpan(r * wanted, wanted);
            for (int i = 0; i < wanted; i++)
            {
                tierKeys[i] = new TierKey(rankKeys[i], i == 0 ? ChunkKey.None : rankKeys[i - 1], tag, chunkBytes);
            }

            int n = rankHits[r];
            bool advanced = true;
            while (advanced && n < wanted)
            {
                advanced = false;
                foreach (TierSlot slot in _chain!.Slots)
                {
                    if (!slot.Tier.HasLocalIndex)
                    {
                        remote = true;
                        continue;
                    }

                    int more = slot.Tier.CountPresentPrefix(tierKeys.AsSpan(n));
                    if (more > 0)
                    {
                        n += more;
                        advanced = true;
                    }
                }
            }

            candidate = Math.Min(candidate, n);
        }

        if (candidate <= hit && !remote)
        {
            return false;
        }

        if (_promotions.Count >= _tiering.MaxPromotions)
        {
            Interlocked.Increment(ref _promotionsSkipped);
            return false;
        }

        var promotion = new Promotion(_tier, _tiering.PromotionTimeout);
        if (!_promotions.TryAdd(id, promotion))
        {
            return true; // another lookup of the request started one a moment ago
        }

        Interlocked.Increment(ref _promotionsStarted);
        var plan = new PromotionPlan[ranks.Length];
        for (int r = 0; r < ranks.Length; r++)
        {
            plan[r] = new PromotionPlan(keys.AsSpan(r * wanted, wanted).ToArray(), rankHits[r], ranks[r].RootKey(cacheSalt).Tag);
        }

        // Off the lookup thread from the first step: the scheduler waits for this LOOKUP's reply.
        promotion.Run(Task.Run(() => PromoteAsync(promotion, plan, chunkBytes)));
        return true;
    }

    /// <summary>Copies each rank's chunks after its L1 hit from the first tier that has them, in prefix order.</summary>
    private async Task PromoteAsync(Promotion promotion, PromotionPlan[] plan, long chunkBytes)
    {
        CancellationToken cancellation = promotion.Token;
        IReadOnlyList<TierSlot> slots = _chain!.Slots;
        foreach (PromotionPlan rank in plan)
        {
            var keys = new TierKey[rank.Keys.Length - rank.L1Hit];
            for (int i = rank.L1Hit; i < rank.Keys.Length; i++)
            {
                keys[i - rank.L1Hit] = new TierKey(rank.Keys[i], i == 0 ? ChunkKey.None : rank.Keys[i - 1], rank.Tag, chunkBytes);
            }

            // Remote tiers are asked once per rank how far they hold the prompt, so no L1 slab is reserved (possibly
            // evicting a useful chunk) for a chunk they do not have.
            int[] remote = new int[slots.Count];
            for (int t = 0; t < slots.Count; t++)
            {
                remote[t] = slots[t].Tier.HasLocalIndex ? int.MaxValue : await ProbeAsync(slots[t].Tier, keys, cancellation).ConfigureAwait(false);
            }

            for (int k = 0; k < keys.Length && !cancellation.IsCancellationRequested; k++)
            {
                if (!await PromoteChunkAsync(promotion, keys[k], k, remote, cancellation).ConfigureAwait(false))
                {
                    break; // the prefix ends here for this rank
                }
            }
        }
    }

    private static async Task<int> ProbeAsync(IChunkTier tier, TierKey[] keys, CancellationToken cancellation)
    {
        try
        {
            return await tier.ProbePrefixAsync(keys, cancellation).ConfigureAwait(false);
        }
        catch (Exception ex) when (ex is not OutOfMemoryException)
        {
            return 0;
        }
    }

    private async Task<bool> PromoteChunkAsync(Promotion promotion, TierKey key, int position, int[] remote, CancellationToken cancellation)
    {
        IReadOnlyList<TierSlot> slots = _chain!.Slots;
        for (int t = 0; t < slots.Count; t++)
        {
            IChunkTier tier = slots[t].Tier;
            if (tier.HasLocalIndex ? tier.CountPresentPrefix([key]) == 0 : position >= remote[t])
            {
                continue;
            }

            StoreBegin begin = _tier.TryBeginStore(key.Key, key.Parent, key.Length, key.NamespaceTag, out SlabRef slab);
            if (begin is StoreBegin.AlreadyPresent or StoreBegin.InProgress)
            {
                return true;
            }

            if (begin == StoreBegin.NoSpace)
            {
                return false;
            }

            TierReadStatus status;
            try
            {
                using var memory = new NativeMemoryManager(slab.Address, checked((int)slab.Length));
                status = await tier.ReadAsync(key, memory.Memory, cancellation).ConfigureAwait(false);
            }
            catch (Exception ex) when (ex is not OutOfMemoryException)
            {
                status = TierReadStatus.Error;
            }

            if (status != TierReadStatus.Hit)
            {
                _tier.AbortStore(slab);
                _chain.CountPromotion(t, ok: false);
                continue;
            }

            _tier.CommitStore(slab);
            _chain.CountPromotion(t, ok: true);
            if (_tier.TryPinForRead(key.Key, key.Length, key.NamespaceTag, out SlabRef pinned))
            {
                promotion.Keep(pinned);
            }

            return true;
        }

        return false;
    }

    /// <summary>Offers chunks just copied into L1 (reserved, not yet visible) to the write-through tiers.</summary>
    private unsafe void OfferStored(PendingCopy copy)
    {
        if (_chain is null)
        {
            return;
        }

        ChunkTransfer transfer = copy.Transfer!;
        for (int k = 0; k < copy.Count; k++)
        {
            int i = copy.Indices[k];
            SlabRef slab = copy.Slabs[k];
            _chain.OnStored(new TierKey(transfer.Key(i), transfer.Parent(i), transfer.NamespaceTag, slab.Length), new ReadOnlySpan<byte>((void*)slab.Address, checked((int)slab.Length)));
        }
    }

    /// <summary>Ends promotions nobody came back for, releasing their pins, and forgets old outcomes.</summary>
    private void SweepPromotions()
    {
        long now = MonotonicClock.NowNs;
        foreach (KeyValuePair<(string, string), (int Hit, long AtNs)> entry in _settled)
        {
            if (now - entry.Value.AtNs >= SettledForNs)
            {
                _settled.TryRemove(entry);
            }
        }

        foreach (KeyValuePair<(string, string), Promotion> entry in _promotions)
        {
            if (entry.Value.IsExpired(2 * _tiering.PromotionTimeout) && _promotions.TryRemove(entry))
            {
                entry.Value.Cancel();
                entry.Value.ReleaseWhenDone();
            }
        }
    }

    private readonly record struct PromotionPlan(ChunkKey[] Keys, int L1Hit, ulong Tag);

    /// <summary>One request's promotion: its task, its deadline and the chunks it pinned.</summary>
    private sealed class Promotion(HostMemoryTier tier, TimeSpan timeout) : IDisposable
    {
        private readonly long _startedNs = MonotonicClock.NowNs;
        private readonly CancellationTokenSource _cancel = new(timeout);
        private readonly List<SlabRef> _pins = [];
        private Task _task = new TaskCompletionSource().Task;
        private int _released;

        public CancellationToken Token => _cancel.Token;

        public bool IsDone => _task.IsCompleted;

        public bool IsExpired(TimeSpan after) => MonotonicClock.NowNs - _startedNs > after.TotalNanoseconds;

        public void Run(Task task) => _task = task;

        public void Keep(SlabRef pin)
        {
            lock (_pins)
            {
                if (_released == 0)
                {
                    _pins.Add(pin);
                    return;
                }
            }

            // Released meanwhile (expired, or the request's lookup came back first): nobody will unpin it later.
            tier.Unpin(pin);
        }

        public void Cancel()
        {
            try
            {
                _cancel.Cancel();
            }
            catch (ObjectDisposedException)
            {
            }
        }

        /// <summary>Unpins what was promoted (call after the lookup leased it).</summary>
        public void Release()
        {
            List<SlabRef> pins;
            lock (_pins)
            {
                if (_released++ != 0)
                {
                    return;
                }

                pins = [.. _pins];
                _pins.Clear();
            }

            foreach (SlabRef pin in pins)
            {
                tier.Unpin(pin);
            }

            if (IsDone)
            {
                Dispose();
            }
        }

        public void Dispose() => _cancel.Dispose();

        /// <summary>Unpins once the (cancelled) task has stopped adding pins.</summary>
        public void ReleaseWhenDone() => _task.ContinueWith(_ => Release(), TaskScheduler.Default);
    }
}
