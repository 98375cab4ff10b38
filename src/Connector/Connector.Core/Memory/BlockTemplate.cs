namespace Connector.Core.Memory;

/// <summary>A contiguous byte range of one block, relative to the block's start (b * StrideBlock).</summary>
/// <param name="Offset">Bytes from the block's start.</param>
/// <param name="Length">Bytes in the run.</param>
/// <param name="FirstRow">Index into <see cref="BlockTemplate.Rows"/> of the run's first row.</param>
/// <param name="RowCount">Rows in the run, back to back in address order.</param>
public readonly record struct ByteRun(long Offset, long Length, int FirstRow, int RowCount);

/// <summary>The identity of one row: K (0) or V (1), token in block, head.</summary>
public readonly record struct RowId(byte Plane, int Token, int Head);

/// <summary>
/// The byte runs that make up one block of a layer, derived from its <see cref="KvLayout"/>: the rows of
/// K and V over every token and head, sorted by address and merged where adjacent. Common vLLM layouts
/// collapse to one run (blocks-first, packed K/V, MLA) or two (kv-first: K and V).
/// </summary>
public sealed class BlockTemplate
{
    /// <summary>Most rows a block may have (planes x tokens x heads); real models have a few hundred.</summary>
    public const int MaxRows = 1 << 16;

    private BlockTemplate(KvLayout layout, ByteRun[] runs, RowId[] rows)
    {
        Layout = layout;
        Runs = runs;
        Rows = rows;
        BytesPerBlock = runs.Sum(r => r.Length);
    }

    /// <summary>The layout the template was derived from.</summary>
    public KvLayout Layout { get; }

    /// <summary>The runs of one block in ascending address order.</summary>
    public IReadOnlyList<ByteRun> Runs { get; }

    /// <summary>Every row of a block in address order; runs index into it.</summary>
    public IReadOnlyList<RowId> Rows { get; }

    /// <summary>Bytes of one block (the sum of its runs).</summary>
    public long BytesPerBlock { get; }

    /// <summary>Derives and validates the template of a layer.</summary>
    /// <param name="layout">The layer's layout descriptor.</param>
    /// <param name="regionLength">Bytes of the layer's registered memory.</param>
    /// <param name="layerName">The layer's name, for messages.</param>
    /// <exception cref="LayoutException">The layout is inconsistent, overlaps itself or does not fit the region.</exception>
    public static BlockTemplate Create(KvLayout layout, long regionLength, string layerName)
    {
        ArgumentNullException.ThrowIfNull(layout);
        if (layout.ElementSize <= 0 || layout.NumBlocks <= 0 || layout.BlockTokens <= 0 || layout.NumHeads <= 0 || layout.RowBytes <= 0)
        {
            throw new LayoutException(layerName, $"element size, blocks, tokens per block, heads and row bytes must be positive (got {layout.ElementSize}, {layout.NumBlocks}, {layout.BlockTokens}, {layout.NumHeads}, {layout.RowBytes})");
        }

        if (layout.RowBytes % layout.ElementSize != 0)
        {
            throw new LayoutException(layerName, $"row bytes {layout.RowBytes} is not a multiple of the element size {layout.ElementSize}");
        }

        if (layout.StrideBlock < 0 || layout.StrideToken < 0 || layout.StrideHead < 0 || layout.KOffset < 0 || layout.VOffset < -1)
        {
            throw new LayoutException(layerName, "strides and offsets must be non-negative (v_offset may be -1 for no V)");
        }

        int planes = layout.HasV ? 2 : 1;
        long rowCount = (long)planes * layout.BlockTokens * layout.NumHeads;
        if (rowCount > MaxRows)
        {
            throw new LayoutException(layerName, $"{rowCount} rows per block is more than {MaxRows}");
        }

        if (regionLength <= 0)
        {
            throw new LayoutException(layerName, $"the region is {regionLength} bytes");
        }

        // Every offset is computed in 128 bits: hostile strides must fail the bounds check, never wrap.
        var rows = new (Int128 Offset, RowId Id)[rowCount];
        int n = 0;
        for (int p = 0; p < planes; p++)
        {
            Int128 plane = p == 0 ? layout.KOffset : layout.VOffset;
            for (int t = 0; t < layout.BlockTokens; t++)
            {
                for (int h = 0; h < layout.NumHeads; h++)
                {
                    rows[n++] = (plane + ((Int128)t * layout.StrideToken) + ((Int128)h * layout.StrideHead), new RowId((byte)p, t, h));
                }
            }
        }

        Array.Sort(rows, (a, b) => a.Offset.CompareTo(b.Offset));
        Int128 lastBlockStart = (Int128)(layout.NumBlocks - 1) * layout.StrideBlock;
        Int128 end = lastBlockStart + rows[^1].Offset + layout.RowBytes;
        if (end > regionLength)
        {
            throw new LayoutException(layerName, $"the last block ends at byte {end}, beyond the region's {regionLength} bytes");
        }

        var runs = new List<ByteRun>();
        long runStart = (long)rows[0].Offset;
        long runEnd = runStart + layout.RowBytes;
        int runFirst = 0;
        for (int i = 1; i < rows.Length; i++)
        {
            long offset = (long)rows[i].Offset;
            if (offset < runEnd)
            {
                throw new LayoutException(layerName, $"rows overlap at byte {offset} of a block (a stride is smaller than the row)");
            }

            if (offset != runEnd)
            {
                runs.Add(new ByteRun(runStart, runEnd - runStart, runFirst, i - runFirst));
                runStart = offset;
                runFirst = i;
            }

            runEnd = offset + layout.RowBytes;
        }

        runs.Add(new ByteRun(runStart, runEnd - runStart, runFirst, rows.Length - runFirst));
        ByteRun[] runArray = [.. runs];
        CheckBlocksDisjoint(layout, runArray, layerName);
        return new BlockTemplate(layout, runArray, rows.Select(r => r.Id).ToArray());
    }

    /// <summary>Rejects layouts where a run of one block overlaps a run of another block.</summary>
    private static void CheckBlocksDisjoint(KvLayout layout, ByteRun[] runs, string layerName)
    {
        if (layout.NumBlocks == 1)
        {
            return;
        }

        if (layout.StrideBlock == 0)
        {
            throw new LayoutException(layerName, "stride_block is 0 but there are several blocks");
        }

        // Run r2 of block b+d overlaps run r1 of block b iff r2.Offset + d*S lies in (r1.Offset - r2.Length, r1.Offset + r1.Length).
        const int MaxPairsChecked = 256;
        if (runs.Length > MaxPairsChecked)
        {
            return;
        }

        long s = layout.StrideBlock;
        foreach (ByteRun r1 in runs)
        {
            foreach (ByteRun r2 in runs)
            {
                Int128 low = (Int128)r1.Offset - r2.Length - r2.Offset;   // d*S must be > low
                Int128 high = (Int128)r1.Offset + r1.Length - r2.Offset; // d*S must be < high
                Int128 dMin = Int128.Max(1, FloorDiv(low, s) + 1);
                Int128 dMax = Int128.Min(layout.NumBlocks - 1, CeilDiv(high, s) - 1);
                if (dMin <= dMax)
                {
                    throw new LayoutException(layerName, $"blocks overlap: stride_block {s} is smaller than what one block occupies");
                }
            }
        }
    }

    private static Int128 FloorDiv(Int128 a, long b) => a >= 0 ? a / b : -((-a + b - 1) / b);

    private static Int128 CeilDiv(Int128 a, long b) => a >= 0 ? (a + b - 1) / b : -(-a / b);
}
