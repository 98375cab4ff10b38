using System.Buffers;

namespace Connector.Protocol.Framing;

/// <summary>What <see cref="FrameReader.TryReadFrame"/> found.</summary>
public enum FrameReadResult
{
    /// <summary>A whole frame was read and the buffer advanced past it.</summary>
    Done,

    /// <summary>The buffer holds only part of a frame; read more and call again.</summary>
    NeedMoreData,

    /// <summary>The header is malformed: the stream cannot be trusted and must be closed.</summary>
    BadFrame,

    /// <summary>The header announces a body above the limit; decided before the body is buffered.</summary>
    TooLarge,
}

/// <summary>Splits a byte stream into frames without copying bodies.</summary>
public static class FrameReader
{
    /// <summary>Reads one frame from the front of <paramref name="buffer"/>.</summary>
    /// <param name="buffer">Received bytes; on <see cref="FrameReadResult.Done"/> it is advanced past the frame.</param>
    /// <param name="maxBodyBytes">The largest body accepted.</param>
    /// <param name="header">The header, valid for Done and TooLarge.</param>
    /// <param name="body">The body, a slice of <paramref name="buffer"/> valid until the buffer is released.</param>
    public static FrameReadResult TryReadFrame(ref ReadOnlySequence<byte> buffer, int maxBodyBytes, out FrameHeader header, out ReadOnlySequence<byte> body)
    {
        body = default;
        header = default;
        if (buffer.Length < FrameHeader.Size)
        {
            return FrameReadResult.NeedMoreData;
        }

        OperationStatus status;
        ReadOnlySpan<byte> first = buffer.FirstSpan;
        if (first.Length >= FrameHeader.Size)
        {
            status = FrameHeader.TryRead(first, out header);
        }
        else
        {
            Span<byte> copy = stackalloc byte[FrameHeader.Size];
            buffer.Slice(0, FrameHeader.Size).CopyTo(copy);
            status = FrameHeader.TryRead(copy, out header);
        }

        if (status != OperationStatus.Done)
        {
            return FrameReadResult.BadFrame;
        }

        if (header.BodyLength > (uint)maxBodyBytes)
        {
            return FrameReadResult.TooLarge;
        }

        long total = FrameHeader.Size + (long)header.BodyLength;
        if (buffer.Length < total)
        {
            return FrameReadResult.NeedMoreData;
        }

        body = buffer.Slice(FrameHeader.Size, header.BodyLength);
        buffer = buffer.Slice(total);
        return FrameReadResult.Done;
    }
}
