using System.Buffers;
using Connector.Protocol.Framing;
using MessagePack;

namespace Connector.Protocol;

/// <summary>Encodes and decodes message bodies (MessagePack arrays with integer keys).</summary>
public static class ProtocolSerializer
{
    /// <summary>The options every body is read and written with: untrusted-data hardening, bounded depth.</summary>
    public static MessagePackSerializerOptions Options { get; } = MessagePackSerializerOptions.Standard
        .WithSecurity(MessagePackSecurity.UntrustedData.WithMaximumObjectGraphDepth(16));

    /// <summary>Decodes a body.</summary>
    /// <exception cref="ProtocolException">With <see cref="ErrorCode.BadRequest"/> for any body that does not decode as <typeparamref name="T"/>.</exception>
    public static T Deserialize<T>(in ReadOnlySequence<byte> body)
    {
        try
        {
            T? value = MessagePackSerializer.Deserialize<T>(body, Options);
            return value ?? throw new ProtocolException(ErrorCode.BadRequest, $"the body of a {typeof(T).Name} is nil");
        }
        catch (MessagePackSerializationException ex)
        {
            throw new ProtocolException(ErrorCode.BadRequest, $"the body does not decode as {typeof(T).Name}: {ex.InnerException?.Message ?? ex.Message}", ex);
        }
        catch (Exception ex) when (ex is EndOfStreamException or InvalidOperationException or OverflowException or ArgumentException)
        {
            throw new ProtocolException(ErrorCode.BadRequest, $"the body does not decode as {typeof(T).Name}: {ex.Message}", ex);
        }
    }

    /// <summary>Encodes a message (a <c>[MessagePackObject]</c>) into <paramref name="writer"/>.</summary>
    public static void Serialize<T>(IBufferWriter<byte> writer, T value) => MessagePackSerializer.Serialize(writer, value, Options);

    /// <summary>
    /// Builds the formatter of every message type now (MessagePack emits them on first use, which costs
    /// hundreds of milliseconds), so that an engine's first HELLO is answered as fast as any other request.
    /// </summary>
    public static void Warm()
    {
        var buffer = new ArrayBufferWriter<byte>();
        foreach (Type type in typeof(ProtocolSerializer).Assembly.GetTypes())
        {
            if (type.IsClass && type.IsPublic && type.GetCustomAttributes(typeof(MessagePackObjectAttribute), false).Length > 0)
            {
                buffer.ResetWrittenCount();
                object message = Activator.CreateInstance(type)!;
                MessagePackSerializer.Serialize(type, buffer, message, Options);
                MessagePackSerializer.Deserialize(type, buffer.WrittenMemory, Options);
            }
        }
    }

    /// <summary>Encodes a message whose type is known only at run time.</summary>
    public static void Serialize(IBufferWriter<byte> writer, object value)
    {
        ArgumentNullException.ThrowIfNull(value);
        MessagePackSerializer.Serialize(value.GetType(), writer, value, Options);
    }
}
