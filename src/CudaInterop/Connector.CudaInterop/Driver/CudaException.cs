namespace Connector.CudaInterop.Driver;

/// <summary>A CUDA driver call that failed: the function, the result code and the driver's own name and text for it.</summary>
public sealed class CudaException : Exception
{
    /// <summary>Creates the exception.</summary>
    public CudaException(string function, int result, string name, string description)
        : base($"{function} failed: {name} ({result}): {description}")
    {
        Function = function;
        Result = (CuResult)result;
        ErrorName = name;
        Description = description;
    }

    /// <summary>The driver entry point that failed.</summary>
    public string Function { get; }

    /// <summary>The result code.</summary>
    public CuResult Result { get; }

    /// <summary>The driver's name of the code, e.g. CUDA_ERROR_INVALID_VALUE.</summary>
    public string ErrorName { get; }

    /// <summary>The driver's description of the code.</summary>
    public string Description { get; }

    /// <summary>
    /// Whether the error poisons the CUDA context for the whole process (an illegal address or a failed launch):
    /// nothing on that device can run any more, and the sidecar must stop using it (cuda.md A.2).
    /// </summary>
    public bool IsSticky => Result is CuResult.IllegalAddress or CuResult.LaunchFailed or CuResult.MisalignedAddress;
}
