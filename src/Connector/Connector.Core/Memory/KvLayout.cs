namespace Connector.Core.Memory;

/// <summary>
/// Where the K and V rows of every block lie in a layer's memory, in bytes (docs/protocol.md, Layout):
/// the row of token t, head h of block b is RowBytes at KOffset + b*StrideBlock + t*StrideToken + h*StrideHead
/// (and the same with VOffset). VOffset -1 means there is no separate V (MLA latent).
/// </summary>
public sealed record KvLayout(
    int ElementSize,
    int NumBlocks,
    int BlockTokens,
    int NumHeads,
    int RowBytes,
    long StrideBlock,
    long StrideToken,
    long StrideHead,
    long KOffset,
    long VOffset)
{
    /// <summary>Whether V has rows of its own.</summary>
    public bool HasV => VOffset >= 0;
}
