using System.Runtime.InteropServices;
using Connector.Core.Memory;
using Xunit;

namespace Connector.Core.Tests.Memory;

public sealed unsafe class ChunkGeometryTests
{
    public static TheoryData<string> LayoutNames => new(LayoutCases.All().Select(c => c.Name));

    [Theory]
    [MemberData(nameof(LayoutNames))]
    public void GatherThenScatter_OtherBlocks_MovesExactlyTheRows(string name)
    {
        (_, KvLayout layout, int runs) = LayoutCases.All().Single(c => c.Name == name);
        long bytes = LayoutCases.RegionBytes(layout);
        Assert.Equal(runs, BlockTemplate.Create(layout, bytes, name).Runs.Count);
        RoundTrip([layout], [0], bytes, [5, 2], [0, 7]);
    }

    [Fact]
    public void GatherThenScatter_LayersAsStridedViewsOfOneBuffer_MovesExactlyTheRows()
    {
        // Two layers interleaved per block in one buffer (a BLNHC-style shared allocation).
        const int n = LayoutCases.N, h = LayoutCases.H, row = LayoutCases.Row, b = LayoutCases.B;
        long perLayerBlock = 2L * n * h * row;
        long stride = 2 * perLayerBlock;
        KvLayout layer0 = new(2, b, n, h, row, stride, h * row, row, 0, n * h * row);
        KvLayout layer1 = layer0 with { KOffset = perLayerBlock, VOffset = perLayerBlock + (n * h * row) };
        RoundTrip([layer0, layer1], [0, 0], b * stride, [1, 6], [4, 3]);
    }

    [Fact]
    public void ChunkBytes_KvFirstNhd_IsLayerThenKThenTokensThenHeads()
    {
        KvLayout l = LayoutCases.KvFirst;
        ChunkGeometry g = ChunkGeometry.Create([("l", l, LayoutCases.RegionBytes(l))], 2);
        var ops = new CopyOp[g.MaxCopyOpsPerChunk];
        int count = g.BuildCopyOps([3, 1], 1000, ops);
        Assert.Equal(4, count);
        long half = (long)LayoutCases.N * LayoutCases.H * LayoutCases.Row;
        Assert.Equal(new CopyOp(0, 3 * half, 1000, half), ops[0]);
        Assert.Equal(new CopyOp(0, 1 * half, 1000 + (nint)half, half), ops[1]);
        Assert.Equal(new CopyOp(0, l.VOffset + (3 * half), 1000 + (nint)(2 * half), half), ops[2]);
        Assert.Equal(new CopyOp(0, l.VOffset + (1 * half), 1000 + (nint)(3 * half), half), ops[3]);
        Assert.Equal(4 * half, g.ChunkBytes);
    }

    [Theory]
    [InlineData(-1)]
    [InlineData(8)]
    [InlineData(int.MaxValue)]
    [InlineData(int.MinValue)]
    public void BuildCopyOps_BlockIdOutOfRange_Throws(int bad)
    {
        KvLayout l = LayoutCases.BlocksFirst;
        ChunkGeometry g = ChunkGeometry.Create([("l", l, LayoutCases.RegionBytes(l))], 2);
        var ex = Assert.Throws<EngineMemoryException>(() => g.BuildCopyOps([0, bad], 4096, new CopyOp[g.MaxCopyOpsPerChunk]));
        Assert.Equal(EngineMemoryError.OutOfRange, ex.Code);
    }

    [Fact]
    public void BuildCopyOps_SkippedBlock_NoOpsForIt()
    {
        KvLayout l = LayoutCases.KvFirst;
        ChunkGeometry g = ChunkGeometry.Create([("l", l, LayoutCases.RegionBytes(l))], 2);
        var ops = new CopyOp[g.MaxCopyOpsPerChunk];
        Assert.Equal(2, g.BuildCopyOps([-1, 4], 0, ops, skipNegativeIds: true));
        Assert.All(ops.Take(2), op => Assert.Equal(4 * (long)LayoutCases.N * LayoutCases.H * LayoutCases.Row, op.RegionOffset % l.VOffset));
    }

