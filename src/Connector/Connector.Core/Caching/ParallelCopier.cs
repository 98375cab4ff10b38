using System.Buffers;
using System.Diagnostics;
using Connector.Core.Memory;

namespace Connector.Core.Caching;

/// <summary>
/// Copies the chunks of one request between engine memory and their slabs, on up to
/// <see cref="MaxThreads"/> threads when the request is large enough to gain from it, and stops at the
/// request's deadline: a chunk copy starts only while there is time left to finish it.
/// </summary>
internal static class ParallelCopier
{
    /// <summary>Requests below 8 MiB copy on the calling thread: a thread hop costs more than it saves.</summary>
    private const long ParallelThresholdBytes = 8L << 20;

    /// <summary>Copy threads per request: memory bandwidth saturates at a few cores.</summary>
    public static int MaxThreads { get; } = Math.Clamp(Environment.ProcessorCount, 1, 4);

    /// <summary>Runs up to <paramref name="count"/> chunk copies and reports which finished.</summary>
    /// <param name="transfer">The request's plan.</param>
    /// <param name="indices">Which chunks of the plan to copy.</param>
    /// <param name="slabs">The slab of each of those chunks.</param>
    /// <param name="count">How many entries of <paramref name="indices"/> and <paramref name="slabs"/> to copy.</param>
    /// <param name="memory">The engine memory.</param>
    /// <param name="toEngine">True for a load (host to engine), false for a store.</param>
    /// <param name="chunkBytes">Bytes per chunk.</param>
    /// <param name="maxOpsPerChunk">The most copy ops one chunk needs.</param>
    /// <param name="deadline">When to stop starting chunk copies.</param>
    /// <param name="helpers">Threads that may help with a large request; null copies on the caller's thread only.</param>
    /// <returns>How many leading entries were copied completely; fewer than <paramref name="count"/> when the deadline stopped the copy.</returns>
    /// <exception cref="EngineMemoryException">A copy failed; thrown after every helper stopped.</exception>
    public static int Run(ChunkTransfer transfer, int[] indices, nint[] slabs, int count, IEngineMemory memory, bool toEngine, long chunkBytes, int maxOpsPerChunk, in CopyDeadline deadline, CopyThreads? helpers)
    {
        if (count == 0)
        {
            return 0;
        }

        var run = new SharedCopy(transfer, indices, slabs, count, memory, toEngine, chunkBytes, maxOpsPerChunk, deadline);
        int threads = helpers is not null && count * chunkBytes >= ParallelThresholdBytes ? Math.Min(MaxThreads, count) : 1;
        for (int t = 1; t < threads; t++)
        {
            helpers!.Post(run.Help);
        }

        run.Participate();
        run.WaitForHelpers();
        return run.Finish();
    }

    /// <summary>
    /// Submits the chunk copies of a request to engine memory that completes them later (a GPU stream), in
    /// chunk order, while the deadline allows each to finish: a chunk is submitted only if the bytes queued before
    /// it and its own can be copied before the deadline at a conservative <see cref="QueuedBytesPerNs"/>.
    /// </summary>
    /// <returns>How many leading entries were submitted; the caller awaits <see cref="IEngineMemory.Completion"/>.</returns>
    /// <exception cref="EngineMemoryException">A submission failed; the entries before it were submitted.</exception>
    public static int SubmitInOrder(ChunkTransfer transfer, int[] indices, nint[] slabs, int count, IEngineMemory memory, bool toEngine, long chunkBytes, int maxOpsPerChunk, in CopyDeadline deadline, out Exception? failure)
    {
        CopyOp[] ops = ArrayPool<CopyOp>.Shared.Rent(maxOpsPerChunk);
        CopyDirection direction = toEngine ? CopyDirection.HostToEngine : CopyDirection.EngineToHost;
        int submitted = 0;
        failure = null;
        try
        {
            for (; submitted < count; submitted++)
            {
                if (!deadline.AllowsStart((submitted + 1) * chunkBytes / QueuedBytesPerNs))
                {
                    break;
                }

                int n = transfer.BuildOps(indices[submitted], slabs[submitted], ops);
                memory.Submit(direction, ops.AsSpan(0, n));
            }
        }
        catch (Exception ex)
        {
            // Reported, not thrown: what was submitted before must still complete before its slabs are let go.
            failure = ex;
        }
        finally
        {
            ArrayPool<CopyOp>.Shared.Return(ops);
        }

        return submitted;
    }

