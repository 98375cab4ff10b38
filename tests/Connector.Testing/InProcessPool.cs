using System.Runtime.InteropServices;
using Connector.Core.Caching;
using Connector.Core.Memory;

namespace Connector.Testing;

/// <summary>
/// A KV pool in this process's own native memory, registered through the real host data plane
/// (process_vm_readv/writev on our own pid): blocks-first layers of 16-token blocks, 2 heads, 64-byte rows.
/// </summary>
public sealed unsafe class InProcessPool : IDisposable
{
    public const int BlockTokens = 16;
    public const int Heads = 2;
    public const int RowBytes = 64;
    public const int BlockBytes = 2 * BlockTokens * Heads * RowBytes;

    private readonly byte*[] _layers;

    public InProcessPool(int layers, int blocks)
    {
        Blocks = blocks;
        _layers = new byte*[layers];
        for (int l = 0; l < layers; l++)
        {
            _layers[l] = (byte*)NativeMemory.AlignedAlloc((nuint)(blocks * BlockBytes), 4096);
            Layer(l).Clear();
        }
    }

    public int Blocks { get; }

    public int LayerCount => _layers.Length;

    public Span<byte> Layer(int l) => new(_layers[l], Blocks * BlockBytes);

    public Span<byte> Block(int layer, int block) => Layer(layer).Slice(block * BlockBytes, BlockBytes);

    /// <summary>Fills every block with bytes that depend on the seed, layer, block and offset.</summary>
    public void Fill(int seed)
    {
        for (int l = 0; l < _layers.Length; l++)
        {
            Span<byte> s = Layer(l);
            for (int i = 0; i < s.Length; i++)
            {
                s[i] = (byte)((seed * 131) + (l * 31) + (i * 7) + (i >> 12));
            }
        }
    }

    public void Zero()
    {
        for (int l = 0; l < _layers.Length; l++)
        {
            Layer(l).Clear();
        }
    }

    /// <summary>The pool's layers as a registration names them; <paramref name="pid"/> overrides the owning pid (default: this process).</summary>
    public IReadOnlyList<LayerSpec> Layers(int? numBlocksOverride = null, int? pid = null)
    {
        var specs = new List<LayerSpec>(_layers.Length);
        for (int i = 0; i < _layers.Length; i++)
        {
            specs.Add(new LayerSpec(
                $"layers.{i}",
                new EngineMemoryRef(EngineMemoryKind.HostProcess, pid ?? Environment.ProcessId, (ulong)_layers[i], (ulong)(Blocks * BlockBytes), null, null, 0),
                new KvLayout(2, numBlocksOverride ?? Blocks, BlockTokens, Heads, RowBytes, BlockBytes, Heads * RowBytes, RowBytes, 0, BlockTokens * Heads * RowBytes)));
        }

        return specs;
    }

    public void Dispose()
    {
        for (int i = 0; i < _layers.Length; i++)
        {
            NativeMemory.AlignedFree(_layers[i]);
        }
    }
}
