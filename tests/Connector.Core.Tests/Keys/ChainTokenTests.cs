using Connector.Core.Keys;
using Xunit;

namespace Connector.Core.Tests.Keys;

public sealed class ChainTokenTests
{
    private static ChunkKey Key(byte b) => new(Enumerable.Repeat(b, ChunkKey.Size).ToArray());

    [Fact]
    public void SealThenOpen_SameRoot_ReturnsChunkAndKey()
    {
        byte[] token = ChainToken.Seal(Key(1), 41, Key(7));
        Assert.Equal(ChainToken.Size, token.Length);
        Assert.True(ChainToken.TryOpen(Key(1), token, out int chunk, out ChunkKey key));
        Assert.Equal((41, Key(7)), (chunk, key));
    }

    [Fact]
    public void Open_OtherRoot_Refused()
    {
        // Another namespace or salt has another root: a tenant cannot continue another tenant's chain.
        byte[] token = ChainToken.Seal(Key(1), 3, Key(7));
        Assert.False(ChainToken.TryOpen(Key(2), token, out _, out _));
    }

    [Theory]
    [InlineData(0)]
    [InlineData(5)]
    [InlineData(40)]
    [InlineData(67)]
    public void Open_AnyByteChanged_Refused(int index)
    {
        byte[] token = ChainToken.Seal(Key(1), 3, Key(7));
        token[index] ^= 0x01;
        Assert.False(ChainToken.TryOpen(Key(1), token, out _, out _));
    }

    [Fact]
    public void Open_WrongLength_Refused()
    {
        byte[] token = ChainToken.Seal(Key(1), 3, Key(7));
        Assert.False(ChainToken.TryOpen(Key(1), token.AsSpan(0, 67), out _, out _));
        Assert.False(ChainToken.TryOpen(Key(1), [.. token, 0], out _, out _));
    }
}
