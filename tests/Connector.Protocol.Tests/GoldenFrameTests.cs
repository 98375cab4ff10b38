using System.Buffers;
using System.Collections;
using System.Reflection;
using System.Text.Json;
using System.Text.Json.Nodes;
using Connector.Protocol.Framing;
using MessagePack;
using Xunit;

namespace Connector.Protocol.Tests;

/// <summary>
/// tests/golden/frames.json holds one frame of every message as exact bytes plus its fields as JSON. It is
/// written by tests/golden/make_frames.py from docs/protocol.md alone (struct and msgpack, no code of ours),
/// so these tests only check: the C# reader and serializer decode every golden frame to its fields, and the
/// C# writer encodes those fields to exactly the golden bytes. A failure here is a disagreement between the
/// C# code and the spec; the golden file is never rewritten from C#.
/// </summary>
public sealed class GoldenFrameTests
{
    private static readonly JsonArray Golden = JsonNode.Parse(File.ReadAllText(Path.Combine(AppContext.BaseDirectory, "golden", "frames.json")))!.AsArray();

    public static TheoryData<string> GoldenNames => new(Golden.Select(f => f!["name"]!.GetValue<string>()));

    [Fact]
    public void GoldenFile_ComparedWithSampleFrames_SameFramesInSameOrder()
    {
        string[] golden = Golden.Select(f => f!["name"]!.GetValue<string>()).ToArray();
        string[] samples = SampleFrames.All().Select(f => f.Name).ToArray();
        Assert.Equal(golden, samples);
        Assert.Equal(golden.Length, golden.Distinct(StringComparer.Ordinal).Count());
    }

    [Theory]
    [MemberData(nameof(GoldenNames))]
    public void Decode_GoldenFrame_HeaderAndFieldsAsInGoldenFile(string name)
    {
        (JsonNode golden, byte[] frame, SampleFrame sample) = Case(name);
        var buffer = new ReadOnlySequence<byte>(frame);

        Assert.Equal(FrameReadResult.Done, FrameReader.TryReadFrame(ref buffer, 64 << 20, out FrameHeader header, out ReadOnlySequence<byte> body));
        Assert.True(buffer.IsEmpty);
        Assert.Equal(FrameHeader.CurrentVersion, header.Version);
        Assert.Equal(golden["opcode"]!.GetValue<int>(), (int)header.Opcode);
        Assert.Equal(golden["flags"]!.GetValue<int>(), (int)header.Flags);
        Assert.Equal(golden["request_id"]!.GetValue<ulong>(), header.RequestId);
        Assert.Equal(frame.Length - FrameHeader.Size, (int)header.BodyLength);
        Assert.Equal((sample.Opcode, sample.Flags, sample.RequestId), (header.Opcode, header.Flags, header.RequestId));

        JsonNode? fields = golden["fields"];
        if (fields is null)
        {
            Assert.True(body.IsEmpty);
            Assert.Null(sample.Message);
            return;
        }

        // The generic MessagePack reader sees the same values...
        AssertJson(fields, ReadJson(body), $"{name}: body read with MessagePackReader");

        // ...and the message type decodes every field to the property at its spec position: the golden
        // fields again, and, property by name, the C# sample (so a property under the wrong key fails here).
        Assert.NotNull(sample.Message);
        Type type = sample.Message.GetType();
        object decoded = Deserialize(type, body);
        AssertJson(fields, FieldsOf(decoded), $"{name}: body decoded as {type.Name}");
        AssertJson(JsonSerializer.SerializeToNode(sample.Message, type), JsonSerializer.SerializeToNode(decoded, type), $"{name}: {type.Name} properties by name");
    }

