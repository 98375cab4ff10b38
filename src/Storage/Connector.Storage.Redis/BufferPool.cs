using System.Collections.Concurrent;

namespace Connector.Storage.Redis;

/// <summary>
/// Reuses the chunk-sized arrays of the write path by exact length (a registration has one chunk geometry, so only
/// a few lengths occur), up to a byte cap. <see cref="System.Buffers.ArrayPool{T}.Shared"/> rounds up to powers of
/// two (a 1 MiB + header value would take 2 MiB) and keeps few arrays this large per core, so at the queue's depth
/// most rents were fresh large-object-heap arrays: zeroed, page-faulted, and collected with gen-2 GCs.
/// </summary>
/// <remarks>Thread-safe. Arrays are managed, so one abandoned to a command that never completed is simply collected.</remarks>
internal sealed class BufferPool(long capacityBytes)
{
    private readonly ConcurrentDictionary<int, ConcurrentStack<byte[]>> _free = new();
    private long _pooledBytes;

    /// <summary>Bytes held by the pool now.</summary>
    public long PooledBytes => Interlocked.Read(ref _pooledBytes);

    /// <summary>An array of exactly <paramref name="length"/> bytes (contents undefined).</summary>
    public byte[] Rent(int length)
    {
        if (_free.TryGetValue(length, out ConcurrentStack<byte[]>? stack) && stack.TryPop(out byte[]? array))
        {
            Interlocked.Add(ref _pooledBytes, -length);
            return array;
        }

        return GC.AllocateUninitializedArray<byte>(length);
    }

    /// <summary>Gives an array back; kept when the pool is under its cap, else left to the GC.</summary>
    public void Return(byte[] array)
    {
        if (Interlocked.Add(ref _pooledBytes, array.Length) > capacityBytes)
        {
            Interlocked.Add(ref _pooledBytes, -array.Length);
            return;
        }

        _free.GetOrAdd(array.Length, static _ => new ConcurrentStack<byte[]>()).Push(array);
    }
}
