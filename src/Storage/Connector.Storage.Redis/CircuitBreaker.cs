namespace Connector.Storage.Redis;

/// <summary>The state of a <see cref="CircuitBreaker"/>.</summary>
internal enum BreakerState
{
    /// <summary>Operations run.</summary>
    Closed,

    /// <summary>Operations fail fast until the open period ends.</summary>
    Open,

    /// <summary>One trial operation runs; its outcome closes or reopens the circuit.</summary>
    HalfOpen,
}

/// <summary>What changed when an outcome was recorded, so the caller logs it once.</summary>
internal enum BreakerTransition
{
    /// <summary>Nothing changed.</summary>
    None,

    /// <summary>The circuit opened after consecutive failures.</summary>
    Opened,

    /// <summary>The trial after an open period failed: open again.</summary>
    Reopened,

    /// <summary>The circuit closed after a successful trial.</summary>
    Closed,
}

/// <summary>
/// Counts consecutive failures; at the threshold the circuit opens and operations fail fast for the open duration,
/// then one trial is let through (half-open): success closes the circuit, failure reopens it.
/// </summary>
/// <remarks>Thread-safe. A trial that never reports (its caller gave up) is replaced by another after one open duration.</remarks>
internal sealed class CircuitBreaker(int threshold, TimeSpan openDuration, TimeProvider time)
{
    private readonly Lock _lock = new();
    private volatile BreakerState _state;
    private int _consecutiveFailures;
    private long _reopenAt;
    private long _trialStartedAt;
    private long _opened;

    /// <summary>The current state.</summary>
    public BreakerState State
    {
        get
        {
            lock (_lock)
            {
                return _state;
            }
        }
    }

    /// <summary>How many times the circuit opened.</summary>
    public long Opened => Interlocked.Read(ref _opened);

    /// <summary>Whether operations are being refused now (open, and the open period has not ended); no lock, no trial taken.</summary>
    public bool IsRefusing => _state == BreakerState.Open && time.GetTimestamp() < Volatile.Read(ref _reopenAt);

    /// <summary>Whether an operation may run now: always when closed; when open, only as the one trial after the open period.</summary>
    public bool TryAcquire()
    {
        if (_state == BreakerState.Closed)
        {
            return true;
        }

        lock (_lock)
        {
            long now = time.GetTimestamp();
            switch (_state)
            {
                case BreakerState.Closed:
                    return true;
                case BreakerState.Open when now >= _reopenAt:
                case BreakerState.HalfOpen when time.GetElapsedTime(_trialStartedAt, now) >= openDuration:
                    _state = BreakerState.HalfOpen;
                    _trialStartedAt = now;
                    return true;
                default:
                    return false;
            }
        }
    }

    /// <summary>Records a successful operation.</summary>
    public BreakerTransition OnSuccess()
    {
        if (_state == BreakerState.Closed && Volatile.Read(ref _consecutiveFailures) == 0)
        {
            return BreakerTransition.None;
        }

        lock (_lock)
        {
            _consecutiveFailures = 0;
            if (_state == BreakerState.Closed)
            {
                return BreakerTransition.None;
            }

            _state = BreakerState.Closed;
            return BreakerTransition.Closed;
        }
    }

    /// <summary>Records a failed operation (an error or a timeout; a miss is a success).</summary>
    public BreakerTransition OnFailure()
    {
        lock (_lock)
        {
            _consecutiveFailures++;
            BreakerTransition transition = _state switch
            {
                BreakerState.HalfOpen => BreakerTransition.Reopened,
                BreakerState.Closed when _consecutiveFailures >= threshold => BreakerTransition.Opened,
                _ => BreakerTransition.None,
            };
            if (transition == BreakerTransition.None)
            {
                return transition;
            }

            _state = BreakerState.Open;
            Volatile.Write(ref _reopenAt, time.GetTimestamp() + (long)(openDuration.TotalSeconds * time.TimestampFrequency));
            _opened++;
            return transition;
        }
    }
}
