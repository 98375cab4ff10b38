using System.Buffers;
using System.Collections.Concurrent;
using System.Net.Sockets;
using Connector.Core.Caching;
using Connector.Core.Platform;
using Connector.Protocol.Framing;
using Microsoft.Extensions.Logging;

namespace Connector.Server;

/// <summary>
/// One engine connection: a reader thread with blocking receives that answers quick requests inline, STORE
/// and LOAD copies on the shared <see cref="CopyThreads"/>, and their replies sent by a writer thread of the
/// connection, out of order, by id.
/// </summary>
/// <remarks>
/// A sidecar serves a handful of long-lived connections (a scheduler and a worker per rank per engine), so a
/// thread per connection costs little and saves the two thread hops an async loop pays on every request:
/// the LOOKUP round trip is what the scheduler waits for. What a connection can cost the daemon is bounded:
/// HELLO within <see cref="SidecarOptions.HelloTimeout"/>, replies read within
/// <see cref="SidecarOptions.SendTimeout"/> and at most <see cref="SidecarOptions.MaxOutboundBytesPerConnection"/>
/// queued, copies and copy bytes in flight capped, and any exception ends this connection only.
/// </remarks>
internal sealed class SidecarConnection : IDisposable
{
    private const int InitialBufferBytes = 64 * 1024;

    /// <summary>A receive buffer grown above this for a large frame is given back once it is empty.</summary>
    private const int RetainedBufferBytes = 1 << 20;

    private readonly Socket _socket;
    private readonly Lock _sendLock = new();
    private readonly ArrayBufferWriter<byte> _inlineReply = new(4096);
    private readonly FrameWriter _frameWriter = new();
    private readonly SemaphoreSlim _copySlots;
    private readonly CountdownEvent _inFlight = new(1);
    private readonly object _bytesLock = new();
    private readonly CancellationTokenSource _closed = new();
    private readonly ConcurrentQueue<byte[]> _outbound = new();
    private readonly SemaphoreSlim _outboundReady = new(0);
    private readonly CopyThreads _copyThreads;
    private readonly ServerCounters _counters;
    private readonly SidecarOptions _options;
    private readonly ILogger _logger;
    private readonly RequestHandler _handler;
    private long _inFlightBytes;
    private long _outboundBytes;
    private Thread? _writer;
    private int _dropped;
    private volatile bool _closing;
    private volatile bool _disposed;
    private volatile bool _draining;

    public SidecarConnection(long sessionId, Socket socket, ProcessIdentity peer, KvCacheService cache, InstanceClaims claims, CopyThreads copyThreads, ServerCounters counters, SidecarOptions options, ILogger logger)
    {
        SessionId = sessionId;
        _socket = socket;
        _copyThreads = copyThreads;
        _counters = counters;
        _options = options;
        _logger = logger;
        _copySlots = new SemaphoreSlim(options.MaxInFlightPerConnection, options.MaxInFlightPerConnection);
        _handler = new RequestHandler(sessionId, peer, cache, claims, counters, options, logger);
        _socket.SendTimeout = (int)Math.Clamp(options.SendTimeout.TotalMilliseconds, 1, int.MaxValue);
    }

    public long SessionId { get; }

    /// <summary>The connecting process.</summary>
    public ProcessIdentity Peer => _handler.Peer;

    /// <summary>STORE and LOAD copies running now.</summary>
    public int InFlight => Math.Max(0, _inFlight.CurrentCount - 1);

