using Connector.Core.Memory;

namespace Connector.Core.Tests.Memory;

/// <summary>vLLM's KV layouts over the eras (engines.md 3.1), small: 8 blocks, 4 tokens, 2 heads, 8-element bf16 rows.</summary>
internal static class LayoutCases
{
    public const int B = 8;
    public const int N = 4;
    public const int H = 2;
    public const int D = 8;
    public const int E = 2;
    public const int Row = D * E;

    /// <summary>(2, B, N, H, D): K of every block, then V of every block.</summary>
    public static KvLayout KvFirst => new(E, B, N, H, Row, N * H * Row, H * Row, Row, 0, (long)B * N * H * Row);

    /// <summary>(B, 2, N, H, D): per block K then V.</summary>
    public static KvLayout BlocksFirst => new(E, B, N, H, Row, 2 * N * H * Row, H * Row, Row, 0, N * H * Row);

    /// <summary>(B, 2, H, N, D): the HND permutation of blocks-first.</summary>
    public static KvLayout BlocksFirstHnd => new(E, B, N, H, Row, 2 * N * H * Row, Row, N * Row, 0, N * H * Row);

    /// <summary>(B, H, N, 2D): K and V packed in the content dimension.</summary>
    public static KvLayout PackedKv => new(E, B, N, H, Row, H * N * 2 * Row, 2 * Row, N * 2 * Row, 0, Row);

    /// <summary>(B, N, 576)-style MLA latent: one plane, no V.</summary>
    public static KvLayout Mla => new(E, B, N, 1, 72 * E, N * 72 * E, 72 * E, 0, 0, -1);

    /// <summary>Bytes a layout needs.</summary>
    public static long RegionBytes(KvLayout l) => l == KvFirst ? 2L * B * N * H * Row : (long)B * l.StrideBlock;

    public static IEnumerable<(string Name, KvLayout Layout, int ExpectedRuns)> All()
    {
        yield return ("kv-first", KvFirst, 2);
        yield return ("blocks-first", BlocksFirst, 1);
        yield return ("blocks-first-hnd", BlocksFirstHnd, 1);
        yield return ("packed-kv", PackedKv, 1);
        yield return ("mla", Mla, 1);
    }
}
