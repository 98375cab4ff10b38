using System.Diagnostics;
using System.Runtime.InteropServices;
using Connector.Core.Memory;

namespace Connector.Benchmarks.Memory;

/// <summary>
/// The host data plane in one process: gather (Read) and scatter (Write) of Llama-3-8B-shaped chunks
/// with random block ids through process_vm_readv/writev, next to a Buffer.MemoryCopy gather of the same pieces.
/// </summary>
internal static unsafe class GatherBenchmark
{
    private const int Layers = 32;
    private const int Blocks = 64;
    private const int HalfBlock = 16 * 8 * 256; // K (or V) of one 16-token block: 32 KiB
    private const int BlocksPerChunk = 16;

    public static IReadOnlyDictionary<string, double> Run()
    {
        long region = (long)Blocks * 2 * HalfBlock;
        var regions = new nint[Layers];
        var refs = new List<EngineMemoryRef>();
        var layers = new List<(string, KvLayout, long)>();
        for (int l = 0; l < Layers; l++)
        {
            regions[l] = (nint)NativeMemory.AlignedAlloc((nuint)region, 4096);
            new Span<byte>((void*)regions[l], (int)region).Fill((byte)l);
            refs.Add(new EngineMemoryRef(EngineMemoryKind.HostProcess, Environment.ProcessId, (ulong)regions[l], (ulong)region, null, null, 0));
            layers.Add(($"l{l}", new KvLayout(2, Blocks, 16, 8, 256, HalfBlock, 8 * 256, 256, 0, (long)Blocks * HalfBlock), region));
        }

        ChunkGeometry geometry = ChunkGeometry.Create(layers, BlocksPerChunk);
        using IEngineMemory memory = new HostProcessMemoryProvider().Open(refs);
        byte* slab = (byte*)NativeMemory.AlignedAlloc((nuint)geometry.ChunkBytes, 4096);
        var ops = new CopyOp[geometry.MaxCopyOpsPerChunk];
        var rng = new Random(7);
        int[] ids = Enumerable.Range(0, Blocks).OrderBy(_ => rng.Next()).Take(BlocksPerChunk).ToArray();
        int n = geometry.BuildCopyOps(ids, (nint)slab, ops);
        try
        {
            const int Rounds = 20;
            double read = Median(Rounds, () => memory.Read(ops.AsSpan(0, n)));
            double write = Median(Rounds, () => memory.Write(ops.AsSpan(0, n)));
            double memcpy = Median(Rounds, () =>
            {
                for (int i = 0; i < n; i++)
                {
                    CopyOp op = ops[i];
                    Buffer.MemoryCopy((void*)(regions[op.Region] + (nint)op.RegionOffset), (void*)op.Host, op.Length, op.Length);
                }
            });
            double gb = geometry.ChunkBytes / 1e9;
            return new Dictionary<string, double>
            {
                ["chunk_bytes"] = geometry.ChunkBytes,
                ["copy_ops_per_chunk"] = n,
                ["process_vm_readv_GBps"] = gb / read,
                ["process_vm_writev_GBps"] = gb / write,
                ["memcpy_gather_GBps"] = gb / memcpy,
                ["readv_over_memcpy"] = memcpy / read,
                ["writev_over_memcpy"] = memcpy / write,
            };
        }
        finally
        {
            NativeMemory.AlignedFree(slab);
            foreach (nint r in regions)
            {
                NativeMemory.AlignedFree((void*)r);
            }
        }
    }

    private static double Median(int rounds, Action action)
    {
        action();
        var s = new double[rounds];
        for (int i = 0; i < rounds; i++)
        {
            long t = Stopwatch.GetTimestamp();
            action();
            s[i] = Stopwatch.GetElapsedTime(t).TotalSeconds;
        }

        Array.Sort(s);
        return s[rounds / 2];
    }
}