    /// <summary>Serves the connection until the peer closes it, the stream breaks, it is dropped, or the server stops; then waits for in-flight copies.</summary>
    public void Run()
    {
        _counters.Opened();
        SidecarLog.ConnectionOpened(_logger, SessionId);
        try
        {
            ReadLoop();
        }
        catch (Exception ex) when (ex is SocketException or ObjectDisposedException or IOException)
        {
            // The peer went away, was dropped, or we are stopping.
        }
        catch (Exception ex)
        {
            // A bug must cost this connection, never the daemon.
            SidecarLog.ConnectionFailed(_logger, ex, SessionId, _handler.Peer.ToString());
            Drop("an unexpected failure");
        }
        finally
        {
            _closing = true;
            if (!_draining)
            {
                // Nobody will read the replies: running copies stop at their next chunk.
                _closed.Cancel();
            }

            _inFlight.Signal();
            _inFlight.Wait(_options.ShutdownTimeout);
            _outboundReady.Release();
            _writer?.Join(_options.SendTimeout);
            _socket.Dispose();
            _handler.Dispose();
            _counters.Closed();
            SidecarLog.ConnectionClosed(_logger, SessionId, _handler.Role, _handler.InstanceId, _handler.Rank);
        }
    }

    /// <summary>Stops reading new requests; <see cref="Run"/> then lets in-flight copies finish and closes.</summary>
    public void Stop()
    {
        _draining = true;
        _closing = true;
        try
        {
            _socket.Shutdown(SocketShutdown.Receive);
        }
        catch (Exception ex) when (ex is SocketException or ObjectDisposedException)
        {
            // Already closed.
        }
    }

    public void Dispose()
    {
        _disposed = true;
        _socket.Dispose();
        _copySlots.Dispose();
        _inFlight.Dispose();
        _closed.Dispose();
        _outboundReady.Dispose();
    }

    private void ReadLoop()
    {
        byte[] buffer = ArrayPool<byte>.Shared.Rent(InitialBufferBytes);
        int start = 0, end = 0;
        long helloDeadline = MonotonicClock.NowNs + (long)_options.HelloTimeout.TotalNanoseconds;
        bool helloTimerOn = true;
        try
        {
            while (!_closing)
            {
                if (helloTimerOn && !ArmHelloTimeout(helloDeadline, ref helloTimerOn))
                {
                    return;
                }

                if (end == buffer.Length)
                {
                    // Make room: slide the partial frame to the front, or grow for a large frame.
                    int pending = end - start;
                    byte[] target = pending > buffer.Length / 2 ? ArrayPool<byte>.Shared.Rent((int)Math.Min(2L * buffer.Length, SidecarOptions.MaxFrameBytesLimit + (2L * FrameHeader.Size))) : buffer;
                    Buffer.BlockCopy(buffer, start, target, 0, pending);
                    if (!ReferenceEquals(target, buffer))
                    {
                        ArrayPool<byte>.Shared.Return(buffer);
                        buffer = target;
                    }

                    start = 0;
                    end = pending;
                }

                int read;
                try
                {
                    read = _socket.Receive(buffer, end, buffer.Length - end, SocketFlags.None);
                }
                catch (SocketException ex) when (ex.SocketErrorCode is SocketError.TimedOut or SocketError.WouldBlock && !_handler.IsReady)
                {
                    Drop($"no HELLO within {_options.HelloTimeout.TotalSeconds:0.###} s");
                    return;
                }

                if (read == 0)
                {
                    return;
                }

                end += read;
                var sequence = new ReadOnlySequence<byte>(buffer, start, end - start);
                while (true)
                {
                    FrameReadResult status = FrameReader.TryReadFrame(ref sequence, _options.MaxFrameBytes, out FrameHeader header, out ReadOnlySequence<byte> body);
                    if (status == FrameReadResult.Done)
                    {
                        Dispatch(header, body);
                        continue;
                    }

                    if (status == FrameReadResult.NeedMoreData)
                    {
                        start = end - (int)sequence.Length;
                        if (start == end)
                        {
                            start = end = 0;
                            if (buffer.Length > RetainedBufferBytes)
                            {
                                ArrayPool<byte>.Shared.Return(buffer);
                                buffer = ArrayPool<byte>.Shared.Rent(InitialBufferBytes);
                            }
                        }

                        EnsureRoom(ref buffer, ref start, ref end, header, sequence);
                        break;
                    }

                    if (status == FrameReadResult.TooLarge)
                    {
                        FailStream(ErrorCode.FrameTooLarge, header.Opcode, header.RequestId, $"frame body of {header.BodyLength} bytes exceeds the limit of {_options.MaxFrameBytes}");
                    }
                    else
                    {
                        FailStream(ErrorCode.BadFrame, Opcode.Hello, 0, "malformed frame header (magic, reserved bits or flags)");
                    }

                    return;
                }
            }
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(buffer);
        }
    }

