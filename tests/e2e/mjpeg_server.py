"""A real MJPEG-over-HTTP camera for the tests, as many IP cameras serve one:
multipart/x-mixed-replace JPEG parts at about 10 frames/s behind HTTP Basic auth.

    python mjpeg_server.py PORT USER PASSWORD

Prints READY once listening; serves until killed. Each frame is a moving bright bar with
its frame number written on it, so consecutive frames differ.
"""

from __future__ import annotations

import base64
import http.server
import socketserver
import sys
import time

import cv2
import numpy as np

BOUNDARY = b"frame"


def picture(index: int) -> bytes:
    image = np.full((240, 320, 3), 90, np.uint8)
    x = (index * 12) % 320
    cv2.rectangle(image, (x, 60), (x + 40, 180), (230, 220, 210), -1)
    cv2.putText(image, str(index), (10, 40), cv2.FONT_HERSHEY_SIMPLEX, 1.0, (20, 20, 240), 2)
    ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 85])
    assert ok
    return jpeg.tobytes()


def handler_for(user: str, password: str) -> type:
    expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.headers.get("Authorization") != expected:
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="camera"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={BOUNDARY.decode()}")
            self.end_headers()
            index = 0
            try:
                while True:
                    data = picture(index)
                    self.wfile.write(b"--" + BOUNDARY + b"\r\nContent-Type: image/jpeg\r\nContent-Length: "
                                     + str(len(data)).encode() + b"\r\n\r\n" + data + b"\r\n")
                    index += 1
                    time.sleep(0.1)
            except (BrokenPipeError, ConnectionResetError):
                return

        def log_message(self, *args: object) -> None:
            return

    return Handler


def main() -> None:
    port, user, password = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    server = socketserver.ThreadingTCPServer(("127.0.0.1", port), handler_for(user, password))
    server.daemon_threads = True
    print("READY", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
