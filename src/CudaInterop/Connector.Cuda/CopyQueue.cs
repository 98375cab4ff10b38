using System.Collections.Concurrent;
using Connector.CudaInterop.Driver;

namespace Connector.Cuda;

/// <summary>
/// One stream of copies and their completions. Requests enqueue copies under a lock, so the stream holds them in
/// the order completions are asked for; a dedicated thread waits for each completion's event in turn and completes
/// its task, so no request thread ever waits on the GPU.
/// </summary>
internal sealed class CopyQueue : IDisposable
{
    private readonly CudaContext _context;
    private readonly Lock _enqueue = new();
    private readonly BlockingCollection<(CudaEvent Event, TaskCompletionSource Done)> _pending = new();
    private readonly ConcurrentBag<CudaEvent> _events = [];
    private readonly Thread _completer;
    private long _completions;

    public CopyQueue(CudaContext context, string name)
    {
        _context = context;
        Stream = CudaStream.Create(context);
        _completer = new Thread(Complete, 256 * 1024) { IsBackground = true, Name = name };
        _completer.Start();
    }

    public CudaStream Stream { get; }

    /// <summary>The lock to hold while enqueueing copies that belong together.</summary>
    public Lock EnqueueLock => _enqueue;

    /// <summary>Completions signalled so far.</summary>
    public long Completions => Interlocked.Read(ref _completions);

    /// <summary>A task that completes when everything enqueued on the stream before this call has run.</summary>
    public Task Completion()
    {
        var done = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        lock (_enqueue)
        {
            CudaEvent? ev = null;
            try
            {
                ev = _events.TryTake(out CudaEvent? pooled) ? pooled : CudaEvent.Create(_context);
                ev.Record(Stream);
                _pending.Add((ev, done));
            }
            catch
            {
                ev?.Dispose();
                // Without an event (or with the queue shut down) nothing says when the queued copies end: wait for them
                // here, so the caller may let go of their host memory when this throws.
                try
                {
                    Stream.Synchronize();
                }
                catch (Exception ex) when (ex is CudaException or ObjectDisposedException)
                {
                    // The stream failed or is gone; its copies have stopped.
                }

                throw;
            }
        }

        return done.Task;
    }

    public void Dispose()
    {
        _pending.CompleteAdding();
        _completer.Join(TimeSpan.FromSeconds(30));
        while (_events.TryTake(out CudaEvent? ev))
        {
            ev.Dispose();
        }

        Stream.Dispose();
    }

    private void Complete()
    {
        foreach ((CudaEvent ev, TaskCompletionSource done) in _pending.GetConsumingEnumerable())
        {
            try
            {
                ev.Synchronize();
                _events.Add(ev);
                Interlocked.Increment(ref _completions);
                done.SetResult();
            }
            catch (Exception ex)
            {
                // A failed copy: the event is not reused (its stream may be in an error state).
                ev.Dispose();
                done.SetException(ex);
            }
        }
    }
}
