using MessagePack;

namespace Connector.Protocol.Messages;

/// <summary>HELLO: the first request on a connection.</summary>
[MessagePackObject]
public sealed class HelloRequest
{
    /// <summary>The protocol version the client speaks.</summary>
    [Key(0)] public int ProtocolVersion { get; set; }

    /// <summary>"vllm", "sglang", "test", ...</summary>
    [Key(1)] public string? EngineKind { get; set; }

    /// <summary>The engine's version string.</summary>
    [Key(2)] public string? EngineVersion { get; set; }

    /// <summary>The engine instance (vLLM's engine_id); shared by its scheduler and workers.</summary>
    [Key(3)] public string? InstanceId { get; set; }

    /// <summary>"scheduler", "worker" or "client".</summary>
    [Key(4)] public string? Role { get; set; }

    /// <summary>The worker's tensor-parallel rank; 0 for the scheduler.</summary>
    [Key(5)] public int Rank { get; set; }

    /// <summary>Capabilities the client offers.</summary>
    [Key(6)] public string[]? Capabilities { get; set; }

    /// <summary>The client's process id.</summary>
    [Key(7)] public int Pid { get; set; }
}

/// <summary>The reply to HELLO.</summary>
[MessagePackObject]
public sealed class HelloReply
{
    /// <summary>The protocol version the server speaks.</summary>
    [Key(0)] public int ProtocolVersion { get; set; }

    /// <summary>The server's build version.</summary>
    [Key(1)] public string? ServerVersion { get; set; }

    /// <summary>"host-memory", and "cuda-ipc" where a GPU data plane exists.</summary>
    [Key(2)] public string[]? Capabilities { get; set; }

    /// <summary>Largest frame body the server accepts, in bytes.</summary>
    [Key(3)] public int MaxFrameBytes { get; set; }

    /// <summary>The server's id for this connection.</summary>
    [Key(4)] public ulong SessionId { get; set; }

    /// <summary>The sidecar's process id, for prctl(PR_SET_PTRACER, pid).</summary>
    [Key(5)] public int ServerPid { get; set; }
}

/// <summary>PING and its reply: an optional nonce echoed back.</summary>
[MessagePackObject]
public sealed class PingMessage
{
    /// <summary>Any value; the reply carries the same.</summary>
    [Key(0)] public ulong Nonce { get; set; }
}

/// <summary>The body of an error reply.</summary>
[MessagePackObject]
public sealed class ErrorBody
{
    /// <summary>An <see cref="Framing.ErrorCode"/> value.</summary>
    [Key(0)] public int Code { get; set; }

    /// <summary>What went wrong and, where possible, what to change.</summary>
    [Key(1)] public string? Message { get; set; }
}
