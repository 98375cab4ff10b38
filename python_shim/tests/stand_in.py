"""A sidecar stand-in on a real Unix socket for the shim's tests: it decides when HELLO is answered, whether
requests are read, and what each opcode is answered."""

import os
import socket
import threading

from csharp_kv import protocol as p


class StandIn:
    """Accepts connections; answers HELLO once ``hello`` is set; answers other requests while ``reading`` is set
    (``replies`` maps an opcode to its reply fields; STORE gets an empty store reply and anything else an empty
    body by default), and stops reading from its sockets when ``reading`` is cleared."""

    def __init__(self, path, replies=None):
        self.path = path
        self.replies = {p.Opcode.STORE: [0, 0, 0], **(replies or {})}
        self.hello = threading.Event()
        self.reading = threading.Event()
        self.reading.set()
        self.connections = 0
        self.requests = []
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(path)
        self._server.listen(8)
        self._socks = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            self.connections += 1
            self._socks.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        buf = b""
        try:
            while True:
                self.reading.wait()
                data = conn.recv(1 << 16)
                if not data:
                    return
                buf += data
                while len(buf) >= p.HEADER_SIZE:
                    h = p.decode_header(buf)
                    if len(buf) < p.HEADER_SIZE + h.body_length:
                        break
                    buf = buf[p.HEADER_SIZE + h.body_length:]
                    if h.opcode == p.Opcode.HELLO:
                        self.hello.wait()
                        fields = [1, "stand-in", [], 64 << 20, 1, os.getpid()]
                    else:
                        self.requests.append(h.opcode)
                        fields = self.replies.get(h.opcode, [])
                    conn.sendall(p.encode_frame(h.opcode, h.request_id, fields, flags=p.FLAG_REPLY))
        except OSError:
            return

    def drop_all(self):
        for s in self._socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        self._socks.clear()

    def close(self):
        self._server.close()
        self.drop_all()
