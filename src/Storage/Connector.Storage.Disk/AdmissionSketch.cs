using System.Buffers.Binary;
using Connector.Core.Keys;

namespace Connector.Storage.Disk;

/// <summary>
/// How often chunks were seen lately, in a fixed 64 KiB: a count-min sketch of four rows of saturating byte counters with
/// conservative update, halved every ten widths of additions so old popularity fades (TinyLFU's reset). A chunk is written to
/// the SSD only from its N-th sighting, which spares the drive one-off prompts.
/// </summary>
/// <remarks>Not thread-safe: the tier calls it under its lock. Chunk keys are SHA-256 digests, so their four 64-bit words are
/// already independent hashes; one per row.</remarks>
internal sealed class AdmissionSketch
{
    private const int Rows = 4;
    private const int Width = 1 << 14;
    private const byte Saturated = 15;

    private readonly byte[] _counters = new byte[Rows * Width];
    private int _additions;

    /// <summary>Counts one sighting of <paramref name="key"/>; returns the (over-)estimated sightings including this one.</summary>
    public int Increment(in ChunkKey key)
    {
        Span<byte> bytes = stackalloc byte[ChunkKey.Size];
        key.CopyTo(bytes);
        Span<int> slots = stackalloc int[Rows];
        int min = int.MaxValue;
        for (int row = 0; row < Rows; row++)
        {
            ulong word = BinaryPrimitives.ReadUInt64LittleEndian(bytes[(row * 8)..]);
            slots[row] = (row * Width) + (int)(word % Width);
            min = Math.Min(min, _counters[slots[row]]);
        }

        if (min < Saturated)
        {
            for (int row = 0; row < Rows; row++)
            {
                if (_counters[slots[row]] == min)
                {
                    _counters[slots[row]]++;
                }
            }

            min++;
        }

        if (++_additions >= 10 * Width)
        {
            Age();
        }

        return min;
    }

    private void Age()
    {
        _additions = 0;
        for (int i = 0; i < _counters.Length; i++)
        {
            _counters[i] >>= 1;
        }
    }
}
