using Connector.Core.Keys;

namespace Connector.Core.Storage.Tiers;

/// <summary>When a tier receives chunks.</summary>
public enum TierWritePolicy
{
    /// <summary>At every store, right after L1 has the bytes (a shared pool: other machines see chunks at once).</summary>
    WriteThrough,

    /// <summary>When L1 evicts the chunk (write-behind): only chunks that outlive their stay in L1 reach the tier.</summary>
    WriteBack,
}

/// <summary>A tier and when it receives chunks.</summary>
/// <param name="Tier">The tier.</param>
/// <param name="Policy">When it receives chunks.</param>
public sealed record TierSlot(IChunkTier Tier, TierWritePolicy Policy);

/// <summary>
/// The tiers below L1, hot to cold, and the traffic between them and L1: write-through offers at store, demotions
/// at L1 eviction (the <see cref="IEvictionSink"/> of the host tier), and counters of promotions. Thread-safe.
/// </summary>
public sealed class TierChain : IEvictionSink, IDisposable
{
    private readonly TierSlot[] _slots;
    private readonly long[] _offered;
    private readonly long[] _demoted;
    private readonly long[] _promoted;
    private readonly long[] _promotionFailures;
    private readonly long[] _offerFailures;

    /// <summary>Creates the chain over <paramref name="slots"/>, hot to cold.</summary>
    public TierChain(IReadOnlyList<TierSlot> slots)
    {
        ArgumentNullException.ThrowIfNull(slots);
        _slots = [.. slots];
        _offered = new long[_slots.Length];
        _demoted = new long[_slots.Length];
        _promoted = new long[_slots.Length];
        _promotionFailures = new long[_slots.Length];
        _offerFailures = new long[_slots.Length];
    }

    /// <summary>The tiers, hot to cold.</summary>
    public IReadOnlyList<TierSlot> Slots => _slots;

    /// <summary>Offers a chunk just stored in L1 to every write-through tier. <paramref name="data"/> is the reserved, not yet visible slab.</summary>
    public void OnStored(in TierKey key, ReadOnlySpan<byte> data)
    {
        for (int i = 0; i < _slots.Length; i++)
        {
            if (_slots[i].Policy == TierWritePolicy.WriteThrough && TryOffer(i, key, data) == TierWriteStatus.Accepted)
            {
                Interlocked.Increment(ref _offered[i]);
            }
        }
    }

    /// <inheritdoc/>
    public void OnEvict(in ChunkKey key, in ChunkKey parent, ulong namespaceTag, ReadOnlySpan<byte> data)
    {
        var tierKey = new TierKey(key, parent, namespaceTag, data.Length);
        for (int i = 0; i < _slots.Length; i++)
        {
            // A write-through tier with a local index (disk) was offered the chunk at store; one that did not admit it
            // then (first sight) sees it again here, the second sighting frequency admission waits for. A remote
            // write-through tier had it at store and cannot tell cheaply whether it kept it: it is not sent again.
            if (_slots[i].Policy == TierWritePolicy.WriteThrough && !_slots[i].Tier.HasLocalIndex)
            {
                continue;
            }

            if (TryOffer(i, tierKey, data) == TierWriteStatus.Accepted)
            {
                Interlocked.Increment(ref _demoted[i]);
            }
        }
    }

    /// <summary>Offers a chunk to one tier; a tier that throws (it should not) loses the chunk, never the caller's store or eviction.</summary>
    private TierWriteStatus TryOffer(int index, in TierKey key, ReadOnlySpan<byte> data)
    {
        try
        {
            return _slots[index].Tier.Offer(key, data);
        }
        catch (Exception ex) when (ex is not StackOverflowException)
        {
            Interlocked.Increment(ref _offerFailures[index]);
            return TierWriteStatus.Unavailable;
        }
    }

    /// <summary>Counts a chunk promoted from tier <paramref name="index"/> into L1.</summary>
    internal void CountPromotion(int index, bool ok) => Interlocked.Increment(ref ok ? ref _promoted[index] : ref _promotionFailures[index]);

    /// <summary>The counters of every tier, hot to cold.</summary>
    public IReadOnlyList<TierChainStats> GetStats()
    {
        var stats = new TierChainStats[_slots.Length];
        for (int i = 0; i < _slots.Length; i++)
        {
            TierStats tier = _slots[i].Tier.GetStats();
            tier = tier with { Errors = tier.Errors + Interlocked.Read(ref _offerFailures[i]) };
            stats[i] = new TierChainStats(tier, _slots[i].Policy, Interlocked.Read(ref _offered[i]), Interlocked.Read(ref _demoted[i]),
                Interlocked.Read(ref _promoted[i]), Interlocked.Read(ref _promotionFailures[i]));
        }

        return stats;
    }

    /// <summary>Disposes every tier.</summary>
    public void Dispose()
    {
        foreach (TierSlot slot in _slots)
        {
            slot.Tier.Dispose();
        }
    }
}

/// <summary>One tier's counters with the chain's.</summary>
/// <param name="Tier">The tier's own counters.</param>
/// <param name="Policy">When it receives chunks.</param>
/// <param name="WriteThroughOffers">Chunks it accepted at store.</param>
/// <param name="Demotions">Chunks it accepted at L1 eviction.</param>
/// <param name="Promotions">Chunks promoted from it into L1.</param>
/// <param name="PromotionFailures">Promotions that failed (missing, corrupt, error, no room in L1).</param>
public readonly record struct TierChainStats(TierStats Tier, TierWritePolicy Policy, long WriteThroughOffers, long Demotions, long Promotions, long PromotionFailures);

/// <summary>Receives chunks the host tier evicts, before their slab is reused.</summary>
public interface IEvictionSink
{
    /// <summary>Called under the host tier's lock with the evicted chunk's bytes: copy what is kept, quickly; never throw.</summary>
    void OnEvict(in ChunkKey key, in ChunkKey parent, ulong namespaceTag, ReadOnlySpan<byte> data);
}