    [Theory]
    [MemberData(nameof(GoldenNames))]
    public void Encode_SampleMessage_ExactlyGoldenFrame(string name)
    {
        (JsonNode golden, byte[] frame, SampleFrame sample) = Case(name);

        // The sample sets every field by property name; at its [Key] positions it must be the golden field list
        // (so a property under the wrong key, or a field the C# type lacks, fails here rather than round-tripping).
        if (sample.Message is null)
        {
            Assert.Null(golden["fields"]);
        }
        else
        {
            AssertJson(golden["fields"], FieldsOf(sample.Message), $"{name}: fields of the C# sample {sample.Message.GetType().Name}");
        }

        byte[] encoded = SampleFrames.Encode(sample.Opcode, sample.Flags, sample.RequestId, sample.Message);
        Assert.Equal(Convert.ToHexStringLower(frame), Convert.ToHexStringLower(encoded));
    }

    [Theory]
    [MemberData(nameof(GoldenNames))]
    public void Encode_DecodedGoldenMessage_ExactlyGoldenFrame(string name)
    {
        (_, byte[] frame, SampleFrame sample) = Case(name);
        var body = new ReadOnlySequence<byte>(frame, FrameHeader.Size, frame.Length - FrameHeader.Size);
        object? decoded = sample.Message is null ? null : Deserialize(sample.Message.GetType(), body);

        byte[] encoded = SampleFrames.Encode(sample.Opcode, sample.Flags, sample.RequestId, decoded);
        Assert.Equal(Convert.ToHexStringLower(frame), Convert.ToHexStringLower(encoded));
    }

    [Theory]
    [MemberData(nameof(GoldenNames))]
    public void Encode_GoldenFieldsWithMessagePackWriter_ExactlyGoldenBody(string name)
    {
        (JsonNode golden, byte[] frame, _) = Case(name);
        JsonNode? fields = golden["fields"];
        var buffer = new ArrayBufferWriter<byte>();
        if (fields is not null)
        {
            var writer = new MessagePackWriter(buffer);
            WriteJson(ref writer, fields);
            writer.Flush();
        }

        Assert.Equal(Convert.ToHexStringLower(frame.AsSpan(FrameHeader.Size)), Convert.ToHexStringLower(buffer.WrittenSpan));
    }

    private sealed record SampleFrame(Opcode Opcode, FrameFlags Flags, ulong RequestId, object? Message);

    private static (JsonNode Golden, byte[] Frame, SampleFrame Sample) Case(string name)
    {
        JsonNode golden = Golden.Single(f => f!["name"]!.GetValue<string>() == name)!;
        var s = SampleFrames.All().Single(f => f.Name == name);
        return (golden, Convert.FromHexString(golden["frame_hex"]!.GetValue<string>()), new SampleFrame(s.Opcode, s.Flags, s.RequestId, s.Message));
    }

    private static void AssertJson(JsonNode? expected, JsonNode? actual, string what) =>
        Assert.True(JsonNode.DeepEquals(expected, actual), $"{what}\nexpected: {expected?.ToJsonString() ?? "null"}\nactual:   {actual?.ToJsonString() ?? "null"}");

    /// <summary>Decodes a body the way the sidecar does (<see cref="ProtocolSerializer.Deserialize{T}"/>).</summary>
    private static object Deserialize(Type type, ReadOnlySequence<byte> body)
    {
        MethodInfo method = typeof(ProtocolSerializer).GetMethod(nameof(ProtocolSerializer.Deserialize))!.MakeGenericMethod(type);
        try
        {
            return method.Invoke(null, [body])!;
        }
        catch (TargetInvocationException ex) when (ex.InnerException is not null)
        {
            throw ex.InnerException;
        }
    }

