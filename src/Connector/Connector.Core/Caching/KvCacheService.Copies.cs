using System.Buffers;
using System.Runtime.ExceptionServices;
using Connector.Core.Memory;
using Connector.Core.Storage;

namespace Connector.Core.Caching;

/// <summary>STORE and LOAD: chunk copies between engine memory and the host tier.</summary>
/// <remarks>
/// A copy is submitted to the engine memory and completes later. Host memory copies inside the submission
/// (spread over <see cref="CopyThreads"/> when large), so the result is ready at once; GPU memory completes
/// when its stream gets there, and the result follows without a thread waiting for it. Slabs stay reserved or
/// pinned until every submitted copy has completed, whatever happens.
/// </remarks>
public sealed partial class KvCacheService
{
    /// <summary>Copies chunks out of the engine's blocks into the host tier and waits for them; see <see cref="StoreAsync"/>.</summary>
    public StoreResult Store(EngineRegistration registration, string requestId, string? cacheSalt, ChunkSource source, int firstChunk, int numChunks, ReadOnlySpan<int> blockIds, in CopyDeadline deadline, ReadOnlySpan<byte> chain = default) =>
        Wait(StoreAsync(registration, requestId, cacheSalt, source, firstChunk, numChunks, blockIds, deadline, chain));

    /// <summary>Copies chunks from the host tier into the engine's blocks and waits for them; see <see cref="LoadAsync"/>.</summary>
    public int Load(EngineRegistration registration, string requestId, string? cacheSalt, ChunkSource source, int firstChunk, int numChunks, ReadOnlySpan<int> blockIds, in CopyDeadline deadline) =>
        Wait(LoadAsync(registration, requestId, cacheSalt, source, firstChunk, numChunks, blockIds, deadline));

    /// <summary>Copies chunks out of the engine's blocks into the host tier; chunks already present are skipped.</summary>
    /// <param name="registration">The calling worker's registration.</param>
    /// <param name="requestId">The engine's request id (bounded like every id).</param>
    /// <param name="cacheSalt">The tenant salt.</param>
    /// <param name="source">Token ids naming the chunks.</param>
    /// <param name="firstChunk">Index of the first chunk to store.</param>
    /// <param name="numChunks">How many chunks to store.</param>
    /// <param name="blockIds">numChunks times blocks-per-chunk engine block ids, chunk by chunk.</param>
    /// <param name="deadline">When the engine stops waiting and may overwrite the blocks: copies stop there, and
    /// nothing copied is committed after it.</param>
    /// <param name="chain">A sealed chain state from an earlier store of the request (<see cref="StoreResult.Chain"/>);
    /// with it, <paramref name="source"/> holds tokens from the chunk after the one it names. Empty: from the first token.</param>
    /// <returns>Completes once the copies ran and the chunks are committed (or given up).</returns>
    /// <exception cref="CacheException">The request is refused, or a copy failed.</exception>
    public ValueTask<StoreResult> StoreAsync(EngineRegistration registration, string requestId, string? cacheSalt, ChunkSource source, int firstChunk, int numChunks, ReadOnlySpan<int> blockIds, in CopyDeadline deadline, ReadOnlySpan<byte> chain = default)
    {
        ArgumentNullException.ThrowIfNull(registration);
        CheckRequest(requestId, cacheSalt, source.Tokens.Length);
        Acquire(registration);
        var copy = new PendingCopy(this, registration, requestId, isLoad: false);
        try
        {
            copy.Transfer = ChunkTransfer.Begin(registration, cacheSalt, source, firstChunk, numChunks, blockIds, allowSkippedBlocks: false, chain);
            copy.Transfer.ValidateBlockIds();
            copy.Rent(numChunks);
            long chunkBytes = registration.Geometry.ChunkBytes;

            // Reserve in prefix order; later chunks are useless without an earlier one (the prefix invariant).
            for (int i = 0; i < numChunks; i++)
            {
                StoreBegin begin = _tier.TryBeginStore(copy.Transfer.Key(i), copy.Transfer.Parent(i), chunkBytes, copy.Transfer.NamespaceTag, out SlabRef slab);
                if (begin is StoreBegin.AlreadyPresent or StoreBegin.InProgress)
                {
                    copy.Present++;
                    continue;
                }

                if (begin == StoreBegin.NoSpace)
                {
                    copy.Failed = numChunks - i;
                    break;
                }

                copy.Add(i, slab);
            }

            ValueTask<StoreResult> result = Run(copy, deadline, FinishStore);
            copy = null;
            return result;
        }
        catch (EngineMemoryException ex)
        {
            Interlocked.Increment(ref _copyErrors);
            throw Translate(ex);
        }
        finally
        {
            copy?.Dispose();
        }
    }

