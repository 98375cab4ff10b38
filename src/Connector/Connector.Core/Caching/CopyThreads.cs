using System.Collections.Concurrent;

namespace Connector.Core.Caching;

/// <summary>
/// Dedicated threads for copies: a copy blocks its thread for milliseconds in process_vm_* or a driver
/// call, so copies never run on (and can never starve) the .NET thread pool that the rest of the process
/// relies on.
/// </summary>
/// <remarks>Thread-safe. Work items run in FIFO order; an item that throws is its own caller's problem.</remarks>
public sealed class CopyThreads : IDisposable
{
    private readonly BlockingCollection<Action> _queue = new(new ConcurrentQueue<Action>());
    private readonly Thread[] _threads;

    /// <summary>Starts <paramref name="count"/> background threads named <paramref name="name"/>-N.</summary>
    public CopyThreads(int count, string name)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(count);
        _threads = new Thread[count];
        for (int i = 0; i < count; i++)
        {
            _threads[i] = new Thread(Run, 256 * 1024) { IsBackground = true, Name = $"{name}-{i}" };
            _threads[i].Start();
        }
    }

    /// <summary>Queues a work item.</summary>
    /// <returns>False when the pool is stopping.</returns>
    public bool Post(Action work)
    {
        try
        {
            _queue.Add(work);
            return true;
        }
        catch (InvalidOperationException)
        {
            return false;
        }
    }

    /// <summary>Stops taking work; queued items still run.</summary>
    public void Dispose() => _queue.CompleteAdding();

    private void Run()
    {
        foreach (Action work in _queue.GetConsumingEnumerable())
        {
            work();
        }
    }
}
