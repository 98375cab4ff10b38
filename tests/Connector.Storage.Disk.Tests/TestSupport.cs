using System.Buffers.Binary;
using System.Collections.Concurrent;
using System.Diagnostics;
using System.Security.Cryptography;
using Connector.Core.Keys;
using Connector.Core.Storage.Tiers;
using Microsoft.Extensions.Logging;
using Xunit;

namespace Connector.Storage.Disk.Tests;

/// <summary>Deterministic chunks: keys from (chain, index), payloads from the key, so any process can rebuild and check them.</summary>
internal static class TestChunks
{
    public const ulong Tag = 0x5EED_7A67;

    public static ChunkKey Key(int chain, int index)
    {
        Span<byte> seed = stackalloc byte[8];
        BinaryPrimitives.WriteInt32LittleEndian(seed, chain);
        BinaryPrimitives.WriteInt32LittleEndian(seed[4..], index);
        return new ChunkKey(SHA256.HashData(seed));
    }

    /// <summary>A prompt's chunks: each one's parent is the chunk before it.</summary>
    public static TierKey[] Chain(int chain, int count, int length, ulong tag = Tag)
    {
        var keys = new TierKey[count];
        for (int i = 0; i < count; i++)
        {
            keys[i] = new TierKey(Key(chain, i), i == 0 ? ChunkKey.None : keys[i - 1].Key, tag, length);
        }

        return keys;
    }

    public static byte[] Data(in TierKey key)
    {
        byte[] data = new byte[key.Length];
        Fill(key.Key, data);
        return data;
    }

    /// <summary>xorshift64* from the key: every chunk's bytes differ, and a misplaced record cannot pass for another chunk.</summary>
    public static void Fill(in ChunkKey key, Span<byte> destination)
    {
        ulong x = key.Tag | 1;
        int i = 0;
        for (; i + 8 <= destination.Length; i += 8)
        {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            BinaryPrimitives.WriteUInt64LittleEndian(destination[i..], x * 0x2545F4914F6CDD1DUL);
        }

        for (; i < destination.Length; i++)
        {
            destination[i] = (byte)(x >> (8 * (i & 7)));
        }
    }

    /// <summary>Reads a chunk and says whether it came back Hit with exactly its bytes.</summary>
    public static async Task<(TierReadStatus Status, bool Exact)> ReadAsync(IChunkTier tier, TierKey key)
    {
        byte[] destination = new byte[key.Length];
        TierReadStatus status = await tier.ReadAsync(key, destination, TestContext.Current.CancellationToken);
        return (status, status == TierReadStatus.Hit && destination.AsSpan().SequenceEqual(Data(key)));
    }

    /// <summary>Reads a chunk into block-aligned native memory, as into an L1 slab (the straight-to-destination O_DIRECT path).</summary>
    public static async Task<(TierReadStatus Status, bool Exact)> ReadAlignedAsync(IChunkTier tier, TierKey key)
    {
        using var slab = new NativeSlab((int)key.Length);
        TierReadStatus status = await tier.ReadAsync(key, slab.Memory, TestContext.Current.CancellationToken);
        return (status, status == TierReadStatus.Hit && slab.Span.SequenceEqual(Data(key)));
    }

    /// <summary>Whether the tier's index holds exactly this one chunk.</summary>
    public static bool Present(IChunkTier tier, TierKey key) => tier.CountPresentPrefix([key]) == 1;
}

/// <summary>A directory under the system temp directory, deleted with everything in it.</summary>
internal sealed class TempDirectory : IDisposable
{
    public TempDirectory()
    {
        Path = System.IO.Path.Combine(System.IO.Path.GetTempPath(), "kvsidecar-disk-tests", Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(Path);
    }

    public string Path { get; }

    public string Sub(string name) => System.IO.Path.Combine(Path, name);

    public void Dispose()
    {
        try
        {
            Directory.Delete(Path, recursive: true);
        }
        catch (IOException)
        {
        }
    }
}

/// <summary>Keeps every formatted log line, so tests can check what the tier told the operator.</summary>
internal sealed class CollectingLogger : ILogger
{
    private readonly ConcurrentQueue<(LogLevel Level, string Message)> _lines = new();

    public IReadOnlyList<(LogLevel Level, string Message)> Lines => [.. _lines];

    public int Count(string fragment) => _lines.Count(l => l.Message.Contains(fragment, StringComparison.Ordinal));

    public IDisposable? BeginScope<TState>(TState state)
        where TState : notnull => null;

    public bool IsEnabled(LogLevel logLevel) => true;

    public void Log<TState>(LogLevel logLevel, EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter)
    {
        _lines.Enqueue((logLevel, formatter(state, exception)));
    }
}

/// <summary>A tmpfs of a few MiB, for a real ENOSPC; null when this machine does not let the tests mount one (not root, no CAP_SYS_ADMIN).</summary>
internal sealed class SmallFilesystem : IDisposable
{
    private SmallFilesystem(string path) => Path = path;

    public string Path { get; }

    public static SmallFilesystem? TryMount(string path, int megabytes, out string why)
    {
        Directory.CreateDirectory(path);
        (int code, string output) = Run("mount", "-t", "tmpfs", "-o", $"size={megabytes}m", "tmpfs", path);
        why = code == 0 ? "" : $"cannot mount a {megabytes} MiB tmpfs at {path} (mount exit {code}: {output.Trim()}); needs root or CAP_SYS_ADMIN";
        return code == 0 ? new SmallFilesystem(path) : null;
    }

    public void Dispose()
    {
        if (Run("umount", Path).Code != 0)
        {
            Run("umount", "-l", Path);
        }
    }

    private static (int Code, string Output) Run(string file, params string[] args)
    {
        try
        {
            using var process = Process.Start(new ProcessStartInfo(file, args) { RedirectStandardOutput = true, RedirectStandardError = true })!;
            string output = process.StandardOutput.ReadToEnd() + process.StandardError.ReadToEnd();
            process.WaitForExit();
            return (process.ExitCode, output);
        }
        catch (System.ComponentModel.Win32Exception ex)
        {
            return (-1, ex.Message);
        }
    }
}

/// <summary>4096-aligned native memory, like an L1 slab.</summary>
internal sealed unsafe class NativeSlab : IDisposable
{
    private readonly byte* _pointer;

    public NativeSlab(int length)
    {
        _pointer = (byte*)System.Runtime.InteropServices.NativeMemory.AlignedAlloc((nuint)Math.Max(length, 1), 4096);
        Length = length;
        Memory = new NativeMemoryManager((nint)_pointer, length).Memory;
    }

    public int Length { get; }

    public Memory<byte> Memory { get; }

    public Span<byte> Span => new(_pointer, Length);

    public void Dispose() => System.Runtime.InteropServices.NativeMemory.AlignedFree(_pointer);
}
