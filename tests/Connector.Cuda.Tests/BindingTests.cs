using Xunit;
using System.Runtime.CompilerServices;
using Connector.CudaInterop.Driver;

namespace Connector.Cuda.Tests;

public sealed class BindingTests
{
    [Fact]
    public void StructSizes_MatchCudaH()
    {
        Assert.Equal(64, Unsafe.SizeOf<IpcHandle>());
        Assert.Equal(16, Unsafe.SizeOf<CuUuid>());
        Assert.Equal(8, Unsafe.SizeOf<MemLocation>());
        Assert.Equal(24, Unsafe.SizeOf<MemcpyAttributes>());
    }

    [Fact]
    public void MemcpyAttributes_FieldOffsets_MatchCudaH()
    {
        MemcpyAttributes a = default;
        ref byte start = ref Unsafe.As<MemcpyAttributes, byte>(ref a);
        Assert.Equal(0, Unsafe.ByteOffset(ref start, ref Unsafe.As<int, byte>(ref a.SrcAccessOrder)));
        Assert.Equal(4, Unsafe.ByteOffset(ref start, ref Unsafe.As<MemLocation, byte>(ref a.SrcLocHint)));
        Assert.Equal(12, Unsafe.ByteOffset(ref start, ref Unsafe.As<MemLocation, byte>(ref a.DstLocHint)));
        Assert.Equal(20, Unsafe.ByteOffset(ref start, ref Unsafe.As<uint, byte>(ref a.Flags)));
    }

    [Theory]
    [InlineData("GPU-facecda0-0000-0000-0000-000000000001", "GPU-facecda0-0000-0000-0000-000000000001")]
    [InlineData("facecda0-0000-0000-0000-000000000001", "GPU-facecda0-0000-0000-0000-000000000001")]
    [InlineData("gpu-FACECDA0-0000-0000-0000-000000000001", "GPU-facecda0-0000-0000-0000-000000000001")]
    [InlineData("facecda0000000000000000000000001", "GPU-facecda0-0000-0000-0000-000000000001")]
    [InlineData("GPU-facecda0-0000", null)]
    [InlineData("GPU-zzzzzzzz-0000-0000-0000-000000000001", null)]
    [InlineData("", null)]
    [InlineData(null, null)]
    public void DeviceUuid_Normalize_AcceptsTorchAndNvidiaSmiForms(string? input, string? expected) =>
        Assert.Equal(expected, DeviceUuid.Normalize(input));

    [Fact]
    public void IpcHandle_FromBytes_RefusesOtherLengths()
    {
        Assert.Throws<ArgumentException>(() => IpcHandle.FromBytes(new byte[63]));
        IpcHandle h = IpcHandle.FromBytes(Enumerable.Range(0, 64).Select(i => (byte)i).ToArray());
        Assert.Equal(63, h[63]);
    }

    [Fact]
    public void Probe_WithTheDouble_FindsItsDeviceByUuid()
    {
        string library = DriverDouble.Use();
        CudaAvailability found = CudaProbe.Probe(library);
        Assert.True(found.Available, found.Reason);
        Assert.Equal(13000, found.DriverVersion);
        Assert.Equal("GPU-facecda0-0000-0000-0000-000000000000", Assert.Single(found.Devices).Uuid);
        Assert.Contains("CUDA 13.0", found.ToString(), StringComparison.Ordinal);
    }

    [Fact]
    public void Error_CarriesTheDriversNameAndText()
    {
        DriverDouble.Use();
        CudaDriver.Initialize();
        CudaException ex = CudaDriver.Error(400, "cuIpcOpenMemHandle_v2");
        Assert.Equal(CuResult.InvalidHandle, ex.Result);
        Assert.Equal("CUDA_ERROR_INVALID_HANDLE", ex.ErrorName);
        Assert.StartsWith("cuIpcOpenMemHandle_v2 failed: CUDA_ERROR_INVALID_HANDLE (400)", ex.Message, StringComparison.Ordinal);
        Assert.True(CudaDriver.Error(700, "x").IsSticky);
        Assert.Equal("CUresult 12345", CudaDriver.Error(12345, "x").ErrorName);
    }

    [Fact]
    public void BatchCopy_ResolvesTheAbiOfTheDriversVersion()
    {
        DriverDouble.Use();
        CudaDriver.Initialize();
        Assert.Equal("13.0", BatchCopy.Resolve().Mode);
        Assert.Equal("none", BatchCopy.Resolve(allowBatch: false).Mode);
        DriverDouble.SetBatchAvailable(false);
        Assert.Equal("none", BatchCopy.Resolve().Mode);
        DriverDouble.Reset();
    }
}
