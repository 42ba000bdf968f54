# A hostile OpenAI-compatible server for outsider attacks (docs/chaos.md, "A hostile model").
# Usage: python3 chaos/hostile-llm/llm.py PORT; the last user message "MODE:<mode> ..." picks the answer:
# garbage, html, empty, stall, truncated, huge, slow500, anything else a normal one-chunk answer.
# GET / returns the calls per mode.
import json, sys, time, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
calls = {}
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def do_POST(self):
        n = int(self.headers.get("content-length", 0)); body = json.loads(self.rfile.read(n))
        text = [m for m in body["messages"] if m["role"] == "user"][-1]["content"]
        mode = text.split(":", 1)[1] if text.startswith("MODE:") else "ok"
        mode = mode.split()[0]
        calls[mode] = calls.get(mode, 0) + 1
        stream = body.get("stream", False)
        def send(status, ctype, data, length=True):
            self.send_response(status); self.send_header("content-type", ctype)
            if length: self.send_header("content-length", str(len(data)))
            self.end_headers(); self.wfile.write(data); self.wfile.flush()
        if mode == "garbage":      # 200, an event stream of non-JSON
            send(200, "text/event-stream", b"data: {not json at all\n\ndata: \x00\x01\x02\n\ndata: [DONE]\n\n")
        elif mode == "html":       # 200, an HTML page
            send(200, "text/html", b"<html><body>502 Bad Gateway</body></html>")
        elif mode == "empty":      # 200, no choices
            send(200, "application/json", b'{"id":"x","object":"chat.completion","choices":[]}')
        elif mode == "stall":      # headers, then nothing, forever (until the client gives up)
            self.send_response(200); self.send_header("content-type", "text/event-stream"); self.end_headers(); self.wfile.flush()
            time.sleep(600)
        elif mode == "truncated":  # a stream cut in the middle of a chunk
            self.send_response(200); self.send_header("content-type", "text/event-stream"); self.send_header("content-length", "100000"); self.end_headers()
            self.wfile.write(b'data: {"id":"x","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"half an ans'); self.wfile.flush()
            self.close_connection = True
        elif mode == "huge":       # a 2 MB answer of control characters and emoji, streamed
            piece = ("\u0000\u202e\U0001F600<script>alert(1)</script>\"\\" * 20)
            self.send_response(200); self.send_header("content-type", "text/event-stream"); self.end_headers()
            for i in range(1000):
                c = {"id":"x","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":piece},"finish_reason":None}]}
                self.wfile.write(b"data: " + json.dumps(c).encode() + b"\n\n")
            self.wfile.write(b"data: [DONE]\n\n"); self.wfile.flush(); self.close_connection = True
        elif mode == "slow500":    # 500s (retryable) every time
            send(500, "application/json", b'{"error":{"message":"boom"}}')
        else:
            c = {"id":"x","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"fine"},"finish_reason":"stop"}]}
            self.send_response(200); self.send_header("content-type", "text/event-stream"); self.end_headers()
            self.wfile.write(b"data: " + json.dumps(c).encode() + b"\n\ndata: [DONE]\n\n"); self.wfile.flush(); self.close_connection = True
    def do_GET(self):
        d = json.dumps(calls).encode(); self.send_response(200); self.send_header("content-length", str(len(d))); self.end_headers(); self.wfile.write(d)
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
