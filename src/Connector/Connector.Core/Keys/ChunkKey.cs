using System.Buffers.Binary;
using System.Runtime.CompilerServices;

namespace Connector.Core.Keys;

/// <summary>The 32-byte SHA-256 key of a chunk (docs/hashing.md).</summary>
public readonly struct ChunkKey : IEquatable<ChunkKey>
{
    /// <summary>Key size in bytes.</summary>
    public const int Size = 32;

    /// <summary>The all-zero key, used as "no parent" (SHA-256 never yields it in practice).</summary>
    public static readonly ChunkKey None;

    private readonly ulong _a;
    private readonly ulong _b;
    private readonly ulong _c;
    private readonly ulong _d;

    /// <summary>Creates a key from its 32 bytes.</summary>
    /// <exception cref="ArgumentException">The span is not 32 bytes.</exception>
    public ChunkKey(ReadOnlySpan<byte> bytes)
    {
        if (bytes.Length != Size)
        {
            throw new ArgumentException($"a chunk key is {Size} bytes, not {bytes.Length}", nameof(bytes));
        }

        _a = BinaryPrimitives.ReadUInt64LittleEndian(bytes);
        _b = BinaryPrimitives.ReadUInt64LittleEndian(bytes[8..]);
        _c = BinaryPrimitives.ReadUInt64LittleEndian(bytes[16..]);
        _d = BinaryPrimitives.ReadUInt64LittleEndian(bytes[24..]);
    }

    /// <summary>Reads the key at <paramref name="index"/> of keys packed back to back.</summary>
    public static ChunkKey Read(ReadOnlySpan<byte> keys, int index) => new(keys.Slice(index * Size, Size));

    /// <summary>Writes the key's 32 bytes.</summary>
    public void CopyTo(Span<byte> destination)
    {
        BinaryPrimitives.WriteUInt64LittleEndian(destination, _a);
        BinaryPrimitives.WriteUInt64LittleEndian(destination[8..], _b);
        BinaryPrimitives.WriteUInt64LittleEndian(destination[16..], _c);
        BinaryPrimitives.WriteUInt64LittleEndian(destination[24..], _d);
    }

    /// <summary>The key's first 8 bytes as a number: a tag of the namespace when the key is a root.</summary>
    public ulong Tag => _a;

    /// <summary>Whether this is <see cref="None"/>.</summary>
    public bool IsNone => (_a | _b | _c | _d) == 0;

    /// <inheritdoc/>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public bool Equals(ChunkKey other) => _a == other._a && _b == other._b && _c == other._c && _d == other._d;

    /// <inheritdoc/>
    public override bool Equals(object? obj) => obj is ChunkKey k && Equals(k);

    /// <summary>A secret per-process seed: keys come from client tokens, so bucket placement must not be predictable.</summary>
    private static readonly ulong HashSeed = BitConverter.ToUInt64(System.Security.Cryptography.RandomNumberGenerator.GetBytes(8)) | 1;

    /// <inheritdoc/>
    // A client can grind tokens until their keys share the low bits that pick a bucket; mixing in a
    // secret seed (multiply-xorshift) makes the bucket of a key unknowable outside this process.
    public override int GetHashCode()
    {
        ulong h = (_a ^ HashSeed) * 0x9E3779B97F4A7C15UL;
        h ^= h >> 29;
        h *= HashSeed;
        return (int)(h >> 32);
    }

    /// <summary>The key as lowercase hex.</summary>
    public override string ToString()
    {
        Span<byte> bytes = stackalloc byte[Size];
        CopyTo(bytes);
        return Convert.ToHexStringLower(bytes);
    }

    /// <summary>Equality.</summary>
    public static bool operator ==(ChunkKey left, ChunkKey right) => left.Equals(right);

    /// <summary>Inequality.</summary>
    public static bool operator !=(ChunkKey left, ChunkKey right) => !left.Equals(right);
}
