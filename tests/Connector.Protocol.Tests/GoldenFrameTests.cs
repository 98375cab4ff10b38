using System.Buffers;
using System.Text.Json;
using System.Text.Json.Nodes;
using MessagePack;
using Xunit;

namespace Connector.Protocol.Tests;

/// <summary>
/// tests/golden/frames.json holds one frame of every message as exact bytes plus its fields as JSON;
/// this test and the Python shim's test both check their encoders against it. Regenerate it (after a
/// deliberate, documented protocol change only) with KVSIDECAR_WRITE_GOLDEN=1.
/// </summary>
public sealed class GoldenFrameTests
{
    private static readonly JsonSerializerOptions Indented = new() { WriteIndented = true };

    [Fact]
    public void Frames_MatchGoldenFile()
    {
        var current = new JsonArray();
        foreach (var f in SampleFrames.All())
        {
            byte[] frame = SampleFrames.Encode(f.Opcode, f.Flags, f.RequestId, f.Message);
            current.Add(new JsonObject
            {
                ["name"] = f.Name,
                ["opcode"] = (int)f.Opcode,
                ["flags"] = (int)f.Flags,
                ["request_id"] = f.RequestId,
                ["fields"] = f.Message is null ? null : ToJson(frame.AsMemory(24)),
                ["frame_hex"] = Convert.ToHexStringLower(frame),
            });
        }

        if (Environment.GetEnvironmentVariable("KVSIDECAR_WRITE_GOLDEN") == "1")
        {
            File.WriteAllText(Path.Combine(RepoRoot(), "tests", "golden", "frames.json"), current.ToJsonString(Indented) + "\n");
        }

        JsonNode golden = JsonNode.Parse(File.ReadAllText(Path.Combine(AppContext.BaseDirectory, "golden", "frames.json")))!;
        Assert.Equal(golden.AsArray().Count, current.Count);
        for (int i = 0; i < current.Count; i++)
        {
            Assert.Equal(golden[i]!["name"]!.GetValue<string>(), current[i]!["name"]!.GetValue<string>());
            Assert.Equal(golden[i]!["frame_hex"]!.GetValue<string>(), current[i]!["frame_hex"]!.GetValue<string>());
            Assert.True(JsonNode.DeepEquals(golden[i]!["fields"], current[i]!["fields"]), $"fields of {current[i]!["name"]}");
        }
    }

    /// <summary>MessagePack to JSON, with bin as {"hex": ...} so it cannot be confused with a string.</summary>
    private static JsonNode? ToJson(ReadOnlyMemory<byte> body)
    {
        var reader = new MessagePackReader(body);
        return Read(ref reader);
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

    private static string RepoRoot()
    {
        for (DirectoryInfo? d = new(AppContext.BaseDirectory); d is not null; d = d.Parent)
        {
            if (File.Exists(Path.Combine(d.FullName, "Connector.sln")))
            {
                return d.FullName;
            }
        }

        throw new DirectoryNotFoundException("Connector.sln");
    }
}
