using System.Buffers;
using System.IO.Pipelines;
using System.Net.Sockets;
using Connector.Core.Caching;
using Connector.Protocol.Framing;
using Microsoft.Extensions.Logging;

namespace Connector.Sidecar.Server;

/// <summary>
/// One engine connection: reads frames, answers quick requests inline, runs STORE and LOAD copies on
/// the thread pool and writes their replies when they finish (out of order, by request id).
/// </summary>
internal sealed class SidecarConnection : IDisposable
{
    private readonly Socket _socket;
    private readonly NetworkStream _stream;
    private readonly PipeReader _reader;
    private readonly PipeWriter _writer;
    private readonly SemaphoreSlim _writeLock = new(1, 1);
    private readonly SemaphoreSlim _copySlots;
    private readonly FrameWriter _frameWriter = new();
    private readonly ServerCounters _counters;
    private readonly SidecarOptions _options;
    private readonly ILogger _logger;
    private readonly RequestHandler _handler;
    private int _inFlight;
    private TaskCompletionSource? _drained;

    public SidecarConnection(long sessionId, Socket socket, KvCacheService cache, ServerCounters counters, SidecarOptions options, ILogger logger)
    {
        SessionId = sessionId;
        _socket = socket;
        _stream = new NetworkStream(socket, ownsSocket: true);
        _reader = PipeReader.Create(_stream, new StreamPipeReaderOptions(bufferSize: 64 * 1024, minimumReadSize: 16 * 1024));
        _writer = PipeWriter.Create(_stream, new StreamPipeWriterOptions(minimumBufferSize: 4096));
        _counters = counters;
        _options = options;
        _logger = logger;
        _copySlots = new SemaphoreSlim(options.MaxInFlightPerConnection, options.MaxInFlightPerConnection);
        _handler = new RequestHandler(sessionId, cache, counters, options);
    }

    public long SessionId { get; }

    /// <summary>STORE and LOAD copies running now.</summary>
    public int InFlight => Volatile.Read(ref _inFlight);

    public async Task RunAsync(CancellationToken stopping)
    {
        _counters.Opened();
        SidecarLog.ConnectionOpened(_logger, SessionId);
        try
        {
            await ReadLoopAsync(stopping).ConfigureAwait(false);
        }
        catch (Exception ex) when (ex is OperationCanceledException or IOException or SocketException or ObjectDisposedException)
        {
            // The peer went away or we are stopping: in-flight copies still finish below.
        }
        finally
        {
            await WaitForCopiesAsync(CancellationToken.None).ConfigureAwait(false);
            await _reader.CompleteAsync().ConfigureAwait(false);
            await CloseWriterAsync().ConfigureAwait(false);
            _counters.Closed();
            SidecarLog.ConnectionClosed(_logger, SessionId, _handler.Role, _handler.InstanceId, _handler.Rank);
        }
    }

    /// <summary>Stops reading new requests, waits for in-flight copies (bounded by the token), then closes.</summary>
    public async Task DrainAndCloseAsync(CancellationToken timeout)
    {
        _reader.CancelPendingRead();
        try
        {
            await WaitForCopiesAsync(timeout).ConfigureAwait(false);
        }
        catch (OperationCanceledException)
        {
            // Shutdown timeout: close anyway.
        }

        _socket.Dispose();
    }

    public void Dispose()
    {
        _stream.Dispose();
        _writeLock.Dispose();
        _copySlots.Dispose();
    }

    private async Task ReadLoopAsync(CancellationToken stopping)
    {
        while (!stopping.IsCancellationRequested)
        {
            ReadResult result = await _reader.ReadAsync(stopping).ConfigureAwait(false);
            if (result.IsCanceled)
            {
                return;
            }

            ReadOnlySequence<byte> buffer = result.Buffer;
            bool keepGoing = true;
            while (keepGoing)
            {
                FrameReadResult status = FrameReader.TryReadFrame(ref buffer, _options.MaxFrameBytes, out FrameHeader header, out ReadOnlySequence<byte> body);
                switch (status)
                {
                    case FrameReadResult.Done:
                        await DispatchAsync(header, body).ConfigureAwait(false);
                        break;
                    case FrameReadResult.NeedMoreData:
                        keepGoing = false;
                        break;
                    case FrameReadResult.TooLarge:
                        await FailStreamAsync(ErrorCode.FrameTooLarge, header.RequestId, $"frame body of {header.BodyLength} bytes exceeds the limit of {_options.MaxFrameBytes}").ConfigureAwait(false);
                        return;
                    default:
                        await FailStreamAsync(ErrorCode.BadFrame, 0, "malformed frame header (magic, reserved bits or flags)").ConfigureAwait(false);
                        return;
                }
            }

            _reader.AdvanceTo(buffer.Start, buffer.End);
            if (result.IsCompleted)
            {
                return;
            }
        }
    }

