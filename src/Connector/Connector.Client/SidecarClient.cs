using System.Buffers;
using System.Collections.Concurrent;
using System.Net.Sockets;
using Connector.Protocol;
using Connector.Protocol.Framing;
using Connector.Protocol.Messages;

namespace Connector.Client;

/// <summary>
/// A client of the sidecar's Unix socket protocol: one connection, any number of requests in flight,
/// replies matched by request id on a dedicated reader thread.
/// </summary>
/// <remarks>Thread-safe. Used by the tests, the benchmarks and the demo; engines use the Python shim.</remarks>
public sealed class SidecarClient : IDisposable
{
    private readonly Socket _socket;
    private readonly Lock _sendLock = new();
    private readonly FrameWriter _frameWriter = new();
    private readonly ArrayBufferWriter<byte> _sendBuffer = new(4096);
    private readonly ConcurrentDictionary<ulong, TaskCompletionSource<Reply>> _pending = new();
    private readonly Thread? _readerThread;
    private byte[] _syncBuffer = new byte[64 * 1024];
    private int _syncStart;
    private int _syncEnd;
    private ulong _nextRequestId;
    private volatile Exception? _failure;

    private SidecarClient(Socket socket, bool multiplexed)
    {
        _socket = socket;
        if (multiplexed)
        {
            _readerThread = new Thread(ReadLoop) { IsBackground = true, Name = "kvsidecar-client-reader" };
            _readerThread.Start();
        }
    }

    /// <summary>The HELLO reply of the connection.</summary>
    public HelloReply Server { get; private set; } = new();

    /// <summary>Connects and sends HELLO.</summary>
    /// <param name="socketPath">The sidecar's socket path.</param>
    /// <param name="instanceId">The engine instance this client belongs to.</param>
    /// <param name="role">"scheduler", "worker" or "client".</param>
    /// <param name="rank">The tensor-parallel rank.</param>
    /// <param name="multiplexed">True: a reader thread matches replies, any number of calls may be in flight.
    /// False: each <see cref="Call{TReply}"/> sends and then reads its reply on the calling thread (the lowest latency; one call at a time).</param>
    public static SidecarClient Connect(string socketPath, string instanceId, string role = "client", int rank = 0, bool multiplexed = true)
    {
        var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        try
        {
            socket.Connect(new UnixDomainSocketEndPoint(socketPath));
        }
        catch
        {
            socket.Dispose();
            throw;
        }

        return Adopt(socket, instanceId, role, rank, multiplexed);
    }

    /// <summary>Takes over a socket already connected to the sidecar (for example one another process connected and passed on) and sends HELLO.</summary>
    /// <remarks>The sidecar binds the connection to the process that called connect(), not to this one.</remarks>
    /// <param name="socket">The connected socket; the client owns it from now on.</param>
    /// <param name="instanceId">The engine instance this client belongs to.</param>
    /// <param name="role">"scheduler", "worker" or "client".</param>
    /// <param name="rank">The tensor-parallel rank.</param>
    /// <param name="multiplexed">See <see cref="Connect(string, string, string, int, bool)"/>.</param>
    public static SidecarClient Adopt(Socket socket, string instanceId, string role = "client", int rank = 0, bool multiplexed = true)
    {
        ArgumentNullException.ThrowIfNull(socket);
        var client = new SidecarClient(socket, multiplexed);
        client.Server = client.Call<HelloReply>(Opcode.Hello, new HelloRequest
        {
            ProtocolVersion = FrameHeader.CurrentVersion,
            EngineKind = "test",
            EngineVersion = "1",
            InstanceId = instanceId,
            Role = role,
            Rank = rank,
            Capabilities = [],
            Pid = Environment.ProcessId,
        });
        return client;
    }

    /// <summary>Sends a request and waits for its reply.</summary>
    /// <exception cref="SidecarErrorException">The sidecar answered with an error frame.</exception>
    public TReply Call<TReply>(Opcode opcode, object? request, TimeSpan? timeout = null)
    {
        if (_readerThread is not null)
        {
            return CallAsync<TReply>(opcode, request).WaitAsync(timeout ?? TimeSpan.FromSeconds(30)).GetAwaiter().GetResult();
        }

        lock (_sendLock)
        {
            ulong id = ++_nextRequestId;
            _sendBuffer.ResetWrittenCount();
            _frameWriter.WriteRequest(_sendBuffer, opcode, id, request);
            _socket.Send(_sendBuffer.WrittenSpan);
            while (true)
            {
                // One receive usually brings the whole reply: the same system calls as a Redis client's PING.
                FrameHeader h;
                ReadOnlyMemory<byte> body;
                while (!TryTakeFrame(out h, out body))
                {
                    if (_syncEnd == _syncBuffer.Length)
                    {
                        Array.Resize(ref _syncBuffer, _syncBuffer.Length * 2);
                    }

                    int n = _socket.Receive(_syncBuffer, _syncEnd, _syncBuffer.Length - _syncEnd, SocketFlags.None);
                    if (n == 0)
                    {
                        throw new IOException("the sidecar closed the connection");
                    }

                    _syncEnd += n;
                }

                if (h.RequestId != id)
                {
                    continue;
                }

                return Decode<TReply>(new Reply(h, body, (h.Flags & FrameFlags.Error) != 0 ? DecodeError(body.ToArray()) : null));
            }
        }
    }

