"""A small real HTTP server standing in for llama-server: it records each request and answers
chat completions with a tool call, to show what lalo passes through unchanged.

    python recording_server.py --port P [any llama-server flags]   (RECORD_TO=FILE.jsonl)

POST /v1/chat/completions: the request's JSON is appended to $RECORD_TO; the answer calls
the first tool of the request with {"city": "Paris"} (streamed as SSE when asked), or, when
the last message is a tool result, says "The tool said: RESULT".
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TOOL_CALL = {"id": "call_lalo_1", "type": "function",
             "function": {"name": "", "arguments": '{"city": "Paris"}'}}


def answer(request: dict[str, Any]) -> dict[str, Any]:
    last = request["messages"][-1]
    if last.get("role") == "tool":
        message: dict[str, Any] = {"role": "assistant", "content": f"The tool said: {last['content']}"}
        reason = "stop"
    else:
        call = json.loads(json.dumps(TOOL_CALL))
        call["function"]["name"] = request["tools"][0]["function"]["name"]
        message = {"role": "assistant", "content": None, "tool_calls": [call]}
        reason = "tool_calls"
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": request["model"],
            "choices": [{"index": 0, "message": message, "finish_reason": reason}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args, _unknown = parser.parse_known_args()
    record = os.environ.get("RECORD_TO")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self._send(200, b'{"status":"ok"}', "application/json")

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            request = json.loads(body)
            if record:
                with open(record, "a", encoding="utf-8") as out:
                    out.write(json.dumps({"path": self.path, "body": request}) + "\n")
            reply = answer(request)
            if not request.get("stream"):
                self._send(200, json.dumps(reply).encode(), "application/json")
                return
            choice = reply["choices"][0]
            delta = {key: value for key, value in choice["message"].items() if value is not None}
            events = [
                {**reply, "object": "chat.completion.chunk",
                 "choices": [{"index": 0, "delta": delta, "finish_reason": None}]},
                {**reply, "object": "chat.completion.chunk",
                 "choices": [{"index": 0, "delta": {}, "finish_reason": choice["finish_reason"]}]},
            ]
            for event in events:
                for call in event["choices"][0]["delta"].get("tool_calls", []):
                    call["index"] = 0
            stream = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
            self._send(200, stream + b"data: [DONE]\n\n", "text/event-stream")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("content-type", content_type)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *items: object) -> None:
            sys.stdout.write("recording: " + format % items + "\n")
            sys.stdout.flush()

    server = ThreadingHTTPServer((args.host, args.port), Handler)
    print(f"recording: listening on {args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
