using System.Buffers;
using System.Collections.Concurrent;
using System.Runtime.InteropServices;

namespace Connector.Storage.Disk;

/// <summary>Native memory aligned to 4096 bytes, as O_DIRECT wants it, usable as <see cref="Memory{T}"/> for async file reads.</summary>
/// <remarks>One owner at a time; the pool hands it out and takes it back. Freed by <see cref="IDisposable.Dispose"/>.</remarks>
internal sealed unsafe class AlignedBuffer : MemoryManager<byte>
{
    public const int Alignment = 4096;

    private byte* _pointer;

    public AlignedBuffer(int length)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(length);
        if (length % Alignment != 0)
        {
            throw new ArgumentException($"an aligned buffer is a multiple of {Alignment} bytes (got {length})", nameof(length));
        }

        _pointer = (byte*)NativeMemory.AlignedAlloc((nuint)length, Alignment);
        Length = length;
    }

    /// <summary>Bytes in the buffer, a multiple of 4096.</summary>
    public int Length { get; }

    public byte* Pointer => _pointer;

    public Span<byte> Span => new(_pointer, Length);

    /// <inheritdoc/>
    public override Span<byte> GetSpan() => new(_pointer, Length);

    /// <inheritdoc/>
    public override MemoryHandle Pin(int elementIndex = 0) => new(_pointer + elementIndex);

    /// <inheritdoc/>
    public override void Unpin()
    {
    }

    /// <inheritdoc/>
    protected override void Dispose(bool disposing)
    {
        if (_pointer != null)
        {
            NativeMemory.AlignedFree(_pointer);
            _pointer = null;
        }
    }
}

/// <summary>
/// Aligned buffers by exact size (chunk geometries repeat, so a few sizes cover the traffic), keeping at most a byte bound of idle
/// buffers; anything over it is freed on return.
/// </summary>
/// <remarks>Thread-safe.</remarks>
internal sealed class AlignedBufferPool : IDisposable
{
    private readonly ConcurrentDictionary<int, ConcurrentStack<AlignedBuffer>> _idle = new();
    private readonly long _maxIdleBytes;
    private long _idleBytes;
    private volatile bool _disposed;

    public AlignedBufferPool(long maxIdleBytes) => _maxIdleBytes = maxIdleBytes;

    /// <summary>A buffer of exactly <paramref name="length"/> bytes (a multiple of 4096); its contents are undefined.</summary>
    public AlignedBuffer Rent(int length)
    {
        if (_idle.TryGetValue(length, out var stack) && stack.TryPop(out AlignedBuffer? buffer))
        {
            Interlocked.Add(ref _idleBytes, -length);
            return buffer;
        }

        return new AlignedBuffer(length);
    }

    /// <summary>Takes a buffer back; the caller must not touch it afterwards.</summary>
    public void Return(AlignedBuffer buffer)
    {
        if (_disposed || Interlocked.Add(ref _idleBytes, buffer.Length) > _maxIdleBytes)
        {
            if (!_disposed)
            {
                Interlocked.Add(ref _idleBytes, -buffer.Length);
            }

            ((IDisposable)buffer).Dispose();
            return;
        }

        _idle.GetOrAdd(buffer.Length, static _ => new ConcurrentStack<AlignedBuffer>()).Push(buffer);
        if (_disposed)
        {
            Drain();
        }
    }

    public void Dispose()
    {
        _disposed = true;
        Drain();
    }

    private void Drain()
    {
        foreach (var stack in _idle.Values)
        {
            while (stack.TryPop(out AlignedBuffer? buffer))
            {
                ((IDisposable)buffer).Dispose();
            }
        }
    }
}