    /// <summary>
    /// A message as the JSON of the golden file: a [MessagePackObject] becomes the array of its [Key]
    /// properties by position, bin becomes {"hex": ...}, an enum its number.
    /// </summary>
    private static JsonNode? FieldsOf(object? value)
    {
        switch (value)
        {
            case null:
                return null;
            case string s:
                return JsonValue.Create(s);
            case bool b:
                return JsonValue.Create(b);
            case byte[] bytes:
                return new JsonObject { ["hex"] = Convert.ToHexStringLower(bytes) };
            case Enum e:
                return JsonValue.Create(Convert.ToInt64(e, System.Globalization.CultureInfo.InvariantCulture));
            case int or long or uint or ushort or short or byte or sbyte:
                return JsonValue.Create(Convert.ToInt64(value, System.Globalization.CultureInfo.InvariantCulture));
            case ulong u:
                return JsonValue.Create(u);
            case IEnumerable items:
                return new JsonArray(items.Cast<object?>().Select(FieldsOf).ToArray());
        }

        Type type = value.GetType();
        Assert.True(type.GetCustomAttribute<MessagePackObjectAttribute>() is not null, $"{type.Name} is not a [MessagePackObject]");
        var keyed = type.GetProperties(BindingFlags.Public | BindingFlags.Instance)
            .Select(p => (Property: p, Key: p.GetCustomAttribute<KeyAttribute>()))
            .Where(p => p.Key is not null)
            .Select(p => (p.Property, Index: p.Key!.IntKey!.Value))
            .OrderBy(p => p.Index)
            .ToArray();
        Assert.Equal(Enumerable.Range(0, keyed.Length), keyed.Select(p => p.Index));
        return new JsonArray(keyed.Select(p => FieldsOf(p.Property.GetValue(value))).ToArray());
    }

    /// <summary>MessagePack to JSON, with bin as {"hex": ...} so it cannot be confused with a string.</summary>
    private static JsonNode? ReadJson(ReadOnlySequence<byte> body)
    {
        var reader = new MessagePackReader(body);
        JsonNode? node = Read(ref reader);
        Assert.True(reader.End, "bytes after the body's MessagePack value");
        return node;
    }

    private static JsonNode? Read(ref MessagePackReader reader)
    {
        switch (reader.NextMessagePackType)
        {
            case MessagePackType.Nil:
                reader.ReadNil();
                return null;
            case MessagePackType.Boolean:
                return reader.ReadBoolean();
            case MessagePackType.Integer:
                return reader.NextCode is >= MessagePackCode.MinNegativeFixInt or MessagePackCode.Int8 or MessagePackCode.Int16 or MessagePackCode.Int32 or MessagePackCode.Int64
                    ? reader.ReadInt64()
                    : reader.ReadUInt64();
            case MessagePackType.String:
                return reader.ReadString();
            case MessagePackType.Binary:
                ReadOnlySequence<byte> bin = reader.ReadBytes()!.Value;
                return new JsonObject { ["hex"] = Convert.ToHexStringLower(bin.ToArray()) };
            case MessagePackType.Array:
                int n = reader.ReadArrayHeader();
                var array = new JsonArray();
                for (int i = 0; i < n; i++)
                {
                    array.Add(Read(ref reader));
                }

                return array;
            default:
                throw new InvalidOperationException($"unexpected MessagePack type {reader.NextMessagePackType} in a protocol body");
        }
    }

    /// <summary>JSON to MessagePack with the C# writer's own choice of encodings.</summary>
    private static void WriteJson(ref MessagePackWriter writer, JsonNode? node)
    {
        switch (node)
        {
            case null:
                writer.WriteNil();
                break;
            case JsonArray array:
                writer.WriteArrayHeader(array.Count);
                foreach (JsonNode? item in array)
                {
                    WriteJson(ref writer, item);
                }

                break;
            case JsonObject obj:
                writer.Write(Convert.FromHexString(obj["hex"]!.GetValue<string>()));
                break;
            default:
                JsonValue value = node.AsValue();
                switch (value.GetValueKind())
                {
                    case JsonValueKind.String:
                        writer.Write(value.GetValue<string>());
                        break;
                    case JsonValueKind.True or JsonValueKind.False:
                        writer.Write(value.GetValue<bool>());
                        break;
                    case JsonValueKind.Number when value.TryGetValue(out long signed):
                        writer.Write(signed);
                        break;
                    case JsonValueKind.Number:
                        writer.Write(value.GetValue<ulong>());
                        break;
                    default:
                        throw new InvalidOperationException($"unexpected JSON {value.ToJsonString()} in golden fields");
                }

                break;
        }
    }
}