    private bool TryTakeFrame(out FrameHeader header, out ReadOnlyMemory<byte> body)
    {
        body = default;
        var sequence = new ReadOnlySequence<byte>(_syncBuffer, _syncStart, _syncEnd - _syncStart);
        switch (FrameReader.TryReadFrame(ref sequence, int.MaxValue, out header, out ReadOnlySequence<byte> b))
        {
            case FrameReadResult.Done:
                // Copied out: the buffer is reused by the next receive.
                body = b.ToArray();
                _syncStart = _syncEnd - (int)sequence.Length;
                if (_syncStart == _syncEnd)
                {
                    _syncStart = _syncEnd = 0;
                }

                return true;
            case FrameReadResult.NeedMoreData:
                if (_syncStart > 0)
                {
                    Buffer.BlockCopy(_syncBuffer, _syncStart, _syncBuffer, 0, _syncEnd - _syncStart);
                    _syncEnd -= _syncStart;
                    _syncStart = 0;
                }

                return false;
            default:
                throw new IOException("the sidecar sent a malformed frame header");
        }
    }

    private static (ErrorCode Code, string Message) DecodeError(byte[] body)
    {
        ErrorBody e = ProtocolSerializer.Deserialize<ErrorBody>(new ReadOnlySequence<byte>(body));
        return ((ErrorCode)e.Code, e.Message ?? string.Empty);
    }

    private static TReply Decode<TReply>(Reply reply)
    {
        if (reply.Error is not null)
        {
            throw new SidecarErrorException(reply.Error.Value.Code, reply.Error.Value.Message);
        }

        return reply.Body.IsEmpty && typeof(TReply) == typeof(PingMessage)
            ? (TReply)(object)new PingMessage()
            : ProtocolSerializer.Deserialize<TReply>(new ReadOnlySequence<byte>(reply.Body));
    }

    /// <summary>Sends a request; the task completes with its reply.</summary>
    public async Task<TReply> CallAsync<TReply>(Opcode opcode, object? request)
    {
        Reply reply = await SendAsync(opcode, request).ConfigureAwait(false);
        return Decode<TReply>(reply);
    }

    /// <summary>Sends raw bytes (for tests of malformed input).</summary>
    public void SendRaw(ReadOnlySpan<byte> bytes)
    {
        lock (_sendLock)
        {
            _socket.Send(bytes);
        }
    }

    /// <summary>Registers a reply slot for a request id sent with <see cref="SendRaw"/>.</summary>
    public Task<Reply> Expect(ulong requestId)
    {
        var tcs = new TaskCompletionSource<Reply>(TaskCreationOptions.RunContinuationsAsynchronously);
        _pending[requestId] = tcs;
        return tcs.Task;
    }

    /// <inheritdoc/>
    public void Dispose()
    {
        try
        {
            _socket.Shutdown(SocketShutdown.Both);
        }
        catch (SocketException)
        {
            // Already gone.
        }

        _socket.Dispose();
        _readerThread?.Join(TimeSpan.FromSeconds(5));
    }

    private Task<Reply> SendAsync(Opcode opcode, object? request)
    {
        if (_readerThread is null)
        {
            throw new InvalidOperationException("this client was connected with multiplexed: false; use Call");
        }

        if (_failure is not null)
        {
            return Task.FromException<Reply>(new IOException("the connection to the sidecar is closed", _failure));
        }

        ulong id = Interlocked.Increment(ref _nextRequestId) + (1UL << 32);
        var tcs = new TaskCompletionSource<Reply>(TaskCreationOptions.RunContinuationsAsynchronously);
        _pending[id] = tcs;
        lock (_sendLock)
        {
            _sendBuffer.ResetWrittenCount();
            _frameWriter.WriteRequest(_sendBuffer, opcode, id, request);
            _socket.Send(_sendBuffer.WrittenSpan);
        }

        return tcs.Task;
    }

    private void ReadLoop()
    {
        byte[] header = new byte[FrameHeader.Size];
        try
        {
            while (true)
            {
                if (!ReadExactly(header))
                {
                    throw new IOException("the sidecar closed the connection");
                }

                if (FrameHeader.TryRead(header, out FrameHeader h) != OperationStatus.Done)
                {
                    throw new IOException("the sidecar sent a malformed frame header");
                }

                byte[] body = h.BodyLength == 0 ? [] : new byte[h.BodyLength];
                if (!ReadExactly(body))
                {
                    throw new IOException("the sidecar closed the connection mid-frame");
                }

                (ErrorCode Code, string Message)? error = (h.Flags & FrameFlags.Error) != 0 ? DecodeError(body) : null;

                if (_pending.TryRemove(h.RequestId, out TaskCompletionSource<Reply>? tcs))
                {
                    tcs.TrySetResult(new Reply(h, body, error));
                }
            }
        }
        catch (Exception ex) when (ex is IOException or SocketException or ObjectDisposedException or ProtocolException)
        {
            _failure = ex;
            foreach (ulong id in _pending.Keys)
            {
                if (_pending.TryRemove(id, out TaskCompletionSource<Reply>? tcs))
                {
                    tcs.TrySetException(new IOException("the connection to the sidecar is closed", ex));
                }
            }
        }
    }

    private bool ReadExactly(Span<byte> buffer)
    {
        while (!buffer.IsEmpty)
        {
            int n = _socket.Receive(buffer);
            if (n == 0)
            {
                return false;
            }

            buffer = buffer[n..];
        }

        return true;
    }

    /// <summary>One reply frame.</summary>
    public readonly record struct Reply(FrameHeader Header, ReadOnlyMemory<byte> Body, (ErrorCode Code, string Message)? Error);
}

/// <summary>An error frame from the sidecar.</summary>
public sealed class SidecarErrorException : Exception
{
    /// <summary>Creates the exception.</summary>
    public SidecarErrorException(ErrorCode code, string message)
        : base($"{code}: {message}") => Code = code;

    /// <summary>The error code of the frame.</summary>
    public ErrorCode Code { get; }
}
