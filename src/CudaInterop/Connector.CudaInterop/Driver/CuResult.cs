namespace Connector.CudaInterop.Driver;

/// <summary>The CUDA driver's result codes that kvsidecar treats specially (cuda.h <c>CUresult</c>); any other value is passed through.</summary>
public enum CuResult
{
    Success = 0,
    InvalidValue = 1,
    OutOfMemory = 2,
    NotInitialized = 3,
    Deinitialized = 4,
    StubLibrary = 34,
    NoDevice = 100,
    InvalidDevice = 101,
    InvalidContext = 201,
    MapFailed = 205,
    AlreadyMapped = 208,
    InvalidHandle = 400,
    NotFound = 500,
    NotReady = 600,
    IllegalAddress = 700,
    PeerAccessAlreadyEnabled = 704,
    ContextIsDestroyed = 709,
    HostMemoryAlreadyRegistered = 712,
    HostMemoryNotRegistered = 713,
    MisalignedAddress = 716,
    LaunchFailed = 719,
    NotPermitted = 800,
    NotSupported = 801,
    Unknown = 999,
}
