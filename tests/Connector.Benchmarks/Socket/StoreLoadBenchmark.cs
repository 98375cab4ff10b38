using System.Diagnostics;
using System.Runtime.InteropServices;
using Connector.Protocol;
using Connector.Protocol.Framing;
using Connector.Protocol.Messages;
using Connector.Testing;

namespace Connector.Benchmarks.Socket;

/// <summary>
/// STORE and LOAD through the socket for a Llama-3-8B-shaped pool (32 layers, 8 KV heads, head size
/// 128, bf16, 16-token blocks, 256-token chunks, kv-first so every K or V block is a 32 KiB piece)
/// living in another process, next to a single-thread memcpy gather of the same pieces in this process.
/// </summary>
internal static unsafe class StoreLoadBenchmark
{
    private const int Layers = 32;
    private const int Heads = 8;
    private const int RowBytes = 128 * 2;
    private const int BlockTokens = 16;
    private const int ChunkTokens = 256;
    private const int Blocks = 128;
    private const int HalfBlockBytes = BlockTokens * Heads * RowBytes; // 32 KiB: K (or V) of one block
    private const int Chunks = Blocks / (ChunkTokens / BlockTokens);

    public static IReadOnlyDictionary<string, double> Run(int rounds)
    {
        long bytes = (long)Layers * Blocks * 2 * HalfBlockBytes;
        using var sidecar = SidecarProcess.Start(capacityBytes: 2 * bytes);
        using var engine = TestEngineProcess.Start(Layers, Blocks, 2 * HalfBlockBytes);
        engine.Command("fill 3");
        using var worker = engine.Connect(sidecar.SocketPath, "bench", "worker");
        worker.Call<RegisterReply>(Opcode.Register, Register(engine));
        uint[] tokens = TestPool.Tokens(Chunks * ChunkTokens, 2);
        int[] blocks = Enumerable.Range(0, Blocks).Reverse().ToArray();
        var store = new StoreRequest { RequestId = "b", Tokens = WireArrays.FromTokens(tokens), FirstChunk = 0, NumChunks = Chunks, BlockIds = WireArrays.FromBlockIds(blocks) };
        var load = new LoadRequest { RequestId = "b", Tokens = WireArrays.FromTokens(tokens), FirstChunk = 0, NumChunks = Chunks, BlockIds = WireArrays.FromBlockIds(blocks) };

        var storeSeconds = new List<double>();
        var loadSeconds = new List<double>();
        for (int r = 0; r < rounds + 1; r++)
        {
            worker.Call<ClearReply>(Opcode.Clear, null);
            long t0 = Stopwatch.GetTimestamp();
            StoreReply s = worker.Call<StoreReply>(Opcode.Store, store);
            long t1 = Stopwatch.GetTimestamp();
            LoadReply l = worker.Call<LoadReply>(Opcode.Load, load);
            long t2 = Stopwatch.GetTimestamp();
            if (s.Stored != Chunks || l.LoadedChunks != Chunks)
            {
                throw new InvalidOperationException($"stored {s.Stored}, loaded {l.LoadedChunks} of {Chunks}");
            }

            if (r > 0)
            {
                storeSeconds.Add(Stopwatch.GetElapsedTime(t0, t1).TotalSeconds);
                loadSeconds.Add(Stopwatch.GetElapsedTime(t1, t2).TotalSeconds);
            }
        }

        double memcpy = MemcpyGatherSeconds(rounds);
        double gb = bytes / 1e9;
        var figures = new Dictionary<string, double>
        {
            ["bytes_per_round"] = bytes,
            ["store_GBps"] = gb / Median(storeSeconds),
            ["load_GBps"] = gb / Median(loadSeconds),
            ["memcpy_gather_GBps"] = gb / memcpy,
        };
        figures["store_over_memcpy"] = figures["store_GBps"] / figures["memcpy_gather_GBps"];
        figures["load_over_memcpy"] = figures["load_GBps"] / figures["memcpy_gather_GBps"];
        return figures;
    }

    private static RegisterRequest Register(TestEngineProcess engine) => new()
    {
        Namespace = new NamespaceDescriptor { ModelId = "meta-llama/Meta-Llama-3-8B", KvDtype = "bfloat16", BlockTokens = BlockTokens, ChunkTokens = ChunkTokens, TpSize = 1, TpRank = 0, FormatVersion = 1 },
        Layers = engine.Regions.Select((r, i) => new LayerDescriptor
        {
            Name = $"model.layers.{i}.self_attn.attn",
            Memory = new MemoryRefDescriptor { Kind = 1, Pid = engine.Pid, Address = r.Address, Length = r.Length },
            Layout = new LayoutDescriptor
            {
                ElementSize = 2,
                NumBlocks = Blocks,
                BlockTokens = BlockTokens,
                NumHeads = Heads,
                RowBytes = RowBytes,
                StrideBlock = HalfBlockBytes,
                StrideToken = Heads * RowBytes,
                StrideHead = RowBytes,
                KOffset = 0,
                VOffset = (long)Blocks * HalfBlockBytes,
            },
        }).ToArray(),
    };

    /// <summary>Seconds for one single-thread memcpy gather of the same 32 KiB pieces (median of rounds).</summary>
    private static double MemcpyGatherSeconds(int rounds)
    {
        long regionBytes = (long)Blocks * 2 * HalfBlockBytes;
        byte* src = (byte*)NativeMemory.AlignedAlloc((nuint)(regionBytes * Layers), 4096);
        byte* dst = (byte*)NativeMemory.AlignedAlloc((nuint)(regionBytes * Layers), 4096);
        try
        {
            new Span<byte>(src, checked((int)(regionBytes * Layers))).Fill(1);
            new Span<byte>(dst, checked((int)(regionBytes * Layers))).Clear();
            var seconds = new List<double>();
            for (int r = 0; r < rounds + 1; r++)
            {
                long t0 = Stopwatch.GetTimestamp();
                byte* d = dst;
                for (int l = 0; l < Layers; l++)
                {
                    byte* region = src + (l * regionBytes);
                    for (int kv = 0; kv < 2; kv++)
                    {
                        for (int b = Blocks - 1; b >= 0; b--)
                        {
                            Buffer.MemoryCopy(region + (kv * Blocks * (long)HalfBlockBytes) + ((long)b * HalfBlockBytes), d, HalfBlockBytes, HalfBlockBytes);
                            d += HalfBlockBytes;
                        }
                    }
                }

                if (r > 0)
                {
                    seconds.Add(Stopwatch.GetElapsedTime(t0).TotalSeconds);
                }
            }

            return Median(seconds);
        }
        finally
        {
            NativeMemory.AlignedFree(src);
            NativeMemory.AlignedFree(dst);
        }
    }

    private static double Median(List<double> values)
    {
        values.Sort();
        return values[values.Count / 2];
    }
}
