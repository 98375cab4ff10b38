using System.Buffers;
using Connector.Protocol.Messages;

namespace Connector.Protocol.Framing;

/// <summary>Writes whole frames (header and MessagePack body) into a buffer writer.</summary>
/// <remarks>Not thread-safe: one writer per connection, used under the connection's write lock.
/// The body is encoded into a reused scratch buffer, then header and body are copied out once.</remarks>
public sealed class FrameWriter
{
    private readonly ArrayBufferWriter<byte> _body = new(1024);

    /// <summary>Writes a request frame; a null message means an empty body.</summary>
    public void WriteRequest(IBufferWriter<byte> destination, Opcode opcode, ulong requestId, object? message) =>
        Write(destination, opcode, FrameFlags.None, requestId, message);

    /// <summary>Writes the reply to a request.</summary>
    public void WriteReply(IBufferWriter<byte> destination, Opcode opcode, ulong requestId, object? message) =>
        Write(destination, opcode, FrameFlags.Reply, requestId, message);

    /// <summary>Writes an error reply.</summary>
    public void WriteError(IBufferWriter<byte> destination, Opcode opcode, ulong requestId, ErrorCode code, string message) =>
        Write(destination, opcode, FrameFlags.Reply | FrameFlags.Error, requestId, new ErrorBody { Code = (int)code, Message = message });

    /// <summary>Writes one frame.</summary>
    public void Write(IBufferWriter<byte> destination, Opcode opcode, FrameFlags flags, ulong requestId, object? message)
    {
        ArgumentNullException.ThrowIfNull(destination);
        _body.ResetWrittenCount();
        if (message is not null)
        {
            ProtocolSerializer.Serialize(_body, message);
        }

        var header = new FrameHeader(FrameHeader.CurrentVersion, opcode, flags, requestId, (uint)_body.WrittenCount);
        Span<byte> span = destination.GetSpan(FrameHeader.Size + _body.WrittenCount);
        header.Write(span);
        _body.WrittenSpan.CopyTo(span[FrameHeader.Size..]);
        destination.Advance(FrameHeader.Size + _body.WrittenCount);
        if (_body.Capacity > 1 << 20)
        {
            // Do not keep a huge scratch buffer alive after one large frame.
            _body.Clear();
        }
    }
}