    [Fact]
    public void Fingerprint_IndependentOfPoolSize_DependsOnByteOrder()
    {
        KvLayout l = LayoutCases.BlocksFirst;
        string small = ChunkGeometry.Create([("l", l, 1 << 20)], 2).Fingerprint;
        string big = ChunkGeometry.Create([("l", l with { NumBlocks = 64 }, 1 << 20)], 2).Fingerprint;
        string hnd = ChunkGeometry.Create([("l", LayoutCases.BlocksFirstHnd, 1 << 20)], 2).Fingerprint;
        string kvFirst = ChunkGeometry.Create([("l", LayoutCases.KvFirst, 1 << 20)], 2).Fingerprint;
        string shifted = ChunkGeometry.Create([("l", l with { KOffset = 4096, VOffset = 4096 + l.VOffset }, 1 << 20)], 2).Fingerprint;
        Assert.Equal(small, big);
        Assert.Equal(small, shifted);
        Assert.NotEqual(small, hnd);
        Assert.NotEqual(small, kvFirst);
    }

    private static void RoundTrip(KvLayout[] layouts, int[] regionOf, long regionBytes, int[] from, int[] to)
    {
        int regions = regionOf.Max() + 1;
        var src = new nint[regions];
        var dst = new nint[regions];
        var rng = new Random(42);
        for (int r = 0; r < regions; r++)
        {
            src[r] = (nint)NativeMemory.AlignedAlloc((nuint)regionBytes, 64);
            dst[r] = (nint)NativeMemory.AllocZeroed((nuint)regionBytes);
            rng.NextBytes(new Span<byte>((void*)src[r], (int)regionBytes));
        }

        try
        {
            var refsSrc = layouts.Select((_, i) => new EngineMemoryRef(EngineMemoryKind.HostProcess, Environment.ProcessId, (ulong)src[regionOf[i]], (ulong)regionBytes, null, null, 0)).ToList();
            var refsDst = layouts.Select((_, i) => new EngineMemoryRef(EngineMemoryKind.HostProcess, Environment.ProcessId, (ulong)dst[regionOf[i]], (ulong)regionBytes, null, null, 0)).ToList();
            ChunkGeometry g = ChunkGeometry.Create(layouts.Select((l, i) => ($"layer{i}", l, regionBytes)).ToList(), from.Length);
            var provider = new HostProcessMemoryProvider();
            using IEngineMemory srcMem = provider.Open(refsSrc);
            using IEngineMemory dstMem = provider.Open(refsDst);
            byte[] slab = new byte[g.ChunkBytes];
            var ops = new CopyOp[g.MaxCopyOpsPerChunk];
            fixed (byte* s = slab)
            {
                int n = g.BuildCopyOps(from, (nint)s, ops);
                srcMem.Read(ops.AsSpan(0, n));
                n = g.BuildCopyOps(to, (nint)s, ops);
                dstMem.Write(ops.AsSpan(0, n));
            }

            // Reference: copy every (plane, token, head) row of the named blocks with explicit loops.
            var expected = new byte[regions][];
            for (int r = 0; r < regions; r++)
            {
                expected[r] = new byte[regionBytes];
            }

            for (int i = 0; i < layouts.Length; i++)
            {
                KvLayout l = layouts[i];
                var source = new ReadOnlySpan<byte>((void*)src[regionOf[i]], (int)regionBytes);
                foreach (long plane in l.HasV ? new[] { l.KOffset, l.VOffset } : new[] { l.KOffset })
                {
                    for (int j = 0; j < from.Length; j++)
                    {
                        for (int t = 0; t < l.BlockTokens; t++)
                        {
                            for (int h = 0; h < l.NumHeads; h++)
                            {
                                long rel = plane + (t * l.StrideToken) + (h * l.StrideHead);
                                source.Slice((int)((from[j] * l.StrideBlock) + rel), l.RowBytes)
                                    .CopyTo(expected[regionOf[i]].AsSpan((int)((to[j] * l.StrideBlock) + rel), l.RowBytes));
                            }
                        }
                    }
                }
            }

            for (int r = 0; r < regions; r++)
            {
                Assert.Equal(expected[r], new ReadOnlySpan<byte>((void*)dst[r], (int)regionBytes).ToArray());
            }
        }
        finally
        {
            for (int r = 0; r < regions; r++)
            {
                NativeMemory.AlignedFree((void*)src[r]);
                NativeMemory.Free((void*)dst[r]);
            }
        }
    }
}