    /// <summary>Until HELLO, every receive waits at most until the HELLO deadline; after it, receives wait as long as needed.</summary>
    /// <returns>False when the deadline has passed (the connection was dropped).</returns>
    private bool ArmHelloTimeout(long deadlineNs, ref bool armed)
    {
        if (_handler.IsReady)
        {
            _socket.ReceiveTimeout = 0;
            armed = false;
            return true;
        }

        long leftMs = (deadlineNs - MonotonicClock.NowNs) / 1_000_000;
        if (leftMs <= 0)
        {
            Drop($"no HELLO within {_options.HelloTimeout.TotalSeconds:0.###} s");
            return false;
        }

        _socket.ReceiveTimeout = (int)Math.Min(leftMs, int.MaxValue);
        return true;
    }

    /// <summary>Grows the buffer when a frame whose header is already known will not fit.</summary>
    private static void EnsureRoom(ref byte[] buffer, ref int start, ref int end, in FrameHeader header, in ReadOnlySequence<byte> pending)
    {
        if (pending.Length < FrameHeader.Size)
        {
            return;
        }

        // The body length was checked against MaxFrameBytes (at most 1 GiB), so this fits an int.
        long needed = FrameHeader.Size + (long)header.BodyLength;
        if (needed <= buffer.Length - start)
        {
            return;
        }

        byte[] bigger = ArrayPool<byte>.Shared.Rent((int)Math.Max(needed, buffer.Length));
        Buffer.BlockCopy(buffer, start, bigger, 0, end - start);
        ArrayPool<byte>.Shared.Return(buffer);
        buffer = bigger;
        end -= start;
        start = 0;
    }

    private void Dispatch(FrameHeader header, in ReadOnlySequence<byte> body)
    {
        if (header.Version != FrameHeader.CurrentVersion)
        {
            WriteError(header.Opcode, header.RequestId, ErrorCode.UnsupportedVersion, $"frame version {header.Version} is not supported; this sidecar speaks version {FrameHeader.CurrentVersion}");
            return;
        }

        if (RequestHandler.IsCopy(header.Opcode) && _handler.IsReady)
        {
            StartCopy(header, body);
            return;
        }

        object reply;
        try
        {
            reply = _handler.Handle(header.Opcode, body);
        }
        catch (Exception ex) when (RequestHandler.TryMapError(ex, out ErrorCode code, out string message))
        {
            WriteError(header.Opcode, header.RequestId, code, message);
            return;
        }
        catch (Exception ex)
        {
            SidecarLog.HandlerFailed(_logger, ex, SessionId, header.RequestId, header.Opcode.ToString());
            WriteError(header.Opcode, header.RequestId, ErrorCode.Internal, ex.Message);
            return;
        }

        lock (_sendLock)
        {
            _inlineReply.ResetWrittenCount();
            _frameWriter.WriteReply(_inlineReply, header.Opcode, header.RequestId, reply);
            SendLocked(_inlineReply.WrittenSpan);
            if (_inlineReply.Capacity > 1 << 20)
            {
                _inlineReply.Clear();
            }
        }
    }

