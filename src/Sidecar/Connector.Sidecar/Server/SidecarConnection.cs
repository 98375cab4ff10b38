using System.Buffers;
using System.Net.Sockets;
using Connector.Core.Caching;
using Connector.Protocol.Framing;
using Microsoft.Extensions.Logging;

namespace Connector.Sidecar.Server;

/// <summary>
/// One engine connection on a thread of its own: blocking reads, quick requests answered inline,
/// STORE and LOAD copies run on the thread pool and answered when they finish (out of order, by id).
/// </summary>
/// <remarks>
/// A sidecar serves a handful of long-lived connections (a scheduler and a worker per rank per engine),
/// so a thread per connection costs little and saves the two thread hops an async loop pays on every
/// request: the LOOKUP round trip is what the scheduler waits for.
/// </remarks>
internal sealed class SidecarConnection : IDisposable
{
    private const int InitialBufferBytes = 64 * 1024;

    private readonly Socket _socket;
    private readonly Lock _writeLock = new();
    private readonly ArrayBufferWriter<byte> _writeBuffer = new(4096);
    private readonly FrameWriter _frameWriter = new();
    private readonly SemaphoreSlim _copySlots;
    private readonly CountdownEvent _inFlight = new(1);
    private readonly ServerCounters _counters;
    private readonly SidecarOptions _options;
    private readonly ILogger _logger;
    private readonly RequestHandler _handler;
    private volatile bool _closing;

    public SidecarConnection(long sessionId, Socket socket, KvCacheService cache, ServerCounters counters, SidecarOptions options, ILogger logger)
    {
        SessionId = sessionId;
        _socket = socket;
        _counters = counters;
        _options = options;
        _logger = logger;
        _copySlots = new SemaphoreSlim(options.MaxInFlightPerConnection, options.MaxInFlightPerConnection);
        _handler = new RequestHandler(sessionId, cache, counters, options, logger);
    }

    public long SessionId { get; }

    /// <summary>STORE and LOAD copies running now.</summary>
    public int InFlight => Math.Max(0, _inFlight.CurrentCount - 1);

    /// <summary>Serves the connection until the peer closes it, the stream breaks, or the server stops; then waits for in-flight copies.</summary>
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
            // The peer went away or we are stopping: in-flight copies still finish below.
        }
        finally
        {
            _closing = true;
            _inFlight.Signal();
            _inFlight.Wait(_options.ShutdownTimeout);
            _socket.Dispose();
            _counters.Closed();
            SidecarLog.ConnectionClosed(_logger, SessionId, _handler.Role, _handler.InstanceId, _handler.Rank);
        }
    }

    /// <summary>Stops reading new requests; <see cref="Run"/> then drains in-flight copies and closes.</summary>
    public void Stop()
    {
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
        _socket.Dispose();
        _copySlots.Dispose();
        _inFlight.Dispose();
    }

    private void ReadLoop()
    {
        byte[] buffer = ArrayPool<byte>.Shared.Rent(InitialBufferBytes);
        int start = 0, end = 0;
        try
        {
            while (!_closing)
            {
                if (end == buffer.Length)
                {
                    // Make room: slide the partial frame to the front, or grow for a large frame.
                    int pending = end - start;
                    byte[] target = pending > buffer.Length / 2 ? ArrayPool<byte>.Shared.Rent(buffer.Length * 2) : buffer;
                    Buffer.BlockCopy(buffer, start, target, 0, pending);
                    if (!ReferenceEquals(target, buffer))
                    {
                        ArrayPool<byte>.Shared.Return(buffer);
                        buffer = target;
                    }

                    start = 0;
                    end = pending;
                }

                int read = _socket.Receive(buffer, end, buffer.Length - end, SocketFlags.None);
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

    /// <summary>Grows the buffer when a frame whose header is already known will not fit.</summary>
    private static void EnsureRoom(ref byte[] buffer, ref int start, ref int end, in FrameHeader header, in ReadOnlySequence<byte> pending)
    {
        if (pending.Length < FrameHeader.Size)
        {
            return;
        }

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
            CopyJob job;
            try
            {
                // Decoded here: the job owns its arrays, the receive buffer is reused at once.
                job = _handler.PrepareCopy(header.Opcode, body);
            }
            catch (Exception ex) when (RequestHandler.TryMapError(ex, out ErrorCode code, out string message))
            {
                WriteError(header.Opcode, header.RequestId, code, message);
                return;
            }

            // Back-pressure: stop reading while too many copies of this connection are running.
            _copySlots.Wait();
            _inFlight.AddCount();
            ThreadPool.UnsafeQueueUserWorkItem(_ => RunCopy(header, job), null);
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

        WriteFrame(w => _frameWriter.WriteReply(w, header.Opcode, header.RequestId, reply));
    }

    private void RunCopy(FrameHeader header, CopyJob job)
    {
        try
        {
            object reply = _handler.RunCopy(job);
            WriteFrame(w => _frameWriter.WriteReply(w, header.Opcode, header.RequestId, reply));
        }
        catch (Exception ex) when (RequestHandler.TryMapError(ex, out ErrorCode code, out string message))
        {
            WriteError(header.Opcode, header.RequestId, code, message);
        }
        catch (Exception ex) when (ex is not (SocketException or ObjectDisposedException))
        {
            SidecarLog.HandlerFailed(_logger, ex, SessionId, header.RequestId, header.Opcode.ToString());
            WriteError(header.Opcode, header.RequestId, ErrorCode.Internal, ex.Message);
        }
        catch (Exception)
        {
            // The engine hung up before its reply: the copy itself finished or was rolled back.
        }
        finally
        {
            try
            {
                _copySlots.Release();
                _inFlight.Signal();
            }
            catch (Exception ex) when (ex is ObjectDisposedException or InvalidOperationException)
            {
                // The connection gave up waiting for this copy (shutdown timeout) and is gone.
            }
        }
    }

    private void FailStream(ErrorCode code, Opcode opcode, ulong requestId, string message)
    {
        SidecarLog.StreamUnusable(_logger, SessionId, code.ToString());
        WriteError(opcode, requestId, code, message);
    }

    private void WriteError(Opcode opcode, ulong requestId, ErrorCode code, string message)
    {
        _counters.ProtocolError();
        SidecarLog.ProtocolError(_logger, SessionId, code.ToString(), requestId, message);
        WriteFrame(w => _frameWriter.WriteError(w, opcode, requestId, code, message));
    }

    private void WriteFrame(Action<IBufferWriter<byte>> write)
    {
        lock (_writeLock)
        {
            _writeBuffer.ResetWrittenCount();
            write(_writeBuffer);
            try
            {
                ReadOnlySpan<byte> bytes = _writeBuffer.WrittenSpan;
                while (!bytes.IsEmpty)
                {
                    bytes = bytes[_socket.Send(bytes)..];
                }
            }
            catch (Exception ex) when (ex is SocketException or ObjectDisposedException)
            {
                // The peer is gone; the read loop notices and closes.
            }

            if (_writeBuffer.Capacity > 1 << 20)
            {
                _writeBuffer.Clear();
            }
        }
    }
}