    /// <summary>Copies chunks from the host tier into the engine's blocks, stopping at the first chunk not present.</summary>
    /// <param name="registration">The calling worker's registration.</param>
    /// <param name="requestId">The engine's request id: this rank's share of its lease is released afterwards.</param>
    /// <param name="cacheSalt">The tenant salt.</param>
    /// <param name="source">Token ids naming the chunks.</param>
    /// <param name="firstChunk">Index of the first chunk to load.</param>
    /// <param name="numChunks">How many chunks to load.</param>
    /// <param name="blockIds">numChunks times blocks-per-chunk engine block ids; -1 skips a block.</param>
    /// <param name="deadline">When the engine stops waiting and reuses the blocks: no chunk copy starts unless it can end before it.</param>
    /// <returns>The number of leading chunks loaded completely, once their copies ran: the engine may use them then.</returns>
    /// <exception cref="CacheException">The request is refused, or a copy failed.</exception>
    public ValueTask<int> LoadAsync(EngineRegistration registration, string requestId, string? cacheSalt, ChunkSource source, int firstChunk, int numChunks, ReadOnlySpan<int> blockIds, in CopyDeadline deadline)
    {
        ArgumentNullException.ThrowIfNull(registration);
        CheckRequest(requestId, cacheSalt, source.Tokens.Length);
        Acquire(registration);
        var copy = new PendingCopy(this, registration, requestId, isLoad: true);
        try
        {
            copy.Transfer = ChunkTransfer.Begin(registration, cacheSalt, source, firstChunk, numChunks, blockIds, allowSkippedBlocks: true);
            copy.Transfer.ValidateBlockIds();
            copy.Rent(numChunks);
            long chunkBytes = registration.Geometry.ChunkBytes;
            while (copy.Count < numChunks && _tier.TryPinForRead(copy.Transfer.Key(copy.Count), chunkBytes, copy.Transfer.NamespaceTag, out SlabRef slab))
            {
                copy.Add(copy.Count, slab);
            }

            ValueTask<int> result = Run(copy, deadline, FinishLoad);
            copy = null;
            return result;
        }
        catch (EngineMemoryException ex)
        {
            Interlocked.Increment(ref _copyErrors);
            throw Translate(ex);
        }
        finally
        {
            copy?.Dispose();
        }
    }

    private static T Wait<T>(ValueTask<T> pending) => pending.IsCompleted ? pending.Result : pending.AsTask().GetAwaiter().GetResult();

    /// <summary>Runs the copies of a prepared request; takes ownership of <paramref name="copy"/>.</summary>
    private ValueTask<T> Run<T>(PendingCopy copy, CopyDeadline deadline, Func<PendingCopy, int, CopyDeadline, T> finish)
    {
        IEngineMemory memory = copy.Registration.Memory;
        long chunkBytes = copy.Registration.Geometry.ChunkBytes;
        int maxOps = copy.Registration.Geometry.MaxCopyOpsPerChunk;
        ChunkTransfer transfer = copy.Transfer!;
        bool owned = true;
        try
        {
            if (memory.CopiesOnSubmit)
            {
                int copied = ParallelCopier.Run(transfer, copy.Indices, copy.Addresses, copy.Count, memory, copy.IsLoad, chunkBytes, maxOps, deadline, _helpers);
                return new ValueTask<T>(finish(copy, copied, deadline));
            }

            int submitted = ParallelCopier.SubmitInOrder(transfer, copy.Indices, copy.Addresses, copy.Count, memory, copy.IsLoad, chunkBytes, maxOps, deadline, out Exception? failure);
            // A failed submission may have queued part of its chunk's copies: wait for those too before the slabs go.
            ValueTask done = submitted > 0 || failure is not null ? memory.Completion(copy.IsLoad ? CopyDirection.HostToEngine : CopyDirection.EngineToHost) : ValueTask.CompletedTask;
            owned = false;
            return Complete(copy, submitted, failure, done, deadline, finish);
        }
        finally
        {
            if (owned)
            {
                copy.Dispose();
            }
        }
    }