    private void StartCopy(FrameHeader header, in ReadOnlySequence<byte> body)
    {
        CopyJob job;
        try
        {
            // Decoded here: the job owns its arrays, the receive buffer is reused at once.
            job = _handler.PrepareCopy(header.Opcode, body, _closed.Token);
        }
        catch (Exception ex) when (RequestHandler.TryMapError(ex, out ErrorCode code, out string message))
        {
            WriteError(header.Opcode, header.RequestId, code, message);
            return;
        }

        // Back-pressure: stop reading while too many copies or copy bytes of this connection are in flight.
        _copySlots.Wait();
        long bytes = job.Bytes;
        lock (_bytesLock)
        {
            while (_inFlightBytes > 0 && _inFlightBytes + bytes > _options.MaxInFlightBytesPerConnection && !_closing)
            {
                Monitor.Wait(_bytesLock, 100);
            }

            _inFlightBytes += bytes;
        }

        _inFlight.AddCount();
        if (!_copyThreads.Post(() => RunCopy(header, job, bytes)))
        {
            EndCopy(bytes);
            WriteError(header.Opcode, header.RequestId, ErrorCode.ShuttingDown, "the sidecar is stopping");
        }
    }

    private void RunCopy(FrameHeader header, CopyJob job, long bytes)
    {
        ValueTask<object> pending;
        try
        {
            pending = _handler.RunCopyAsync(job);
        }
        catch (Exception ex)
        {
            FinishCopy(header, null, ex, bytes);
            return;
        }

        if (pending.IsCompletedSuccessfully)
        {
            FinishCopy(header, pending.Result, null, bytes);
            return;
        }

        // A GPU copy completes on its stream: the copy thread goes back to work, and the reply follows the completion.
        _ = AwaitCopyAsync(header, pending, bytes);
    }

    private async Task AwaitCopyAsync(FrameHeader header, ValueTask<object> pending, long bytes)
    {
        object? reply = null;
        Exception? failure = null;
        try
        {
            reply = await pending.ConfigureAwait(false);
        }
        catch (Exception ex)
        {
            failure = ex;
        }

        FinishCopy(header, reply, failure, bytes);
    }

    /// <summary>Sends a copy's reply (or its error) and ends its accounting, exactly once, whatever happens.</summary>
    private void FinishCopy(FrameHeader header, object? reply, Exception? failure, long bytes)
    {
        try
        {
            if (failure is not null)
            {
                CopyFailed(header, failure);
                return;
            }

            var frame = new ArrayBufferWriter<byte>(64);
            new FrameWriter().WriteReply(frame, header.Opcode, header.RequestId, reply!);
            Enqueue(frame.WrittenSpan.ToArray());
        }
        catch (Exception ex)
        {
            try
            {
                CopyFailed(header, ex);
            }
            catch (Exception inner) when (inner is ObjectDisposedException or InvalidOperationException)
            {
                // The connection is gone; nobody reads the error.
            }
        }
        finally
        {
            EndCopy(bytes);
        }
    }

    private void CopyFailed(FrameHeader header, Exception ex)
    {
        if (RequestHandler.TryMapError(ex, out ErrorCode code, out string message))
        {
            WriteError(header.Opcode, header.RequestId, code, message, fromCopyThread: true);
            return;
        }

        SidecarLog.HandlerFailed(_logger, ex, SessionId, header.RequestId, header.Opcode.ToString());
        WriteError(header.Opcode, header.RequestId, ErrorCode.Internal, ex.Message, fromCopyThread: true);
    }

    private void EndCopy(long bytes)
    {
        try
        {
            lock (_bytesLock)
            {
                _inFlightBytes -= bytes;
                Monitor.PulseAll(_bytesLock);
            }

            _copySlots.Release();
            _inFlight.Signal();
        }
        catch (Exception ex) when (ex is ObjectDisposedException or InvalidOperationException)
        {
            // The connection gave up waiting for this copy (shutdown timeout) and is gone.
        }
    }

    private void FailStream(ErrorCode code, Opcode opcode, ulong requestId, string message)
    {
        SidecarLog.StreamUnusable(_logger, SessionId, code.ToString());
        WriteError(opcode, requestId, code, message);
    }

