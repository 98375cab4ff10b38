using System.Buffers;
using System.Buffers.Binary;
using System.Runtime.CompilerServices;

namespace Connector.Protocol.Framing;

/// <summary>The fixed 24-byte little-endian header in front of every frame (docs/protocol.md section 1).</summary>
public readonly record struct FrameHeader(ushort Version, Opcode Opcode, FrameFlags Flags, ulong RequestId, uint BodyLength)
{
    /// <summary>Header size in bytes.</summary>
    public const int Size = 24;

    /// <summary>The magic "KVSC" read as a little-endian u32.</summary>
    public const uint Magic = 0x4353564B;

    /// <summary>The protocol version this build speaks.</summary>
    public const ushort CurrentVersion = 1;

    private const FrameFlags KnownFlags = FrameFlags.Reply | FrameFlags.Error;

    /// <summary>Writes the header into the first <see cref="Size"/> bytes of <paramref name="destination"/>.</summary>
    public void Write(Span<byte> destination)
    {
        if (destination.Length < Size)
        {
            ThrowHelper.ThrowDestinationTooSmall();
        }

        BinaryPrimitives.WriteUInt32LittleEndian(destination, Magic);
        BinaryPrimitives.WriteUInt16LittleEndian(destination[4..], Version);
        BinaryPrimitives.WriteUInt16LittleEndian(destination[6..], (ushort)Opcode);
        BinaryPrimitives.WriteUInt16LittleEndian(destination[8..], (ushort)Flags);
        BinaryPrimitives.WriteUInt16LittleEndian(destination[10..], 0);
        BinaryPrimitives.WriteUInt64LittleEndian(destination[12..], RequestId);
        BinaryPrimitives.WriteUInt32LittleEndian(destination[20..], BodyLength);
    }

    /// <summary>Parses a header.</summary>
    /// <returns><see cref="OperationStatus.Done"/>; <see cref="OperationStatus.NeedMoreData"/> when fewer than
    /// <see cref="Size"/> bytes are given; <see cref="OperationStatus.InvalidData"/> for a wrong magic,
    /// a non-zero reserved field or unknown flag bits (the stream cannot be trusted after that).</returns>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static OperationStatus TryRead(ReadOnlySpan<byte> source, out FrameHeader header)
    {
        header = default;
        if (source.Length < Size)
        {
            return OperationStatus.NeedMoreData;
        }

        if (BinaryPrimitives.ReadUInt32LittleEndian(source) != Magic
            || BinaryPrimitives.ReadUInt16LittleEndian(source[10..]) != 0)
        {
            return OperationStatus.InvalidData;
        }

        var flags = (FrameFlags)BinaryPrimitives.ReadUInt16LittleEndian(source[8..]);
        if ((flags & ~KnownFlags) != 0)
        {
            return OperationStatus.InvalidData;
        }

        header = new FrameHeader(
            BinaryPrimitives.ReadUInt16LittleEndian(source[4..]),
            (Opcode)BinaryPrimitives.ReadUInt16LittleEndian(source[6..]),
            flags,
            BinaryPrimitives.ReadUInt64LittleEndian(source[12..]),
            BinaryPrimitives.ReadUInt32LittleEndian(source[20..]));
        return OperationStatus.Done;
    }
}