    /// <summary>Bytes per nanosecond assumed for queued device copies when checking a deadline (4 GB/s, well below PCIe).</summary>
    private const long QueuedBytesPerNs = 4;

    /// <summary>One request's copy, shared by the caller and the helpers that join it.</summary>
    /// <remarks>
    /// Participants take chunk indices from a shared counter. The caller never waits for a helper that has
    /// not started: once the caller stops, the counter is pushed past the end, so a late helper finds no
    /// work and never touches the (by then returned) transfer.
    /// </remarks>
    private sealed class SharedCopy(ChunkTransfer transfer, int[] indices, nint[] slabs, int count, IEngineMemory memory, bool toEngine, long chunkBytes, int maxOps, CopyDeadline deadline)
    {
        private readonly byte[] _done = RentCleared(count);
        private readonly object _idle = new();
        private int _next;
        private int _active;
        private long _slowestChunkNs;
        private Exception? _failure;

        public void Help()
        {
            Interlocked.Increment(ref _active);
            try
            {
                Participate();
            }
            finally
            {
                if (Interlocked.Decrement(ref _active) == 0)
                {
                    lock (_idle)
                    {
                        Monitor.PulseAll(_idle);
                    }
                }
            }
        }

        public void Participate()
        {
            CopyOp[] ops = ArrayPool<CopyOp>.Shared.Rent(maxOps);
            try
            {
                int k;
                while ((k = Interlocked.Increment(ref _next) - 1) < count)
                {
                    // Start a chunk only if it can end before the deadline: twice the slowest chunk so far,
                    // and before the first one an estimate of 1 byte per nanosecond (1 GB/s).
                    if (!deadline.AllowsStart(Math.Max(2 * Volatile.Read(ref _slowestChunkNs), chunkBytes)))
                    {
                        Stop();
                        return;
                    }

                    long started = Stopwatch.GetTimestamp();
                    int n = transfer.BuildOps(indices[k], slabs[k], ops);
                    memory.Submit(toEngine ? CopyDirection.HostToEngine : CopyDirection.EngineToHost, ops.AsSpan(0, n));

                    long ns = (long)Stopwatch.GetElapsedTime(started).TotalNanoseconds;
                    long seen;
                    while (ns > (seen = Volatile.Read(ref _slowestChunkNs)) && Interlocked.CompareExchange(ref _slowestChunkNs, ns, seen) != seen)
                    {
                    }

                    Volatile.Write(ref _done[k], 1);
                }
            }
            catch (Exception ex)
            {
                Interlocked.CompareExchange(ref _failure, ex, null);
                Stop();
            }
            finally
            {
                ArrayPool<CopyOp>.Shared.Return(ops);
            }
        }

        public void WaitForHelpers()
        {
            Stop();
            lock (_idle)
            {
                while (Volatile.Read(ref _active) > 0)
                {
                    Monitor.Wait(_idle, 1);
                }
            }
        }

        public int Finish()
        {
            try
            {
                if (_failure is not null)
                {
                    System.Runtime.ExceptionServices.ExceptionDispatchInfo.Throw(_failure);
                }

                int leading = 0;
                while (leading < count && _done[leading] == 1)
                {
                    leading++;
                }

                return leading;
            }
            finally
            {
                ArrayPool<byte>.Shared.Return(_done, clearArray: true);
            }
        }

        private void Stop() => Interlocked.Exchange(ref _next, int.MaxValue / 2);

        private static byte[] RentCleared(int count)
        {
            byte[] done = ArrayPool<byte>.Shared.Rent(count);
            Array.Clear(done, 0, count);
            return done;
        }
    }
}
