using System.Buffers;
using Connector.Core.Memory;

namespace Connector.Core.Caching;

/// <summary>
/// Copies the chunks of one request between engine memory and their slabs, on up to
/// <see cref="MaxThreads"/> threads when the request is large enough to gain from it.
/// </summary>
internal static class ParallelCopier
{
    /// <summary>Requests below 8 MiB copy on the calling thread: a thread hop costs more than it saves.</summary>
    private const long ParallelThresholdBytes = 8L << 20;

    /// <summary>Copy threads per request: memory bandwidth saturates at a few cores.</summary>
    public static int MaxThreads { get; } = Math.Clamp(Environment.ProcessorCount, 1, 4);

    /// <summary>Runs <paramref name="count"/> chunk copies; the first failure is thrown after every thread stopped.</summary>
    /// <param name="transfer">The request's plan.</param>
    /// <param name="indices">Which chunks of the plan to copy.</param>
    /// <param name="slabs">The slab of each of those chunks.</param>
    /// <param name="count">How many entries of <paramref name="indices"/> and <paramref name="slabs"/> to copy.</param>
    /// <param name="memory">The engine memory.</param>
    /// <param name="toEngine">True for a load (host to engine), false for a store.</param>
    /// <param name="chunkBytes">Bytes per chunk.</param>
    /// <param name="maxOpsPerChunk">The most copy ops one chunk needs.</param>
    public static void Run(ChunkTransfer transfer, int[] indices, nint[] slabs, int count, IEngineMemory memory, bool toEngine, long chunkBytes, int maxOpsPerChunk)
    {
        int threads = count * chunkBytes >= ParallelThresholdBytes ? Math.Min(MaxThreads, count) : 1;
        if (threads <= 1)
        {
            CopyRange(transfer, indices, slabs, 0, count, 1, memory, toEngine, maxOpsPerChunk);
            return;
        }

        Exception? failure = null;
        using var done = new CountdownEvent(threads - 1);
        for (int t = 1; t < threads; t++)
        {
            int start = t;
            ThreadPool.UnsafeQueueUserWorkItem(_ =>
            {
                try
                {
                    CopyRange(transfer, indices, slabs, start, count, threads, memory, toEngine, maxOpsPerChunk);
                }
                catch (Exception ex)
                {
                    Interlocked.CompareExchange(ref failure, ex, null);
                }
                finally
                {
                    done.Signal();
                }
            }, null);
        }

        try
        {
            CopyRange(transfer, indices, slabs, 0, count, threads, memory, toEngine, maxOpsPerChunk);
        }
        catch (Exception ex)
        {
            Interlocked.CompareExchange(ref failure, ex, null);
        }

        done.Wait();
        if (failure is not null)
        {
            System.Runtime.ExceptionServices.ExceptionDispatchInfo.Throw(failure);
        }
    }

    private static void CopyRange(ChunkTransfer transfer, int[] indices, nint[] slabs, int start, int count, int step, IEngineMemory memory, bool toEngine, int maxOpsPerChunk)
    {
        CopyOp[] ops = ArrayPool<CopyOp>.Shared.Rent(maxOpsPerChunk);
        try
        {
            for (int k = start; k < count; k += step)
            {
                int n = transfer.BuildOps(indices[k], slabs[k], ops);
                if (toEngine)
                {
                    memory.Write(ops.AsSpan(0, n));
                }
                else
                {
                    memory.Read(ops.AsSpan(0, n));
                }
            }
        }
        finally
        {
            ArrayPool<CopyOp>.Shared.Return(ops);
        }
    }
}