    private async ValueTask DispatchAsync(FrameHeader header, ReadOnlySequence<byte> body)
    {
        if (header.Version != FrameHeader.CurrentVersion)
        {
            await WriteErrorAsync(header.Opcode, header.RequestId, ErrorCode.UnsupportedVersion, $"frame version {header.Version} is not supported; this sidecar speaks version {FrameHeader.CurrentVersion}").ConfigureAwait(false);
            return;
        }

        if (RequestHandler.IsCopy(header.Opcode) && _handler.IsReady)
        {
            // Decode now (the body buffer is released when we return), copy on the thread pool.
            CopyJob job;
            try
            {
                job = _handler.PrepareCopy(header.Opcode, body);
            }
            catch (Exception ex) when (RequestHandler.TryMapError(ex, out ErrorCode code, out string message))
            {
                await WriteErrorAsync(header.Opcode, header.RequestId, code, message).ConfigureAwait(false);
                return;
            }

            await _copySlots.WaitAsync().ConfigureAwait(false);
            Interlocked.Increment(ref _inFlight);
            _ = Task.Run(() => RunCopyAsync(header, job));
            return;
        }

        object reply;
        try
        {
            reply = _handler.Handle(header.Opcode, body);
        }
        catch (Exception ex) when (RequestHandler.TryMapError(ex, out ErrorCode code, out string message))
        {
            await WriteErrorAsync(header.Opcode, header.RequestId, code, message).ConfigureAwait(false);
            return;
        }
        catch (Exception ex)
        {
            SidecarLog.HandlerFailed(_logger, ex, SessionId, header.RequestId, header.Opcode.ToString());
            await WriteErrorAsync(header.Opcode, header.RequestId, ErrorCode.Internal, ex.Message).ConfigureAwait(false);
            return;
        }

        await WriteReplyAsync(header.Opcode, header.RequestId, reply).ConfigureAwait(false);
    }

    private async Task RunCopyAsync(FrameHeader header, CopyJob job)
    {
        try
        {
            object reply;
            try
            {
                reply = _handler.RunCopy(job);
            }
            catch (Exception ex) when (RequestHandler.TryMapError(ex, out ErrorCode code, out string message))
            {
                await WriteErrorAsync(header.Opcode, header.RequestId, code, message).ConfigureAwait(false);
                return;
            }
            catch (Exception ex)
            {
                SidecarLog.HandlerFailed(_logger, ex, SessionId, header.RequestId, header.Opcode.ToString());
                await WriteErrorAsync(header.Opcode, header.RequestId, ErrorCode.Internal, ex.Message).ConfigureAwait(false);
                return;
            }

            await WriteReplyAsync(header.Opcode, header.RequestId, reply).ConfigureAwait(false);
        }
        catch (Exception ex) when (ex is IOException or SocketException or ObjectDisposedException or InvalidOperationException)
        {
            // The engine hung up before its reply: the copy itself is complete and consistent.
        }
        finally
        {
            _copySlots.Release();
            if (Interlocked.Decrement(ref _inFlight) == 0)
            {
                Volatile.Read(ref _drained)?.TrySetResult();
            }
        }
    }

    private async Task WaitForCopiesAsync(CancellationToken timeout)
    {
        if (InFlight == 0)
        {
            return;
        }

        var drained = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        Interlocked.CompareExchange(ref _drained, drained, null);
        if (InFlight == 0)
        {
            return;
        }

        await _drained!.Task.WaitAsync(timeout).ConfigureAwait(false);
    }

    private async ValueTask FailStreamAsync(ErrorCode code, ulong requestId, string message)
    {
        _counters.ProtocolError();
        SidecarLog.StreamUnusable(_logger, SessionId, code.ToString());
        try
        {
            await WriteErrorAsync(Opcode.Hello, requestId, code, message, countError: false).ConfigureAwait(false);
        }
        catch (Exception ex) when (ex is IOException or SocketException or ObjectDisposedException)
        {
            // Best effort only.
        }
    }

    private async ValueTask WriteReplyAsync(Opcode opcode, ulong requestId, object reply)
    {
        await _writeLock.WaitAsync().ConfigureAwait(false);
        try
        {
            _frameWriter.WriteReply(_writer, opcode, requestId, reply);
            await _writer.FlushAsync().ConfigureAwait(false);
        }
        finally
        {
            _writeLock.Release();
        }
    }

    private async ValueTask WriteErrorAsync(Opcode opcode, ulong requestId, ErrorCode code, string message, bool countError = true)
    {
        if (countError)
        {
            _counters.ProtocolError();
            SidecarLog.ProtocolError(_logger, SessionId, code.ToString(), requestId, message);
        }

        await _writeLock.WaitAsync().ConfigureAwait(false);
        try
        {
            _frameWriter.WriteError(_writer, opcode, requestId, code, message);
            await _writer.FlushAsync().ConfigureAwait(false);
        }
        finally
        {
            _writeLock.Release();
        }
    }

    private async ValueTask CloseWriterAsync()
    {
        await _writeLock.WaitAsync().ConfigureAwait(false);
        try
        {
            await _writer.CompleteAsync().ConfigureAwait(false);
        }
        catch (Exception ex) when (ex is IOException or SocketException or ObjectDisposedException)
        {
            // The peer is gone.
        }
        finally
        {
            _writeLock.Release();
            _socket.Dispose();
        }
    }
}
