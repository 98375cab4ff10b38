using Connector.Core.Memory;
using Xunit;

namespace Connector.Core.Tests.Memory;

public sealed class BlockTemplateTests
{
    [Fact]
    public void Create_LastBlockPastRegion_BadLayoutNamingLayer()
    {
        KvLayout l = LayoutCases.BlocksFirst;
        var ex = Assert.Throws<LayoutException>(() => BlockTemplate.Create(l, LayoutCases.RegionBytes(l) - 1, "model.layers.3"));
        Assert.Contains("model.layers.3", ex.Message, StringComparison.Ordinal);
        BlockTemplate.Create(l, LayoutCases.RegionBytes(l), "ok");
    }

    [Theory]
    [InlineData(long.MaxValue, 16, 8)]
    [InlineData(16, long.MaxValue, 8)]
    [InlineData(16, 32, long.MaxValue)]
    [InlineData(long.MaxValue / 3, long.MaxValue / 3, long.MaxValue / 3)]
    public void Create_HugeStrides_RejectedWithoutOverflow(long block, long token, long head)
    {
        var l = new KvLayout(2, 4, 4, 2, 16, block, token, head, 0, -1);
        Assert.Throws<LayoutException>(() => BlockTemplate.Create(l, 1 << 30, "x"));
    }

    [Fact]
    public void Create_RowsOverlap_Rejected()
    {
        var l = new KvLayout(2, 4, 4, 2, 16, 1024, 16, 8, 0, -1);
        Assert.Contains("overlap", Assert.Throws<LayoutException>(() => BlockTemplate.Create(l, 1 << 20, "x")).Message, StringComparison.Ordinal);
    }

    [Fact]
    public void Create_BlocksOverlap_Rejected()
    {
        KvLayout l = LayoutCases.BlocksFirst with { StrideBlock = LayoutCases.BlocksFirst.StrideBlock / 2 };
        Assert.Contains("blocks overlap", Assert.Throws<LayoutException>(() => BlockTemplate.Create(l, 1 << 20, "x")).Message, StringComparison.Ordinal);
    }

    [Fact]
    public void Create_KvFirstInterleavedBlocks_Accepted()
    {
        // K blocks and V blocks interleave across the region without overlapping.
        BlockTemplate t = BlockTemplate.Create(LayoutCases.KvFirst, LayoutCases.RegionBytes(LayoutCases.KvFirst), "x");
        Assert.Equal(2 * LayoutCases.N * LayoutCases.H * LayoutCases.Row, t.BytesPerBlock);
    }

    [Theory]
    [InlineData(0, 4, 4, 2, 16)]
    [InlineData(2, 0, 4, 2, 16)]
    [InlineData(2, 4, 0, 2, 16)]
    [InlineData(2, 4, 4, 0, 16)]
    [InlineData(2, 4, 4, 2, 0)]
    [InlineData(2, 4, 4, 2, 15)]
    [InlineData(2, 4, 100000, 2, 16)]
    public void Create_NonPositiveOrAbsurdSizes_Rejected(int elem, int blocks, int tokens, int heads, int row)
    {
        var l = new KvLayout(elem, blocks, tokens, heads, row, 1 << 20, 64, 16, 0, -1);
        Assert.Throws<LayoutException>(() => BlockTemplate.Create(l, 1L << 40, "x"));
    }

    [Fact]
    public void Create_NegativeStrideOrOffset_Rejected()
    {
        Assert.Throws<LayoutException>(() => BlockTemplate.Create(LayoutCases.BlocksFirst with { StrideToken = -32 }, 1 << 20, "x"));
        Assert.Throws<LayoutException>(() => BlockTemplate.Create(LayoutCases.BlocksFirst with { VOffset = -2 }, 1 << 20, "x"));
    }
}
