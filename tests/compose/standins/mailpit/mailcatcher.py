"""Stand-in for axllent/mailpit (scripts/compose-check): SMTP on 1025 accepting every message, and
on 8025 a page listing them (newest first, bodies shown) and the subset of Mailpit's API the check
reads: GET /api/v1/messages -> {"total": n, "messages": [{"ID", "Subject", "From", "To",
"Snippet"}]}. Standard library only; messages live in memory."""

import asyncio
import email
import email.policy
import html
import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

messages = []
lock = threading.Lock()


async def session(reader, writer):
    async def reply(line):
        writer.write(line.encode() + b"\r\n")
        await writer.drain()

    await reply("220 mailcatcher ESMTP")
    sender, recipients = "", []
    while True:
        line = await reader.readline()
        if not line:
            break
        command = line.decode(errors="replace").rstrip("\r\n")
        upper = command.upper()
        if upper.startswith(("EHLO", "HELO")):
            await reply("250-mailcatcher\r\n250 8BITMIME")
        elif upper.startswith("MAIL FROM:"):
            sender, recipients = command[10:].strip(), []
            await reply("250 OK")
        elif upper.startswith("RCPT TO:"):
            recipients.append(command[8:].strip())
            await reply("250 OK")
        elif upper == "DATA":
            await reply("354 go ahead")
            data = bytearray()
            while True:
                chunk = await reader.readline()
                if not chunk or chunk == b".\r\n":
                    break
                data += chunk[1:] if chunk.startswith(b".") else chunk
            store(sender, recipients, bytes(data))
            await reply("250 OK queued")
        elif upper in ("RSET", "NOOP"):
            await reply("250 OK")
        elif upper == "QUIT":
            await reply("221 bye")
            break
        else:
            await reply("502 not implemented")
    writer.close()


def store(sender, recipients, data):
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    body = parsed.get_body(preferencelist=("plain",))
    text = body.get_content() if body is not None else ""
    with lock:
        messages.append({
            "ID": str(uuid.uuid4()),
            "Subject": str(parsed.get("Subject", "")),
            "From": {"Address": sender.strip("<>")},
            "To": [{"Address": r.strip("<>")} for r in recipients],
            "Snippet": " ".join(text.split())[:250],
            "Text": text,
        })


class Web(BaseHTTPRequestHandler):
    def do_GET(self):
        with lock:
            newest = list(reversed(messages))
        if self.path.startswith("/api/v1/messages"):
            listed = [{k: v for k, v in m.items() if k != "Text"} for m in newest]
            self.send(200, "application/json", json.dumps({"total": len(newest), "messages": listed}))
            return
        if self.path in ("/", "/index.html"):
            rows = "".join(
                f"<article><h2>{html.escape(m['Subject'])}</h2>"
                f"<p>to {html.escape(', '.join(t['Address'] for t in m['To']))}</p>"
                f"<pre>{html.escape(m['Text'])}</pre></article>"
                for m in newest
            ) or "<p>No messages yet.</p>"
            self.send(200, "text/html; charset=utf-8",
                      f"<!doctype html><title>Mail catcher</title><h1>Mail catcher</h1>{rows}")
            return
        self.send(404, "text/plain", "not found\n")

    def send(self, status, content_type, text):
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


async def main():
    web = ThreadingHTTPServer(("0.0.0.0", 8025), Web)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    server = await asyncio.start_server(session, "0.0.0.0", 1025)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
