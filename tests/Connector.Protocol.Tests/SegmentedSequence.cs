using System.Buffers;

namespace Connector.Protocol.Tests;

/// <summary>Builds multi-segment sequences, the way a pipe hands over bytes that arrived in pieces.</summary>
internal static class SegmentedSequence
{
    public static ReadOnlySequence<byte> Of(params byte[][] pieces)
    {
        pieces = pieces.Where(p => p.Length > 0).ToArray();
        if (pieces.Length == 0)
        {
            return ReadOnlySequence<byte>.Empty;
        }

        var first = new Segment(pieces[0], 0);
        Segment last = first;
        foreach (byte[] p in pieces.Skip(1))
        {
            last = last.Append(p);
        }

        return new ReadOnlySequence<byte>(first, 0, last, last.Memory.Length);
    }

    /// <summary>The bytes split in two at <paramref name="at"/>.</summary>
    public static ReadOnlySequence<byte> SplitAt(byte[] bytes, int at) => Of(bytes[..at], bytes[at..]);

    /// <summary>The bytes one per segment.</summary>
    public static ReadOnlySequence<byte> OneBytePieces(byte[] bytes) => Of(bytes.Select(b => new[] { b }).ToArray());

    private sealed class Segment : ReadOnlySequenceSegment<byte>
    {
        public Segment(ReadOnlyMemory<byte> memory, long runningIndex)
        {
            Memory = memory;
            RunningIndex = runningIndex;
        }

        public Segment Append(ReadOnlyMemory<byte> memory)
        {
            var next = new Segment(memory, RunningIndex + Memory.Length);
            Next = next;
            return next;
        }
    }
}