    private void WriteError(Opcode opcode, ulong requestId, ErrorCode code, string message, bool fromCopyThread = false)
    {
        _counters.ProtocolError(code);
        SidecarLog.ProtocolError(_logger, SessionId, code.ToString(), requestId, message);
        if (fromCopyThread)
        {
            var frame = new ArrayBufferWriter<byte>(128);
            new FrameWriter().WriteError(frame, opcode, requestId, code, message);
            Enqueue(frame.WrittenSpan.ToArray());
            return;
        }

        lock (_sendLock)
        {
            _inlineReply.ResetWrittenCount();
            _frameWriter.WriteError(_inlineReply, opcode, requestId, code, message);
            SendLocked(_inlineReply.WrittenSpan);
        }
    }

    /// <summary>Queues a copy's reply for the writer thread: a copy thread never blocks on a client's socket.</summary>
    private void Enqueue(byte[] frame)
    {
        // A copy that outlived the connection (shutdown gave up waiting for it) has nobody to answer.
        if (Volatile.Read(ref _dropped) != 0 || _disposed)
        {
            return;
        }

        if (Interlocked.Add(ref _outboundBytes, frame.Length) > _options.MaxOutboundBytesPerConnection)
        {
            Drop($"more than {_options.MaxOutboundBytesPerConnection} bytes of replies unread");
            return;
        }

        _outbound.Enqueue(frame);
        if (_writer is null)
        {
            var writer = new Thread(WriteLoop, 64 * 1024) { IsBackground = true, Name = $"kvsidecar-send-{SessionId}" };
            if (Interlocked.CompareExchange(ref _writer, writer, null) is null)
            {
                writer.Start();
            }
        }

        try
        {
            _outboundReady.Release();
        }
        catch (ObjectDisposedException)
        {
            // Disposed between the check above and here.
        }
    }

    private void WriteLoop()
    {
        try
        {
            while (true)
            {
                _outboundReady.Wait();
                while (_outbound.TryDequeue(out byte[]? frame))
                {
                    lock (_sendLock)
                    {
                        SendLocked(frame);
                    }

                    Interlocked.Add(ref _outboundBytes, -frame.Length);
                }

                if (_closing && _outbound.IsEmpty && InFlight == 0)
                {
                    return;
                }
            }
        }
        catch (ObjectDisposedException)
        {
            // The connection is gone.
        }
    }

    /// <summary>Sends a whole frame within <see cref="SidecarOptions.SendTimeout"/>; a client that does not read is dropped.</summary>
    private void SendLocked(ReadOnlySpan<byte> bytes)
    {
        if (Volatile.Read(ref _dropped) != 0)
        {
            return;
        }

        try
        {
            while (!bytes.IsEmpty)
            {
                bytes = bytes[_socket.Send(bytes)..];
            }
        }
        catch (SocketException ex) when (ex.SocketErrorCode is SocketError.TimedOut or SocketError.WouldBlock)
        {
            Drop($"it did not read its replies for {_options.SendTimeout.TotalSeconds:0.###} s");
        }
        catch (Exception ex) when (ex is SocketException or ObjectDisposedException)
        {
            // The peer is gone; the read loop notices and closes.
        }
    }

    /// <summary>Closes a connection that misbehaves: its copies stop and its reader wakes up and ends.</summary>
    private void Drop(string reason)
    {
        if (Interlocked.Exchange(ref _dropped, 1) != 0)
        {
            return;
        }

        _counters.Dropped();
        SidecarLog.ConnectionDropped(_logger, SessionId, _handler.Peer.ToString(), reason);
        _closing = true;
        try
        {
            _closed.Cancel();
            _socket.Shutdown(SocketShutdown.Both);
        }
        catch (Exception ex) when (ex is SocketException or ObjectDisposedException)
        {
            // Already closed.
        }
    }
}