    private async ValueTask<T> Complete<T>(PendingCopy copy, int submitted, Exception? failure, ValueTask done, CopyDeadline deadline, Func<PendingCopy, int, CopyDeadline, T> finish)
    {
        try
        {
            try
            {
                await done.ConfigureAwait(false);
            }
            catch (Exception ex)
            {
                failure ??= ex;
            }

            if (failure is EngineMemoryException memoryFailure)
            {
                Interlocked.Increment(ref _copyErrors);
                throw Translate(memoryFailure);
            }

            if (failure is not null)
            {
                ExceptionDispatchInfo.Throw(failure);
            }

            return finish(copy, submitted, deadline);
        }
        finally
        {
            copy.Dispose();
        }
    }

    private StoreResult FinishStore(PendingCopy copy, int copied, CopyDeadline deadline)
    {
        ChunkTransfer transfer = copy.Transfer!;
        if (copied < copy.Count || deadline.IsOver)
        {
            // Too late: the engine may have reused the blocks while we copied. Disposing the copy aborts the slabs.
            Interlocked.Increment(ref _lateStores);
            return new StoreResult(0, copy.Present, copy.Failed + copy.Count, transfer.SealLast());
        }

        // While the slabs are still ours alone (reserved, not visible, not evictable): the tiers copy their bytes.
        OfferStored(copy);
        for (; copy.Committed < copy.Count; copy.Committed++)
        {
            _tier.CommitStore(copy.Slabs[copy.Committed]);
        }

        long chunkBytes = copy.Registration.Geometry.ChunkBytes;
        Interlocked.Add(ref _storedChunks, copy.Count);
        Interlocked.Add(ref _storedBytes, copy.Count * chunkBytes);
        return new StoreResult(copy.Count, copy.Present, copy.Failed, transfer.SealLast());
    }

    private int FinishLoad(PendingCopy copy, int loaded, CopyDeadline deadline)
    {
        if (loaded < copy.Count)
        {
            Interlocked.Increment(ref _lateLoads);
        }

        Interlocked.Add(ref _loadedChunks, loaded);
        Interlocked.Add(ref _loadedBytes, loaded * copy.Registration.Geometry.ChunkBytes);
        return loaded;
    }

    /// <summary>
    /// One request's copy state: its plan, the slabs it reserved (store) or pinned (load), and a reference on the
    /// registration. Disposing it lets go of everything not committed, exactly once.
    /// </summary>
    private sealed class PendingCopy(KvCacheService service, EngineRegistration registration, string requestId, bool isLoad) : IDisposable
    {
        private int _disposed;

        public EngineRegistration Registration => registration;

        public bool IsLoad => isLoad;

        public ChunkTransfer? Transfer { get; set; }

        public int[] Indices { get; private set; } = [];

        public nint[] Addresses { get; private set; } = [];

        public SlabRef[] Slabs { get; private set; } = [];

        public int Count { get; private set; }

        public int Committed { get; set; }

        public int Present { get; set; }

        public int Failed { get; set; }

        public void Rent(int chunks)
        {
            Indices = ArrayPool<int>.Shared.Rent(Math.Max(chunks, 1));
            Addresses = ArrayPool<nint>.Shared.Rent(Math.Max(chunks, 1));
            Slabs = ArrayPool<SlabRef>.Shared.Rent(Math.Max(chunks, 1));
        }

        public void Add(int chunk, SlabRef slab)
        {
            Indices[Count] = chunk;
            Addresses[Count] = slab.Address;
            Slabs[Count++] = slab;
        }

        public void Dispose()
        {
            if (Interlocked.Exchange(ref _disposed, 1) != 0)
            {
                return;
            }

            try
            {
                // Nothing half-copied ever becomes visible; loaded slabs become evictable again.
                for (int k = Committed; k < Count; k++)
                {
                    if (isLoad)
                    {
                        service._tier.Unpin(Slabs[k]);
                    }
                    else
                    {
                        service._tier.AbortStore(Slabs[k]);
                    }
                }

                if (Indices.Length > 0)
                {
                    ArrayPool<int>.Shared.Return(Indices);
                    ArrayPool<nint>.Shared.Return(Addresses);
                    ArrayPool<SlabRef>.Shared.Return(Slabs);
                }

                Transfer?.Dispose();
            }
            finally
            {
                registration.ReleaseRef();
                if (isLoad)
                {
                    service._leases.ReleaseRank(registration.InstanceId, requestId, registration.BaseNamespace);
                }
            }
        }
    }
}
